"""What each divergence x tail costs relative to FuseLLM's CE, forward + backward of ``fused_loss``.

    python benchmarks/bench_divergences.py [--device cuda|cpu] [--n N] [--v V] [--csv PATH] [--warm-jobs J]

On CUDA (the Triton kernels; ``tests/kernels/test_gpu.py`` is the correctness side) at N = 16384,
V = 128256 bf16 by default, with the one-read + one-write copy floor measured in the same run; the
issue's targets: two-pass combinations within 1.15x of ``ce``, the three-pass ``"uniform"`` JSD /
skew KLs / TVD stated. On CPU (no GPU: the torch path, chunked float32) at a small default shape;
the ratios there say what the torch path costs, not the kernels. ``ce`` is the original kernel
(``divergence="ce", tail="renormalize"``); ``ce/bucket`` runs the generic kernel on nearly the same
loss (what the generic row code itself costs). Each case is its own kernel specialisation (2-3 s
to compile): ``--warm-jobs J`` first runs every case once at N = 16 in J processes, which fills
Triton's on-disk cache in parallel, so the timed loop loads instead of compiling (``gpu_check.py``).
``--tiny``: the dry run's CPU interpreter at N = 8, V = 5000 (kernels, not the torch path).
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from fastfuse import AlignMap, SourceTopK, fused_loss  # noqa: E402
from fastfuse.loss.spec import DIVERGENCES, TAILS, lookup  # noqa: E402
from fastfuse.testing import random_inputs  # noqa: E402


def cases():
    yield "ce", {}
    for divergence, tail in itertools.product(DIVERGENCES, TAILS):
        if (divergence, tail) != ("ce", "renormalize"):
            yield f"{divergence}/{tail}", dict(tail=tail, **lookup(divergence).options())
    yield "jsd/bucket+softcap+T", dict(divergence="jsd", tail="bucket", softcap=30.0, student_temperature=2.0)


def _inputs(N, V, dev, dtype):
    d = random_inputs(B=1, T=N, V=V, S=2, K=10, Ts=N, Vs=32000, dtype=dtype, device=dev, missing_mass=0.5,
                      generator=torch.Generator().manual_seed(0))
    return d, SourceTopK(*d["source_topk"]), AlignMap(*d["align_map"])


def _warm_one(job):
    """One case once (a worker of ``--warm-jobs``): compiles its kernels into the on-disk cache."""
    name, V, device = job
    kw = dict(cases())[name]
    d, topk, amap = _inputs(16, V, torch.device(device), torch.bfloat16)
    z = d["target_logits"].requires_grad_()
    fused_loss(z, topk, amap, d["labels"], d["source_weights"], validate=False, **kw).backward()
    if z.is_cuda:
        torch.cuda.synchronize()
    return name


def warm(V, device, jobs, limit=None):
    import multiprocessing as mp
    t = time.perf_counter()
    names = [name for name, _ in cases()][:limit]
    with mp.get_context("spawn").Pool(jobs) as pool:
        done = pool.map(_warm_one, [(name, V, device) for name in names], chunksize=1)
    print(f"(compiled {len(done)} cases in {jobs} processes: {time.perf_counter() - t:.1f} s)", flush=True)


def timer(device):
    """``step -> (ms, peak extra bytes)`` (0 bytes on CPU)."""
    if device.type == "cuda":
        from _common import cuda_timed
        return cuda_timed

    def cpu(step):
        t = time.perf_counter()
        step()
        return (time.perf_counter() - t) * 1e3, 0
    return cpu


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--n", type=int, default=None, help="tokens (default 16384 on CUDA, 512 on CPU)")
    ap.add_argument("--v", type=int, default=None, help="vocabulary (default 128256 on CUDA, 32000 on CPU)")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--csv", default=None, help="rows written as they are measured")
    ap.add_argument("--warm-jobs", type=int, default=1, help="CUDA: compile every case first in J processes")
    ap.add_argument("--tiny", action="store_true", help="dry run: CPU, N=8, V=5000, 1 iteration")
    args = ap.parse_args(argv)
    if args.tiny:
        args.device, args.n, args.v, args.iters = "cpu", args.n or 8, args.v or 5000, 1
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    N = args.n or (16384 if cuda else 512)
    V = args.v or (128256 if cuda else 32000)
    dtype = torch.bfloat16 if cuda else torch.float32
    if args.warm_jobs > 1:      # (the dry run: two cases, to prove the parallel path)
        warm(V, args.device, 2 if args.tiny else args.warm_jobs, 2 if args.tiny else None)
    d, topk, amap = _inputs(N, V, dev, dtype)
    logits = d["target_logits"].requires_grad_()
    run = timer(dev)
    floor = None
    if cuda:
        from _common import cuda_ms_per_call
        buf = torch.empty_like(logits)
        floor = cuda_ms_per_call(lambda: buf.copy_(logits))      # one read + one write of the row
    print(f"device {torch.cuda.get_device_name() if cuda else 'cpu'}, N={N}, V={V}, {dtype}, S=2, K=10"
          + (f", copy floor {floor:.3f} ms" if floor else ""))
    head = f"{'divergence/tail':<28}{'ms':>9}{'x ce':>7}" + (f"{'of floor':>10}" if floor else "")
    print(head + "\n" + "-" * len(head))
    rows, base = [], None
    from _common import CsvRows
    sink = CsvRows(args.csv, ["case", "N", "V", "ms", "x_ce", "of_floor", "extra_mib"])
    for name, kw in cases():
        def step():
            logits.grad = None
            fused_loss(logits, topk, amap, d["labels"], d["source_weights"], validate=False, **kw).backward()
        step()
        res = [run(step) for _ in range(args.iters)]
        ms = sorted(r[0] for r in res)[len(res) // 2]
        extra = max(r[1] for r in res) / 2**20
        base = base or ms
        rows.append((name, ms, ms / base, floor / ms if floor else None))
        sink.add(dict(case=name, N=N, V=V, ms=f"{ms:.4f}", x_ce=f"{ms / base:.3f}",
                      of_floor=f"{floor / ms:.4f}" if floor else "", extra_mib=f"{extra:.0f}"))
        print(f"{name:<28}{ms:>9.3f}{ms / base:>7.2f}" + (f"{floor / ms:>10.1%}" if floor else ""), flush=True)
    return rows


if __name__ == "__main__":
    main()
