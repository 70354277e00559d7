"""The one harness every benchmark runs through: its command line, its timing, its CSV.

A benchmark is a script ``benchmarks/bench_<what>.py`` (``run.py`` runs every one it finds) with a
``main(argv)`` that builds its command line with :func:`parser`, times with :func:`measure` and
writes each measurement through :class:`Results`. The GPU scripts (``gpu_*.py``) use the same.

One CSV schema for all of them, one measurement per row (:data:`COLUMNS`):

* ``kernel``    what is measured: ``fused_loss``, ``dtw_align``, ``vocab_map mined``, ...
* ``provider``  who computes it: ``fastfuse``, ``liger_ce``, ``python reference``, a launch config, ...
* ``metric``, ``unit``  ``time`` / ``ms`` (the median of the timed runs), ``extra_memory`` / ``MiB``,
  ``throughput`` / ``M tok/s``, ...
* ``x_name``, ``x_value``  the shape: the keys and values of a dict joined by `` x ``
  (``N x V`` / ``16384 x 128256``); :func:`read` splits them back
* ``value``     a number
* ``extra``     a JSON object: the spread of the timed runs (``min_ms``, ``max_ms``, ``iters``), the
  floor, notes

Timing: CUDA events (and the peak of allocated memory above the start) on a CUDA device, the host's
``perf_counter`` elsewhere; warm-up runs first, then the median and the spread of the timed runs.
"""
from __future__ import annotations

import argparse
import csv
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable

COLUMNS = ("kernel", "provider", "metric", "unit", "x_name", "x_value", "value", "extra")
SEP = " x "             # joins the shape's names and values in x_name / x_value
SKIPPED = 3             # exit status of a benchmark that cannot run here (needs CUDA); run.py says "skipped"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------ command line
def parser(doc: str, cuda: bool = True) -> argparse.ArgumentParser:
    """The benchmarks' shared options; a script adds its own. ``cuda=False``: a CPU-only benchmark."""
    ap = argparse.ArgumentParser(description=doc.strip().splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer shapes and iterations")
    ap.add_argument("--tiny", action="store_true",
                    help="the smallest shapes, one iteration: proves it runs on CPU (timings meaningless)")
    ap.add_argument("--csv", metavar="PATH", default=None,
                    help=f"write the measurements here, row by row (columns: {', '.join(COLUMNS)})")
    ap.add_argument("--device", default=None, choices=["cpu", "cuda"],
                    help="default: cuda when available" if cuda else "this benchmark runs on the CPU "
                    "whatever is given (run.py passes one --device to all)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed runs before the timed ones")
    ap.add_argument("--iters", type=int, default=None, help="timed runs (the median is reported)")
    return ap


def iterations(args, full: tuple[int, int] = (2, 5), quick: tuple[int, int] = (1, 3)) -> tuple[int, int]:
    """``(warmup, iters)``: the script's defaults for a full or ``--quick`` run (``--tiny``: 0 and 1),
    each overridden by ``--warmup`` / ``--iters``."""
    warmup, iters = (0, 1) if args.tiny else quick if args.quick else full
    return (warmup if args.warmup is None else args.warmup), (iters if args.iters is None else args.iters)


def device(args) -> str:
    """``--device``, else ``cuda`` when torch sees one, else ``cpu``."""
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device (leave --device out, or --device cpu)")
    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")


def need_cuda(args, name: str) -> None:
    """A GPU benchmark without a CUDA device and without ``--tiny``: say so, exit :data:`SKIPPED`."""
    if not args.tiny and device(args) != "cuda":
        print(f"{name}: needs a CUDA device (--tiny: a CPU dry run at tiny shapes); skipped")
        sys.exit(SKIPPED)


# ------------------------------------------------------------------ timing
def _is_cuda(dev) -> bool:
    return str(dev).startswith("cuda")


def clock(step: Callable[[], object], dev="cpu") -> tuple[float, int]:
    """Run ``step()`` once: ``(ms, peak bytes allocated above the start)``. On CUDA between events
    (synchronised), elsewhere on the host clock with a peak of 0."""
    if not _is_cuda(dev):
        t = time.perf_counter()
        step()
        return (time.perf_counter() - t) * 1e3, 0
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    step()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end), torch.cuda.max_memory_allocated() - base


@dataclass(frozen=True)
class Timing:
    """The timed runs of one step: median, spread, and the largest peak of extra memory (CUDA)."""
    ms: float
    min_ms: float
    max_ms: float
    iters: int
    peak_bytes: int | None          # None off CUDA (not measured)

    @property
    def seconds(self) -> float:
        return self.ms / 1e3

    def extra(self) -> dict:
        return dict(min_ms=round(self.min_ms, 6), max_ms=round(self.max_ms, 6), iters=self.iters)


def timing_of(samples: list[tuple[float, int]], dev="cpu") -> Timing:
    """A :class:`Timing` from ``(ms, peak bytes)`` samples (a script that times its own way)."""
    times = [s[0] for s in samples]
    return Timing(statistics.median(times), min(times), max(times), len(times),
                  max(s[1] for s in samples) if _is_cuda(dev) else None)


def measure(step: Callable[[], object], dev="cpu", warmup: int = 2, iters: int = 5,
            once: Callable[[Callable], tuple[float, int]] | None = None) -> Timing:
    """``warmup`` untimed calls of ``step()``, then ``iters`` timed ones. ``once(step) -> (ms, bytes)``
    replaces :func:`clock` where a run needs untimed set-up of its own (a fresh copy of the input)."""
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    run = once or (lambda s: clock(s, dev))
    for _ in range(warmup):
        run(step)
    return timing_of([run(step) for _ in range(iters)], dev)


def ms_per_call(fn: Callable[[], object], dev="cpu", reps: int = 10, warmup: int = 3) -> float:
    """Mean milliseconds of ``fn()`` over ``reps`` back-to-back calls (rates: a copy, a matmul)."""
    for _ in range(warmup):
        fn()
    ms, _ = clock(lambda: [fn() for _ in range(reps)], dev)
    return ms / reps


def free_memory() -> None:
    """Collect garbage and return CUDA's cached blocks (between shapes)."""
    gc.collect()
    if "torch" in sys.modules and sys.modules["torch"].cuda.is_available():
        sys.modules["torch"].cuda.empty_cache()


def device_name(dev="cuda") -> str:
    import torch

    if _is_cuda(dev) and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return "cpu"


# ------------------------------------------------------------------ the CSV
def _cell(v) -> str:
    s = str(v)
    if SEP in s:
        raise ValueError(f"a shape value may not contain {SEP!r}: {s!r}")
    return s


class Results:
    """The measurements of one run: each row printed (``echo``) and, with a ``path``, appended to
    the CSV and flushed at once, so a run cut short keeps what it measured."""

    def __init__(self, path: str | None = None, echo: Callable[[str], object] | None = print):
        self.path, self.echo, self.rows = path, echo, []
        self._f = None
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self._f = open(path, "w", newline="")
            self._w = csv.DictWriter(self._f, fieldnames=COLUMNS)
            self._w.writeheader()
            self._f.flush()

    def add(self, kernel: str, provider: str, metric: str, unit: str, x: dict, value: float, **extra) -> dict:
        """One measurement; ``x`` is the shape (``dict(N=16384, V=128256)``), ``extra`` any JSON."""
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise TypeError(f"value must be a number, got {value!r}")
        row = dict(kernel=kernel, provider=provider, metric=metric, unit=unit,
                   x_name=SEP.join(_cell(k) for k in x), x_value=SEP.join(_cell(v) for v in x.values()),
                   value=f"{float(value):.7g}",
                   extra=json.dumps(extra, sort_keys=True) if extra else "")
        self.rows.append(row)
        if self._f:
            self._w.writerow(row)
            self._f.flush()
        if self.echo:
            note = ", ".join(f"{k} {v}" for k, v in extra.items() if k not in ("min_ms", "max_ms", "iters"))
            self.echo(f"{kernel:<22} {provider:<34} {row['x_value']:>18} {metric:>12} {float(value):>12.4g} "
                      f"{unit:<8}{note}")
        return row

    def time(self, kernel: str, provider: str, x: dict, t: Timing, unit: str = "ms", **extra) -> None:
        """A :class:`Timing`: its median as ``time`` (with its spread in ``extra``), and on CUDA its
        peak extra memory as ``extra_memory`` in MiB."""
        self.add(kernel, provider, "time", unit, x, t.ms if unit == "ms" else t.seconds, **t.extra(), **extra)
        if t.peak_bytes is not None:
            self.add(kernel, provider, "extra_memory", "MiB", x, t.peak_bytes / 2**20)

    def close(self) -> None:
        if self._f:
            self._f.close()
            self._f = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read(path: str) -> list[dict]:
    """The rows of a harness CSV: ``value`` a float, ``x`` the shape as a dict (numbers where they
    parse), ``extra`` a dict."""
    out = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            names, values = r["x_name"].split(SEP), r["x_value"].split(SEP)
            x = {k: _number(v) for k, v in zip(names, values)} if r["x_name"] else {}
            out.append(dict(r, value=float(r["value"]), x=x, extra=json.loads(r["extra"]) if r["extra"] else {}))
    return out


def _number(s: str):
    for kind in (int, float):
        try:
            return kind(s)
        except ValueError:
            pass
    return s


def pivot(rows: list[dict]) -> list[dict]:
    """One dict per (kernel, provider, shape), in first-seen order: the shape's fields, the extras,
    and each metric's value under its name (``time``, ``extra_memory``, ...)."""
    out: dict[tuple, dict] = {}
    for r in rows:
        d = out.setdefault((r["kernel"], r["provider"], r["x_value"]),
                           dict(kernel=r["kernel"], provider=r["provider"], **r["x"]))
        d.update(r["extra"])
        d[r["metric"]] = r["value"]
    return list(out.values())


# ------------------------------------------------------------------ providers x shapes
def sweep(results: Results, kernel: str, shapes: list[dict], providers: list[str], inputs: Callable,
          provider_fn: Callable, time_one: Callable, floor_ms: Callable | None = None,
          errors: list | None = None) -> None:
    """Every provider on every shape: ``inputs(**shape)`` once per shape, ``provider_fn(name)`` (None:
    not installed, reported and skipped), ``time_one(fn, data) -> Timing`` into ``results`` (with
    ``floor_ms(**shape)`` in its extras). A provider that runs out of memory or raises is reported
    (and appended to ``errors``); the sweep goes on."""
    for shape in shapes:
        data = inputs(**shape)
        floor = dict(floor_ms=round(floor_ms(**shape), 6)) if floor_ms else {}
        for name in providers:
            fn = provider_fn(name)
            if fn is None:
                print(f"{kernel:<22} {name:<34} n/a (not installed)")
                continue
            try:
                t = time_one(fn, data)
            except Exception as e:  # keep the sweep going: a cut GPU window still returns the rest
                oom = type(e).__name__ == "OutOfMemoryError"
                print(f"{kernel:<22} {name:<34} {'OOM' if oom else f'error: {type(e).__name__}: {str(e)[:80]}'}")
                if errors is not None and not oom:
                    errors.append((kernel, name, shape, repr(e)))
                free_memory()
                continue
            results.time(kernel, name, shape, t, **floor)
        del data
        free_memory()


# ------------------------------------------------------------------ a source checkout
def source_tree_package(py: str = sys.executable, env: dict | None = None) -> str | None:
    """A scratch folder holding ``fastfuse/`` (links to the source tree's files) and ``kernels/`` as
    ``fastfuse/kernels`` -- what the wheel maps -- for a machine where fastfuse is not installed
    (a fresh GPU machine: the loss does not need the C++ core). None when ``py`` imports it."""
    import subprocess

    probe = "import fastfuse.loss.logits_loss, fastfuse.kernels.fused_ce"
    if subprocess.run([py, "-c", probe], cwd=os.path.join(ROOT, "tests"), env=env,
                      capture_output=True).returncode == 0:
        return None
    return _link_source_tree()


def _link_source_tree() -> str:
    shim = tempfile.mkdtemp(prefix="fastfuse-src-")
    os.mkdir(os.path.join(shim, "fastfuse"))
    for name in os.listdir(os.path.join(ROOT, "fastfuse")):
        os.symlink(os.path.join(ROOT, "fastfuse", name), os.path.join(shim, "fastfuse", name))
    os.symlink(os.path.join(ROOT, "kernels"), os.path.join(shim, "fastfuse", "kernels"))
    return shim


def use_source_tree() -> None:
    """Make ``import fastfuse.kernels`` work in this process and its children (PYTHONPATH) where
    fastfuse is not installed: the source tree linked as a package."""
    try:
        import fastfuse.kernels.fused_ce  # noqa: F401
        import fastfuse.loss.logits_loss  # noqa: F401
        return
    except ImportError:
        for name in [m for m in sys.modules if m == "fastfuse" or m.startswith("fastfuse.")]:
            del sys.modules[name]
    import atexit

    shim = _link_source_tree()
    atexit.register(shutil.rmtree, shim, True)
    sys.path.insert(0, shim)
    os.environ["PYTHONPATH"] = os.pathsep.join([shim] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    print(f"(fastfuse not installed: fastfuse and fastfuse.kernels from the source tree via {shim})")
