"""Split long documents so that *every* tokenizer's tokenisation of each chunk fits a block size.

FuseLLM re-splits by decoding token chunks of one tokenizer, which changes the text other
tokenizers see. Here the cut points are byte positions in the original text that are token
boundaries of all tokenizers at once (and UTF-8 character boundaries), preferring cuts just
before whitespace; each chunk is then the exact substring, and every tokenizer reads the same text.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from fastfuse.align.spans import TokenizerOffsets


def _as_offsets(tokenizers) -> list[TokenizerOffsets]:
    out = []
    for k, t in enumerate(tokenizers):
        out.append(t if isinstance(t, TokenizerOffsets) else TokenizerOffsets(t, f"tokenizers[{k}]"))
    return out


def _furthest_fit(cands: np.ndarray, before_space: np.ndarray, start: int, counts, budget: int):
    """The furthest candidate cut after ``start`` whose chunk fits (counts grow with the cut),
    moved back to the last cut before whitespace if that still fills 3/4 of the block."""
    lo = int(np.searchsorted(cands, start, "right"))
    a, b = lo, len(cands)
    while a < b:
        mid = (a + b) // 2
        if counts(cands[mid]) <= budget:
            a = mid + 1
        else:
            b = mid
    if a == lo:
        return None
    pick = a - 1
    spaced = np.flatnonzero(before_space[lo:a])
    if len(spaced) and counts(cands[lo + spaced[-1]]) >= 0.75 * budget:
        pick = lo + spaced[-1]
    return int(cands[pick])


def split_document(text: str, tokenizers: Sequence, block_size: int, reserve: int = 2) -> list[str]:
    """Cut ``text`` into consecutive substrings whose tokenisation under each tokenizer has at most
    ``block_size - reserve`` tokens (``reserve`` leaves room for BOS/EOS).

    ``tokenizers``: Hugging Face fast tokenizers or :class:`~fastfuse.align.spans.TokenizerOffsets`.
    The chunks concatenate back to ``text`` exactly.
    """
    if not isinstance(block_size, int) or block_size <= reserve:
        raise ValueError(f"block_size: expected an int > reserve ({reserve}), got {block_size!r}")
    if not isinstance(text, str):
        raise TypeError(f"text: expected str, got {type(text).__name__}")
    toks = _as_offsets(tokenizers)
    if not toks:
        raise ValueError("tokenizers: expected at least one tokenizer")
    budget = block_size - reserve
    data = text.encode("utf-8", "surrogatepass")
    n = len(data)
    # non-decreasing byte ends; searchsorted(ends, cut, 'right') counts the tokens ending by `cut`
    ends = [t.encode([text], add_special_tokens=False)[0][1] for t in toks]
    if all(len(e) <= budget for e in ends):
        return [text]
    # Candidate cuts: boundaries of every tokenizer, on a character boundary, inside the text.
    common = np.unique(ends[0])
    for e in ends[1:]:
        common = np.intersect1d(common, e)
    buf = np.frombuffer(data, dtype=np.uint8)
    common = common[(common > 0) & (common < n)]
    common = common[(buf[common] & 0xC0) != 0x80]
    before_space = np.isin(buf[common], np.frombuffer(b" \n\t\r", dtype=np.uint8))
    anyb = np.unique(np.concatenate(ends))
    anyb = anyb[(anyb > 0) & (anyb < n)]
    anyb = anyb[(buf[anyb] & 0xC0) != 0x80]

    chunks: list[str] = []
    start = 0
    while start < n:
        def counts(cut, start=start):  # tokens of the chunk [start, cut) under the worst tokenizer
            return max(int(np.searchsorted(e, cut, "right") - (np.searchsorted(e, start, "right") if start else 0))
                       for e in ends)

        if counts(n) <= budget:
            cut = n
        else:
            cut = _furthest_fit(common, before_space, start, counts, budget)
            if cut is None:  # no shared boundary fits (e.g. a long run of symbols): any tokenizer's
                cut = _furthest_fit(anyb, np.zeros(len(anyb), bool), start, counts, budget)
            if cut is None:
                raise ValueError(f"text: no cut point within {budget} tokens after byte {start}; raise block_size")
        chunks.append(data[start:cut].decode("utf-8", "surrogatepass"))
        start = cut
    # Tokenising a chunk on its own can differ from in-context at the cut: re-check and re-split.
    out: list[str] = []
    for c in chunks:
        sizes = [len(t.encode([c], add_special_tokens=False)[0][0]) for t in toks]
        if max(sizes) > budget and c != text:
            out.extend(split_document(c, toks, block_size, reserve))
        elif max(sizes) > budget:
            raise ValueError(f"text: could not split into chunks of {budget} tokens")
        else:
            out.append(c)
    return out


def split_corpus(texts: Sequence[str], tokenizers: Sequence, block_size: int, reserve: int = 2) -> list[tuple[int, str]]:
    """:func:`split_document` over a corpus -> ``[(document index, chunk text)]`` in document order."""
    toks = _as_offsets(tokenizers)
    return [(d, c) for d, text in enumerate(texts) for c in split_document(text, toks, block_size, reserve)]
