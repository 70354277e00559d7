"""One-shot GPU check of ``fastfuse.fused_loss``: the ``gpu`` tests of ``tests/kernels/test_gpu.py`` that
concern it (float64 reference on fresh random inputs, fp32/bf16/fp16, 128k vocabularies, edge
cases, N*V > 2**31, strided in-place views, fp16 loss scale, determinism, no host sync), then the
benchmark table of ``bench_loss.py``. Meant for a single call on a CUDA machine, a few minutes:

    python benchmarks/gpu_loss.py [--no-check] [--no-bench] [--quick] [--no-compile]

Works from a source checkout even when fastfuse is not installed (e.g. the C++ core ``fastfuse._C``
could not be built): the loss does not need it, see ``_bootstrap``.
Exit status 1 if any correctness check fails.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bootstrap():
    """Import fastfuse; where it is not installed (e.g. the C++ core could not be built: the loss
    does not need it), put a scratch folder first on the path (and on PYTHONPATH, for the pytest
    subprocess) holding ``fastfuse/`` as links to the source tree's files plus ``kernels/`` as
    ``fastfuse/kernels`` -- what the wheel build maps."""
    try:
        import fastfuse.kernels.fused_ce  # noqa: F401
        import fastfuse.loss.logits_loss  # noqa: F401
        return
    except ImportError:
        for name in [m for m in sys.modules if m == "fastfuse" or m.startswith("fastfuse.")]:
            del sys.modules[name]
    import atexit
    import shutil
    import tempfile

    shim = tempfile.mkdtemp(prefix="fastfuse-src-")
    atexit.register(shutil.rmtree, shim, True)
    os.mkdir(os.path.join(shim, "fastfuse"))
    for name in os.listdir(os.path.join(ROOT, "fastfuse")):
        os.symlink(os.path.join(ROOT, "fastfuse", name), os.path.join(shim, "fastfuse", name))
    os.symlink(os.path.join(ROOT, "kernels"), os.path.join(shim, "fastfuse", "kernels"))
    sys.path.insert(0, shim)
    os.environ["PYTHONPATH"] = os.pathsep.join([shim] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    print(f"(fastfuse not installed: loaded fastfuse and fastfuse.kernels from the source tree via {shim})")


_bootstrap()
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--no-check", action="store_true", help="skip the gpu tests (gpu_check.sh runs them once)")
    ap.add_argument("--no-bench", action="store_true")
    ap.add_argument("--quick", action="store_true", help="benchmark only N=16384 (V=128256, the target, first)")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile in the table")
    ap.add_argument("--csv", default=None, help="table rows, written as they are measured")
    ap.add_argument("--tiny", action="store_true", help="CPU dry run (TRITON_INTERPRET=1): tiny shapes, no checks")
    a = ap.parse_args()
    if a.tiny:
        a.no_check, a.no_compile = True, True
    elif not torch.cuda.is_available():
        sys.exit("gpu_loss.py needs a CUDA device")
    import triton
    from _common import device_name
    print(f"torch {torch.__version__}, triton {triton.__version__}, {device_name()}")
    t0 = time.time()
    ok = True
    if not a.no_check:
        ok = run_gpu_tests("not linear and not training and not extraction", os.environ.get("OUT"))
        print(f"correctness: {'PASS' if ok else 'FAIL'} ({time.time() - t0:.0f} s)\n")
    if not a.no_bench:
        import bench_loss
        shapes = bench_loss.TINY if a.tiny else (bench_loss.QUICK if a.quick else bench_loss.SHAPES)
        provs = [p for p in bench_loss.PROVIDERS if not (a.no_compile and p == "torch_compile")]
        t1 = time.time()
        errors = []
        try:
            bench_loss.table(shapes, provs, csv=a.csv or os.path.join(os.environ.get("OUT", "."), "bench_loss.csv"),
                             warmup=1 if a.tiny else 2, iters=1 if a.tiny else 5, errors=errors)
        except Exception:
            traceback.print_exc()
            ok = False
        ok &= not errors
        print(f"benchmark: {time.time() - t1:.0f} s")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
