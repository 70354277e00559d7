"""Every kernel launch compiles -- without spills where ``test_kernels_compile.py`` demands it -- with
the Triton of the GPU image too (3.6.0), not only with the newest one CI installs: a launch that
fails or spills there would waste the rare GPU window.

``triton==3.6.0`` is installed once with pip into a cached folder (``FASTFUSE_CACHE``, default
``~/.cache/fastfuse``) that goes first on ``PYTHONPATH`` of a subprocess running
``test_kernels_compile.py`` (the compile-only path: the 3.6.0 interpreter, which breaks with
numpy >= 2.3, is never used). Skipped with the reason when pip cannot install it (no PyPI).
"""
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

GPU_IMAGE_TRITON = "3.6.0"
HERE = Path(__file__).resolve().parent


def _cached_triton() -> Path:
    from fastfuse.tokenizer_files import cache_dir

    target = cache_dir() / f"triton-{GPU_IMAGE_TRITON}-py{sys.version_info.major}{sys.version_info.minor}"
    if (target / ".complete").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".triton-"))
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--disable-pip-version-check",
                        "--target", str(tmp), f"triton=={GPU_IMAGE_TRITON}"],
                       capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["?"]
        pytest.skip(f"pip could not install triton=={GPU_IMAGE_TRITON} (no PyPI here?): {tail[0]}")
    (tmp / ".complete").write_text(GPU_IMAGE_TRITON)
    try:
        os.replace(tmp, target)          # atomic: a half-installed folder is never used
    except OSError:                      # another process won the race
        shutil.rmtree(tmp, ignore_errors=True)
    return target


@pytest.mark.slow
def test_every_launch_compiles_with_the_gpu_images_triton():
    pytest.importorskip("triton")
    site = _cached_triton()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(site)] + [p for p in [env.get("PYTHONPATH")] if p])
    version = subprocess.run([sys.executable, "-c", "import triton; print(triton.__version__)"], env=env,
                             capture_output=True, text=True, timeout=120)
    assert version.stdout.strip() == GPU_IMAGE_TRITON, version.stdout + version.stderr
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        str(HERE / "test_kernels_compile.py")], env=env, capture_output=True, text=True,
                       timeout=2400, cwd=str(HERE))
    assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-2000:]
    passed = re.search(r"(\d+) passed", r.stdout)
    assert passed and int(passed.group(1)) >= 40 and "failed" not in r.stdout.splitlines()[-1], r.stdout[-2000:]
