"""Exact alignment from byte offsets: C++ linear merge vs the same merge in pure Python.

Target: >= 5 M target tokens/s on one core. Run `python benchmarks/bench_align.py` for a table,
or `pytest benchmarks/bench_align.py --benchmark-enable` for pytest-benchmark statistics.
"""
from __future__ import annotations

import time

import numpy as np
import pytest

from fastfuse import _C


def python_merge(te, se):
    """The reference: the same two-pointer merge over span boundaries, in Python."""
    te, se = te.tolist(), se.tolist()
    match = [-1] * len(te)
    i = j = 0
    while i < len(te) and j < len(se):
        ts, tend = (te[i - 1] if i else 0), te[i]
        ss, send = (se[j - 1] if j else 0), se[j]
        if tend == ts:
            i += 1
        elif send == ss:
            j += 1
        elif ts == ss and tend == send:
            match[i] = j
            i += 1
            j += 1
        elif tend < send:
            i += 1
        elif send < tend:
            j += 1
        else:
            i += 1
            j += 1
    return match


def corpus_ends(target="llama-bpe", source="llama-spm", repeat=4):
    """Byte end offsets of the whole pydoc corpus as one long text, under two real tokenizers."""
    from fastfuse.align.spans import TokenizerOffsets
    from fastfuse.corpus import python_docs
    from fastfuse.tokenizer_files import load_tokenizer

    text = "\n\n".join(python_docs()) * repeat
    (_, te), = TokenizerOffsets(load_tokenizer(target)).encode([text], add_special_tokens=False)
    (_, se), = TokenizerOffsets(load_tokenizer(source)).encode([text], add_special_tokens=False)
    return te, se


def _median_seconds(fn, reps=7):
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


@pytest.fixture(scope="module")
def ends():
    try:
        return corpus_ends(repeat=1)
    except Exception as e:  # no network for the vocab files on first use
        pytest.skip(f"real tokenizers unavailable: {e}")


def test_align_spans_cpp(benchmark, ends):
    te, se = ends
    match, pos, n = benchmark(_C.align_spans, te, se)
    assert n > 0.5 * len(te)
    assert match.tolist() == python_merge(te, se)  # fast path = reference


def main():
    te, se = corpus_ends()
    t_cpp = _median_seconds(lambda: _C.align_spans(te, se))
    sub = slice(0, len(te) // 8)
    t_py = _median_seconds(lambda: python_merge(te[sub], se[: np.searchsorted(se, te[sub][-1]) + 1]), reps=3) * 8
    n = len(te)
    print(f"offsets alignment, {n} target vs {len(se)} source tokens (pydoc corpus x4, llama-bpe vs llama-spm), one core")
    print(f"{'impl':<22}{'ms':>10}{'M tok/s':>10}{'speed-up':>10}")
    print(f"{'python merge (ref)':<22}{t_py * 1e3:>10.1f}{n / t_py / 1e6:>10.2f}{1.0:>10.1f}")
    print(f"{'fastfuse C++':<22}{t_cpp * 1e3:>10.2f}{n / t_cpp / 1e6:>10.1f}{t_py / t_cpp:>10.0f}")
    print(f"target >= 5 M tok/s: {'met' if n / t_cpp >= 5e6 else 'MISSED'}")


if __name__ == "__main__":
    main()
