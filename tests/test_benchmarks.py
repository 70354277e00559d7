"""The benchmarks go through one harness (``benchmarks/harness.py``): ``run.py`` runs every
``bench_*.py`` there is, each imports the harness and, at ``--tiny``, runs on CPU and writes a CSV
with exactly the harness's columns; ``gpu_check.py``'s tables are those same scripts."""
from __future__ import annotations

import ast
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))

import harness  # noqa: E402

BENCHES = sorted(p.name for p in BENCH.glob("bench_*.py"))
GPU_SCRIPTS = sorted(p.name for p in BENCH.glob("gpu_*.py") if p.name not in ("gpu_check.py", "gpu_summary.py"))


def _run(*args, timeout=600):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, str(BENCH / "run.py"), *args], capture_output=True, text=True,
                          timeout=timeout, env=dict(env, CUDA_VISIBLE_DEVICES=""))


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


def test_run_lists_exactly_the_bench_files():
    r = _run("--list", timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == BENCHES
    assert len(BENCHES) >= 9


@pytest.mark.parametrize("name", BENCHES + GPU_SCRIPTS)
def test_every_benchmark_goes_through_the_harness(name):
    """The harness's options, timing and CSV writer: no argparse or csv of its own, no pytest-benchmark
    style, a ``main(argv)``."""
    path = BENCH / name
    imports = _imports(path)
    assert "harness" in imports, f"{name} does not import the harness"
    assert not imports & {"argparse", "csv", "pytest", "_common"}, (name, imports & {"argparse", "csv", "pytest"})
    mains = [n for n in ast.parse(path.read_text()).body if isinstance(n, ast.FunctionDef) and n.name == "main"]
    assert mains and mains[0].args.args and mains[0].args.args[0].arg == "argv", f"{name}: no main(argv)"


def test_gpu_check_runs_the_same_scripts():
    """Every script a gpu_check step runs is a benchmark run.py runs (same name) or a GPU script on the
    harness; the loss, linear and divergence tables are the bench_*.py themselves."""
    import gpu_check

    scripts = {}
    for step, argv in gpu_check.steps("/tmp/out", True, "python3"):
        scripts.update({step: Path(a).name for a in argv if a.startswith(str(BENCH)) and a.endswith(".py")})
    assert set(scripts.values()) <= set(BENCHES) | set(GPU_SCRIPTS), scripts
    assert {scripts[s] for s in ("loss_table", "linear_table", "divergence_table")} == {
        "bench_loss.py", "bench_linear_loss.py", "bench_divergences.py"}


def test_results_round_trip(tmp_path):
    path = str(tmp_path / "r.csv")
    with harness.Results(path, echo=None) as res:
        res.add("fused_loss", "fastfuse", "time", "ms", dict(N=16, V=40000), 1.25, floor_ms=0.5)
        res.add("fused_loss", "fastfuse", "extra_memory", "MiB", dict(N=16, V=40000), 3.0)
        res.add("vocab_map exact", "python dict", "time", "s", dict(pair="a->b"), 0.5, note="same ids")
        with pytest.raises(ValueError, match="may not contain"):
            res.add("k", "p", "time", "ms", dict(shape="16 x 4"), 1.0)
        with pytest.raises(TypeError, match="must be a number"):
            res.add("k", "p", "time", "ms", dict(N=1), "1.0")
    with open(path, newline="") as f:
        assert tuple(next(csv.reader(f))) == harness.COLUMNS
    rows = harness.read(path)
    assert [r["x"] for r in rows] == [dict(N=16, V=40000)] * 2 + [dict(pair="a->b")]
    assert rows[0]["x_name"] == "N x V" and rows[0]["x_value"] == "16 x 40000"
    first, vocab = harness.pivot(rows)
    assert first == dict(kernel="fused_loss", provider="fastfuse", N=16, V=40000, floor_ms=0.5, time=1.25,
                         extra_memory=3.0)
    assert vocab["time"] == 0.5 and vocab["note"] == "same ids"


def test_measure_warms_up_then_reports_median_and_spread():
    calls = []
    sleeps = iter([0.0, 0.0, 0.001, 0.02, 0.005])

    def step():
        calls.append(1)
        time.sleep(next(sleeps))

    t = harness.measure(step, "cpu", warmup=2, iters=3)
    assert len(calls) == 5 and t.iters == 3 and t.peak_bytes is None
    assert 1.0 <= t.min_ms <= t.ms <= t.max_ms and t.ms >= 5.0 and t.max_ms >= 20.0
    assert t.extra() == dict(min_ms=round(t.min_ms, 6), max_ms=round(t.max_ms, 6), iters=3)
    with pytest.raises(ValueError, match="iters"):
        harness.measure(step, "cpu", iters=0)


def test_shared_options():
    ap = harness.parser("doc")
    assert harness.iterations(ap.parse_args(["--tiny"])) == (0, 1)
    assert harness.iterations(ap.parse_args(["--quick"]), quick=(1, 3)) == (1, 3)
    assert harness.iterations(ap.parse_args(["--iters", "9"])) == (2, 9)
    a = ap.parse_args(["--csv", "x.csv", "--device", "cpu"])
    assert a.csv == "x.csv" and harness.device(a) == "cpu"
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="--device cuda: torch sees no CUDA device"):
            harness.device(ap.parse_args(["--device", "cuda"]))


@pytest.mark.slow
def test_gpu_benchmark_without_cuda_is_skipped_not_failed():
    """(``_run`` hides any CUDA device.)"""
    r = _run("--only", "loss", timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "needs a CUDA device" in r.stdout and "bench_loss.py skipped" in r.stdout


@pytest.mark.slow
@pytest.mark.parametrize("name", BENCHES)
def test_tiny_run_writes_the_schema(name, tmp_path):
    """``run.py --tiny`` runs the benchmark on CPU (the loss ones on the torch path here; gpu_check's
    dry run runs them under the interpreter) and its CSV has exactly the harness's columns."""
    r = _run("--tiny", "--only", name, "--csv-dir", str(tmp_path), timeout=400)
    assert r.returncode == 0 and f"{name} ok" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
    with open(tmp_path / name.replace(".py", ".csv"), newline="") as f:
        reader = csv.reader(f)
        assert tuple(next(reader)) == harness.COLUMNS
        rows = list(reader)
    assert rows, f"{name} wrote no measurement"
    for row in rows:
        r = dict(zip(harness.COLUMNS, row))
        assert len(row) == len(harness.COLUMNS) and r["kernel"] and r["provider"] and r["metric"] and r["unit"]
        assert float(r["value"]) == float(r["value"]), r            # a number, not NaN
        assert len(r["x_name"].split(harness.SEP)) == len(r["x_value"].split(harness.SEP)), r
        assert r["extra"] == "" or isinstance(json.loads(r["extra"]), dict), r
    assert any(dict(zip(harness.COLUMNS, row))["metric"] == "time" for row in rows)


def test_sweep_times_every_provider_on_every_shape_and_goes_on_after_an_error(tmp_path, capsys):
    def provider_fn(name):
        if name == "absent":
            return None
        if name == "broken":
            def broken(data):
                raise RuntimeError("boom")
            return broken
        return lambda data: time.sleep(0.001 * data)

    errors: list = []
    with harness.Results(str(tmp_path / "s.csv"), echo=None) as res:
        harness.sweep(res, "k", [dict(N=1), dict(N=2)], ["fast", "absent", "broken"], inputs=lambda N: N,
                      provider_fn=provider_fn, time_one=lambda fn, d: harness.measure(lambda: fn(d), "cpu", 0, 2),
                      floor_ms=lambda N: 0.5 * N, errors=errors)
    rows = harness.pivot(harness.read(str(tmp_path / "s.csv")))
    assert [(r["provider"], r["N"], r["floor_ms"]) for r in rows] == [("fast", 1, 0.5), ("fast", 2, 1.0)]
    assert rows[1]["time"] >= 2.0 and rows[1]["iters"] == 2
    assert [(e[1], e[2]) for e in errors] == [("broken", dict(N=1)), ("broken", dict(N=2))]
    out = capsys.readouterr().out
    assert "absent" in out and "n/a (not installed)" in out and "error: RuntimeError: boom" in out
