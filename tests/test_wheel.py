"""The built wheel works on its own: build it, install it into a fresh directory, and run tests
against the installed copy (not the source tree); installed without its extras (no torch, no
transformers), every command that needs one says which extra to install, in one line."""
import importlib.util
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HINT = 'pip install "fastfuse[torch,hf]"'


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    wheels = tmp_path_factory.mktemp("wheels")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels),
                    str(ROOT)], check=True, timeout=900)
    (built,) = wheels.glob("fastfuse-*.whl")
    return built


@pytest.mark.slow
def test_wheel_ships_types_and_license(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "fastfuse/py.typed" in names and "fastfuse/_C.pyi" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") or n.endswith(".dist-info/LICENSE") for n in names), names
    meta = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "Provides-Extra: hf" in meta and "accelerate" in meta and "Classifier: Typing :: Typed" in meta


def _venv_without_extras(wheel: Path, root: Path) -> Path:
    """A fresh virtual environment (no system site-packages) with the wheel and its required
    dependencies only (numpy, safetensors, tqdm: this interpreter's copies, linked; no network)."""
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index", "-q",
                    str(wheel)], check=True, timeout=300)
    deps = root / "deps"
    deps.mkdir()
    for name in ("numpy", "safetensors", "tqdm"):
        pkg = Path(importlib.util.find_spec(name).submodule_search_locations[0])
        for p in (pkg, pkg.with_name(name + ".libs")):     # numpy.libs: the wheel's bundled shared libraries
            if p.exists():
                (deps / p.name).symlink_to(p)
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    (Path(purelib) / "required_deps.pth").write_text(str(deps) + "\n")
    return venv


@pytest.mark.slow
def test_wheel_without_extras_names_the_extra(wheel, tmp_path):
    venv = _venv_without_extras(wheel, tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["FASTFUSE_CACHE"] = str(tmp_path / "cache")       # nothing cached: a download would show here

    def run(*argv):
        return subprocess.run([str(venv / "bin" / argv[0]), *argv[1:]], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=120)

    assert "No module named 'torch'" in run("python", "-c", "import torch").stderr   # really without extras
    assert run("fastfuse", "--version").stdout.strip() == "fastfuse 0.1.0"
    for argv, missing in ((["demo"], "torch"), (["demo", "--size", "tiny"], "torch"), (["align-demo"], "transformers"),
                          (["chunk", "--tokenizers", "gpt-2", "--input", __file__, "--block-size", "64",
                            "--out", str(tmp_path / "c.jsonl")], "transformers")):
        r = run("fastfuse", *argv)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1, (argv, r.returncode, r.stdout, r.stderr)
        assert lines[0].startswith(f"fastfuse: error: fastfuse {argv[0]} needs '{missing}'"), lines
        assert HINT in lines[0] and "Traceback" not in r.stdout + r.stderr
    r = run("python", "-c", "import fastfuse; fastfuse.fused_loss")
    assert r.returncode == 1 and "ModuleNotFoundError: fastfuse.fused_loss needs 'torch'" in r.stderr, r.stderr
    assert HINT in r.stderr
    # what needs no extra still works: alignment of byte ends through the compiled core
    r = run("python", "-c", "import numpy as np, fastfuse; print(fastfuse.align_offsets(np.array([2, 5]), "
                            "np.array([2, 5])).n_matched)")
    assert r.returncode == 0 and r.stdout.strip() == "2", r.stderr


@pytest.mark.slow
def test_wheel_installs_and_passes_tests(wheel, tmp_path):
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "-q", "--target", str(site),
                    str(wheel)], check=True, timeout=300)
    # TRITON_INTERPRET=1: the kernel tests run in this one process (the wheel's kernels, interpreted); a
    # main session would send them to a child pytest (tests/_interpreter.py) that imports the source tree
    env = dict(os.environ, PYTHONPATH=str(site), HF_HUB_OFFLINE="1", TRITON_INTERPRET="1")
    # An editable install of the source tree hooks the import system ahead of PYTHONPATH: drop it.
    boot = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in type(f).__module__.lower()]; "
            "sys.path[:] = [p for p in sys.path if p not in ('', '.')]; ")
    probe = boot + "import fastfuse, fastfuse._C, fastfuse.kernels.fused_ce; print(fastfuse.__file__)"
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip().startswith(str(site)), out.stdout
    tests = ["align/test_align.py", "align/test_dtw.py", "align/test_vocab_map.py", "kernels/test_loss_kernel.py",
             "test_api.py"]
    args = ["-q", "-x", "-p", "no:cacheprovider", "--rootdir", str(tmp_path), "-c", os.devnull,
            *[str(ROOT / "tests" / t) for t in tests]]
    run_pytest = boot + f"import pytest, fastfuse; assert fastfuse.__file__.startswith({str(site)!r}); " \
                        f"sys.exit(pytest.main({args!r}))"
    r = subprocess.run([sys.executable, "-c", run_pytest], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "passed" in r.stdout
