"""Sequence alignment of two tokenisations of the same text (next-token semantics, DESIGN.md §1).

Exact path: byte end offsets of both tokenisations, merged linearly in C++ (:func:`align_offsets`,
:func:`align_texts`). MinED path for tokenizers without offsets: :func:`fastfuse.dtw_align`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import numpy.typing as npt

from fastfuse import _C
from fastfuse.corpus import check_text
from fastfuse.align.surface import TokenSurfaces, backend_tokenizer, token_surfaces
from fastfuse.align.native_threads import check_num_threads


@dataclass
class Alignment:
    """Alignment of one target tokenisation to one source tokenisation of the same text.

    ``match[i]``: source token covering exactly the bytes of target token i, or -1 (int32 [T]).
    ``pos[i]``: source *position* aligned to target position i under next-token semantics — the
    source position whose predicted token spans the same bytes as target token i+1 — or -1
    (int32 [T]); this is the row of ``AlignMap.pos`` that ``fused_loss`` takes.
    """

    match: np.ndarray
    pos: np.ndarray
    n_matched: int

    @property
    def one_to_one_rate(self) -> float:
        """Fraction of target positions with a 1-to-1 aligned source position (the last position
        predicts nothing and is not counted)."""
        n = len(self.pos) - 1
        return float((self.pos[:-1] >= 0).sum()) / n if n > 0 else 0.0


def align_offsets(tgt_ends: np.ndarray, src_ends: np.ndarray) -> Alignment:
    """Align two tokenisations from their byte end offsets (int [T], int [S]).

    Token k covers bytes ``[ends[k-1], ends[k])``; ends must be non-negative and non-decreasing.
    Ends are integer numpy arrays or lists of int: anything else (floats, strings, bools) is a
    TypeError naming the argument, never silently truncated or parsed.
    """
    match, pos, n = _C.align_spans(tgt_ends, src_ends)
    return Alignment(match, pos, int(n))


def align_offsets_batch(tgt_ends: Sequence[np.ndarray], src_ends: Sequence[np.ndarray], num_threads: int = 0) -> list[Alignment]:
    """:func:`align_offsets` over many sequence pairs, on ``num_threads`` threads (0 = all cores;
    see :func:`fastfuse.align.native_threads.check_num_threads`)."""
    num_threads = check_num_threads(num_threads)
    for name, batch in (("tgt_ends", tgt_ends), ("src_ends", src_ends)):
        if isinstance(batch, (str, bytes)) or not isinstance(batch, Sequence) and not (
                isinstance(batch, np.ndarray) and batch.ndim == 2):
            raise TypeError(f"{name}: expected a sequence of 1-D integer arrays (one per pair), "
                            f"got {type(batch).__name__}")
    return [Alignment(m, p, int(n)) for m, p, n in _C.align_spans_batch(list(tgt_ends), list(src_ends), num_threads)]


def align_groups(tgt_ends: np.ndarray, src_ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Many-to-many groups: the text is cut at the byte boundaries both tokenisations share; group g
    is the g-th piece. Returns (group of each target token, group of each source token), int64.
    A group with one token on each side is a 1-to-1 match; empty tokens join the next group."""
    t, s = _int_ends(tgt_ends, "tgt_ends"), _int_ends(src_ends, "src_ends")
    for name, e in (("tgt_ends", t), ("src_ends", s)):
        if e.ndim != 1 or (len(e) and (e[0] < 0 or (np.diff(e) < 0).any())):
            raise ValueError(f"{name}: byte end offsets must be a 1-D non-negative, non-decreasing array")
    shared = np.intersect1d(t, s)
    shared = shared[shared > 0]
    # token k belongs to the group of its end: the number of shared boundaries strictly before it
    return np.searchsorted(shared, t, "left"), np.searchsorted(shared, s, "left")


def _int_ends(ends, name: str) -> np.ndarray:
    """The C++ binding's rule for byte end offsets: integers only (empty input of any dtype)."""
    arr = np.asarray(ends)
    if arr.size and arr.dtype.kind not in "iu":
        raise TypeError(f"{name}: expected a 1-D integer array (or list of int) of byte end offsets, "
                        f"got {type(ends).__name__} of dtype {arr.dtype}")
    return arr.astype(np.int64)


def _char_to_byte(text: str) -> np.ndarray:
    """cum[c] = byte offset of character c in the UTF-8 encoding (len(text)+1 entries)."""
    cps = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    nbytes = 1 + (cps >= 0x80) + (cps >= 0x800) + (cps >= 0x10000)
    cum = np.zeros(len(cps) + 1, dtype=np.int64)
    np.cumsum(nbytes, out=cum[1:])
    return cum


def byte_ends(ids: npt.ArrayLike, offsets: npt.ArrayLike, text: str, surfaces: TokenSurfaces,
              lengths: np.ndarray | None = None) -> np.ndarray:
    """Byte end offsets of each token of ``text`` (special tokens get an empty span).

    Exact path: when the tokens' surface bytes spell the text (or the text after a prefix the
    normaliser added, like SentencePiece's dummy space), the ends are the cumulative surface lengths —
    exact even where a token ends inside a multi-byte character. Otherwise (a normaliser that rewrites
    the text, e.g. NFC) they come from the tokenizer's character ``offset_mapping``; a run of tokens
    sharing one end character gets byte boundaries from its surface lengths when those add up.
    """
    ids = np.asarray(ids, dtype=np.int64)
    off = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    if len(ids) != len(off):
        raise ValueError(f"offsets: expected one (start, end) pair per token ({len(ids)}), got {len(off)}")
    if len(ids) == 0:
        return np.zeros(0, dtype=np.int64)
    if ids.min() < 0 or ids.max() >= len(surfaces):
        raise ValueError(f"ids: token ids must lie in [0, {len(surfaces)}), got range [{ids.min()}, {ids.max()}]")
    if lengths is None:
        lengths = surfaces.lengths()
    real = ~surfaces.special[ids]
    lens = np.where(real, lengths[ids], 0)
    spelled = b"".join(surfaces.bytes[t] for t in ids[real])
    data = text.encode("utf-8", "surrogatepass")
    extra = len(spelled) - len(data)
    if spelled == data or (0 < extra <= 4 and spelled.endswith(data) and not spelled[:extra].strip()):
        return np.maximum(np.cumsum(lens) - max(extra, 0), 0)

    cum = _char_to_byte(text)
    if off.max() > len(text) or off.min() < 0:
        raise ValueError(f"offsets: character offsets must lie in [0, {len(text)}] for a text of that length")
    end = np.where(real, cum[off[:, 1]], 0)
    same = (off[1:, 1] == off[:-1, 1]) & real[1:] & real[:-1]
    n = len(ids)
    for k in np.flatnonzero(same):
        if k > 0 and same[k - 1]:
            continue  # inside a run already handled
        j = k + 1
        while j < n - 1 and same[j]:
            j += 1
        base = end[:k].max() if k > 0 else 0
        if base + lens[k:j + 1].sum() == end[j]:
            end[k:j + 1] = base + np.cumsum(lens[k:j + 1])
    return np.maximum.accumulate(end)


class TokenizerOffsets:
    """Encodes texts with one fast tokenizer and returns ids with byte end offsets."""

    def __init__(self, tokenizer, name: str = "tokenizer"):
        if not getattr(tokenizer, "is_fast", True) or not hasattr(tokenizer, "backend_tokenizer") and not hasattr(tokenizer, "to_str"):
            raise TypeError(f"{name}: byte offsets need a Hugging Face fast tokenizer, got {type(tokenizer).__name__}; "
                            "align tokenizers without offsets with fastfuse.dtw_align (MinED)")
        backend = backend_tokenizer(tokenizer)
        self.tokenizer = tokenizer
        self.backend = backend
        self.surfaces = token_surfaces(tokenizer)
        self.lengths = self.surfaces.lengths()
        self.name = name

    def encode(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[tuple[np.ndarray, np.ndarray]]:
        if isinstance(texts, str):
            raise TypeError("texts: expected a list of strings, got a single str")
        for k, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"texts[{k}]: expected str, got {type(t).__name__}")
            check_text(t, f"texts[{k}]")
        encs = self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        out = []
        for text, enc in zip(texts, encs):
            ids = np.asarray(enc.ids, dtype=np.int64)
            out.append((ids, byte_ends(ids, enc.offsets, text, self.surfaces, self.lengths)))
        return out


def align_texts(tgt_tokenizer, src_tokenizer, texts: Sequence[str], num_threads: int = 0,
                add_special_tokens: bool = True) -> list[Alignment]:
    """Tokenise each text with both tokenizers and align them exactly through byte offsets."""
    num_threads = check_num_threads(num_threads)  # before tokenising
    tgt = TokenizerOffsets(tgt_tokenizer, "tgt_tokenizer").encode(texts, add_special_tokens)
    src = TokenizerOffsets(src_tokenizer, "src_tokenizer").encode(texts, add_special_tokens)
    return align_offsets_batch([e for _, e in tgt], [e for _, e in src], num_threads)
