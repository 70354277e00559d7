"""One-shot GPU check of ``fastfuse.fused_loss``: correctness against the float64 reference on
fresh random inputs (fp32/bf16/fp16, a 128k vocabulary, edge cases), then the benchmark table of
``bench_loss.py``. Meant for a single call on a CUDA machine, a few minutes in all:

    python benchmarks/gpu_loss.py [--no-bench] [--quick] [--no-compile]

Works from a source checkout even when the C++ core (``fastfuse._C``) is not built: the loss
does not need it, so the packages are then loaded straight from ``fastfuse/`` and ``kernels/``.
Exit status 1 if any correctness check fails.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
import traceback
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bootstrap():
    """Import fastfuse; without the built C++ core, load the pure-Python parts from the tree."""
    sys.path.insert(0, ROOT)
    try:
        import fastfuse  # noqa: F401
        import fastfuse.kernels  # noqa: F401
        return
    except ImportError:
        for name in [m for m in sys.modules if m == "fastfuse" or m.startswith("fastfuse.")]:
            del sys.modules[name]
    pkg = types.ModuleType("fastfuse")
    pkg.__path__ = [os.path.join(ROOT, "fastfuse")]
    sys.modules["fastfuse"] = pkg
    spec = importlib.util.spec_from_file_location(
        "fastfuse.kernels", os.path.join(ROOT, "kernels", "__init__.py"),
        submodule_search_locations=[os.path.join(ROOT, "kernels")])
    kern = importlib.util.module_from_spec(spec)
    sys.modules["fastfuse.kernels"] = kern
    spec.loader.exec_module(kern)
    pkg.kernels = kern
    print("(fastfuse._C not built: loaded fastfuse.loss and fastfuse.kernels from the source tree)")


_bootstrap()

import torch  # noqa: E402

from fastfuse.loss import AlignMap, SourceTopK, fused_loss  # noqa: E402
from fastfuse.reference import fused_loss_reference, random_inputs  # noqa: E402

TOL = {torch.float32: (1e-5, 1e-6), torch.bfloat16: (2e-2, 1.6e-2), torch.float16: (2e-3, 2e-3)}


def check_case(name, d, *, reduction="mean", inplace=False, lm_weight=0.9, temperature=1.0):
    topk, amap = SourceTopK(*d["source_topk"]), AlignMap(*d["align_map"])
    z0 = d["target_logits"]
    z64 = z0.double().requires_grad_()
    want = fused_loss_reference(z64, topk, amap, d["labels"], d["source_weights"], lm_weight,
                                temperature, reduction=reduction)
    gout = (torch.rand(want.shape, dtype=torch.float64, device=z0.device)
            if reduction == "none" else torch.tensor(0.5, dtype=torch.float64, device=z0.device))
    (want * gout).sum().backward()
    z = z0.clone().requires_grad_()
    x = z * 1 if inplace else z
    got = fused_loss(x, topk, amap, d["labels"], d["source_weights"], lm_weight, temperature,
                     reduction=reduction, inplace_grad=inplace, impl="triton")
    (got * gout.float()).sum().backward()
    rtol, atol = TOL[z0.dtype]
    scale = max(1.0, want.detach().abs().max().item())
    lerr = (got.double() - want.detach()).abs().max().item()
    gerr = (z.grad.double() - z64.grad).abs().max().item()
    ok = lerr <= atol * scale + rtol * want.detach().abs().max().item() and gerr <= atol
    print(f"  {'ok ' if ok else 'FAIL'} {name:<48} loss err {lerr:.2e}  grad err {gerr:.2e}")
    return ok


def correctness(device="cuda") -> bool:
    print("correctness vs float64 reference (impl='triton')")
    ok = True
    g = torch.Generator().manual_seed(1234)
    cases = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for S, K in ((1, 1), (3, 10), (8, 64)):
            for weights in ("seq", "token"):
                cases.append((f"{str(dtype)[6:]} S={S} K={K} w={weights} V=1000",
                              dict(B=2, T=7, V=1000, S=S, K=K, dtype=dtype, weights=weights,
                                   map_range=200), {}))
    cases += [
        ("bf16 V=128256 S=2 K=10", dict(B=2, T=16, V=128256, S=2, K=10, Vs=32000,
                                        dtype=torch.bfloat16), {}),
        ("bf16 V=128256 inplace reduction=none", dict(B=2, T=16, V=128256, S=2, K=10, Vs=32000,
                                                      dtype=torch.bfloat16),
         dict(inplace=True, reduction="none")),
        ("fp32 V=262144 S=4 K=16 sum", dict(B=1, T=8, V=262144, S=4, K=16, Vs=50000),
         dict(reduction="sum")),
        ("fp32 V=32003 duplicates", dict(B=2, T=9, V=32003, S=3, K=10, map_range=4), dict(lm_weight=0.5)),
        ("fp32 all ignored", dict(B=2, T=5, V=3000, S=3, K=10, p_ignore=1.0), {}),
        ("fp32 no position aligned", dict(B=2, T=5, V=3000, S=3, K=10, p_unaligned=1.0), {}),
        ("fp32 no id mapped", dict(B=2, T=5, V=3000, S=3, K=10, p_unmapped=1.0), {}),
        ("bf16 temperature 2, inplace", dict(B=2, T=5, V=5000, S=2, K=10, dtype=torch.bfloat16),
         dict(temperature=2.0, inplace=True)),
    ]
    for name, kw, opts in cases:
        try:
            d = random_inputs(**kw, device=device, generator=g)
            ok &= check_case(name, d, **opts)
        except Exception:
            ok = False
            print(f"  FAIL {name}: exception")
            traceback.print_exc()
    # extreme logits
    try:
        d = random_inputs(2, 5, 40000, 3, 10, device=device, generator=g)
        z = d["target_logits"]
        z[0, 0, 7] = 1e4
        z[0, 1] = -1e4
        z[1, 2] = 1e4
        ok &= check_case("fp32 extreme logits +-1e4", d)
    except Exception:
        ok = False
        traceback.print_exc()
    # no host sync in the forward with validate=False
    try:
        d = random_inputs(4, 512, 32000, 2, 10, device=device, dtype=torch.bfloat16, generator=g)
        topk, amap = SourceTopK(*d["source_topk"]), AlignMap(*d["align_map"])
        x = d["target_logits"].clone().requires_grad_()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            loss = fused_loss(x, topk, amap, d["labels"], d["source_weights"], validate=False)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        loss.backward()
        print("  ok  forward with validate=False has no host sync")
    except Exception as e:
        ok = False
        print(f"  FAIL forward with validate=False synchronised: {e}")
    return ok


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--no-bench", action="store_true")
    ap.add_argument("--quick", action="store_true", help="benchmark only N=8192")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile in the table")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_loss.py needs a CUDA device")
    import triton
    print(f"torch {torch.__version__}, triton {triton.__version__}, {torch.cuda.get_device_name()}")
    t0 = time.time()
    ok = correctness()
    print(f"correctness: {'PASS' if ok else 'FAIL'} ({time.time() - t0:.0f} s)\n")
    if not a.no_bench:
        sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
        import bench_loss
        shapes = bench_loss.SHAPES[:2] if a.quick else bench_loss.SHAPES
        provs = [p for p in bench_loss.PROVIDERS if not (a.no_compile and p == "torch_compile")]
        t1 = time.time()
        try:
            bench_loss.table(shapes, provs, csv=os.path.join(os.environ.get("OUT", "."), "bench_loss.csv"),
                             iters=5)
        except Exception:
            traceback.print_exc()
        print(f"benchmark: {time.time() - t1:.0f} s")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
