"""Tokenising and aligning a corpus for ``align_corpus``, chunk by chunk, in one process or a pool.

The tokenizers dominate corpus-scale alignment (DESIGN.md §4), and every sequence is tokenised and
aligned on its own, so the documents are cut into chunks (of at most :data:`CHUNK_DOCS`) and each chunk is
tokenised by the target and every source and aligned (:class:`ChunkAligner`), here or in a pool
of worker processes (:func:`align_chunks`); results come back in corpus order, so the output does
not depend on the number of workers.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from fastfuse.align.spans import TokenizerOffsets, align_offsets_batch, byte_ends
from fastfuse.corpus import source_sequences

CHUNK_DOCS = 64
NO_SPLIT = 1 << 40  # block size that never splits: alignment reads each sequence whole


def sequences(tokenizer, docs: list[str], offs: TokenizerOffsets, doc_base: int = 0):
    """(ids, byte ends, doc index + ``doc_base``) of each non-empty document, tokenised as
    extraction does (``source_sequences`` with a block size that never splits)."""
    out = []
    for s, doc in source_sequences(tokenizer, docs, NO_SPLIT):
        ends = byte_ends(s.input_ids, s.offsets, doc, offs.surfaces, offs.lengths)
        out.append((s.input_ids, ends, s.doc_index + doc_base))
    return out


def mined_positions(tgt_seqs, src_seqs, tsurf, ssurf, num_threads: int) -> list[np.ndarray]:
    """FuseLLM's MinED path: DTW over the tokens' surface strings; target token i is matched to
    source token j when DTW maps exactly one source token to it and both spell the same bytes."""
    from fastfuse.align.dtw import dtw_align_batch

    def strings(ids, surf):
        return [surf.bytes[t].decode("utf-8", "replace") for t in ids]

    pairs = [(i, a, b) for i, ((a, _, _), (b, _, _)) in enumerate(zip(tgt_seqs, src_seqs)) if len(a) and len(b)]
    dtws = dtw_align_batch([strings(b, ssurf) for _, _, b in pairs], [strings(a, tsurf) for _, a, _ in pairs],
                           num_threads)
    out = [np.full(len(a), -1, dtype=np.int32) for a, _, _ in tgt_seqs]
    for (i, tids, sids), d in zip(pairs, dtws):
        m = d.one_to_one()
        ok = m >= 0
        same = np.zeros(len(m), dtype=bool)
        same[ok] = [tsurf.bytes[t] == ssurf.bytes[s] and not tsurf.special[t] for t, s in zip(tids[ok], sids[m[ok]])]
        match = np.where(same, m, -1)
        out[i][:-1] = np.where(match[1:] >= 1, match[1:] - 1, -1)  # next-token semantics
    return out


class ChunkAligner:
    """Aligns one chunk of documents: ``aligner(doc_base, docs)`` returns ``{"target": [(ids int32,
    doc index)], "sources": {name: [(source length, doc index, pos int32)]}}``, one entry per
    non-empty document (doc indices counted from ``doc_base``)."""

    def __init__(self, target_tokenizer, sources: Mapping[str, Any], seq_mode: str, num_threads: int):
        self.target = (target_tokenizer, TokenizerOffsets(target_tokenizer, "target_tokenizer"))
        self.sources = {n: (t, TokenizerOffsets(t, f"sources['{n}']")) for n, t in sources.items()}
        self.seq_mode, self.num_threads = seq_mode, num_threads

    def __call__(self, doc_base: int, docs: list[str]) -> dict[str, Any]:
        tok, toffs = self.target
        tgt = sequences(tok, docs, toffs, doc_base)
        out: dict[str, Any] = {"target": [(ids.astype(np.int32), d) for ids, _, d in tgt], "sources": {}}
        for name, (stok, soffs) in self.sources.items():
            src = sequences(stok, docs, soffs, doc_base)
            if [d for _, _, d in src] != [d for _, _, d in tgt]:
                raise ValueError(f"sources['{name}']: its sequences come from other documents than the target's")
            if self.seq_mode == "offsets":
                pos = [a.pos for a in align_offsets_batch([e for _, e, _ in tgt], [e for _, e, _ in src],
                                                          self.num_threads)]
            else:
                pos = mined_positions(tgt, src, toffs.surfaces, soffs.surfaces, self.num_threads)
            out["sources"][name] = [(len(ids), d, p.astype(np.int32)) for (ids, _, d), p in zip(src, pos)]
        return out


_WORKER: dict[str, ChunkAligner] = {}   # the pool worker's aligner, built once per process


def _init_worker(target_tokenizer, sources, seq_mode: str) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"   # the pool is the parallelism: no nested thread pools
    _WORKER["aligner"] = ChunkAligner(target_tokenizer, sources, seq_mode, num_threads=1)


def _run_chunk(task: tuple[int, list[str]]) -> dict[str, Any]:
    return _WORKER["aligner"](*task)


def align_chunks(docs: list[str], target_tokenizer, sources: Mapping[str, Any], seq_mode: str, num_threads: int,
                 workers: int, on_chunk: Callable[[int], None] | None = None) -> Iterator[dict[str, Any]]:
    """:class:`ChunkAligner` results for every chunk of ``docs``, in order. ``workers > 1`` runs the
    chunks in that many spawned processes (the tokenizers are pickled to each once; spawn rather
    than fork, as forking a process whose tokenizers or threads have run is unsafe);
    ``on_chunk(n_docs)`` is called as each chunk's result arrives."""
    if isinstance(workers, bool) or not isinstance(workers, (int, np.integer)) or workers < 1:
        raise ValueError(f"workers: expected a positive int, got {workers!r}")
    # small corpora still give every worker a few chunks; chunking never changes the results
    size = max(1, min(CHUNK_DOCS, -(-len(docs) // (4 * workers))))
    tasks = [(a, docs[a:a + size]) for a in range(0, len(docs), size)]
    if workers == 1 or len(tasks) <= 1:
        aligner = ChunkAligner(target_tokenizer, sources, seq_mode, num_threads)
        results: Iterator[dict[str, Any]] = (aligner(*t) for t in tasks)
        pool = None
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        pool = ProcessPoolExecutor(min(workers, len(tasks)), mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_init_worker, initargs=(target_tokenizer, dict(sources), seq_mode))
        results = pool.map(_run_chunk, tasks)
    try:
        for (_, chunk), r in zip(tasks, results):
            if on_chunk is not None:
                on_chunk(len(chunk))
            yield r
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
