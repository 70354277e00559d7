"""Online fusion: teachers score the target's token sequences while the student trains; no shard.

:class:`OnlineTeachers` turns a batch of *target* token ids into what :class:`fastfuse.FusionCollator`
returns for the offline pipeline (``chunk -> extract -> align -> FusionDataset``), for the same text the
same tensors (tests/batches/test_online.py compares them bit for bit):

1. **Bytes.** The target ids' token surfaces (:func:`fastfuse.align.surface.token_surfaces`; special tokens
   are empty) concatenated: the text as the target's tokens spell it, with no decode/re-encode drift.
   A dummy-prefix space the target's normaliser adds (SentencePiece) is not part of the text. Bytes that
   are not UTF-8 from some point on (a sampled sequence cut inside a character) end the teachers' text
   there: target tokens past it get no teacher.
2. **Each teacher's tokenisation** of that text, as extraction makes it (its special tokens around
   it), with byte end offsets (:func:`fastfuse.batches.align_pool.sequences`).
3. **Top-k** (:mod:`fastfuse.teachers.online_teachers`): local models on their own device, or a server.
4. **Alignment** by byte spans (:func:`fastfuse.align_offsets_batch`) and the vocabulary maps
   (built once per teacher, optionally cached on disk), then the batch through the collator itself.

A sequence a teacher cannot score (longer than its ``max_length``, refused by its server, a text its
tokenizer rejects) gets "no teacher" for that teacher: ``pos`` all -1 and CE NaN, which the loss reads
as the one-hot fallback and the fusion weights as unknown.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from fastfuse.align.native_threads import check_num_threads
from fastfuse.align.spans import TokenizerOffsets, align_offsets_batch
from fastfuse.align.surface import normalized_text
from fastfuse.align.vocab_map import VocabMap
from fastfuse.batches.align_pool import sequences
from fastfuse.batches.corpus_align import check_source_name
from fastfuse.corpus import pad_token_id as default_pad_id
from fastfuse.teachers.online_teachers import as_teacher
from fastfuse.teachers.shards import tokenizer_fingerprint

__all__ = ["OnlineTeachers", "TargetText", "target_sequences"]


class TargetText:
    """Text and byte end offsets of target token sequences (module docstring, step 1)."""

    def __init__(self, tokenizer):
        self.offsets = TokenizerOffsets(tokenizer, "target_tokenizer")
        probe = normalized_text(tokenizer, "x")
        # what the normaliser puts before any text (SentencePiece's dummy-prefix space)
        self.prefix = probe[:-1] if probe.endswith(b"x") else b""

    def __call__(self, ids: np.ndarray) -> tuple[str, np.ndarray]:
        """``(text, byte end offsets [len(ids)])`` of one target sequence; the ends count bytes of
        ``text`` and may pass its end where the bytes stop being UTF-8."""
        surf = self.offsets.surfaces
        if len(ids) and (ids.min() < 0 or ids.max() >= len(surf)):
            raise ValueError(f"input_ids: target ids must lie in [0, {len(surf)}), got [{ids.min()}, {ids.max()}]")
        real = ~surf.special[ids]
        lens = np.where(real, self.offsets.lengths[ids], 0)
        spelled = b"".join(surf.bytes[t] for t in ids[real])
        skip = len(self.prefix) if self.prefix and spelled.startswith(self.prefix) else 0
        data = spelled[skip:]
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            text = data[:e.start].decode("utf-8")
        return text, np.maximum(np.cumsum(lens) - skip, 0)


def target_sequences(input_ids, attention_mask=None) -> list[np.ndarray]:
    """The sequences of a right-padded ``[B, T]`` batch (int64 numpy, one per row)."""
    ids = np.asarray(input_ids.detach().cpu() if hasattr(input_ids, "detach") else input_ids)
    if ids.ndim != 2 or ids.dtype.kind not in "iu":
        raise ValueError(f"input_ids: expected an integer [B, T] tensor, got {ids.dtype} of shape {ids.shape}")
    if attention_mask is None:
        return [row.astype(np.int64) for row in ids]
    mask = np.asarray(attention_mask.detach().cpu() if hasattr(attention_mask, "detach") else attention_mask)
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask: expected shape {ids.shape} (as input_ids), got {mask.shape}")
    mask = mask != 0
    n = mask.sum(1)
    if (mask != (np.arange(ids.shape[1])[None] < n[:, None])).any():
        b = int(np.flatnonzero((mask != (np.arange(ids.shape[1])[None] < n[:, None])).any(1))[0])
        raise ValueError(f"attention_mask: row {b} is not right-padded (ones, then zeros); online teachers read "
                         "right-padded batches")
    return [ids[b, :n[b]].astype(np.int64) for b in range(len(ids))]


class OnlineTeachers:
    """Several teachers with different tokenizers, scoring target token ids online (module docstring).

    Args:
        teachers: ``{name: teacher}``; a teacher is a :class:`~fastfuse.teachers.online_teachers.LocalTeacher`,
            a :class:`~fastfuse.teachers.online_teachers.ServedTeacher` or a ``(model, tokenizer)`` pair. Index ``s``
            of every batch tensor is ``self.sources[s]``: the names **sorted**, as ``FusionDataset``.
        target_tokenizer: the student's fast tokenizer.
        fusion, tau, ignore_index, pin_memory: as :class:`fastfuse.FusionCollator`.
        pad_token_id: target id of padding (default the tokenizer's, else 0).
        vocab_mode: ``"exact"`` or ``"mined"`` (:class:`fastfuse.VocabMap`).
        vocab_cache_dir: where the vocabulary maps are kept between runs (keyed by both tokenizers'
            fingerprints and the mode); ``None``: built in memory once per instance.

    ``teachers(input_ids, attention_mask)`` (right-padded ``[B, T]``) returns the collator's dict
    (``input_ids``, ``attention_mask``, ``labels``, ``source_topk``, ``align_map``, ``source_weights``,
    ``source_ce``) on the CPU, ``T`` columns as given. :attr:`last_stats` holds the last call's seconds
    per stage and, per teacher, the sequences it could not score.
    """

    def __init__(self, teachers: Mapping[str, Any], target_tokenizer, fusion: str | None = "min_ce", tau: float = 1.0,
                 pad_token_id: int | None = None, vocab_mode: str = "exact", ignore_index: int = -100,
                 pin_memory: bool = True, vocab_cache_dir: str | os.PathLike | None = None, num_threads: int = 0):
        from fastfuse.batches.dataset import FusionCollator

        if not isinstance(teachers, Mapping) or not teachers:
            raise ValueError("teachers: expected a non-empty {name: teacher} mapping")
        self.sources = sorted(check_source_name(n) for n in teachers)
        self.teachers = [as_teacher(n, teachers[n]) for n in self.sources]
        self.num_threads = check_num_threads(num_threads)
        self.target = TargetText(target_tokenizer)
        self.source_offsets = [TokenizerOffsets(t.tokenizer, f"teachers['{n}']")
                               for n, t in zip(self.sources, self.teachers)]
        maps = [self.vocab_map(n, t.tokenizer, target_tokenizer, vocab_mode, vocab_cache_dir).ids
                for n, t in zip(self.sources, self.teachers)]
        sizes = [max(int(t.vocab_size), len(m)) for t, m in zip(self.teachers, maps)]
        self.pad_token_id = default_pad_id(target_tokenizer) if pad_token_id is None else pad_token_id
        self.collator = FusionCollator(maps, self.pad_token_id, source_vocab_sizes=sizes,
                                       target_vocab_size=len(self.target.offsets.surfaces), fusion=fusion, tau=tau,
                                       ignore_index=ignore_index, pin_memory=pin_memory)
        self.ignore_index = ignore_index
        self.last_stats: dict[str, Any] = {}

    def vocab_map(self, name: str, src_tok, tgt_tok, mode: str, cache_dir) -> VocabMap:
        if cache_dir is None:
            return VocabMap.build(src_tok, tgt_tok, mode=mode, num_threads=self.num_threads)
        key = f"{tokenizer_fingerprint(src_tok)[:16]}-{tokenizer_fingerprint(tgt_tok)[:16]}-{mode}"
        path = Path(cache_dir) / f"{name}-{key}.vocab.safetensors"
        if path.exists():
            return VocabMap.load(path)
        vm = VocabMap.build(src_tok, tgt_tok, mode=mode, num_threads=self.num_threads)
        path.parent.mkdir(parents=True, exist_ok=True)
        vm.save(path)
        return vm

    def examples(self, input_ids, attention_mask=None) -> list[dict[str, Any]]:
        """One :class:`fastfuse.FusionCollator` example per sequence (what ``FusionDataset`` yields)."""
        t0 = time.perf_counter()
        tgt = target_sequences(input_ids, attention_mask)
        texts, tgt_ends = zip(*(self.target(ids) for ids in tgt)) if tgt else ((), ())
        secs = {"text": time.perf_counter() - t0, "tokenize": 0.0, "teacher": 0.0, "align": 0.0}
        B, S = len(tgt), len(self.sources)
        out: list[dict[str, Any]] = [{"input_ids": ids, "topk_ids": [None] * S, "topk_logprobs": [None] * S, "pos": [None] * S,
                "ce": np.full(S, np.nan, np.float32)} for ids in tgt]
        stats = {}
        for s, (name, teacher, offs) in enumerate(zip(self.sources, self.teachers, self.source_offsets)):
            t1 = time.perf_counter()
            src = self.tokenize(teacher.tokenizer, offs, list(texts))
            t2 = time.perf_counter()
            have = {b: enc for b, enc in enumerate(src) if enc is not None}
            rows = teacher.score([enc[0] for enc in have.values()], [texts[b] for b in have])
            t3 = time.perf_counter()
            scored = [b for b, r in zip(have, rows) if r is not None]
            by_seq = dict(zip(have, rows))
            aligned = align_offsets_batch([tgt_ends[b] for b in scored], [have[b][1] for b in scored],
                                          self.num_threads)
            pos = dict(zip(scored, (a.pos for a in aligned)))
            k = getattr(teacher, "k", 1)
            for b in range(B):
                r = by_seq.get(b)
                ex = out[b]
                if r is None:           # no teacher for this sequence
                    ex["topk_ids"][s] = np.zeros((0, k), np.int32)
                    ex["topk_logprobs"][s] = np.zeros((0, k), np.float16)
                    ex["pos"][s] = np.full(len(tgt[b]), -1, np.int32)
                    continue
                ex["topk_ids"][s], ex["topk_logprobs"][s] = r.ids, r.logprobs
                ex["pos"][s] = pos[b].astype(np.int32)
                ex["ce"][s] = np.float32(r.ce())
            secs["tokenize"] += t2 - t1
            secs["teacher"] += t3 - t2
            secs["align"] += time.perf_counter() - t3
            stats[name] = {"sequences": B, "no_teacher": B - len(scored)}
        self.last_stats = {"seconds": secs, "teachers": stats}
        return out

    @staticmethod
    def tokenize(tokenizer, offs: TokenizerOffsets, texts: list[str]) -> list[tuple[np.ndarray, np.ndarray] | None]:
        """Per text, the teacher's ``(ids, byte ends)`` as extraction tokenises it, or ``None`` (no tokens,
        or a text its tokenizer refuses)."""
        try:
            got = sequences(tokenizer, texts, offs)
        except Exception:           # one text it refuses: find it, score the others
            return [OnlineTeachers.tokenize_one(tokenizer, offs, t) for t in texts]
        out: list = [None] * len(texts)
        for ids, ends, d in got:
            out[d] = (ids, ends)
        return out

    @staticmethod
    def tokenize_one(tokenizer, offs: TokenizerOffsets, text: str):
        try:
            got = sequences(tokenizer, [text], offs)
        except Exception:
            return None
        return (got[0][0], got[0][1]) if got else None

    def __call__(self, input_ids, attention_mask=None) -> dict[str, Any]:
        examples = self.examples(input_ids, attention_mask)
        t0 = time.perf_counter()
        batch = self.collator(examples)
        batch = pad_columns(batch, int(np.shape(input_ids)[1]), self.pad_token_id, self.ignore_index)
        self.last_stats["seconds"]["collate"] = time.perf_counter() - t0
        return batch


def pad_columns(batch: dict[str, Any], T: int, pad_id: int, ignore_index: int) -> dict[str, Any]:
    """The collator's batch widened to ``T`` target columns (its own width is the longest sequence)."""
    import torch

    t = batch["input_ids"].shape[1]
    if t >= T:
        return batch
    extra = T - t

    def widen(x, value):
        return torch.nn.functional.pad(x, (0, extra), value=value)

    out = dict(batch)
    out["input_ids"] = widen(batch["input_ids"], pad_id)
    out["attention_mask"] = widen(batch["attention_mask"], 0)
    out["labels"] = widen(batch["labels"], ignore_index)
    am = batch["align_map"]
    out["align_map"] = type(am)(widen(am.pos, -1), am.vocab)
    if batch["source_weights"].dim() == 3:
        out["source_weights"] = widen(batch["source_weights"], 0.0)
    return out
