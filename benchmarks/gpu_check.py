"""The GPU window's one command (``bash benchmarks/gpu_check.sh`` runs this with ``python3``).

    python3 benchmarks/gpu_check.py [OUT_DIR] [--deadline 480] [--pack DIR] [--only a,b] [--dry-run]

Steps, each a child process in its own process group (session), one after another:

1. ``versions``          torch / triton / device;
2. ``gpu_tests``         ``pytest -m gpu tests/kernels/test_gpu.py -v`` with ``-n auto`` (pytest-xdist) and a
                         per-test timeout (pytest-timeout) where installed, junit XML;
3. ``loss_table``        ``fused_loss`` at N = 16384, V = 128256 first (then 32000), against the copy floor,
                         Liger and the torch providers (``bench_loss.py --quick``);
4. ``candidates``        every candidate launch configuration of the row kernels, timed per shape, the
                         winners written as ``launch_tuned.json`` (``gpu_candidates.py``);
5. ``divergence_table``  each divergence x tail against ``ce`` at N = 16384, V = 128256 (``bench_divergences.py``);
6. ``linear_table``      ``fused_linear_loss`` against its matmul floor at N = 8192, H = 4096, V = 128256
                         (``bench_linear_loss.py``);
7. ``tp_loss``           the vocabulary-parallel loss on a one-rank group (``gpu_tp_loss.py``).

The tables are the benchmarks ``run.py`` runs, by the same names (``bench_*.py``), plus the two GPU-only
scripts; all write the harness's CSV (``harness.COLUMNS``), which :mod:`gpu_summary` reads.

**One deadline** (``--deadline`` seconds from the start, default 480) bounds the whole run: a step gets
``min(its cap, time left)``; when that runs out its whole process group gets SIGTERM, then SIGKILL,
and what is left of the run is marked "not run". SIGTERM/SIGINT to this script do the same. Every
step writes its results as it goes (CSV rows flushed one by one, unbuffered logs); after every step
``summary.md`` / ``summary.json`` (each target and its measured ratio, :mod:`gpu_summary`) and
``RESULTS.md`` (the repository's file with its "GPU" section filled in) are rewritten, and with
``--pack DIR`` copied there with a tarball of everything, so a cut run still returns what it measured.

In the workplace's device tool (one call, ``timeout_s`` 570; Liger's pure-Python wheel carried in a
git-ignored ``.whl/``, see ``gpu_check.sh``): ``bash benchmarks/gpu_check.sh /tmp/gc --pack $OUT``.
Then commit ``RESULTS.md`` over ``benchmarks/RESULTS.md`` and ``launch_tuned.json`` as
``kernels/launch_tuned.json``, the numbers of ``summary.md`` in the message.

``--dry-run``: the same steps on CPU under ``TRITON_INTERPRET=1`` at tiny shapes (the kernels run in the
interpreter; timings are meaningless), default deadline 240 s: what CI runs (``tests/kernels/test_gpu_check.py``).
The register tables (``kernel_resources.py``: an ahead-of-time compile, no GPU needed) run in CI.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import gpu_summary  # noqa: E402
import harness  # noqa: E402

VERSIONS = ("import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, "
            "torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')")
# per-step caps (s): the sum exceeds the default deadline on purpose -- a fast step leaves its rest
CAPS = dict(versions=30, gpu_tests=150, loss_table=100, candidates=100, divergence_table=80, linear_table=60,
            tp_loss=45)
# the target shapes of the dry run's tables (the scripts' --tiny): loss (N, V), linear (N, H, V)
TINY_TARGETS = dict(loss=(16, 40000), linear=(16, 64, 40000))
GRACE_S = 3.0           # between SIGTERM and SIGKILL of a step's group


def steps(out: str, dry: bool, py: str) -> list[tuple[str, list[str]]]:
    """``(name, argv)`` of every step, in order."""
    tiny = ["--tiny"] if dry else []
    tests = [py, "-m", "pytest", "kernels/test_gpu.py", "-m", "gpu", "-v", "-p", "no:cacheprovider", "-rfs",
             f"--junitxml={out}/gpu_tests.xml"]
    if importlib.util.find_spec("xdist"):
        tests += ["-n", "auto"]
    if importlib.util.find_spec("pytest_timeout"):
        tests += ["--timeout", "90"]
    return [
        ("versions", [py, "-c", VERSIONS]),
        ("gpu_tests", tests),
        ("loss_table", [py, f"{HERE}/bench_loss.py", "--quick", "--csv", f"{out}/bench_loss.csv"] + tiny),
        ("candidates", [py, f"{HERE}/gpu_candidates.py", "--csv", f"{out}/candidates.csv",
                        "--table", f"{out}/launch_tuned.json"] + tiny),
        ("divergence_table", [py, f"{HERE}/bench_divergences.py", "--csv", f"{out}/bench_divergences.csv",
                              "--warm-jobs", "8"] + tiny),
        ("linear_table", [py, f"{HERE}/bench_linear_loss.py", "--csv", f"{out}/bench_linear_loss.csv"] + tiny),
        ("tp_loss", [py, f"{HERE}/gpu_tp_loss.py", "--quick", "--csv", f"{out}/gpu_tp_loss.csv"] + tiny),
    ]


def group_alive(pgid: int) -> list[int]:
    """Pids of the processes still in process group ``pgid`` (from /proc; zombies excluded)."""
    alive = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(stat[2]) == pgid and stat[0] != "Z":
            alive.append(int(entry))
    return alive


def kill_group(pgid: int) -> bool:
    """SIGTERM the group, SIGKILL what is left after ``GRACE_S``; True when nothing of it is left."""
    for sig, wait in ((signal.SIGTERM, GRACE_S), (signal.SIGKILL, 2.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return True
        t = time.monotonic()
        while time.monotonic() - t < wait:
            if not group_alive(pgid):
                return True
            time.sleep(0.05)
    return not group_alive(pgid)


def _die_with_parent():
    """In the step's child: own session (its group is what the deadline kills), and SIGKILL when this
    script dies (Linux), so even a killed driver leaves no step holding the GPU."""
    os.setsid()
    try:
        import ctypes
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)          # PR_SET_PDEATHSIG
    except Exception:
        pass


class Run:
    def __init__(self, out: str, deadline_s: float, pack: str | None, dry: bool):
        self.out, self.pack, self.dry = out, pack, dry
        self.t0 = time.monotonic()
        self.deadline = self.t0 + deadline_s
        self.deadline_s = deadline_s
        self.results: list[dict] = []
        self.current: subprocess.Popen | None = None

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def run_step(self, name: str, argv: list[str], env: dict) -> dict:
        limit = min(CAPS.get(name, 60), self.left())
        rec = dict(step=name, status="not run", seconds=0.0, rc=None, pgid=None, limit_s=round(limit, 1))
        if limit <= 1.0:
            rec["status"] = "not run (deadline)"
            return rec
        t = time.monotonic()
        cwd = os.path.join(ROOT, "tests") if name == "gpu_tests" else ROOT
        with open(os.path.join(self.out, f"{name}.log"), "w") as log:
            log.write(f"$ {' '.join(argv)}\n")
            log.flush()
            self.current = p = subprocess.Popen(argv, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
            rec["pgid"] = p.pid
            with open(os.path.join(self.out, "pgids.txt"), "a") as f:
                f.write(f"{p.pid} {name}\n")
            try:
                rc = p.wait(timeout=limit)
                rec.update(rc=rc, status="ok" if rc == 0 else f"failed (rc {rc})")
            except subprocess.TimeoutExpired:
                cut_by = "deadline" if self.left() <= 1.0 else "step cap"
                clean = kill_group(p.pid)
                p.wait()
                rec.update(rc=p.returncode, status=f"cut ({cut_by}, {limit:.0f} s)" + ("" if clean else
                                                                                       ", processes left!"))
            finally:
                if group_alive(p.pid):      # the step ended but left children behind: stop them too
                    kill_group(p.pid)
                self.current = None
        rec["seconds"] = round(time.monotonic() - t, 1)
        return rec

    def interrupt(self, signum, frame):
        if self.current is not None:
            kill_group(self.current.pid)
        self.results.append(dict(step="(interrupted)", status=f"signal {signum}", seconds=0.0))
        self.write()
        sys.exit(128 + signum)

    def write(self):
        """summary.{md,json} and RESULTS.md now; with --pack, those and a tarball of OUT there."""
        info = dict(out=self.out, dry_run=self.dry, deadline_s=self.deadline_s,
                    elapsed_s=round(time.monotonic() - self.t0, 1), steps=self.results,
                    shapes=TINY_TARGETS if self.dry else None)
        gpu_summary.write_all(self.out, info, os.path.join(ROOT, "benchmarks", "RESULTS.md"))
        if self.pack:
            os.makedirs(self.pack, exist_ok=True)
            for f in ("summary.md", "summary.json", "RESULTS.md", "launch_tuned.json"):
                if os.path.exists(os.path.join(self.out, f)):
                    shutil.copy(os.path.join(self.out, f), os.path.join(self.pack, f))
            tmp = os.path.join(self.pack, ".gpu_results.tgz")
            with tarfile.open(tmp, "w:gz") as tar:
                tar.add(self.out, arcname=os.path.basename(self.out))
            os.replace(tmp, os.path.join(self.pack, "gpu_results.tgz"))


def source_env(py: str, env: dict) -> tuple[dict, str | None]:
    """Where fastfuse is not importable as installed (a fresh GPU machine: no C++ core built), the
    source tree linked as a package (:func:`harness.source_tree_package`) goes first on PYTHONPATH."""
    shim = harness.source_tree_package(py, env)
    if shim is None:
        return env, None
    return dict(env, PYTHONPATH=os.pathsep.join([shim] + [p for p in [env.get("PYTHONPATH")] if p])), shim


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", nargs="?", default=None, help="results folder (default results/gpu-<UTC time>)")
    ap.add_argument("--deadline", type=float, default=None, help="seconds for the whole run (480; dry run 240)")
    ap.add_argument("--pack", default=None, help="after each step copy the summary, RESULTS.md, launch_tuned.json "
                                                 "and a tarball of the results folder here (e.g. $OUT)")
    ap.add_argument("--only", default=None, help="comma-separated step names")
    ap.add_argument("--dry-run", action="store_true", help="CPU, TRITON_INTERPRET=1, tiny shapes")
    a = ap.parse_args(argv)
    out = os.path.abspath(a.out or os.path.join(ROOT, "results", time.strftime("gpu-%Y%m%d-%H%M%S", time.gmtime())))
    os.makedirs(out, exist_ok=True)
    py = os.environ.get("PYTHON") or "python3"
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", FASTFUSE_OFFLINE="1")
    if a.dry_run:
        env.update(TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    run = Run(out, a.deadline if a.deadline is not None else (240.0 if a.dry_run else 480.0), a.pack, a.dry_run)
    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, run.interrupt)
    env, shim = source_env(py, env)
    todo = steps(out, a.dry_run, py)
    if a.only:
        names = a.only.split(",")
        unknown = set(names) - {n for n, _ in todo}
        if unknown:
            ap.error(f"--only: unknown steps {sorted(unknown)}; expected names from {[n for n, _ in todo]}")
        todo = [(n, c) for n, c in todo if n in names]
    print(f"gpu_check: {len(todo)} steps, deadline {run.deadline_s:.0f} s, results in {out}", flush=True)
    try:
        ok = run_all(run, todo, env)
    finally:
        if shim:
            shutil.rmtree(shim, ignore_errors=True)
    print(open(os.path.join(out, "summary.md")).read())
    return 0 if ok else 1


def run_all(run: Run, todo: list[tuple[str, list[str]]], env: dict) -> bool:
    """Every step in turn under the run's one deadline, the summary rewritten after each; True when all
    were ok."""
    for name, cmd in todo:
        rec = run.run_step(name, cmd, env)
        run.results.append(rec)
        print(f"== {name:<17} {rec['status']} ({rec['seconds']} s)", flush=True)
        run.write()
    return all(r["status"] == "ok" for r in run.results)


if __name__ == "__main__":
    sys.exit(main())
