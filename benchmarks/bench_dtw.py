"""Benchmark: MinED / DTW alignment of a 2048-token target against a 2250-token source.

    python benchmarks/bench_dtw.py [--quick | --tiny] [--csv out.csv]   # with the Python reference
    python benchmarks/bench_dtw.py --full-reference       # ... timing the reference on the full pair

The token strings come from two small tokenizers of different kinds (byte-level BPE for the
target, Unigram with metaspace for the source) trained on the Python docs that ship with Python
(`pydoc_data.topics`). The pure-Python FuseLLM reference is timed on a smaller pair and
extrapolated by cell count (it is quadratic with a constant cost per cell). ``--tiny``: a 256 x 281
pair, the reference timed on 64 x 70.
"""
from __future__ import annotations

import functools
import os
import sys
import time

import harness
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
    sys.path.insert(0, os.path.join(harness.ROOT, "tests", "align"))
    from test_dtw import reference_dtw

    return reference_dtw


def reference_seconds_per_cell(n: int = 256, repeat: int = 3) -> float:
    """Seconds per DP cell of the pure-Python FuseLLM reference, best of `repeat` on an n x 1.1n pair."""
    src, tgt = make_pair(int(n * 1.1), n, start=5000)
    reference = _reference()
    return _best_of(lambda: reference(src, tgt), repeat) / (len(src) * len(tgt))


def _best_of(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv=None) -> int:
    ap = harness.parser(__doc__, cuda=False)
    ap.add_argument("--full-reference", action="store_true", help="time the Python reference on the full pair (seconds)")
    a = ap.parse_args(argv)
    warmup, iters = harness.iterations(a, full=(2, 30), quick=(1, 10))
    n_tgt, n_src, n_batch, n_ref = (256, 281, 2, 64) if a.tiny else (N_TGT, N_SRC, 8, 256)
    src, tgt = make_pair(n_src, n_tgt)
    pairs = [make_pair(n_src, n_tgt, start=k * 7000) for k in range(n_batch)]
    x = dict(target=len(tgt), source=len(src))
    print(f"DTW of {len(tgt)} target x {len(src)} source tokens (unique: {len(set(tgt))} x {len(set(src))})")
    with harness.Results(a.csv) as res:
        fast = {}
        for threads in (1, 0):
            fast[threads] = harness.measure(lambda: dtw_align(src, tgt, num_threads=threads), "cpu", warmup, iters)
            res.time("dtw_align", f"fastfuse (threads={threads or os.cpu_count()})", x, fast[threads])
        t = harness.measure(lambda: dtw_align_batch([p[0] for p in pairs], [p[1] for p in pairs]), "cpu",
                            min(warmup, 1), max(1, iters // 6))
        res.add("dtw_align", f"fastfuse dtw_align_batch, per pair ({n_batch} pairs)", "time", "ms", x,
                t.ms / n_batch, **t.extra())
        if a.full_reference:
            t0 = time.perf_counter()
            ref_map2 = _reference()(src, tgt)[3]
            ref_s = time.perf_counter() - t0
            if dtw_align(src, tgt).to_lists() != ref_map2:
                raise SystemExit("bench_dtw: fastfuse and the reference disagree")
            note = "full pair, once; same mapping"
        else:
            ref_s = reference_seconds_per_cell(n_ref) * len(src) * len(tgt)
            note = f"extrapolated from {n_ref} x {int(n_ref * 1.1)}"
        res.add("dtw_align", "FuseLLM Python reference", "time", "ms", x, ref_s * 1e3, note=note,
                speedup_over_all_threads=round(ref_s * 1e3 / fast[0].ms))
    return 0


if __name__ == "__main__":
    sys.exit(main())
