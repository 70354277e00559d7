"""Training batches for ``fused_loss``: a collator that pads per-sequence fusion data.

One example (what :class:`FusionDataset` yields, or anything shaped the same) is a dict:

    input_ids       int [T]            target tokenisation of the sequence
    topk_ids        list of S int [Ts_s, K_s]   each source's top-k ids, source positions
    topk_logprobs   list of S float [Ts_s, K_s] their log-probs
    pos             list of S int32 [T]  target position -> source position (next-token semantics) or -1
    ce              float [S]          each source's cross-entropy on the sequence (NaN = unknown)

Sources may have different sequence lengths, top-k sizes and vocabulary sizes; model vocabularies
may be padded beyond their tokenizer (embedding rows with no token): ids there map to nothing.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from fastfuse.batches.fusion_weights import fuse_weights, gold_probabilities, token_choice_weights
from fastfuse.batch import AlignMap, SourceTopK


def _vocab_table(vocab_maps: Sequence[np.ndarray], source_vocab_sizes: Sequence[int] | None) -> tuple[torch.Tensor, list[int]]:
    """[S, Vs_max] int32 table padded with -1, and each source's accepted id range."""
    if not isinstance(vocab_maps, (list, tuple)):
        raise TypeError(f"vocab_maps: expected a list of 1-D integer arrays (one per source), "
                        f"got {type(vocab_maps).__name__}")
    if source_vocab_sizes is not None and not isinstance(source_vocab_sizes, (list, tuple)):
        raise TypeError(f"source_vocab_sizes: expected a list of ints, got {type(source_vocab_sizes).__name__}")
    maps = []
    for s, v in enumerate(vocab_maps):
        v = np.asarray(v)
        if v.ndim != 1 or not np.issubdtype(v.dtype, np.integer):
            raise TypeError(f"vocab_maps[{s}]: expected a 1-D integer array (source id -> target id or -1)")
        maps.append(v)
    vocab_maps = maps
    S = len(vocab_maps)
    sizes = [len(v) for v in vocab_maps]
    if source_vocab_sizes is not None:
        if len(source_vocab_sizes) != S:
            raise ValueError(f"source_vocab_sizes: expected {S} entries (one per source), got {len(source_vocab_sizes)}")
        for s, (n, m) in enumerate(zip(source_vocab_sizes, sizes)):
            if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
                raise TypeError(f"source_vocab_sizes[{s}]: expected an int, got {type(n).__name__}")
            if int(n) < m:
                raise ValueError(f"source_vocab_sizes[{s}]: model vocabulary {n} is smaller than the vocab map ({m} ids)")
        sizes = [int(n) for n in source_vocab_sizes]
    table = np.full((S, max(sizes) if S else 0), -1, dtype=np.int32)
    sizes_out = list(sizes)
    for s, v in enumerate(vocab_maps):
        table[s, : len(v)] = v  # ids of padded embedding rows stay -1
    return torch.from_numpy(table), sizes_out


FUSIONS = ("min_ce", "avg_ce", "min_ce_norm", "avg_ce_norm", "equal", "token")


class FusionCollator:
    """Pads a list of examples into one batch for :func:`fastfuse.fused_loss`.

    Args:
        vocab_maps: per source, int array ``[len(source tokenizer)]``: source id -> target id or -1
            (``VocabMap.ids``).
        pad_token_id: target id used to pad ``input_ids``.
        source_vocab_sizes: per source, the model's logits dimension if it exceeds the tokenizer
            (padded embeddings); ids in ``[len(map), size)`` are accepted and map to nothing.
        target_vocab_size: if given, every mapped id is checked to be below it.
        fusion: how the sources are weighted (one of :data:`FUSIONS`): ``"min_ce"`` (FuseLLM's MinCE: weight 1
            on the source with the lowest CE per own token on the sequence), ``"avg_ce"`` (``softmax(-CE / tau)``),
            ``"min_ce_norm"`` / ``"avg_ce_norm"`` (the same on each source's total nats on the sequence per
            *target* token: tokenizer-invariant, ranking the sources exactly as nats per byte would),
            ``"equal"`` (or ``None``: ``1 / S``), ``"token"`` (per target position, the source whose aligned
            top-k gives the gold token the highest probability; :func:`fastfuse.batches.fusion_weights.token_choice_weights`).
        tau: the temperature of ``"avg_ce"`` / ``"avg_ce_norm"`` (nats).
        pin_memory: pin the batch's tensors (only when CUDA is available).

    Returns dicts with ``input_ids`` int64 ``[B, T]``, ``attention_mask`` ``[B, T]``, ``labels`` int64
    ``[B, T]`` (already shifted: ``labels[:, t]`` is token ``t+1``; padding and the last position
    are ``ignore_index``), ``source_topk`` (:class:`SourceTopK`, ``[S, B, Ts, K]``), ``align_map``
    (:class:`AlignMap`), ``source_weights`` float32 ``[S, B]`` and ``source_ce`` ``[S, B]``.
    """

    def __init__(self, vocab_maps: Sequence[np.ndarray], pad_token_id: int, source_vocab_sizes: Sequence[int] | None = None,
                 target_vocab_size: int | None = None, fusion: str | None = "min_ce", tau: float = 1.0,
                 ignore_index: int = -100, pin_memory: bool = True):
        if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, (int, np.integer)) or pad_token_id < 0:
            raise ValueError(f"pad_token_id: expected an int >= 0, got {pad_token_id!r}")
        if target_vocab_size is not None and (isinstance(target_vocab_size, bool) or
                                              not isinstance(target_vocab_size, (int, np.integer)) or
                                              target_vocab_size < 1):
            raise ValueError(f"target_vocab_size: expected an int >= 1 or None, got {target_vocab_size!r}")
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, (int, np.integer)):
            raise TypeError(f"ignore_index: expected an int, got {type(ignore_index).__name__}")
        if fusion is not None and (not isinstance(fusion, str) or fusion not in FUSIONS):
            raise ValueError(f"fusion: expected one of {', '.join(map(repr, FUSIONS))} or None, got {fusion!r}")
        self.vocab, self.source_sizes = _vocab_table(vocab_maps, source_vocab_sizes)
        if target_vocab_size is not None and self.vocab.numel() and int(self.vocab.max()) >= target_vocab_size:
            raise ValueError(f"vocab_maps: mapped ids must be < target_vocab_size ({target_vocab_size}), "
                             f"got {int(self.vocab.max())}")
        if target_vocab_size is not None and pad_token_id >= target_vocab_size:
            raise ValueError(f"pad_token_id: {pad_token_id} is not a target id (target_vocab_size {target_vocab_size})")
        self.num_sources = len(vocab_maps)
        self.pad_token_id = int(pad_token_id)
        self.fusion, self.tau, self.ignore_index = fusion, tau, ignore_index
        self.pin_memory = pin_memory and torch.cuda.is_available()

    def check_example(self, b: int, ex: Any) -> dict[str, Any]:
        """Example ``b`` as arrays, or ``ValueError`` naming the example and the field."""
        S = self.num_sources
        if not isinstance(ex, dict):
            raise ValueError(f"examples[{b}]: expected a dict, got {type(ex).__name__}")
        missing = [k for k in ("input_ids", "topk_ids", "topk_logprobs", "pos") if k not in ex]
        if missing:
            raise ValueError(f"examples[{b}]: missing fields {missing}")
        out: dict[str, Any] = {"input_ids": np.asarray(ex["input_ids"])}
        if out["input_ids"].ndim != 1 or not np.issubdtype(out["input_ids"].dtype, np.integer):
            raise ValueError(f"examples[{b}]['input_ids']: expected a 1-D integer array, got shape "
                             f"{out['input_ids'].shape} of {out['input_ids'].dtype}")
        for key in ("topk_ids", "topk_logprobs", "pos"):
            if not isinstance(ex[key], (list, tuple)):
                raise ValueError(f"examples[{b}]['{key}']: expected a list of {S} arrays (one per source), "
                                 f"got {type(ex[key]).__name__}")
            if len(ex[key]) != S:
                raise ValueError(f"examples[{b}]['{key}']: expected {S} sources, got {len(ex[key])}")
            out[key] = [np.asarray(x) for x in ex[key]]
        for s in range(S):
            ti, tl = out["topk_ids"][s], out["topk_logprobs"][s]
            if ti.shape != tl.shape or ti.ndim != 2:
                raise ValueError(f"examples[{b}]['topk_ids'][{s}]: topk_ids {ti.shape} and topk_logprobs {tl.shape} "
                                 "must both be [Ts, K]")
            for key, arr, kinds in (("topk_ids", ti, "iu"), ("topk_logprobs", tl, "fiu"),
                                    ("pos", out["pos"][s], "iu")):
                if arr.size and arr.dtype.kind not in kinds:
                    raise ValueError(f"examples[{b}]['{key}'][{s}]: expected {'integers' if kinds == 'iu' else 'numbers'}, "
                                     f"got dtype {arr.dtype}")
        ce = ex.get("ce")
        if ce is not None:
            try:
                ce = np.asarray(ce, dtype=np.float32)
            except (TypeError, ValueError) as e:
                raise ValueError(f"examples[{b}]['ce']: expected {S} numbers, got {ce!r:.60} ({e})") from None
            if ce.shape not in ((S,), (S, 1)):
                raise ValueError(f"examples[{b}]['ce']: expected {S} values (one per source), got shape {ce.shape}")
        out["ce"] = ce
        return out

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        S, B = self.num_sources, len(examples)
        if B == 0:
            raise ValueError("examples: expected at least one example")
        examples = [self.check_example(b, ex) for b, ex in enumerate(examples)]
        T = max(len(ex["input_ids"]) for ex in examples)
        Ts = max([1] + [len(ex["topk_ids"][s]) for ex in examples for s in range(S)])
        K = max([1] + [ex["topk_ids"][s].shape[1] for ex in examples for s in range(S)])
        input_ids = torch.full((B, T), self.pad_token_id, dtype=torch.int64)
        attention = torch.zeros((B, T), dtype=torch.int64)
        labels = torch.full((B, T), self.ignore_index, dtype=torch.int64)
        ids = torch.full((S, B, Ts, K), -1, dtype=torch.int32)
        logprobs = torch.zeros((S, B, Ts, K), dtype=torch.float32)
        pos = torch.full((S, B, T), -1, dtype=torch.int32)
        ce = torch.full((S, B), float("nan"), dtype=torch.float32)
        for b, ex in enumerate(examples):
            x = torch.as_tensor(np.asarray(ex["input_ids"], dtype=np.int64))
            n = len(x)
            input_ids[b, :n] = x
            attention[b, :n] = 1
            labels[b, : max(n - 1, 0)] = x[1:]
            if ex["ce"] is not None:
                ce[:, b] = torch.as_tensor(ex["ce"].reshape(S))
            for s in range(S):
                ti, tl = ex["topk_ids"][s], ex["topk_logprobs"][s]
                if ti.size and (ti.max() >= self.source_sizes[s] or ti.min() < -1):
                    raise ValueError(f"examples[{b}]: source {s} topk_ids must lie in [-1, {self.source_sizes[s]}), "
                                     f"got [{ti.min()}, {ti.max()}]")
                p = ex["pos"][s]
                if p.shape != (n,):
                    raise ValueError(f"examples[{b}]: source {s} pos must have the target length {n}, got {p.shape}")
                if p.size and p.max() >= len(ti):
                    raise ValueError(f"examples[{b}]: source {s} pos points past the source sequence ({len(ti)} positions)")
                ids[s, b, : len(ti), : ti.shape[1]] = torch.from_numpy(ti.astype(np.int32))
                logprobs[s, b, : len(tl), : tl.shape[1]] = torch.from_numpy(tl.astype(np.float32))
                pos[s, b, :n] = torch.from_numpy(p.astype(np.int32))
        weights = self.source_weights(ids, logprobs, pos, labels, ce)
        batch: dict[str, Any] = {
            "input_ids": input_ids, "attention_mask": attention, "labels": labels,
            "source_topk": SourceTopK(ids, logprobs), "align_map": AlignMap(pos, self.vocab),
            "source_weights": weights, "source_ce": ce,
        }
        if self.pin_memory:
            batch = {k: (type(v)(*(t.pin_memory() for t in v)) if isinstance(v, tuple) else v.pin_memory())
                     for k, v in batch.items()}
        return batch


    def source_weights(self, ids: torch.Tensor, logprobs: torch.Tensor, pos: torch.Tensor, labels: torch.Tensor,
                       ce: torch.Tensor) -> torch.Tensor:
        """``[S, B]`` (per sequence) or ``[S, B, T]`` (``"token"``) weights of the padded batch under ``fusion``."""
        S, B = ce.shape
        if self.fusion in (None, "equal") or S == 0:
            return torch.full((S, B), 1.0 / max(S, 1))
        if self.fusion == "token":
            return token_choice_weights(gold_probabilities(ids, logprobs, pos, self.vocab, labels, self.ignore_index))
        if self.fusion.endswith("_norm"):
            # total nats of each source on the sequence (its CE is a mean over its Ts - 1 predictions) per
            # predicted target token: one unit for every tokenizer
            n_src = ((ids >= 0).any(-1).sum(-1) - 1).clamp_min(0).float()     # [S, B]
            n_tgt = (labels != self.ignore_index).sum(-1).float()             # [B]
            ce = ce * n_src / n_tgt
        return fuse_weights(ce, method=self.fusion.removesuffix("_norm"), level="sequence", tau=self.tau)


class FusionDataset(torch.utils.data.Dataset):
    """Examples for :class:`FusionCollator` from an ``align_corpus`` directory and the sources' shards.

    ``sources`` names the sources and fixes their order: index ``s`` of every batch tensor (``source_topk``,
    ``align_map``, ``source_weights``, ``source_ce``) is ``dataset.sources[s]``. The default is every source
    of the alignment **sorted by name** (not the order they were given to ``align_corpus``), so look a
    source up by name (``dataset.sources.index(name)``), never by a position assumed elsewhere.

    ``dataset.collator(pad_token_id, ...)`` builds the matching collator (vocabulary maps, padded
    source vocabularies from the shards' metadata).
    """

    def __init__(self, align_dir, sources: Sequence[str] | None = None):
        from fastfuse.batches.corpus_align import AlignedStore
        from fastfuse.teachers.rank_parts import open_shards

        self.store = AlignedStore(align_dir)
        self.sources = list(sources) if sources is not None else sorted(self.store.sources)
        if len(set(self.sources)) != len(self.sources):
            raise ValueError(f"sources: each source at most once, got {self.sources}")
        unknown = [s for s in self.sources if s not in self.store.sources]
        if unknown:
            raise ValueError(f"sources: {unknown} not in {align_dir} (has {self.store.sources})")
        self.readers = [open_shards(self.store.source_dir(s)) for s in self.sources]
        for s, r in zip(self.sources, self.readers):
            if [e["sha256"] for e in r.meta["shards"]] != self.store.source_shards(s):
                raise ValueError(f"sources: the shards of '{s}' in {r.out_dir} are not the ones {align_dir} was "
                                 "aligned against (re-extracted since?); run fastfuse align again")
            if len(r) != len(self.store):
                raise ValueError(f"sources: '{s}' has {len(r)} sequences, the alignment {len(self.store)}")

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} sequences")
        recs = [r[i] for r in self.readers]
        return {"input_ids": self.store.target_ids(i), "topk_ids": [r["topk_ids"] for r in recs],
                "topk_logprobs": [r["topk_logprobs"] for r in recs],
                "pos": [self.store.pos(s, i) for s in self.sources],
                "ce": np.array([r["ce"] for r in recs], dtype=np.float32)}

    def collator(self, pad_token_id: int, **kwargs) -> FusionCollator:
        maps = [self.store.vocab_map(s).ids for s in self.sources]
        sizes = [max(int(r.meta["vocab_size"]), len(m)) for r, m in zip(self.readers, maps)]
        kwargs.setdefault("target_vocab_size", self.store.meta.get("target_vocab"))
        return FusionCollator(maps, pad_token_id, source_vocab_sizes=sizes, **kwargs)
