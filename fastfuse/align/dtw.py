"""MinED alignment: dynamic time warping of two token sequences with edit-distance cost.

The fallback alignment when no character offsets are available (DESIGN.md §2). It reproduces
FuseLLM's ``dtw(src, tgt, norm_func=editdistance.eval)`` exactly, ties included: the target-side
mapping (its 4th return value, ``mappings_series_2``) and the total cost. The work is done in
C++ (``fastfuse._C``): unique-pair edit distances, then an integer DP with the backtrack
direction recorded in the forward pass.
"""
from __future__ import annotations

import operator
from typing import Any, Sequence

import numpy as np

from fastfuse import _C
from fastfuse.align.native_threads import check_num_threads

__all__ = ["DTWAlignment", "dtw_align", "dtw_align_batch", "DEFAULT_MAX_CELLS"]

# 2**30 (a 32768 x 32768 alignment): at most ~1.3 GiB of cost rows and backtrack bits, ~4.3 GiB
# when a token has > 255 code points (int32 costs), and a few seconds of DP. See dtw_align.
DEFAULT_MAX_CELLS: int = _C.DTW_DEFAULT_MAX_CELLS


class DTWAlignment:
    """The DTW path from source tokens to target tokens, as CSR over target tokens.

    Attributes:
        indptr: int64 ``[T + 1]``. Target token ``t`` is mapped from the source tokens
            ``indices[indptr[t]:indptr[t + 1]]`` (ascending, never empty).
        indices: int32 ``[P]``, the source coordinate of each path cell in path order.
        cost: the DTW total cost (sum of edit distances along the path), an int.
    """

    __slots__ = ("indptr", "indices", "cost")

    def __init__(self, indptr: np.ndarray, indices: np.ndarray, cost: int):
        self.indptr = indptr
        self.indices = indices
        self.cost = int(cost)

    @property
    def num_tgt(self) -> int:
        return len(self.indptr) - 1

    def sources(self, t: int) -> np.ndarray:
        """Source indices mapped to target token ``t``: int32 ``[k]``, ascending."""
        return self.indices[self.indptr[t] : self.indptr[t + 1]]

    def to_lists(self) -> list[list[int]]:
        """FuseLLM's ``mappings_series_2``: one list of source indices per target token."""
        return [self.indices[a:b].tolist() for a, b in zip(self.indptr[:-1], self.indptr[1:])]

    def one_to_one(self) -> np.ndarray:
        """int32 ``[T]``: the source index where target token t's list has exactly one element
        (FuseLLM's ``len(list) == 1`` test for a 1-to-1 match), else -1."""
        counts = np.diff(self.indptr)
        out = np.full(self.num_tgt, -1, dtype=np.int32)
        single = counts == 1
        out[single] = self.indices[self.indptr[:-1][single]]
        return out

    def __repr__(self) -> str:
        return f"DTWAlignment(num_tgt={self.num_tgt}, path_len={len(self.indices)}, cost={self.cost})"


def dtw_align(src_tokens: Sequence[str], tgt_tokens: Sequence[str], num_threads: int = 0,
              max_cells: int = DEFAULT_MAX_CELLS) -> DTWAlignment:
    """Align two tokenisations of one text by DTW over their token strings (FuseLLM's MinED).

    Args:
        src_tokens: list of str ``[S]``, S >= 1 (FuseLLM's ``series_1``).
        tgt_tokens: list of str ``[T]``, T >= 1 (``series_2``).
        num_threads: threads for the edit-distance table (0: all cores).
        max_cells: refuse (ValueError, before allocating) an alignment larger than this:
            ``S * T`` DTW cells (about 1.25 bytes each; 4.25 when some token has more than 255
            code points), or this many edit-distance DP cells for the pairs involving a token
            longer than 64 code points (``len_a * len_b`` each, ``len`` steps when the source
            token is short: edit distance is quadratic in token length). Every result that is
            computed is exact; raise the limit to align more, or align shorter pieces.

    Returns:
        A :class:`DTWAlignment` with the target-side mapping and the total cost.

    Raises:
        TypeError: an argument is not a list/tuple of str (the message names it).
        ValueError: an empty sequence, or more work than ``max_cells`` (the message has the sizes).
    """
    indptr, indices, cost = _C.dtw_align(src_tokens, tgt_tokens, check_num_threads(num_threads),
                                         _check_max_cells(max_cells))
    return DTWAlignment(indptr, indices, cost)


def dtw_align_batch(
    src_batch: Sequence[Sequence[str]], tgt_batch: Sequence[Sequence[str]], num_threads: int = 0,
    max_cells: int = DEFAULT_MAX_CELLS,
) -> list[DTWAlignment]:
    """:func:`dtw_align` over many sequence pairs, one pair per C++ thread, GIL released.

    Args:
        src_batch: ``B`` lists of str, each non-empty.
        tgt_batch: ``B`` lists of str, each non-empty.
        num_threads: worker threads (0: all cores).
        max_cells: :func:`dtw_align`'s limit, for each pair (the error names the pair).
    """
    out = _C.dtw_align_batch(src_batch, tgt_batch, check_num_threads(num_threads), _check_max_cells(max_cells))
    return [DTWAlignment(indptr, indices, cost) for indptr, indices, cost in out]



def _check_max_cells(value: Any) -> int:
    if isinstance(value, bool) or not hasattr(type(value), "__index__"):
        raise TypeError(f"max_cells: expected an int >= 1, got {type(value).__name__}")
    try:
        n = operator.index(value)
    except TypeError as e:       # e.g. a float tensor, which has __index__ but refuses it
        raise TypeError(f"max_cells: expected an int >= 1, got {type(value).__name__} ({e})") from None
    if n < 1:
        raise ValueError(f"max_cells: expected an int >= 1, got {n}")
    return min(n, 2**62)  # more is unlimited anyway; keeps the C++ int64 from overflowing
