"""The register table of every kernel launch and launch candidate (``benchmarks/kernel_resources.py``,
an ahead-of-time compile for sm_90a) runs here in CI, not in the GPU window: it needs no GPU."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_register_table_has_every_launch_and_no_spills():
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernel_resources.py")], env=env,
                       capture_output=True, text=True, timeout=1500)
    if "no ptxas" in r.stderr:
        pytest.skip("this Triton ships no ptxas that takes its own PTX")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = [line for line in r.stdout.splitlines() if line.startswith("| ") and "_kernel |" in line]
    for what in ("forced 2pass_l2_persistent", "generic_s5", "backward rescale V=128256, row", "fused_loss V=32000"):
        assert any(what in row for row in rows), what
    assert "no launch spills" in r.stdout
