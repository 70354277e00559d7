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
written as "no teacher" (:mod:`fastfuse.topk_runs`). Shards, identity (the model name and the
tokenizer, as :func:`fastfuse.served.served_fingerprint`) and resume are those of a served run.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from fastfuse.corpus import source_sequences
from fastfuse.served import served_meta
from fastfuse.shards import META_NAME, load_meta
from fastfuse.topk_runs import ShardRun, TopKRows


def vllm_prompts(tokenizer, texts: Any, block_size: int, out_dir: str | os.PathLike | None = None,
                 text_field: str = "text") -> list[dict]:
    """``{"prompt_token_ids": [...]}`` for every sequence (vLLM's ``TokensPrompt``), skipping those
    ``out_dir`` already holds (a resumed run)."""
    done = 0
    if out_dir is not None and (Path(out_dir) / META_NAME).exists():
        done = int(load_meta(out_dir)["num_sequences"])
    return [{"prompt_token_ids": s.input_ids.tolist()}
            for s, _ in source_sequences(tokenizer, texts, block_size, text_field) if s.seq_index >= done]


def _pairs(d: Any, where: str) -> list[tuple[int, float, float]]:
    """(id, log-prob, rank) of a ``{token_id: Logprob}`` dict (a bare float is a log-prob without rank)."""
    if not isinstance(d, dict):
        raise ValueError(f"{where}: expected a {{token_id: Logprob}} dict, got {type(d).__name__}")
    out = []
    for tid, v in d.items():
        lp = getattr(v, "logprob", v)
        rank = getattr(v, "rank", None)
        try:
            out.append((int(tid), float(lp), float("inf") if rank is None else float(rank)))
        except (TypeError, ValueError):
            raise ValueError(f"{where}: entry {tid!r}: {v!r} is not a Logprob") from None
    return out


def rows_from_output(output: Any, seq: np.ndarray, k: int, n_real: int, where: str) -> TopKRows:
    """One sequence's :class:`TopKRows` from a vLLM ``RequestOutput`` (module docstring)."""
    got = list(getattr(output, "prompt_token_ids", None) or [])
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

    def fill(r: int, d: Any) -> None:
        pairs = _pairs(d, f"{where}, position {r}")
        pairs.sort(key=lambda t: (t[2], -t[1]))  # vLLM's own top-k order; the prompt token last if outside it
        bad = [t for t, _, _ in pairs if not 0 <= t < n_real]
        if bad:
            raise ValueError(f"{where}, position {r}: token ids {bad[:4]} outside the tokenizer's {n_real} tokens")
        rows.set_row(r, [(t, lp) for t, lp, _ in pairs[:k]], f"{where}, position {r}")

    for r in range(n - 1):
        d = plp[r + 1]
        fill(r, d)
        gold = {t: lp for t, lp, _ in _pairs(d, where)}.get(int(seq[r + 1]))
        if gold is None:
            raise ValueError(f"{where}: prompt_logprobs[{r + 1}] lacks the prompt token {int(seq[r + 1])}")
        rows.gold[r] = gold
    outs = getattr(output, "outputs", None) or []
    gen = getattr(outs[0], "logprobs", None) if outs else None
    if gen:  # SamplingParams(logprobs=k): the prediction after the whole sequence
        fill(n - 1, gen[0])
    return rows


def write_vllm_outputs(outputs: Iterable[Any], tokenizer, texts: Any, out_dir: str | os.PathLike, k: int = 10,
                       block_size: int = 2048, shard_size: int = 4096, model_name: str = "vllm",
                       source_name: str | None = None, progress: bool = True, text_field: str = "text") -> dict:
    """Write the shards of ``outputs`` (one per sequence :func:`vllm_prompts` returned, in order).
    Returns the summary of :func:`fastfuse.extract.extract_topk` (plus ``rows_without_teacher``)."""
    for name, v in (("k", k), ("block_size", block_size), ("shard_size", shard_size)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name}: expected a positive int, got {v!r}")
    n_real = len(tokenizer)
    run = ShardRun(out_dir, served_meta(tokenizer, model_name, f"{model_name} (vLLM offline)", source_name, k,
                                        block_size, block_size, shard_size, default_name="vllm"),
                   tokenizer, texts, block_size, shard_size, text_field, progress, desc=f"vLLM outputs {model_name}")
    it = iter(outputs)
    try:
        for s, _ in run.pending():
            out = next(it, None)
            if out is None:
                raise ValueError(f"outputs: ended before sequence {s.seq_index} (one output per vllm_prompts prompt)")
            run.add(s, rows_from_output(out, s.input_ids, int(k), n_real, f"outputs: sequence {s.seq_index}"))
        if next(it, None) is not None:
            raise ValueError("outputs: more outputs than sequences (one output per vllm_prompts prompt)")
    except BaseException:
        run.close()
        raise
    return run.finish()
