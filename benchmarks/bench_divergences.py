"""What each divergence x tail costs relative to FuseLLM's CE, forward + backward of ``fused_loss``.

    python benchmarks/bench_divergences.py [--device cuda|cpu] [--n N] [--v V] [--tiny] [--csv PATH] [--warm-jobs J]

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

import itertools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402

harness.use_source_tree()

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


def main(argv=None) -> int:
    ap = harness.parser(__doc__)
    ap.add_argument("--n", type=int, default=None, help="tokens (default 16384 on CUDA, 512 on CPU)")
    ap.add_argument("--v", type=int, default=None, help="vocabulary (default 128256 on CUDA, 32000 on CPU)")
    ap.add_argument("--warm-jobs", type=int, default=1, help="CUDA: compile every case first in J processes")
    args = ap.parse_args(argv)
    if args.tiny:      # the dry run's interpreter: the kernels on CPU
        args.device, args.n, args.v = "cpu", args.n or 8, args.v or 5000
    dev = torch.device(harness.device(args))
    cuda = dev.type == "cuda"
    # one untimed call compiles (or loads) a case's kernels; the interpreter (--tiny) compiles nothing
    warmup, iters = harness.iterations(args, full=(1, 5), quick=(1, 3))
    N = args.n or (16384 if cuda else 512)
    V = args.v or (128256 if cuda else 32000)
    dtype = torch.bfloat16 if cuda else torch.float32
    if args.warm_jobs > 1:      # (the dry run: two cases, to prove the parallel path)
        warm(V, str(dev), 2 if args.tiny else args.warm_jobs, 2 if args.tiny else None)
    d, topk, amap = _inputs(N, V, dev, dtype)
    logits = d["target_logits"].requires_grad_()
    floor = None
    if cuda:
        buf = torch.empty_like(logits)
        floor = harness.ms_per_call(lambda: buf.copy_(logits), str(dev))     # one read + one write of the row
    print(f"device {harness.device_name(str(dev))}, N={N}, V={V}, {dtype}, S=2, K=10, median of {iters}"
          + (f", copy floor {floor:.3f} ms" if floor else ""))
    base = None
    with harness.Results(args.csv) as res:
        for name, kw in cases():
            def step():
                logits.grad = None
                fused_loss(logits, topk, amap, d["labels"], d["source_weights"], validate=False, **kw).backward()
            t = harness.measure(step, str(dev), warmup, iters)
            base = base or t.ms
            res.time("divergences", name, dict(N=N, V=V), t, x_ce=round(t.ms / base, 4),
                     **(dict(floor_ms=round(floor, 6), of_floor=round(floor / t.ms, 4)) if floor else {}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
