"""The package type-checks: mypy, configured in pyproject.toml ([tool.mypy]), reports nothing on fastfuse/;
and it reads the compiled core's stub (fastfuse/_C.pyi), so a wrong call into ``_C`` is an error."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytest.importorskip("mypy", reason="mypy is not installed (requirements-dev.txt has it; CI installs it)")


def mypy(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mypy", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=900)


@pytest.mark.slow
def test_package_type_checks():
    out = mypy("fastfuse")
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
    assert "Success: no issues found" in out.stdout, out.stdout


@pytest.mark.slow
def test_type_checker_sees_the_compiled_core_stub(tmp_path):
    # a misspelt hook, a wrong argument type, and one correct call of each kind: only the first two are errors
    bad = tmp_path / "uses_core.py"
    bad.write_text("from fastfuse import _C\n"
                   "from fastfuse._C import _testing\n"
                   "n: int = _C.MAX_THREADS + _testing.vocab_levenshtein(b'a', b'b')\n"
                   "_C._testing.dtw_set_paths(simd=True, force_wide=False)\n"
                   "_C._testing.dtw_set_path(simd=True)\n"
                   "_C.align_spans_batch([[1]], [[1]], num_threads='all')\n")
    out = mypy("--follow-imports=silent", str(bad))
    errors = [line for line in out.stdout.splitlines() if ": error:" in line]
    assert len(errors) == 2, out.stdout
    assert "uses_core.py:5:" in errors[0] and "dtw_set_path" in errors[0], errors
    assert "uses_core.py:6:" in errors[1] and "num_threads" in errors[1], errors
