"""Ahead-of-time compilation of the library's kernel launches, on a machine without a GPU.

The interpreter checks the kernels' arithmetic; only the compiler checks types of loop-carried
values, layouts and register pressure. :func:`record_launches` swaps ``JITFunction.run`` for a
recorder, so the real launch wrappers (``fused_loss_rows``...) can run on CPU tensors and yield
the launches they would make (:func:`fused_loss_launches` does it for ``fused_loss``);
:func:`compile_launch` compiles one down to a cubin for a CUDA
target and :func:`ptxas_resources` reads its registers and spills. Used by
``tests/kernels/test_kernels_compile.py`` and ``benchmarks/kernel_resources.py``.
"""
from __future__ import annotations

import contextlib
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

HOPPER = GPUTarget("cuda", 90, 32)
AMPERE = GPUTarget("cuda", 80, 32)


class _Launches(list):
    """The recorded ``(kernel, args, kwargs)`` launches, with their grids beside them."""

    def __init__(self):
        super().__init__()
        self.grids: list = []


@contextlib.contextmanager
def record_launches(*kernels):
    """Within the block, ``kernel[grid](...)`` of each given kernel appends ``(kernel, args,
    kwargs)`` to the yielded list instead of launching (and its grid to the list's ``grids``)."""
    launches = _Launches()
    saved = {k: k.__dict__.get("run") for k in kernels}
    for k in kernels:
        def run(*args, grid, warmup, _k=k, **kwargs):
            launches.append((_k, args, kwargs))
            launches.grids.append(tuple(grid))
        k.run = run
    try:
        yield launches
    finally:
        for k, old in saved.items():
            if old is None:
                del k.run
            else:
                k.run = old


def fused_loss_launches(V: int, dtype, compute_grad: bool = True, inplace_grad: bool = False, *, S: int = 2,
                        B: int = 1, T: int = 4, K: int = 10, Vs: int = 500, seed: int = 0):
    """The launches (sparse teacher, then row kernel) that ``fused_loss`` makes for ``[B, T, V]``
    logits of ``dtype`` and ``S`` sources of top-``K``, recorded on CPU tensors (inputs from
    :func:`fastfuse.testing.random_inputs`, fp16 log-probs as extraction stores them)."""
    import torch

    from fastfuse.loss.torch_path import normalize_weights
    from fastfuse.testing import random_inputs

    from fastfuse.kernels.fused_ce import fused_ce_kernel, fused_loss_rows
    from fastfuse.kernels.sparse_teacher import sparse_teacher_kernel

    d = random_inputs(B=B, T=T, V=V, S=S, K=K, Ts=T, Vs=Vs, dtype=dtype,
                      generator=torch.Generator().manual_seed(seed))
    (ids, logprobs), (pos, vocab) = d["source_topk"], d["align_map"]
    weights = normalize_weights(d["source_weights"], S, B, T, torch.device("cpu")).reshape(S, B * T)
    with record_launches(fused_ce_kernel, sparse_teacher_kernel) as launches:
        fused_loss_rows(d["target_logits"], ids, logprobs.half(), pos, vocab, d["labels"], weights, 0.9, 1.0, -100,
                        torch.tensor(1.0), compute_grad, inplace_grad)
    return launches


def divergence_launches(V: int, dtype, spec, compute_grad: bool = True, *, S: int = 2, B: int = 1, T: int = 4,
                        K: int = 10, Vs: int = 500, seed: int = 0):
    """The launches (tail-mass sparse teacher, then the generic row kernel with its own launch,
    ``fastfuse.kernels.divergence.launch_config``) that ``fused_loss`` makes for a non-default
    :class:`~fastfuse.loss.spec.DivergenceSpec`, recorded on CPU tensors."""
    import torch

    from fastfuse.loss.torch_path import normalize_weights
    from fastfuse.testing import random_inputs

    from fastfuse.kernels.divergence import divergence_kernel, divergence_rows
    from fastfuse.kernels.sparse_teacher import sparse_teacher, sparse_teacher_kernel

    d = random_inputs(B=B, T=T, V=V, S=S, K=K, Ts=T, Vs=Vs, dtype=dtype,
                      generator=torch.Generator().manual_seed(seed))
    (ids, logprobs), (pos, vocab) = d["source_topk"], d["align_map"]
    weights = normalize_weights(d["source_weights"], S, B, T, torch.device("cpu")).reshape(S, B * T)
    N, E = B * T, S * K + 1
    with record_launches(divergence_kernel, sparse_teacher_kernel) as launches:
        tail = torch.zeros(N)
        sparse_teacher(ids, logprobs.half(), pos, vocab, d["labels"], weights, 0.0, 1.0, -100, V,
                       tail=tail if spec.uses_tail_mass else None)
        z = d["target_logits"]
        divergence_rows(z, torch.empty_like(z), torch.zeros(N, E, dtype=torch.int32), torch.zeros(N, E), tail,
                        d["labels"].reshape(-1), -100, torch.ones(1), compute_grad, spec, 0.9)
    return launches


def _arg_type(name: str, value) -> str:
    import torch

    pointee = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int32: "i32",
               torch.int64: "i64"}
    if isinstance(value, torch.Tensor):
        return "*" + pointee[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"{name}: no Triton type for {type(value).__name__}")


def compile_launch(kernel, args, kwargs, target=HOPPER, aligned: bool = False):
    """Compile one recorded launch for ``target``; the signature comes from the recorded values.
    By default no divisibility specialisation, so the code is the general case of what a GPU would
    run; ``aligned=True`` marks pointers and integers divisible by 16 as such, as Triton's launcher
    does on a GPU (e.g. V = 128256: vectorised, ``cp.async``-pipelined loads)."""
    names = [p.name for p in kernel.params]
    values = dict(zip(names, args), **{k: v for k, v in kwargs.items() if k in names})
    signature, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(kernel.params):
        if p.is_constexpr:
            signature[p.name] = "constexpr"
            constexprs[p.name] = values[p.name]
        else:
            signature[p.name] = _arg_type(p.name, values[p.name])
            v = values[p.name]
            if aligned and (_is_tensor(v) or (type(v) is int and v != 0 and v % 16 == 0)):
                attrs[(i,)] = [["tt.divisibility", 16]]
    return triton.compile(ASTSource(kernel, signature, constexprs, attrs or None), target=target,
                          options={"num_warps": kwargs.get("num_warps", 4),
                                   **({"maxnreg": kwargs["maxnreg"]} if kwargs.get("maxnreg") else {})})


def _is_tensor(value) -> bool:
    import torch

    return isinstance(value, torch.Tensor)


def ptxas_resources(compiled, arch: str = "sm_90a") -> dict:
    """``{"registers", "spill_stores", "spill_loads"}`` of a compiled kernel, from ``ptxas -v``
    on its PTX with the newest ptxas this Triton ships."""
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    candidates = [os.path.join(bin_dir, n) for n in ("ptxas-blackwell", "ptxas")]
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        for exe in filter(os.path.exists, candidates):
            out = subprocess.run([exe, "-v", "--gpu-name", arch, ptx, "-o", os.path.join(tmp, "k.cubin")],
                                 capture_output=True, text=True)
            if out.returncode == 0:
                log = out.stderr
                regs = re.search(r"Used (\d+) registers", log)
                spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
                if regs is None or spills is None:
                    raise RuntimeError(f"ptxas -v printed no register or spill counts:\n{log}")
                return {"registers": int(regs.group(1)), "spill_stores": int(spills.group(1)),
                        "spill_loads": int(spills.group(2))}
    raise RuntimeError(f"no ptxas in {bin_dir} accepted this PTX")
