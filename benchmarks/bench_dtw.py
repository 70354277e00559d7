"""Benchmark: MinED / DTW alignment of a 2048-token target against a 2250-token source.

    pytest benchmarks/bench_dtw.py --benchmark-enable     # pytest-benchmark tables
    python benchmarks/bench_dtw.py                        # a small table, with the Python reference
    python benchmarks/bench_dtw.py --full-reference       # ... timing the reference on the full pair

The token strings come from two small tokenizers of different kinds (byte-level BPE for the
target, Unigram with metaspace for the source) trained on the Python docs that ship with Python
(`pydoc_data.topics`). The pure-Python FuseLLM reference is timed on a smaller pair and
extrapolated by cell count (it is quadratic with a constant cost per cell); it runs only with
`--benchmark-enable`, from `python benchmarks/bench_dtw.py`, or with FASTFUSE_BENCH_REFERENCE=1.
"""
from __future__ import annotations

import functools
import os
import time

import pytest

from fastfuse.align.dtw import dtw_align, dtw_align_batch

N_TGT, N_SRC = 2048, 2250


@functools.lru_cache(maxsize=None)
def tokenizers_for_bench():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from fastfuse.corpus import python_docs

    corpus = python_docs()
    tgt = Tokenizer(models.BPE())
    tgt.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tgt.train_from_iterator(
        corpus,
        trainers.BpeTrainer(vocab_size=2000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False),
    )
    src = Tokenizer(models.Unigram())
    src.pre_tokenizer = pre_tokenizers.Metaspace()
    src.train_from_iterator(
        corpus[:40], trainers.UnigramTrainer(vocab_size=1000, show_progress=False, unk_token="<unk>", special_tokens=["<unk>"])
    )
    return src, tgt, corpus


def make_pair(n_src: int = N_SRC, n_tgt: int = N_TGT, start: int = 0) -> tuple[list[str], list[str]]:
    """Two tokenisations of (about) the same stretch of the docs, cut to n_src and n_tgt tokens."""
    src_tok, tgt_tok, corpus = tokenizers_for_bench()
    text = "\n\n".join(corpus)[start:]
    chars = 4 * max(n_src, n_tgt)
    while True:
        tgt = tgt_tok.encode(text[:chars]).tokens
        src = src_tok.encode(text[:chars]).tokens
        if len(tgt) >= n_tgt and len(src) >= n_src:
            break
        chars *= 2
    return src[:n_src], tgt[:n_tgt]


def _reference():
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    from test_dtw import reference_dtw

    return reference_dtw


def reference_seconds_per_cell(n: int = 256, repeat: int = 3) -> float:
    """Seconds per DP cell of the pure-Python FuseLLM reference, best of `repeat` on an n x 1.1n pair."""
    src, tgt = make_pair(int(n * 1.1), n, start=5000)
    reference = _reference()
    return _best_of(lambda: reference(src, tgt), repeat) / (len(src) * len(tgt))


def _want_reference(benchmark) -> bool:
    return not getattr(benchmark, "disabled", True) or os.environ.get("FASTFUSE_BENCH_REFERENCE") == "1"


@pytest.mark.parametrize("num_threads", [1, 0])
def test_bench_dtw_2048(benchmark, num_threads):
    src, tgt = make_pair()
    benchmark.group = "dtw 2048 tgt x 2250 src"
    out = benchmark(dtw_align, src, tgt, num_threads)
    assert out.indptr.shape == (N_TGT + 1,) and out.indices[-1] == N_SRC - 1


def test_bench_dtw_batch8(benchmark):
    pairs = [make_pair(start=k * 7000) for k in range(8)]
    benchmark.group = "dtw batch of 8 (2048 x 2250)"
    out = benchmark(dtw_align_batch, [p[0] for p in pairs], [p[1] for p in pairs], 0)
    assert len(out) == 8


def test_bench_reference_extrapolated(benchmark):
    if not _want_reference(benchmark):
        pytest.skip("slow Python reference: run with --benchmark-enable or FASTFUSE_BENCH_REFERENCE=1")
    src, tgt = make_pair(281, 256, start=5000)
    reference = _reference()
    benchmark.group = "FuseLLM Python reference, 256 tgt x 281 src (extrapolated in extra_info)"
    t0 = time.perf_counter()
    benchmark.pedantic(reference, args=(src, tgt), rounds=1, iterations=1)
    per_cell = (time.perf_counter() - t0) / (len(src) * len(tgt))
    benchmark.extra_info["extrapolated_s_2048x2250"] = per_cell * N_SRC * N_TGT


def _best_of(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main(full_reference: bool = False) -> None:
    src, tgt = make_pair()
    n_unique = (len(set(src)), len(set(tgt)))
    pairs = [make_pair(start=k * 7000) for k in range(8)]
    rows = []
    for threads in (1, 0):
        t = _best_of(lambda: dtw_align(src, tgt, num_threads=threads), 30)
        rows.append((f"fastfuse dtw_align (threads={threads or os.cpu_count()})", t))
    t = _best_of(lambda: dtw_align_batch([p[0] for p in pairs], [p[1] for p in pairs]), 5) / len(pairs)
    rows.append(("fastfuse dtw_align_batch, per pair (8 pairs)", t))
    if full_reference:
        t0 = time.perf_counter()
        ref_map2 = _reference()(src, tgt)[3]
        ref = time.perf_counter() - t0
        assert dtw_align(src, tgt).to_lists() == ref_map2, "fastfuse and the reference disagree"
        rows.append(("FuseLLM Python reference (full pair, once; same mapping)", ref))
    else:
        per_cell = reference_seconds_per_cell()
        ref = per_cell * len(src) * len(tgt)
        rows.append(("FuseLLM Python reference (extrapolated from 256 x 281)", ref))
    print(f"DTW of {len(tgt)} target x {len(src)} source tokens (unique: {n_unique[1]} x {n_unique[0]})")
    print(f"{'implementation':<58} {'time':>12}")
    for name, t in rows:
        print(f"{name:<58} {t * 1e3:>9.2f} ms")
    print(f"speed-up of dtw_align (all threads) over the reference: {ref / rows[1][1]:,.0f}x")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full-reference", action="store_true", help="time the Python reference on the full pair (seconds)")
    main(parser.parse_args().full_reference)
