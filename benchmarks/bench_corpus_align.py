"""Corpus-scale alignment throughput on the machine's cores: tokenisation with byte offsets
(Rust tokenizers + numpy) and the C++ batch alignment, over the pydoc corpus.

`python benchmarks/bench_corpus_align.py` prints a table; the pytest-benchmark test is cheap.
"""
from __future__ import annotations

import os
import time

import pytest

TARGET, SOURCES = "llama-bpe", ["llama-spm", "gpt-2", "mpt", "qwen2"]


def corpus(repeat: int = 1) -> list[str]:
    from fastfuse.corpus import python_docs

    return python_docs() * repeat


_OFFSETS = {}


def offsets(name):
    """Tokenizer + surface forms, built once (loading is not part of the alignment cost)."""
    from fastfuse.align.spans import TokenizerOffsets
    from fastfuse.tokenizer_files import load_tokenizer

    if name not in _OFFSETS:
        _OFFSETS[name] = TokenizerOffsets(load_tokenizer(name))
    return _OFFSETS[name]


def run(texts, target=TARGET, sources=SOURCES, threads=0):
    from fastfuse.align.spans import align_offsets_batch

    t0 = time.perf_counter()
    tgt = offsets(target).encode(texts)
    t_tok = time.perf_counter() - t0
    t_align = 0.0
    n_src = 0
    for name in sources:
        t0 = time.perf_counter()
        src = offsets(name).encode(texts)
        t_tok += time.perf_counter() - t0
        n_src += sum(len(i) for i, _ in src)
        t0 = time.perf_counter()
        align_offsets_batch([e for _, e in tgt], [e for _, e in src], threads)
        t_align += time.perf_counter() - t0
    n_tgt = sum(len(i) for i, _ in tgt)
    return {"target_tokens": n_tgt, "source_tokens": n_src, "seconds_tokenize": t_tok, "seconds_align": t_align}


@pytest.fixture(scope="module")
def texts():
    try:
        from fastfuse.tokenizer_files import load_tokenizer

        load_tokenizer(TARGET)
    except Exception as e:
        pytest.skip(f"real tokenizers unavailable: {e}")
    return corpus()


def test_corpus_alignment(benchmark, texts):
    r = benchmark(run, texts, TARGET, SOURCES[:1])
    assert r["target_tokens"] > 50_000


def main():
    texts = corpus(repeat=4)
    run(texts[:2])  # warm the tokenizer caches
    r = run(texts)
    pairs = len(SOURCES) * r["target_tokens"]
    print(f"corpus alignment: pydoc x4 ({len(texts)} documents, {r['target_tokens']} {TARGET} tokens) "
          f"against {len(SOURCES)} sources, {os.cpu_count()} cores")
    print(f"{'stage':<42}{'s':>8}{'M target tok/s':>16}")
    print(f"{'tokenise + byte offsets (5 tokenizers)':<42}{r['seconds_tokenize']:>8.2f}{pairs / r['seconds_tokenize'] / 1e6:>16.2f}")
    print(f"{'C++ alignment (4 sources, batch)':<42}{r['seconds_align']:>8.3f}{pairs / r['seconds_align'] / 1e6:>16.1f}")


if __name__ == "__main__":
    main()
