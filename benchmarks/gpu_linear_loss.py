"""One-shot GPU check of ``fastfuse.fused_linear_loss``: the ``gpu`` tests of ``tests/kernels/test_gpu.py``
that concern it (float64 reference of ``fused_loss(hidden @ W.T + b)`` on small shapes, fp32/bf16/
fp16, bias, reductions, chunk sizes, 32k and 128k vocabularies; the benchmark shape N = 8192,
H = 4096, V = 128256 bf16 against the naive bf16 path and an fp32 one, with the memory bound), then
a chunk-size sweep and the table of ``bench_linear_loss.py``. A single call on a CUDA machine:

    python benchmarks/gpu_linear_loss.py [--no-check] [--no-sweep] [--no-bench] [--csv out.csv]

(the sweep's rows go to ``out_chunks.csv`` beside ``--csv``, the table's to ``--csv``)

Works from a source checkout without the built C++ core (see ``gpu_loss.py``). Exit status 1 if
any correctness check fails.
"""
from __future__ import annotations

import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import harness  # noqa: E402
from gpu_loss import run_gpu_tests  # noqa: E402  (importing gpu_loss sets fastfuse up)

import torch  # noqa: E402

from fastfuse.loss.linear_loss import fused_linear_loss  # noqa: E402


def chunk_sweep(results, N=8192, H=4096, V=128256, iters=5):
    """``fused_linear_loss`` at each ``chunk_tokens`` (provider ``chunk <n>``) into ``results``."""
    from bench_linear_loss import LM_WEIGHT, make_inputs, measure

    print(f"\nchunk-size sweep N={N} H={H} V={V} bf16 (fwd+bwd, median of {iters})")
    d = make_inputs(N, H, V)
    for chunk in (512, 1024, 2048, 4096):
        fn = lambda h, W, dd, c=chunk: fused_linear_loss(h, W, dd["topk"], dd["amap"], dd["labels"],  # noqa: E731
                                                          source_weights=dd["w"], lm_weight=LM_WEIGHT,
                                                          validate=False, chunk_tokens=c)
        results.time("fused_linear_loss", f"chunk {chunk}", dict(N=N, H=H, V=V), measure(fn, d, 1, iters))


def main(argv=None) -> int:
    ap = harness.parser(__doc__)
    ap.add_argument("--no-check", action="store_true", help="skip the gpu tests (gpu_check.sh runs them once)")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--no-bench", action="store_true")
    a = ap.parse_args(argv)
    if a.tiny:
        a.no_check, a.no_sweep = True, True
    harness.need_cuda(a, "gpu_linear_loss.py")
    import triton

    print(f"device: {harness.device_name(harness.device(a))}  torch {torch.__version__}  triton {triton.__version__}")
    t0 = time.time()
    ok = True
    if not a.no_check:
        ok = run_gpu_tests("linear", os.environ.get("OUT"))
        print(f"\ncorrectness: {'all ok' if ok else 'FAILURES'} ({time.time() - t0:.0f} s)")
    if not a.no_sweep:
        with harness.Results(a.csv and os.path.splitext(a.csv)[0] + "_chunks.csv") as res:
            chunk_sweep(res)
    if not a.no_bench:
        import bench_linear_loss

        print()
        argv = [f for f, on in (("--quick", a.quick), ("--tiny", a.tiny)) if on] + (["--csv", a.csv] if a.csv else [])
        ok &= bench_linear_loss.main(argv) == 0
    print(f"total {time.time() - t0:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
