"""``benchmarks/gpu_check.sh``, the GPU window's one command, proven on CPU: its dry run (every step
end to end under ``TRITON_INTERPRET=1`` at tiny shapes) and its deadline, which must stop a step's
whole process tree and leave a summary saying what was cut."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check  # noqa: E402


def _check(tmp, *args, timeout=600):
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(tmp / "res"), "--dry-run",
                           "--pack", str(tmp / "pack"), *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def _pgids(res: Path) -> list[int]:
    return [int(line.split()[0]) for line in (res / "pgids.txt").read_text().splitlines()]


@pytest.mark.slow
def test_dry_run_runs_every_step_and_fills_the_summary(tmp_path):
    r = _check(tmp_path, "--deadline", "540", timeout=700)
    res = tmp_path / "res"
    summary = json.loads((res / "summary.json").read_text())
    steps = {s["step"]: s["status"] for s in summary["steps"]}
    assert list(steps) == [n for n, _ in gpu_check.steps(str(res), True, "python3")]
    assert all(v == "ok" for v in steps.values()), (steps, r.stdout[-3000:], r.stderr[-2000:])
    assert r.returncode == 0
    # the steps wrote their tables, and the summary read the targets from them
    for f in ("bench_loss.csv", "candidates.csv", "bench_divergences.csv", "bench_linear_loss.csv",
              "gpu_tp_loss.csv", "gpu_tests.xml", "launch_tuned.json"):
        assert (res / f).stat().st_size > 0, f
    got = {t["target"]: t for t in summary["targets"]}
    loss = got["fused_loss N=16 V=40000: fastfuse of the copy floor"]
    assert loss["measured"] != "not measured" and loss["ratio"].endswith("%")
    assert any(k.startswith("divergence jsd/uniform") for k in got)
    assert any(k.startswith("launch candidates fused_ce") for k in got)
    assert "fastfuse_inplace" in (res / "bench_loss.csv").read_text()     # the in-place provider runs
    results = (tmp_path / "pack" / "RESULTS.md").read_text()
    assert "NOT measurements" in results and "| 16 x 40000 | fastfuse |" in results
    assert (tmp_path / "pack" / "gpu_results.tgz").stat().st_size > 0
    assert not any(gpu_check.group_alive(p) for p in _pgids(res))


def test_deadline_kills_the_step_tree_and_says_what_was_cut(tmp_path):
    """A deadline shorter than one step: the step (a shell whose children sleep far past it) and its
    children are gone, the later steps are marked not run, and the summary says so. The steps are
    fixed commands, so the cut does not depend on how fast this machine is."""
    out, pack = tmp_path / "res", tmp_path / "pack"
    out.mkdir()
    run = gpu_check.Run(str(out), deadline_s=4.0, pack=str(pack), dry=True)
    todo = [("versions", ["true"]),
            ("loss_table", ["bash", "-c", "sleep 300 & sleep 300 & wait"]),
            ("divergence_table", ["true"])]
    t = time.monotonic()
    assert gpu_check.run_all(run, todo, dict(os.environ)) is False
    elapsed = time.monotonic() - t
    steps = {s["step"]: s["status"] for s in json.loads((out / "summary.json").read_text())["steps"]}
    assert steps["versions"] == "ok", steps
    assert steps["loss_table"].startswith("cut (deadline"), steps
    assert steps["divergence_table"].startswith("not run"), steps
    assert "cut (deadline" in (out / "summary.md").read_text()
    assert (pack / "summary.md").exists()
    assert elapsed < 4 + gpu_check.GRACE_S + 10, elapsed
    for pgid in _pgids(out):
        assert not gpu_check.group_alive(pgid), pgid


def test_kill_group_stops_grandchildren(tmp_path):
    """A step's children (xdist workers, a shell's subprocesses) share its process group: all go."""
    p = subprocess.Popen(["bash", "-c", "sleep 300 & sleep 300 & wait"], preexec_fn=os.setsid)
    time.sleep(0.3)
    assert len(gpu_check.group_alive(p.pid)) == 3
    assert gpu_check.kill_group(p.pid)
    p.wait()
    assert gpu_check.group_alive(p.pid) == []


def test_summary_states_each_target_from_the_tables(tmp_path):
    """The ratios come from the CSV rows (a GPU run's numbers, here written by hand); a table that is
    missing reads "not measured"; RESULTS.md gets the rows between its markers, the rest unchanged."""
    import gpu_summary
    import harness
    shape = dict(N=16384, V=128256)
    with harness.Results(str(tmp_path / "bench_loss.csv"), echo=None) as res:
        for provider, ms, mib in (("fastfuse", 2.0, 0.0), ("liger_ce", 2.5, 10.0)):
            res.add("fused_loss", provider, "time", "ms", shape, ms, floor_ms=1.8)
            res.add("fused_loss", provider, "extra_memory", "MiB", shape, mib)
    with harness.Results(str(tmp_path / "bench_divergences.csv"), echo=None) as res:
        for case, ms, x_ce in (("ce", 2.0, 1.0), ("jsd/renormalize", 2.4, 1.2), ("jsd/uniform", 5.0, 2.5)):
            res.add("divergences", case, "time", "ms", shape, ms, x_ce=x_ce, floor_ms=1.8, of_floor=1.8 / ms)
    md = tmp_path / "RESULTS.md"
    md.write_text(f"# R\n\nbefore\n\n{gpu_summary.BEGIN}\nold\n{gpu_summary.END}\n\nafter\n")
    info = dict(dry_run=False, deadline_s=480, elapsed_s=100.0, steps=[dict(step="loss_table", status="ok", seconds=9.0)])
    gpu_summary.write_all(str(tmp_path), info, str(md))
    got = {t["target"]: t for t in json.loads((tmp_path / "summary.json").read_text())["targets"]}
    floor = got["fused_loss N=16384 V=128256: fastfuse of the copy floor"]
    assert floor["ratio"] == "90.0%" and floor["met"] is True
    liger = got["fused_loss N=16384 V=128256: fastfuse / Liger hard-label CE"]
    assert liger["ratio"] == "0.80x" and liger["met"] is True
    assert got["divergence jsd/renormalize / ce"]["met"] is False
    assert got["divergence jsd/uniform / ce"]["met"] is None                  # tail pass: stated
    assert got["fused_linear_loss N=8192 H=4096 V=128256: time / matmul floor"]["measured"] == "not measured"
    out = (tmp_path / "RESULTS.md").read_text()
    assert out.startswith("# R\n\nbefore\n") and out.endswith("\n\nafter\n") and "old" not in out
    assert "| 16384 x 128256 | fastfuse | 2.000 | 90.0% | 0 |" in out
