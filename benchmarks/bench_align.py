"""Exact alignment from byte offsets: C++ linear merge vs the same merge in pure Python.

Target: >= 5 M target tokens/s on one core.

    python benchmarks/bench_align.py [--quick | --tiny] [--csv out.csv]

The pydoc corpus x4 under llama-bpe and llama-spm (``--quick``: x1; ``--tiny``: 4 documents); the
Python merge runs on the first eighth and is extrapolated, after checking it gives C++'s matches.
"""
from __future__ import annotations

import sys

import numpy as np

import harness
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


def corpus_ends(target="llama-bpe", source="llama-spm", repeat=4, docs=None):
    """Byte end offsets of the pydoc corpus (its first ``docs`` documents) as one long text, under two
    real tokenizers."""
    from fastfuse.align.spans import TokenizerOffsets
    from fastfuse.corpus import python_docs
    from fastfuse.tokenizer_files import load_tokenizer

    text = "\n\n".join(python_docs(docs) if docs else python_docs()) * repeat
    (_, te), = TokenizerOffsets(load_tokenizer(target)).encode([text], add_special_tokens=False)
    (_, se), = TokenizerOffsets(load_tokenizer(source)).encode([text], add_special_tokens=False)
    return te, se


def main(argv=None) -> int:
    a = harness.parser(__doc__, cuda=False).parse_args(argv)
    warmup, iters = harness.iterations(a, full=(1, 7), quick=(1, 3))
    te, se = corpus_ends(repeat=1, docs=4) if a.tiny else corpus_ends(repeat=1 if a.quick else 4)
    sub = slice(0, len(te) // 8)
    te_sub, se_sub = te[sub], se[: np.searchsorted(se, te[sub][-1]) + 1]
    if _C.align_spans(te_sub, se_sub)[0].tolist() != python_merge(te_sub, se_sub):
        raise SystemExit("bench_align: the C++ merge and the Python reference disagree")
    t_cpp = harness.measure(lambda: _C.align_spans(te, se), "cpu", warmup, iters)
    t_py = harness.measure(lambda: python_merge(te_sub, se_sub), "cpu", min(warmup, 1), min(iters, 3))
    n, scale = len(te), len(te) / len(te_sub)
    x = dict(target_tokens=n, source_tokens=len(se))
    print(f"offsets alignment, {n} target vs {len(se)} source tokens (pydoc corpus, llama-bpe vs llama-spm), one core")
    with harness.Results(a.csv) as res:
        ms_py = t_py.ms * scale
        res.add("align_spans", "python merge (reference)", "time", "ms", x, ms_py, **t_py.extra(),
                note=f"timed on the first {len(te_sub)} target tokens, x {scale:.1f}")
        res.add("align_spans", "python merge (reference)", "throughput", "M tok/s", x, n / ms_py / 1e3)
        res.time("align_spans", "fastfuse C++", x, t_cpp)
        res.add("align_spans", "fastfuse C++", "throughput", "M tok/s", x, n / t_cpp.ms / 1e3,
                speedup=round(ms_py / t_cpp.ms, 1), target="5 M tok/s")
    print(f"target >= 5 M tok/s: {'met' if n / t_cpp.seconds >= 5e6 else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
