"""Top-k rows that come from elsewhere (a completion server, vLLM outputs) into resumable shards.

:class:`TopKRows` is one sequence's result; :class:`ShardRun` reads the corpus the way
:func:`fastfuse.teachers.local_extract.extract_topk` does (:func:`fastfuse.corpus.source_sequences`, the same
sequences, block size and special tokens), skips the sequences a previous run already wrote
(checking the corpus fingerprint at every completed shard boundary) and writes results, which the
caller hands over in sequence order, through :class:`fastfuse.teachers.shards.ShardWriter`: the same format,
atomic writes and resume rule. A row the producer could not report (a server that hides the first
prediction, or stops on end-of-sequence before the last) is written as ids ``-1`` and log-probs
``-inf``: "no teacher here", which alignment and the collator already read as the one-hot fallback.
"""
from __future__ import annotations

import hashlib
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from fastfuse.corpus import SourceSequence, chain_fingerprint, source_sequences
from fastfuse.teachers.shards import ShardReader, ShardWriter


LOGPROB_TOL = 1e-3          # a log-prob above 0 by at most this is rounding (stored as 0); more is refused
FLOAT16_MIN = -65504.0      # the most negative log-prob the shards' float16 holds (beyond: -inf, "no teacher")
FLOAT32_MIN = -3.4028234663852886e38


def checked_logprob(v: Any, where: str, gold: bool = False) -> float:
    """A log-prob from outside (a server's JSON, vLLM's objects) as a float, or a ``ValueError``
    naming ``where`` (sequence, position and field): it must be a number (not a bool, a string or a
    container), finite, at most ``LOGPROB_TOL`` above 0 (then read as 0) and within what its stored
    dtype holds (float16 for top-k values, float32 for ``gold``)."""
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise ValueError(f"{where}: expected a number (a log-prob), got {type(v).__name__} {v!r:.60}")
    x = float(v)
    if not math.isfinite(x):
        raise ValueError(f"{where}: log-prob {x} is not finite (a broken server or model)")
    if x > LOGPROB_TOL:
        raise ValueError(f"{where}: log-prob {x} is above 0 (a probability above 1; a broken server or model)")
    low = FLOAT32_MIN if gold else FLOAT16_MIN
    if x < low:
        raise ValueError(f"{where}: log-prob {x} is below {low:g}, the lowest the shards' "
                         f"{'float32' if gold else 'float16'} can hold")
    return min(x, 0.0)


@dataclass
class TopKRows:
    """One sequence of ``n`` tokens: ``ids`` int32 [n, k] (-1: none), ``logprobs`` float16 [n, k]
    (-inf: none), ``gold`` float32 [n]: log-prob of the next token at each position, NaN where not
    reported (and at the last position, which predicts past the sequence)."""

    ids: np.ndarray
    logprobs: np.ndarray
    gold: np.ndarray

    @classmethod
    def empty(cls, n: int, k: int) -> "TopKRows":
        return cls(np.full((n, k), -1, np.int32), np.full((n, k), -np.inf, np.float16), np.full(n, np.nan, np.float32))

    def set_row(self, r: int, entries: list[tuple[int, float]], where: str) -> None:
        """Row ``r`` from (id, log-prob) pairs: the ``k`` largest, in descending order (ties keep
        the given order); ``ValueError`` naming ``where`` for fewer than k, repeats or values that are
        not possible log-probs (:func:`checked_logprob`)."""
        k = self.ids.shape[1]
        if len(entries) < k:
            raise ValueError(f"{where}: {len(entries)} top log-probs for k = {k}")
        vals = np.array([checked_logprob(v, f"{where}: top log-prob of id {i}") for i, v in entries], np.float64)
        order = np.argsort(-vals, kind="stable")[:k]
        ids = np.array([entries[j][0] for j in order], np.int64)
        if len(np.unique(ids)) < k:
            raise ValueError(f"{where}: the top {k} name a token twice ({ids.tolist()})")
        self.ids[r] = ids
        self.logprobs[r] = vals[order].astype(np.float16)

    @property
    def missing_rows(self) -> int:
        return int((self.ids[:, 0] < 0).sum())

    def ce(self) -> float:
        """Mean CE over the positions whose gold log-prob is known (NaN if none)."""
        g = self.gold[:-1]
        g = g[~np.isnan(g)]
        return float(-np.mean(g, dtype=np.float64)) if len(g) else float("nan")


class ShardRun:
    """One resumable shard run over a corpus (module docstring).

    ``meta`` is the run's identity for :class:`ShardWriter`. :meth:`pending` yields the sequences
    still to do, in order (up to ``seq_end``, exclusive: one rank's share ends there); :meth:`add`
    takes their results in the same order and writes a shard every ``shard_size`` sequences (then
    calls ``on_shard(i, path)``); :meth:`finish` writes the last one and returns a summary. The one
    resume loop of every extraction: local (:func:`fastfuse.teachers.local_extract.extract_topk`), served, vLLM.
    """

    def __init__(self, out_dir: str | os.PathLike, meta: dict, tokenizer, texts: Any, block_size: int,
                 shard_size: int, text_field: str = "text", progress: bool = True, desc: str = "extract",
                 on_shard: Callable[[int, Path], None] | None = None, seq_end: int | None = None):
        from tqdm import tqdm

        self.writer = ShardWriter(out_dir, meta)
        self.k = int(meta["k"])
        self.tokenizer, self.texts, self.block_size, self.text_field = tokenizer, texts, block_size, text_field
        self.shard_size = shard_size
        self.on_shard = on_shard
        self.seq_end = seq_end
        self.done_seq = self.writer.next_seq
        self.buf: list[tuple[SourceSequence, TopKRows]] = []
        self.fp: dict[int, str] = {}
        self.n_seen = 0
        self.stats: dict[str, Any] = {"sequences": int(self.writer.meta["num_sequences"]), "tokens_done_before": int(self.writer.meta["num_tokens"]),
                      "tokens": 0, "shards_written": 0, "rows_without_teacher": 0}
        self.bar = tqdm(desc=desc, unit="tok", unit_scale=True, disable=not progress, dynamic_ncols=True)
        self.t0 = time.perf_counter()

    def pending(self) -> Iterator[tuple[SourceSequence, str]]:
        """(sequence, its document) for every sequence not yet written, in corpus order."""
        checkpoints = dict(self.writer.shard_fingerprints())
        h = hashlib.sha256(b"").digest()
        for s, text in source_sequences(self.tokenizer, self.texts, self.block_size, self.text_field):
            if self.seq_end is not None and s.seq_index >= self.seq_end:
                break                   # the rest belongs to later ranks
            h = chain_fingerprint(h, s.doc_index, s.char_start, s.char_end, text)
            self.n_seen += 1
            if s.seq_index < self.done_seq:
                want = checkpoints.get(s.seq_index + 1)
                if want is not None and want != h.hex():
                    raise ValueError(f"cannot resume in {self.writer.out_dir}: the corpus differs from the one it was "
                                     f"written from (sequences before {s.seq_index + 1} hash differently)")
                continue
            self.fp[s.seq_index] = h.hex()
            yield s, text

    def add(self, s: SourceSequence, rows: TopKRows) -> None:
        """The result of the next sequence (in order); writes a shard when one is full."""
        want = self.writer.next_seq + len(self.buf)
        if s.seq_index != want:
            raise ValueError(f"results out of order: sequence {s.seq_index} handed over, {want} expected")
        n = len(s.input_ids)
        if rows.ids.shape != (n, self.k) or rows.logprobs.shape != (n, self.k) or rows.gold.shape != (n,):
            raise ValueError(f"sequence {s.seq_index}: rows of shape {rows.ids.shape} for {n} tokens and k = {self.k}")
        self.buf.append((s, rows))
        self.stats["rows_without_teacher"] += rows.missing_rows
        self.bar.update(n)
        if len(self.buf) == self.shard_size:
            self._write()

    def _write(self) -> None:
        seqs = [s for s, _ in self.buf]
        lens = np.array([len(s.input_ids) for s in seqs], np.int64)
        offsets = np.zeros(len(seqs) + 1, np.int64)
        np.cumsum(lens, out=offsets[1:])
        path = self.writer.write_shard(
            offsets=offsets, topk_ids=np.concatenate([r.ids for _, r in self.buf]),
            topk_logprobs=np.concatenate([r.logprobs for _, r in self.buf]),
            ce=np.array([r.ce() for _, r in self.buf], np.float32),
            seq_index=np.array([s.seq_index for s in seqs], np.int64),
            doc_spans=np.array([[s.doc_index, s.char_start, s.char_end] for s in seqs], np.int64).reshape(-1, 3),
            corpus_fingerprint=self.fp.pop(seqs[-1].seq_index))
        for s in seqs[:-1]:
            self.fp.pop(s.seq_index, None)
        self.stats["tokens"] += int(offsets[-1])
        self.stats["shards_written"] += 1
        self.bar.set_postfix(shards=self.writer.next_shard, seqs=self.writer.next_seq)
        self.buf = []
        if self.on_shard is not None:
            self.on_shard(self.writer.next_shard - 1, path)

    def close(self) -> None:
        self.bar.close()

    def finish(self) -> dict:
        """Write the last shard, mark the run complete, return a summary (as ``extract_topk``)."""
        if self.buf:
            self._write()
        self.close()
        if self.n_seen == 0 and self.seq_end is None:    # a rank's share may be empty, the corpus was not
            raise ValueError("texts: the corpus is empty (no document has a token)")
        if self.n_seen < self.done_seq:
            raise ValueError(f"cannot resume in {self.writer.out_dir}: the corpus has {self.n_seen} sequences, fewer "
                             f"than the {self.done_seq} already written")
        self.writer.finish()
        el = time.perf_counter() - self.t0
        self.stats.update(sequences=int(self.writer.meta["num_sequences"]), seconds=el, tokens_per_s=self.stats["tokens"] / max(el, 1e-9),
                          total_tokens=int(self.writer.meta["num_tokens"]), out_dir=str(self.writer.out_dir))
        if self.writer.next_shard:
            self.stats["bytes_per_token"] = ShardReader(self.writer.out_dir, check_sha256=False).bytes_per_token()
        return self.stats
