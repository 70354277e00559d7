"""Corpus-scale alignment throughput on the machine's cores: tokenisation with byte offsets
(Rust tokenizers + numpy) and the C++ batch alignment, over the pydoc corpus.

    python benchmarks/bench_corpus_align.py [--quick | --tiny] [--csv out.csv]

The pydoc corpus x4 (``--quick``: x1; ``--tiny``: 4 documents against one source).
"""
from __future__ import annotations

import os
import sys
import time

import harness

TARGET, SOURCES = "llama-bpe", ["llama-spm", "gpt-2", "mpt", "qwen2"]


def corpus(repeat: int = 1, docs: int | None = None) -> list[str]:
    from fastfuse.corpus import python_docs

    return (python_docs(docs) if docs else python_docs()) * repeat


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


def main(argv=None) -> int:
    a = harness.parser(__doc__, cuda=False).parse_args(argv)
    texts = corpus(docs=4) if a.tiny else corpus(repeat=1 if a.quick else 4)
    sources = SOURCES[:1] if a.tiny else SOURCES
    run(texts[:2], sources=sources)  # warm the tokenizer caches
    r = run(texts, sources=sources)
    pairs = len(sources) * r["target_tokens"]
    print(f"corpus alignment: pydoc ({len(texts)} documents, {r['target_tokens']} {TARGET} tokens) "
          f"against {len(sources)} sources, {os.cpu_count()} cores")
    x = dict(documents=len(texts), target_tokens=r["target_tokens"], sources=len(sources))
    with harness.Results(a.csv) as res:
        for stage, provider, secs in (("tokenize", f"tokenizers + byte offsets ({len(sources) + 1} tokenizers)",
                                       r["seconds_tokenize"]),
                                      ("align_offsets_batch", "fastfuse C++ (batch)", r["seconds_align"])):
            res.add(f"corpus {stage}", provider, "time", "s", x, secs)
            res.add(f"corpus {stage}", provider, "throughput", "M target tok/s", x, pairs / secs / 1e6)
    return 0


if __name__ == "__main__":
    sys.exit(main())
