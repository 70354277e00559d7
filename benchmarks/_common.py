"""Helpers shared by the benchmark runners: CUDA event timing with peak memory, the median of
repeated runs, and CSV output."""
from __future__ import annotations

import csv
import gc


def cuda_timed(step):
    """Run ``step()`` between CUDA events; ``(ms, peak bytes allocated above the start)``. Without
    CUDA (``gpu_check.py --dry-run``: CPU, interpreter) the host clock and a peak of 0."""
    import time

    import torch

    if not torch.cuda.is_available():
        t = time.perf_counter()
        step()
        return (time.perf_counter() - t) * 1e3, 0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    step()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end), torch.cuda.max_memory_allocated() - base


def cuda_ms_per_call(fn, reps: int = 10, warmup: int = 3) -> float:
    """Mean milliseconds of ``fn()`` over ``reps`` back-to-back calls (rates: copy, matmul)."""
    for _ in range(warmup):
        fn()
    ms, _ = cuda_timed(lambda: [fn() for _ in range(reps)])
    return ms / reps


def median_run(run_once, warmup: int = 2, iters: int = 5):
    """``run_once() -> (ms, extra_bytes)`` repeated: (median ms, max extra bytes)."""
    for _ in range(warmup):
        run_once()
    res = [run_once() for _ in range(iters)]
    times = sorted(r[0] for r in res)
    return times[len(times) // 2], max(r[1] for r in res)


def free_cuda() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (no CUDA: dry run)"


class CsvRows:
    """A CSV file written row by row (flushed each time), so a run cut short keeps what it measured."""

    def __init__(self, path, fields):
        self.f = open(path, "w", newline="") if path else None
        self.w = csv.DictWriter(self.f, fieldnames=fields) if path else None
        if self.w:
            self.w.writeheader()
            self.f.flush()

    def add(self, row: dict):
        if self.w:
            self.w.writerow(row)
            self.f.flush()


def write_csv(path: str, rows: list[dict]) -> None:
    """The rows (dicts with the same keys) as a CSV file with a header."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
