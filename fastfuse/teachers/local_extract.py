"""Offline top-k extraction: a source LM reads the corpus once and keeps its top-k next-token log-probs.

The output is a shard directory (:mod:`fastfuse.teachers.shards`). The pipeline:

1. **Corpus and sequences** (:mod:`fastfuse.corpus`): documents read by ``iter_corpus`` and cut into
   sequences of at most ``block_size`` tokens (special tokens included) by ``source_sequences``.
3. **Batches** (:func:`plan_batches`): the sequences of one shard, sorted by length (longest first,
   ties by index) and packed greedily while ``padded length x batch size <= token_budget``. Batches
   never cross shard boundaries, so a resumed run reproduces the batches of an uninterrupted one.
4. **Top-k** (:func:`topk_forward`): one forward pass ``model(input_ids=..., attention_mask=...)``
   per batch; then, on row views of the logits in chunks of bounded memory, fp32 logits
   (columns of a padded embedding, ids >= ``len(tokenizer)``, are left out), ``logsumexp``,
   ``torch.topk``, and the log-prob of the gold next token; only the top-k and the gold log-probs
   are copied to the host.
5. **Shards** (:class:`fastfuse.teachers.shards.ShardWriter`): every ``shard_size`` sequences, one shard and
   an updated ``meta.json``, written atomically and byte-deterministically. A rerun with the same
   arguments skips the completed shards (checking that the corpus still hashes the same) and
   writes exactly the bytes an uninterrupted run writes.
6. **Ranks** (``world_size > 1``, :mod:`fastfuse.teachers.rank_parts`): every rank tokenises the corpus once
   for the sequence lengths, takes its contiguous range of about ``total / world_size`` tokens
   (:func:`~fastfuse.teachers.rank_parts.token_ranges`) and runs steps 3-5 over that range only, into
   ``out_dir/rank-RRRRR-of-WWWWW/``; shards start at the range's start, and the corpus fingerprint
   chain still runs from the corpus's first sequence. Ranks share nothing at run time (no process
   group): each one resumes alone.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from fastfuse.corpus import SourceSequence, pad_token_id, source_sequences, special_tokens
from fastfuse.teachers.rank_parts import check_layout, part_name, token_ranges
from fastfuse.teachers.shards import tokenizer_fingerprint
from fastfuse.teachers.resume_loop import ShardRun, TopKRows

DEFAULT_K = 10
DEFAULT_BLOCK_SIZE = 2048
DEFAULT_TOKEN_BUDGET = 16384
DEFAULT_SHARD_SIZE = 4096
_CHUNK_ELEMS = 1 << 25  # fp32 logits elements processed at once in the top-k step on GPU (128 MiB)
_CHUNK_ELEMS_CPU = 1 << 22  # on CPU: smaller chunks stay in cache (16 MiB)


# ----------------------------------------------------------------------------------------------
# batches and the top-k step


def plan_batches(lengths: np.ndarray | list[int], token_budget: int) -> list[np.ndarray]:
    """Indices of the batches for sequences of ``lengths``: sorted longest first (stable), packed
    greedily while ``max length x batch size <= token_budget`` (a longer sequence goes alone)."""
    lengths = np.asarray(lengths, np.int64)
    order = np.argsort(-lengths, kind="stable")
    batches: list[np.ndarray] = []
    start = 0
    for i in range(1, len(order) + 1):
        if i == len(order) or lengths[order[start]] * (i - start + 1) > token_budget:
            batches.append(order[start:i])
            start = i
    return batches


def pad_token_ids(seqs: list[np.ndarray], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded ``input_ids`` and ``attention_mask``, int64 [B, max length]."""
    lens = np.array([len(s) for s in seqs])
    ids = np.full((len(seqs), int(lens.max())), pad_id, np.int64)
    mask = np.zeros_like(ids)
    for b, s in enumerate(seqs):
        ids[b, :len(s)] = s
        mask[b, :len(s)] = 1
    return ids, mask


def forward_logits(model, input_ids, attention_mask):
    """``model(input_ids=..., attention_mask=...)`` logits [B, L, V] (no KV cache)."""
    kw = {"use_cache": False} if getattr(getattr(model, "config", None), "use_cache", None) is not None else {}
    out = model(input_ids=input_ids, attention_mask=attention_mask, **kw)
    return out.logits if hasattr(out, "logits") else out[0]


def topk_from_logits(logits, seqs: list[np.ndarray], k: int, n_real: int, chunk_elems: int | None = None):
    """Top-k of log_softmax (fp32) at every real position and the gold next-token log-probs.

    ``logits`` [B, L, V] (any float dtype, on any device) for the right-padded ``seqs``. Returns
    device tensors ``ids`` int32 [T, k], ``logprobs`` float16 [T, k], ``gold`` float32 [T] where
    T = sum of lengths, rows in batch order, and ``gold[t]`` the log-prob of the next token (0 at
    each sequence's last position). Only columns ``< n_real`` take part (a padded embedding's
    extra columns are left out). Works on contiguous row views of ``logits`` in chunks of at most
    ``chunk_elems`` fp32 elements (few kernel launches; batches are length-sorted, so the padding
    rows it also reads are few) and keeps the real rows of the small results.
    """
    import torch

    B, L, V = logits.shape
    dev = logits.device
    if chunk_elems is None:
        chunk_elems = _CHUNK_ELEMS if dev.type == "cuda" else _CHUNK_ELEMS_CPU
    nxt = np.zeros((B, L), np.int64)
    keep = np.zeros((B, L), bool)
    for b, s in enumerate(seqs):
        nxt[b, :len(s) - 1] = s[1:]
        keep[b, :len(s)] = True
    nxt_t = torch.from_numpy(nxt.reshape(-1, 1)).to(dev, non_blocking=True)
    flat = logits.reshape(B * L, V)
    step = max(1, chunk_elems // V)
    out_ids, out_lp, out_gold = [], [], []
    for a in range(0, B * L, step):
        x = flat[a:a + step, :n_real].float()
        lse = torch.logsumexp(x, dim=-1, keepdim=True)
        vals, idx = torch.topk(x, k, dim=-1)
        out_ids.append(idx.to(torch.int32))
        out_lp.append((vals - lse).to(torch.float16))
        out_gold.append((x.gather(1, nxt_t[a:a + step]) - lse).squeeze(1))
    rows = torch.from_numpy(np.flatnonzero(keep)).to(dev, non_blocking=True)
    return tuple(torch.cat(o).index_select(0, rows) for o in (out_ids, out_lp, out_gold))


def topk_forward(model, seqs: list[np.ndarray], k: int, n_real: int, device, pad_id: int = 0,
                 chunk_elems: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One batch: forward pass, top-k on the device, host copies (ids, logprobs, gold; see
    :func:`topk_from_logits`)."""
    import torch

    ids, mask = pad_token_ids(seqs, pad_id)
    ids_t = torch.from_numpy(ids).to(device, non_blocking=True)
    mask_t = torch.from_numpy(mask).to(device, non_blocking=True)
    logits = forward_logits(model, ids_t, mask_t)
    r = topk_from_logits(logits, seqs, k, n_real, chunk_elems)
    del logits
    top_ids, top_logprobs, gold = (t.cpu().numpy() for t in r)
    return top_ids, top_logprobs, gold


def topk_rows(model, seqs: list[np.ndarray], k: int, n_real: int, device, pad_id: int, token_budget: int,
              seq_index: list[int] | None = None, what: str = "model") -> list[TopKRows]:
    """:class:`TopKRows` of every sequence of ``seqs``, in the batches of :func:`plan_batches`
    (``token_budget``) through :func:`topk_forward`; ``ValueError`` (:func:`check_finite`) on a NaN.
    The one top-k step of offline extraction and of online teachers (:mod:`fastfuse.teachers.online_teachers`): the
    same sequences give the same batches, so the same bits. Call it under ``torch.inference_mode()``."""
    lens = np.array([len(s) for s in seqs], np.int64)
    seq_index = list(range(len(seqs))) if seq_index is None else seq_index
    rows: list = [None] * len(seqs)
    for batch in plan_batches(lens, token_budget):
        bi, bl, bg = topk_forward(model, [seqs[j] for j in batch], k, n_real, device, pad_id)
        check_finite(bl, bg, lens[batch], [seq_index[j] for j in batch], what)
        pos = 0
        for j in batch:
            n = lens[j]
            rows[j] = TopKRows(bi[pos:pos + n], bl[pos:pos + n], bg[pos:pos + n])
            pos += n
    return rows


# ----------------------------------------------------------------------------------------------
# the driver


def resolve_device_dtype(device, dtype):
    """``(torch.device, torch.dtype)``: default CUDA if available, else CPU; bf16 on GPU, fp32 on CPU."""
    import torch

    try:
        device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device: {device!r} is not a torch device ({e})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {str(device)!r} asked for, but CUDA is not available here")
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    elif isinstance(dtype, str):
        name = dtype
        dtype = getattr(torch, name, None)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"dtype: {name!r} is not a torch floating-point dtype (float32, bfloat16, float16)")
    return device, dtype


def model_vocab_size(model) -> int:
    """The width of the model's logits (its output embedding rows, else ``config.vocab_size``)."""
    emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if emb is not None and getattr(emb, "weight", None) is not None:
        return int(emb.weight.shape[0])
    return int(model.config.vocab_size)


def model_fingerprint(model) -> str:
    """sha256 over a model's state dict (names, dtypes, shapes and bytes of every tensor), one tensor
    at a time: a resumed extraction refuses other weights under the same output directory. Costs one
    read of the weights (about a second per GB), and at most one tensor's copy of extra memory."""
    import torch

    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        if t.numel():
            h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def check_finite(logprobs: np.ndarray, gold: np.ndarray, lens: np.ndarray, seq_index: list[int], what: str) -> None:
    """``ValueError`` naming the first sequence whose log-probs hold NaN (a broken model or input)."""
    bad = np.isnan(logprobs).any(axis=1) | np.isnan(gold)
    if bad.any():
        row = int(np.argmax(bad))
        j = int(np.searchsorted(np.cumsum(lens), row, side="right"))
        raise ValueError(f"{what}: produced NaN log-probs at position {row - int(lens[:j].sum())} of "
                         f"sequence {seq_index[j]} (NaN weights or activations?); nothing was written for its shard")


def rank_partition(tokenizer, texts: Any, block_size: int, text_field: str, rank: int, world_size: int) -> dict:
    """Rank ``rank``'s share of the corpus (meta.json's ``partition`` record; see
    :func:`fastfuse.teachers.rank_parts.token_ranges`), from one tokenisation of the whole corpus."""
    for name, v, low in (("rank", rank, 0), ("world_size", world_size, 1)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < low:
            raise ValueError(f"{name}: expected an int >= {low}, got {v!r}")
    if rank >= world_size:
        raise ValueError(f"rank: {rank} is not below world_size {world_size}")
    if world_size > 1 and isinstance(texts, Iterator):
        raise ValueError("texts: an iterator can be read only once, and a rank reads the corpus twice (lengths, "
                         "then its share); pass a list, files or a dataset")
    lengths = [len(s.input_ids) for s, _ in source_sequences(tokenizer, texts, block_size, text_field)]
    if not lengths:
        raise ValueError("texts: the corpus is empty (no document has a token)")
    lo, hi = token_ranges(lengths, world_size)[rank]
    return {"rank": int(rank), "world_size": int(world_size), "seq_start": lo, "seq_end": hi,
            "corpus_sequences": len(lengths), "corpus_tokens": int(sum(lengths))}


def extract_topk(model, tokenizer, texts: Any, out_dir: str | os.PathLike, k: int = DEFAULT_K,
                 block_size: int = DEFAULT_BLOCK_SIZE, token_budget: int = DEFAULT_TOKEN_BUDGET,
                 shard_size: int = DEFAULT_SHARD_SIZE, source_name: str | None = None, device=None, dtype=None,
                 progress: bool = True, text_field: str = "text",
                 on_shard: Callable[[int, Path], None] | None = None, rank: int = 0, world_size: int = 1) -> dict:
    """Run a Hugging Face causal LM over a corpus and write its top-k next-token log-probs to
    ``out_dir`` as shards (format: :mod:`fastfuse.teachers.shards`; pipeline: this module's docstring).

    ``model``: called as ``model(input_ids=[B, L] int64, attention_mask=[B, L])`` returning logits
    ``[B, L, V]``, with a ``state_dict()`` (any ``nn.Module``: its :func:`model_fingerprint` makes the
    weights part of the run's identity, so a resume with other weights is refused); moved to ``device`` (default CUDA if available, else CPU) and ``dtype`` (default
    bf16 on GPU, fp32 on CPU). ``tokenizer``: the model's fast tokenizer. ``texts``: see
    :func:`fastfuse.corpus.iter_corpus`. ``block_size``: max tokens per sequence (special tokens included).
    ``token_budget``: max padded tokens per batch. ``shard_size``: sequences per shard.
    ``on_shard(i, path)`` is called after shard ``i`` and ``meta.json`` are on disk.
    ``rank`` / ``world_size``: with ``world_size > 1``, write only rank ``rank``'s share of the
    corpus, into ``out_dir/rank-RRRRR-of-WWWWW`` (step 6 above); read all parts back with
    :func:`fastfuse.teachers.rank_parts.open_shards`. ``texts`` must then be readable twice (not an iterator).

    Resumes if ``out_dir`` holds a run with the same settings (``ValueError`` naming what differs
    otherwise). Returns a summary dict (sequences, tokens, shards written now, seconds, tokens/s,
    bytes per token).
    """
    import torch

    for name, v in (("k", k), ("block_size", block_size), ("token_budget", token_budget), ("shard_size", shard_size)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name}: expected a positive int, got {v!r}")
    if token_budget < block_size:
        raise ValueError(f"token_budget: {token_budget} is smaller than block_size {block_size}")
    device, dtype = resolve_device_dtype(device, dtype)
    n_real = len(tokenizer)
    vocab_size = model_vocab_size(model)
    if vocab_size < n_real:
        raise ValueError(f"model: logits have {vocab_size} columns, fewer than the tokenizer's {n_real} tokens")
    if k > n_real:
        raise ValueError(f"k: {k} exceeds the tokenizer's {n_real} tokens")
    ident = getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
    if source_name is None:
        source_name = Path(str(ident)).name or type(model).__name__
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None) or \
        getattr(getattr(model, "config", None), "n_positions", None)
    if isinstance(limit, int) and block_size > limit:
        raise ValueError(f"block_size: {block_size} exceeds the model's {limit} positions "
                         "(config.max_position_embeddings / n_positions)")
    part = None
    if world_size != 1 or rank != 0:
        part = rank_partition(tokenizer, texts, block_size, text_field, rank, world_size)
    check_layout(out_dir, world_size)
    if part is not None:
        out_dir = Path(out_dir) / part_name(rank, world_size)
    model.to(device=device, dtype=dtype)
    model.eval()
    desc = f"extract {source_name}" + (f" [rank {rank}/{world_size}]" if part is not None else "")
    run = ShardRun(out_dir, {
        "source_name": source_name, "model": str(ident), "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "tokenizer_size": n_real, "vocab_size": vocab_size, "k": int(k), "block_size": int(block_size),
        "token_budget": int(token_budget), "shard_size": int(shard_size), "dtype": str(dtype).replace("torch.", ""),
        "special_tokens": list(map(list, special_tokens(tokenizer))), "model_fingerprint": model_fingerprint(model),
        **({"partition": part} if part is not None else {}),     # absent for one process: the same bytes as ever
    }, tokenizer, texts, block_size, shard_size, text_field, progress, desc=desc, on_shard=on_shard,
        seq_end=part["seq_end"] if part is not None else None)
    pad_id = pad_token_id(tokenizer)

    def run_shard(buf: list[SourceSequence]) -> None:
        """The top-k rows of one shard's sequences, then handed over in order (a NaN anywhere stops
        the run before its shard is written)."""
        rows = topk_rows(model, [s.input_ids for s in buf], k, n_real, device, pad_id, token_budget,
                         [s.seq_index for s in buf])
        for s, r in zip(buf, rows):
            assert r is not None        # plan_batches covers every sequence
            run.add(s, r)

    buf: list[SourceSequence] = []
    try:
        with torch.inference_mode():
            for s, _ in run.pending():
                buf.append(s)
                if len(buf) == shard_size:
                    run_shard(buf)
                    buf = []
            if buf:
                run_shard(buf)
    finally:
        run.close()
    return run.finish()
