"""One-shot GPU check of ``fastfuse.fused_loss``: the ``gpu`` tests of ``tests/kernels/test_gpu.py`` that
concern it (float64 reference on fresh random inputs, fp32/bf16/fp16, 128k vocabularies, edge
cases, N*V > 2**31, strided in-place views, fp16 loss scale, determinism, no host sync), then the
benchmark table of ``bench_loss.py``. Meant for a single call on a CUDA machine, a few minutes:

    python benchmarks/gpu_loss.py [--no-check] [--no-bench] [--quick] [--no-compile] [--csv out.csv]

Works from a source checkout even when fastfuse is not installed (e.g. the C++ core ``fastfuse._C``
could not be built): the loss does not need it, see ``harness.use_source_tree``.
Exit status 1 if any correctness check fails.
"""
from __future__ import annotations

import os
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import harness  # noqa: E402

harness.use_source_tree()      # fastfuse from the source tree where it is not installed (no C++ core)

import torch  # noqa: E402


def run_gpu_tests(select: str, out_dir: str = None) -> bool:
    """The GPU correctness checks are the ``gpu`` tests of ``tests/kernels/test_gpu.py`` (one copy, the
    tolerances of :func:`fastfuse.testing.tolerance`): run those matching ``select`` with pytest in
    a subprocess (this script does not import pytest), junit XML to ``out_dir`` if given."""
    import subprocess

    cmd = [sys.executable, "-m", "pytest", "kernels/test_gpu.py", "-m", "gpu", "-q", "-p", "no:cacheprovider", "-k", select]
    if out_dir:
        cmd.append(f"--junitxml={os.path.join(out_dir, 'pytest_' + select.split()[-1] + '.xml')}")
    # run from tests/: "python -m" puts the working directory first on the path, and the source
    # tree's fastfuse/ (no kernels/ inside) must not shadow the installed (or linked) package
    return subprocess.run(cmd, cwd=os.path.join(ROOT, "tests")).returncode == 0


def main(argv=None) -> int:
    ap = harness.parser(__doc__)
    ap.add_argument("--no-check", action="store_true", help="skip the gpu tests (gpu_check.sh runs them once)")
    ap.add_argument("--no-bench", action="store_true")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile in the table")
    a = ap.parse_args(argv)
    if a.tiny:
        a.no_check = True
    harness.need_cuda(a, "gpu_loss.py")
    import triton
    print(f"torch {torch.__version__}, triton {triton.__version__}, {harness.device_name(harness.device(a))}")
    t0 = time.time()
    ok = True
    if not a.no_check:
        ok = run_gpu_tests("not linear and not training and not extraction", os.environ.get("OUT"))
        print(f"correctness: {'PASS' if ok else 'FAIL'} ({time.time() - t0:.0f} s)\n")
    if not a.no_bench:
        import bench_loss
        argv = [f for f, on in (("--quick", a.quick), ("--tiny", a.tiny), ("--no-compile", a.no_compile)) if on]
        argv += ["--csv", a.csv or os.path.join(os.environ.get("OUT", "."), "bench_loss.csv")]
        t1 = time.time()
        try:
            ok &= bench_loss.main(argv) == 0
        except Exception:
            traceback.print_exc()
            ok = False
        print(f"benchmark: {time.time() - t1:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
