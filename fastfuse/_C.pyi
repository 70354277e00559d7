"""Typed stub of ``fastfuse._C``, the compiled C++ core (csrc/; pybind11, numpy in and out, GIL released
in the heavy loops). ``fastfuse.align`` (``spans``, ``dtw``, ``vocab_map``) is its public face; ``_testing`` holds
the hooks only the tests use."""
from collections.abc import Sequence
from typing import type_check_only

import numpy as np
import numpy.typing as npt
from typing_extensions import Buffer

Int32Array = npt.NDArray[np.int32]
Int64Array = npt.NDArray[np.int64]

MAX_THREADS: int
"""The most threads one call starts (every ``num_threads`` is capped at it; 0 means all cores, up to it)."""

DTW_DEFAULT_MAX_CELLS: int
"""Default bound on the DTW table (target x source tokens) and the edit-distance work it implies."""

def align_spans(tgt_ends: npt.ArrayLike, src_ends: npt.ArrayLike) -> tuple[Int32Array, Int32Array, int]:
    """Exact alignment from byte end offsets -> (match int32[T], pos int32[T], number matched)."""

def align_spans_batch(tgt_ends: Sequence[npt.ArrayLike], src_ends: Sequence[npt.ArrayLike],
                      num_threads: int = 0) -> list[tuple[Int32Array, Int32Array, int]]:
    """:func:`align_spans` over many pairs on ``num_threads`` threads (0: all cores)."""

def dtw_align(src_tokens: Sequence[str], tgt_tokens: Sequence[str], num_threads: int = 0,
              max_cells: int = ...) -> tuple[Int64Array, Int32Array, int]:
    """MinED / DTW alignment (FuseLLM's) -> (indptr int64[T+1], indices int32[P], cost)."""

def dtw_align_batch(src_batch: Sequence[Sequence[str]], tgt_batch: Sequence[Sequence[str]], num_threads: int = 0,
                    max_cells: int = ...) -> list[tuple[Int64Array, Int32Array, int]]:
    """:func:`dtw_align` over many pairs, one pair per thread."""

def map_vocab(src_buf: Buffer, src_offsets: npt.ArrayLike, src_special: npt.ArrayLike, tgt_buf: Buffer,
              tgt_offsets: npt.ArrayLike, tgt_special: npt.ArrayLike, mined: bool,
              num_threads: int = 0) -> tuple[Int32Array, Int32Array]:
    """Source id -> target id by normalised bytes (then minimum edit distance when ``mined``)
    -> (ids int32[S], distance int32[S])."""

# A stub cannot declare a submodule of an extension module without turning ``_C`` into a stub package
# (a ``_C/`` directory that would also import, empty, where the build is missing); so ``_testing`` is
# typed by a stub-only class that lists its functions (not a ModuleType subclass: ModuleType's
# ``__getattr__`` would let any misspelt name through).
@type_check_only
class _TestingModule:
    """``_C._testing``: test-only hooks (reference implementations, path switches); nothing in fastfuse/ calls them."""

    @staticmethod
    def dtw_set_paths(simd: bool = True, force_wide: bool = False) -> None:
        """Pick the DTW DP path, process-wide (AVX2 row on/off, int64 forced); all give the same result."""

    @staticmethod
    def vocab_levenshtein(a: bytes, b: bytes) -> int:
        """Byte-level Levenshtein distance as ``map_vocab`` computes it (bit-parallel when the shorter has
        <= 64 bytes)."""

    @staticmethod
    def vocab_levenshtein_dp(a: bytes, b: bytes) -> int:
        """Byte-level Levenshtein distance by plain dynamic programming (the reference)."""

_testing: _TestingModule
