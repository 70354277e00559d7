"""One-shot GPU check of ``fastfuse.fused_linear_loss``: correctness against the float64 reference
of ``fused_loss(hidden @ W.T + b)`` on small shapes (fp32/bf16/fp16, bias, reductions, chunk sizes,
32k and 128k vocabularies), then at the benchmark shape (N = 8192, H = 4096, V = 128256, bf16)
against the naive bf16 path and an fp32 one, the no-host-sync and memory checks, a chunk-size sweep
and the table of ``bench_linear_loss.py``. A single call on a CUDA machine, under 5 minutes:

    python benchmarks/gpu_linear_loss.py [--no-bench] [--csv out.csv]

Works from a source checkout without the built C++ core (see ``gpu_loss.py``). Exit status 1 if
any correctness check fails.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from gpu_loss import _bootstrap  # noqa: E402,F401  (importing it sets fastfuse up)

import torch  # noqa: E402

from fastfuse.linear_loss import default_chunk_tokens, fused_linear_loss  # noqa: E402
from fastfuse.loss import AlignMap, SourceTopK, fused_loss  # noqa: E402
from fastfuse.reference import fused_loss_reference, random_inputs  # noqa: E402

DEVICE = "cuda"    # (a CPU dry run of the checks: set to "cpu")
TOL = {torch.float32: 2e-4, torch.bfloat16: 2e-2, torch.float16: 4e-3}   # relative (norm) errors


def rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def small_case(name, *, B, T, H, V, dtype, bias, reduction, chunk, S=2, K=10, weights="token", seed=0) -> bool:
    g = torch.Generator().manual_seed(seed)
    d = random_inputs(B=B, T=T, V=V, S=S, K=K, Ts=T + 3, Vs=min(V, 5000), weights=weights, generator=g,
                      device=DEVICE)
    topk, amap = SourceTopK(*d["source_topk"]), AlignMap(*d["align_map"])
    hidden = torch.randn(B, T, H, generator=g).to(DEVICE, dtype)
    weight = (torch.randn(V, H, generator=g) * 3 / H ** 0.5).to(DEVICE, dtype)
    b = (torch.randn(V, generator=g) * 0.5).to(DEVICE, dtype) if bias else None
    h64 = hidden.double().requires_grad_()
    W64 = weight.double().requires_grad_()
    b64 = b.double().requires_grad_() if bias else None
    want = fused_loss_reference(h64 @ W64.T + (b64 if bias else 0), topk, amap, d["labels"], d["source_weights"],
                                0.8, 1.5, reduction=reduction)
    go = torch.rand(want.shape, dtype=torch.float64, device=DEVICE) if reduction == "none" else \
        torch.tensor(0.5, dtype=torch.float64, device=DEVICE)
    want.backward(go)
    h = hidden.clone().requires_grad_()
    W = weight.clone().requires_grad_()
    bb = b.clone().requires_grad_() if bias else None
    got = fused_linear_loss(h, W, topk, amap, d["labels"], bias=bb, source_weights=d["source_weights"],
                            lm_weight=0.8, temperature=1.5, reduction=reduction, chunk_tokens=chunk)
    got.backward(go.float())
    errs = {"loss": rel(got, want.detach()), "d_hidden": rel(h.grad, h64.grad), "d_weight": rel(W.grad, W64.grad)}
    if bias:
        errs["d_bias"] = rel(bb.grad, b64.grad)
    ok = all(e <= TOL[dtype] for e in errs.values())
    print(f"  {'ok ' if ok else 'FAIL'} {name:<52} " + "  ".join(f"{k} {v:.1e}" for k, v in errs.items()))
    return ok


def correctness_small() -> bool:
    print("correctness vs float64 reference of fused_loss(hidden @ W.T + b)")
    ok = True
    cases = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for V, chunk in ((1000, None), (1000, 37), (32000, 50), (128256, 64)):
            for reduction, bias in (("mean", True), ("sum", False), ("none", True)):
                cases.append((f"{str(dtype)[6:]} V={V} chunk={chunk} {reduction} bias={bias}",
                              dict(B=3, T=40, H=64, V=V, dtype=dtype, bias=bias, reduction=reduction, chunk=chunk)))
    cases.append(("fp32 S=8 K=64 per-seq weights, chunk=7", dict(B=2, T=33, H=32, V=5000, dtype=torch.float32,
                                                                 bias=False, reduction="mean", chunk=7, S=8, K=64,
                                                                 weights="seq")))
    for i, (name, kw) in enumerate(cases):
        try:
            ok &= small_case(name, seed=i, **kw)
        except Exception:
            ok = False
            print(f"  FAIL {name}: exception")
            traceback.print_exc()
    return ok


def correctness_large(N=8192, H=4096, V=128256) -> bool:
    """bf16 fused_linear_loss and bf16 naive (full logits + fused_loss) against an fp32 run."""
    from bench_linear_loss import LM_WEIGHT, make_inputs

    print(f"\nbenchmark shape N={N} H={H} V={V} bf16: errors against fp32 matmuls + fused_loss")
    d = make_inputs(N, H, V)
    kw = dict(source_weights=d["w"], lm_weight=LM_WEIGHT)
    ok = True
    h32 = d["hidden"].float().requires_grad_()
    W32 = d["weight"].float().requires_grad_()
    ref = fused_loss(h32 @ W32.T, d["topk"], d["amap"], d["labels"], inplace_grad=True, **kw)
    ref.backward()
    ref_g = (h32.grad, W32.grad)
    ref = float(ref.detach())
    del h32, W32
    gc.collect()
    torch.cuda.empty_cache()
    res = {}
    for name in ("fastfuse_linear", "naive"):
        h = d["hidden"].clone().requires_grad_()
        W = d["weight"].clone().requires_grad_()
        if name == "naive":
            loss = fused_loss(h @ W.T, d["topk"], d["amap"], d["labels"], **kw)
        else:
            loss = fused_linear_loss(h, W, d["topk"], d["amap"], d["labels"], **kw)
        loss.backward()
        res[name] = (abs(float(loss.detach()) - ref) / abs(ref), rel(h.grad, ref_g[0]), rel(W.grad, ref_g[1]))
        print(f"  {name:<16} loss {res[name][0]:.1e}  d_hidden {res[name][1]:.1e}  d_weight {res[name][2]:.1e}")
        del h, W, loss
        gc.collect()
        torch.cuda.empty_cache()
    good = all(f <= 1.5 * n + 1e-3 for f, n in zip(res["fastfuse_linear"], res["naive"]))
    print(f"  {'ok ' if good else 'FAIL'} fused_linear_loss errors within 1.5x of the naive bf16 path + 1e-3")
    ok &= good
    # no host sync in the forward (validate=False); memory bound
    h = d["hidden"].clone().requires_grad_()
    W = d["weight"].clone().requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    try:
        torch.cuda.set_sync_debug_mode("error")
        try:
            loss = fused_linear_loss(h, W, d["topk"], d["amap"], d["labels"], validate=False, **kw)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        print("  ok  forward with validate=False has no host sync")
    except Exception as e:
        ok = False
        print(f"  FAIL forward with validate=False synchronised: {e}")
        loss = fused_linear_loss(h, W, d["topk"], d["amap"], d["labels"], validate=False, **kw)
    loss.backward()
    torch.cuda.synchronize()
    extra = (torch.cuda.max_memory_allocated() - base - 2 * (h.numel() + W.numel())) / 2**30
    good = extra <= 1.0
    print(f"  {'ok ' if good else 'FAIL'} peak extra memory {extra:.2f} GiB (chunk {default_chunk_tokens(N, V, 2)} "
          f"tokens; goal <= 1 GiB)")
    ok &= good
    return ok


def chunk_sweep(N=8192, H=4096, V=128256, iters=5):
    from _common import median_run
    from bench_linear_loss import LM_WEIGHT, make_inputs, run_once

    print(f"\nchunk-size sweep N={N} H={H} V={V} bf16 (fwd+bwd, median of {iters})")
    d = make_inputs(N, H, V)
    for chunk in (512, 1024, 2048, 4096):
        fn = lambda h, W, dd, c=chunk: fused_linear_loss(h, W, dd["topk"], dd["amap"], dd["labels"],  # noqa: E731
                                                          source_weights=dd["w"], lm_weight=LM_WEIGHT,
                                                          validate=False, chunk_tokens=c)
        ms, extra = median_run(lambda: run_once(fn, d), warmup=1, iters=iters)
        print(f"  chunk {chunk:>5}: {ms:8.2f} ms  extra {extra / 2**20:8.0f} MiB")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--no-bench", action="store_true")
    ap.add_argument("--csv", default=None)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_linear_loss.py needs CUDA")
    import triton

    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
    t0 = time.time()
    ok = correctness_small()
    ok &= correctness_large()
    print(f"\ncorrectness: {'all ok' if ok else 'FAILURES'} ({time.time() - t0:.0f} s)")
    if not a.no_bench:
        from bench_linear_loss import table

        chunk_sweep()
        print()
        table(csv=a.csv)
    print(f"total {time.time() - t0:.0f} s")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
