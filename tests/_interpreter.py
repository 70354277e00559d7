"""Running the Triton kernels under the interpreter from a test module, shared by the kernel tests.

Triton decides between interpreter and compiler when a function is decorated, so
``TRITON_INTERPRET=1`` must be set before ``triton`` is first imported: :func:`request_interpreter`
does that at a module's import when it still can; :func:`use_interpreter` (in the module's fixture)
re-decorates the kernels if they were imported compiled; when triton itself was already imported
compiled, :func:`rerun_under_interpreter` runs the whole module again in a fresh process.
"""
import os
import re
import subprocess
import sys

import pytest


def request_interpreter(device: str) -> str | None:
    """Set TRITON_INTERPRET=1 on CPU if triton is not imported yet; returns the old value."""
    old = os.environ.get("TRITON_INTERPRET")
    if device == "cpu" and "triton" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "1"
    return old


def runs_in_process(device: str) -> bool:
    """The kernels can run in this process: on CUDA, or with triton imported for the interpreter."""
    import triton

    return device == "cuda" or type(triton.language.standard.sum).__name__ == "InterpretedFunction"


def use_interpreter() -> None:
    """Set the variable and re-decorate fastfuse's kernels if they were imported compiled."""
    import importlib

    os.environ["TRITON_INTERPRET"] = "1"
    import fastfuse.kernels.divergence as dv
    import fastfuse.kernels.fused_ce as fc
    import fastfuse.kernels.sparse_teacher as st
    if type(fc.fused_ce_kernel).__name__ != "InterpretedFunction":
        importlib.reload(st)        # imported earlier in compiled mode: decorate again
        importlib.reload(fc)
    if type(dv.divergence_kernel).__name__ != "InterpretedFunction":
        importlib.reload(dv)


def restore(old: str | None) -> None:
    if old is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = old


def interpreter_fixtures(device: str, old: str | None, in_process: bool, rerun_test: str):
    """The two autouse fixtures of a kernel test module; assign them to module names:
    ``_interpret, _skip_if_subprocess = interpreter_fixtures(DEVICE, _OLD, _IN_PROCESS, "test_...")``.
    ``_interpret`` turns the interpreter on for the module's tests (re-decorating the kernels if
    needed) and restores ``TRITON_INTERPRET`` after them; ``_skip_if_subprocess`` skips every test
    but ``rerun_test`` when triton was imported compiled (that test reruns the module)."""
    @pytest.fixture(scope="module", autouse=True)
    def _interpret():
        if in_process and device == "cpu":
            use_interpreter()
        yield
        restore(old)

    @pytest.fixture(autouse=True)
    def _skip_if_subprocess(request):
        if not in_process and request.node.name != rerun_test:
            pytest.skip(f"triton was imported in compiled mode; covered by {rerun_test}")

    return _interpret, _skip_if_subprocess


def rerun_under_interpreter(path: str, min_passed: int) -> None:
    """Run the test module at ``path`` in a fresh process under the interpreter; it must pass, with
    at least ``min_passed`` tests really run and only its own rerun test skipped."""
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", path],
                       env=dict(os.environ, TRITON_INTERPRET="1"), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-2000:]
    passed = re.search(r"(\d+) passed", r.stdout)
    assert passed and int(passed.group(1)) >= min_passed and "1 skipped" in r.stdout, r.stdout[-3000:]
