"""Registers and spills of every kernel launch fused_loss / fused_linear_loss would make on an
H100 (sm_90a), and of every launch candidate a GPU run compares, compiled ahead of time on this
machine (no GPU needed; CI runs it: ``tests/kernels/test_kernel_resources.py``).

    python benchmarks/kernel_resources.py

One row per (kernel, V path, dtype): launch shape (BLOCK_V, num_warps), registers per thread,
spill bytes, and the CTAs per SM the register file allows (65536 registers and 64 warps per SM;
shared memory, which the pipelined loops use, is not counted).
"""
from __future__ import annotations

import sys

import torch
import triton

from fastfuse.kernels import divergence, fused_ce
from fastfuse.testing import aot
from fastfuse.kernels.launch import forced


def launches():
    for V in (32000, 128256, 262144):
        for dtype in (torch.bfloat16, torch.float32):
            for kernel, args, kwargs in aot.fused_loss_launches(V, dtype, inplace_grad=True, Vs=100):
                if kernel is fused_ce.fused_ce_kernel or (V == 32000 and dtype == torch.bfloat16):
                    yield f"fused_loss V={V}", dtype if kernel is fused_ce.fused_ce_kernel else None, kernel, args, kwargs
    for name in ["2pass_v1"] + fused_ce.CANDIDATES["two_pass"][1:]:    # the previous launch, the candidates
        for dtype in (torch.bfloat16, torch.float32):
            with forced("fused_ce", name):
                launches = aot.fused_loss_launches(128256, dtype, inplace_grad=True, Vs=100)
            for kernel, args, kwargs in launches:
                if kernel is fused_ce.fused_ce_kernel:
                    yield f"fused_loss V=128256, forced {name}", dtype, kernel, args, kwargs
    from fastfuse.loss.spec import make_spec
    for name in divergence.LAUNCHES:
        for div, tail in (("jsd", "uniform"), ("reverse_kl", "renormalize")):
            with forced("divergence", name):
                kernel, args, kwargs = aot.divergence_launches(128256, torch.bfloat16, make_spec(div, tail))[-1]
            yield f"divergence {div}/{tail} V=128256, {name}", torch.bfloat16, kernel, args, kwargs
    with aot.record_launches(fused_ce.fused_ce_kernel) as rec:
        z = torch.empty(1, 8, 128256, dtype=torch.bfloat16)     # a chunk's logits, overwritten in place
        fused_ce.ce_rows(z, z, torch.zeros(8, 21, dtype=torch.int32), torch.zeros(8, 21),
                         torch.zeros(8, dtype=torch.int64), -100, torch.ones(1), compute_grad=True)
    for kernel, args, kwargs in rec:
        yield "fused_linear_loss chunk V=128256", torch.bfloat16, kernel, args, kwargs
    for name in fused_ce.RESCALES:                                  # backward's grad_output multiply
        with aot.record_launches(fused_ce.rescale_kernel, fused_ce.rescale_row_kernel) as rec, forced("rescale", name):
            fused_ce.rescale_rows_(torch.empty(2, 4, 128256, dtype=torch.bfloat16), torch.ones(8))
        for kernel, args, kwargs in rec:
            yield f"backward rescale V=128256, {name}", torch.bfloat16, kernel, args, kwargs


def main() -> int:
    print(f"Triton {triton.__version__}, target sm_90a (compiled ahead of time, no GPU)\n")
    print("registers and spills: general code / with the 16-divisibility a GPU launch of these shapes gets")
    print("| launch | kernel | dtype | BLOCK | warps | stages | registers | spill st/ld (B) | CTAs/SM by registers |")
    print("|---|---|---|---|---|---|---|---|---|")
    spills = 0
    for what, dtype, kernel, args, kwargs in launches():
        res, al = (aot.ptxas_resources(aot.compile_launch(kernel, args, kwargs, aot.HOPPER, aligned))
                   for aligned in (False, True))
        warps = kwargs.get("num_warps", 4)
        block = kwargs.get("BLOCK_V", kwargs.get("BLOCK_K", kwargs.get("BLOCK")))
        ctas = min(65536 // (max(res["registers"], al["registers"]) * 32 * warps), 64 // warps)  # <= 64 warps/SM
        print(f"| {what} | {kernel.__name__} | {str(dtype).replace('torch.', '') if dtype else '-'} | {block} | {warps} | "
              f"{kwargs.get('NUM_STAGES', '-')} | {res['registers']} / {al['registers']} | "
              f"{res['spill_stores']}/{res['spill_loads']} / {al['spill_stores']}/{al['spill_loads']} | {ctas} |")
        spills += sum(r[k] for r in (res, al) for k in ("spill_stores", "spill_loads"))
    print(f"\n{'no launch spills' if not spills else f'SPILLS: {spills} bytes in all'}")
    return 1 if spills else 0


if __name__ == "__main__":
    sys.exit(main())
