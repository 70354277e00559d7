"""vLLM's offline API as a source: ``LLM.generate`` outputs with prompt log-probs into top-k shards.

vLLM itself is not a dependency; this module reads objects of the shape its ``RequestOutput`` has::

    from vllm import LLM, SamplingParams
    prompts = vllm_prompts(tokenizer, texts, block_size, out_dir)       # the sequences still to do
    outs = LLM(model).generate(prompts, SamplingParams(max_tokens=1, temperature=0, logprobs=k,
                                                       prompt_logprobs=k))
    write_vllm_outputs(outs, tokenizer, texts, out_dir, k=k, block_size=block_size, model_name=model)

``output.prompt_token_ids`` must be the sequence (checked: ``ValueError`` naming the sequence and
the first differing position); ``output.prompt_logprobs[j]`` (None for j = 0) is a
``{token_id: Logprob}`` dict with ``.logprob`` and ``.rank`` predicting prompt token j: the top k by
rank plus the prompt token itself, so row j - 1 of the shard and its gold log-prob. The last row
comes from the generated token's ``outputs[0].logprobs[0]`` when ``logprobs=k`` was set, else it is
written as "no teacher" (:mod:`fastfuse.teachers.resume_loop`). Shards, identity (the model name and the
tokenizer, as :func:`fastfuse.teachers.served.served_fingerprint`) and resume are those of a served run.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from fastfuse.corpus import source_sequences
from fastfuse.teachers.served import served_meta
from fastfuse.teachers.shards import META_NAME, load_meta
from fastfuse.teachers.resume_loop import ShardRun, TopKRows, checked_logprob


def vllm_prompts(tokenizer, texts: Any, block_size: int, out_dir: str | os.PathLike | None = None,
                 text_field: str = "text") -> list[dict]:
    """``{"prompt_token_ids": [...]}`` for every sequence (vLLM's ``TokensPrompt``), skipping those
    ``out_dir`` already holds (a resumed run)."""
    done = 0
    if out_dir is not None and (Path(out_dir) / META_NAME).exists():
        done = int(load_meta(out_dir)["num_sequences"])
    return [{"prompt_token_ids": s.input_ids.tolist()}
            for s, _ in source_sequences(tokenizer, texts, block_size, text_field) if s.seq_index >= done]


def _pairs(d: Any, where: str, gold: int | None = None) -> list[tuple[int, float, float]]:
    """(id, log-prob, rank) of a ``{token_id: Logprob}`` dict (a bare float is a log-prob without
    rank); every log-prob checked (:func:`fastfuse.teachers.resume_loop.checked_logprob`; ``gold``: the id whose
    value is stored as float32, the others as float16)."""
    if not isinstance(d, dict):
        raise ValueError(f"{where}: expected a {{token_id: Logprob}} dict, got {type(d).__name__}")
    out = []
    for tid, v in d.items():
        if isinstance(tid, (bool, np.bool_)) or not isinstance(tid, (int, np.integer)):
            raise ValueError(f"{where}: key {tid!r:.40} is not a token id (an int)")
        lp = getattr(v, "logprob", v)
        rank = getattr(v, "rank", None)
        if isinstance(rank, (bool, np.bool_)) or not (rank is None or isinstance(rank, (int, float, np.integer,
                                                                                          np.floating))):
            raise ValueError(f"{where}: token {int(tid)}: rank {rank!r:.40} is not a number")
        lp = checked_logprob(lp, f"{where}: token {int(tid)}: logprob", gold=int(tid) == gold)
        out.append((int(tid), lp, float("inf") if rank is None else float(rank)))
    return out


def _token_ids(output: Any, where: str) -> list[int]:
    """``output.prompt_token_ids`` (a list, tuple or numpy array of ints) as a list."""
    got = getattr(output, "prompt_token_ids", None)
    if got is None:
        raise ValueError(f"{where}: has no prompt_token_ids (expected a vLLM RequestOutput, got "
                         f"{type(output).__name__})")
    arr = np.asarray(got) if not isinstance(got, (str, bytes, dict)) else None
    if arr is None or arr.ndim != 1 or not (arr.dtype.kind in "iu" or arr.size == 0):
        raise ValueError(f"{where}: prompt_token_ids must be a 1-d sequence of ints, got {type(got).__name__} "
                         f"{got!r:.60}")
    return [int(x) for x in arr]


def rows_from_output(output: Any, seq: np.ndarray, k: int, n_real: int, where: str) -> TopKRows:
    """One sequence's :class:`TopKRows` from a vLLM ``RequestOutput`` (module docstring)."""
    got = _token_ids(output, where)
    want = seq.tolist()
    if got != want:
        p = next((j for j, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
        raise ValueError(f"{where}: prompt_token_ids differ from the sequence at position {p} "
                         f"({got[p] if p < len(got) else 'end'} vs {want[p] if p < len(want) else 'end'}); "
                         "generate from vllm_prompts(...) with the same tokenizer, corpus and block size")
    plp = getattr(output, "prompt_logprobs", None)
    if plp is None or len(plp) != len(seq):
        raise ValueError(f"{where}: no prompt_logprobs for its {len(seq)} tokens (SamplingParams(prompt_logprobs=k))")
    n = len(seq)
    rows = TopKRows.empty(n, k)

    def fill(r: int, d: Any, field: str, gold: int | None) -> list[tuple[int, float, float]]:
        at = f"{where}, position {r}: {field}"
        pairs = _pairs(d, at, gold)
        bad = [t for t, _, _ in pairs if not 0 <= t < n_real]
        if bad:
            raise ValueError(f"{at}: token ids {bad[:4]} outside the tokenizer's {n_real} tokens")
        top = sorted(pairs, key=lambda t: (t[2], -t[1]))  # vLLM's own top-k order; the prompt token last if outside it
        rows.set_row(r, [(t, lp) for t, lp, _ in top[:k]], at)
        return pairs

    for r in range(n - 1):
        gold_id = int(seq[r + 1])
        pairs = fill(r, plp[r + 1], f"prompt_logprobs[{r + 1}]", gold_id)
        gold = {t: lp for t, lp, _ in pairs}.get(gold_id)
        if gold is None:
            raise ValueError(f"{where}, position {r}: prompt_logprobs[{r + 1}] lacks the prompt token {gold_id}")
        rows.gold[r] = gold
    outs = getattr(output, "outputs", None)
    outs = [] if outs is None else list(outs)
    gen = getattr(outs[0], "logprobs", None) if outs else None
    if gen:  # SamplingParams(logprobs=k): the prediction after the whole sequence
        fill(n - 1, gen[0], "outputs[0].logprobs[0]", None)
    return rows


def write_vllm_outputs(outputs: Iterable[Any], tokenizer, texts: Any, out_dir: str | os.PathLike, k: int = 10,
                       block_size: int = 2048, shard_size: int = 4096, model_name: str = "vllm",
                       source_name: str | None = None, progress: bool = True, text_field: str = "text") -> dict:
    """Write the shards of ``outputs`` (one per sequence :func:`vllm_prompts` returned, in order).
    Returns the summary of :func:`fastfuse.teachers.local_extract.extract_topk` (plus ``rows_without_teacher``)."""
    for name, v in (("k", k), ("block_size", block_size), ("shard_size", shard_size)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name}: expected a positive int, got {v!r}")
    n_real = len(tokenizer)
    run = ShardRun(out_dir, served_meta(tokenizer, model_name, f"{model_name} (vLLM offline)", source_name, k,
                                        block_size, block_size, shard_size, default_name="vllm"),
                   tokenizer, texts, block_size, shard_size, text_field, progress, desc=f"vLLM outputs {model_name}")
    it = iter(outputs)
    end = object()
    try:
        for i, (s, _) in enumerate(run.pending()):
            out = next(it, end)
            if out is end:
                raise ValueError(f"outputs: ended before sequence {s.seq_index} (one output per vllm_prompts prompt)")
            if out is None:
                raise ValueError(f"outputs: item {i} (sequence {s.seq_index}) is None, expected a vLLM RequestOutput")
            run.add(s, rows_from_output(out, s.input_ids, int(k), n_real, f"outputs: sequence {s.seq_index}"))
        if next(it, end) is not end:
            raise ValueError("outputs: more outputs than sequences (one output per vllm_prompts prompt)")
    except BaseException:
        run.close()
        raise
    return run.finish()
