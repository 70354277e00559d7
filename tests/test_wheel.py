"""The built wheel works on its own: build it, install it into a fresh directory, and run tests
against the installed copy (not the source tree)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_installs_and_passes_tests(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels),
                    str(ROOT)], check=True, timeout=900)
    (wheel,) = wheels.glob("fastfuse-*.whl")
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "-q", "--target", str(site),
                    str(wheel)], check=True, timeout=300)
    env = dict(os.environ, PYTHONPATH=str(site), HF_HUB_OFFLINE="1")
    # An editable install of the source tree hooks the import system ahead of PYTHONPATH: drop it.
    boot = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in type(f).__module__.lower()]; "
            "sys.path[:] = [p for p in sys.path if p not in ('', '.')]; ")
    probe = boot + "import fastfuse, fastfuse._C, fastfuse.kernels.fused_ce; print(fastfuse.__file__)"
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip().startswith(str(site)), out.stdout
    tests = ["test_align.py", "test_dtw.py", "test_vocab.py", "test_loss_kernel.py", "test_api.py"]
    args = ["-q", "-x", "-p", "no:cacheprovider", "--rootdir", str(tmp_path), "-c", os.devnull,
            *[str(ROOT / "tests" / t) for t in tests]]
    run_pytest = boot + f"import pytest, fastfuse; assert fastfuse.__file__.startswith({str(site)!r}); " \
                        f"sys.exit(pytest.main({args!r}))"
    r = subprocess.run([sys.executable, "-c", run_pytest], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "passed" in r.stdout
