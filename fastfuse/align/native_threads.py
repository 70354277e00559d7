"""The one check for every ``num_threads`` argument of the C++ core.

Used by ``align_offsets_batch``, ``align_texts``, ``dtw_align``, ``dtw_align_batch`` and
``VocabMap.build`` / ``VocabMap.from_token_bytes``, so they all accept and refuse the same values.
No numpy or torch import: any int-like (``operator.index``) is accepted.
"""
from __future__ import annotations

import operator
from typing import Any

from fastfuse import _C

__all__ = ["MAX_THREADS", "check_num_threads"]

# More threads than this only costs stacks and start-up time (the work is CPU-bound): the C++
# core's own cap (kMaxThreads in csrc/common.hpp), so the two cannot drift apart.
MAX_THREADS: int = _C.MAX_THREADS


def check_num_threads(value: Any, name: str = "num_threads") -> int:
    """``value`` as a thread count for the C++ core: 0 = all cores, else capped at :data:`MAX_THREADS`.

    Raises:
        TypeError: not an int (bool and float included); the message names ``name``.
        ValueError: negative.
    """
    n = None
    if not isinstance(value, bool):
        try:
            n = operator.index(value)
        except TypeError:
            pass
    if n is None:
        raise TypeError(f"{name}: expected an int >= 0 (0 = all cores), got {type(value).__name__}")
    if n < 0:
        raise ValueError(f"{name}: expected an int >= 0 (0 = all cores), got {n}")
    return min(n, MAX_THREADS)
