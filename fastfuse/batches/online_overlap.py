"""Overlap: the online teachers score the next batches while the student trains on this one.

:func:`prefetch` runs :class:`fastfuse.batches.online.OnlineTeachers` on the batches ahead in one background
thread. What overlaps is whatever leaves the Python thread free: a served teacher's HTTP wait (the
server computes in its own process or machine), and the teachers' torch kernels (which release the
GIL) -- on a GPU in their own CUDA stream, so they run beside the student's kernels instead of queueing
behind them. Teachers on the same CPU cores as the student mostly trade places with it: measure
(``benchmarks/bench_online.py --overlap``). Only off-policy batches can be scored ahead: an
on-policy batch needs the student of this very step.
"""
from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterable, Iterator

__all__ = ["prefetch"]


def _split(item: Any) -> tuple[Any, Any]:
    if isinstance(item, dict):
        return item["input_ids"], item.get("attention_mask")
    if isinstance(item, (tuple, list)) and len(item) == 2:
        return item[0], item[1]
    if isinstance(item, (tuple, list)):
        raise ValueError(f"batches: expected (input_ids, attention_mask) pairs, got a {len(item)}-tuple")
    return item, None


def _streams(teachers) -> dict:
    """A side CUDA stream per CUDA device of the local teachers (none on CPU)."""
    import torch

    devices = {getattr(t, "device", None) for t in teachers.teachers}
    return {d: torch.cuda.Stream(device=d) for d in devices if d is not None and getattr(d, "type", "") == "cuda"}


def prefetch(teachers, batches: Iterable[Any], depth: int = 1) -> Iterator[tuple[Any, dict[str, Any]]]:
    """Yields ``(item, teachers(input_ids, attention_mask))`` for every item of ``batches`` (a
    ``(input_ids, attention_mask)`` pair, a dict with those keys, or ``input_ids`` alone), in order,
    scoring up to ``depth`` items ahead in a background thread. An error in the teachers is raised
    where its batch would have been yielded; closing the generator stops the thread."""
    import torch

    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise ValueError(f"depth: expected a positive int (batches scored ahead), got {depth!r}")
    streams = _streams(teachers)

    def score(item):
        ids, mask = _split(item)
        if not streams:
            return teachers(ids, mask)
        for s in streams.values():      # the batch's ids were made on the default stream
            s.wait_stream(torch.cuda.current_stream(s.device))
        with _on_streams(streams):
            return teachers(ids, mask)

    items = iter(batches)
    window: deque = deque()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastfuse-teachers") as pool:
        try:
            for item in items:
                window.append((item, pool.submit(score, item)))
                if len(window) > depth:
                    head, fut = window.popleft()
                    yield head, fut.result()
            while window:
                head, fut = window.popleft()
                yield head, fut.result()
        finally:
            for _, fut in window:
                fut.cancel()


class _on_streams:
    """Every side stream current on its device for the ``with`` block (one per CUDA device)."""

    def __init__(self, streams: dict):
        import torch

        self.contexts = [torch.cuda.stream(s) for s in streams.values()]

    def __enter__(self):
        for c in self.contexts:
            c.__enter__()

    def __exit__(self, *exc):
        for c in reversed(self.contexts):
            c.__exit__(*exc)
        return False
