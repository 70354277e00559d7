"""Run every benchmark -- each ``benchmarks/bench_*.py``, found by name -- one after another.

    python benchmarks/run.py                      # all of them (the GPU ones say "skipped" without CUDA)
    python benchmarks/run.py --tiny --csv-dir DIR # each at tiny shapes on CPU, its rows in DIR/<name>.csv
    python benchmarks/run.py --only dtw,vocab     # bench_dtw.py and bench_vocab.py
    python benchmarks/run.py --list               # the names, one a line

Each runs in its own process with the options given here (``--quick``, ``--tiny``, ``--device``; with
``--csv-dir``, ``--csv DIR/bench_<name>.csv``: the harness's columns). Exit status 1 if any failed.
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from harness import SKIPPED  # noqa: E402


def benches() -> list[str]:
    """The file names of every benchmark, sorted."""
    return sorted(f for f in os.listdir(HERE) if f.startswith("bench_") and f.endswith(".py"))


def command(name: str, args) -> list[str]:
    """The command line that runs benchmark ``name`` (a file name) with ``args``' options."""
    cmd = [sys.executable, os.path.join(HERE, name)]
    cmd += [flag for flag, on in (("--quick", args.quick), ("--tiny", args.tiny)) if on]
    if args.device:
        cmd += ["--device", args.device]
    if args.csv_dir:
        cmd += ["--csv", os.path.join(args.csv_dir, name[:-3] + ".csv")]
    return cmd


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="passed on: fewer shapes and iterations")
    p.add_argument("--tiny", action="store_true", help="passed on: tiny shapes, one iteration (CPU check)")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"],
                   help="passed on (the CPU-only benchmarks run on the CPU whatever is given)")
    p.add_argument("--csv-dir", default=None, help="each benchmark's rows in DIR/bench_<name>.csv")
    p.add_argument("--only", default=None, help="comma-separated names: dtw or bench_dtw or bench_dtw.py")
    p.add_argument("--list", action="store_true", help="print the benchmarks it would run, one a line; run none")
    args = p.parse_args(argv)
    todo = benches()
    if args.only:
        want = {n if n.startswith("bench_") else f"bench_{n}" for n in args.only.split(",")}
        want = {n if n.endswith(".py") else f"{n}.py" for n in want}
        if want - set(todo):
            p.error(f"--only: no such benchmark {sorted(want - set(todo))}; there are {todo}")
        todo = [n for n in todo if n in want]
    if args.list:
        print("\n".join(todo))
        return 0
    if args.csv_dir:
        os.makedirs(args.csv_dir, exist_ok=True)
    import numpy
    print(f"# fastfuse benchmarks, {time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, Python {platform.python_version()}, numpy {numpy.__version__}\n")
    status = {}
    for name in todo:
        print(f"## {name}", flush=True)
        t = time.monotonic()
        rc = subprocess.call(command(name, args))
        status[name] = "ok" if rc == 0 else "skipped" if rc == SKIPPED else f"FAILED (rc {rc})"
        print(f"({status[name]}, {time.monotonic() - t:.0f} s)\n", flush=True)
    print("# " + ", ".join(f"{n} {s}" for n, s in status.items()))
    return int(any(s.startswith("FAILED") for s in status.values()))


if __name__ == "__main__":
    sys.exit(main())
