"""Served teachers: a source model behind an OpenAI-compatible ``/v1/completions`` endpoint.

:func:`extract_served` writes the same shards as :func:`fastfuse.teachers.local_extract.extract_topk` (same
sequences, block size, special tokens, format, atomic resumable writes: :mod:`fastfuse.teachers.resume_loop`)
from a server's prompt log-probs instead of a local forward pass:

1. **Requests.** One request per group of consecutive sequences (``prompts_per_request``, at most
   ``token_budget`` prompt tokens): ``echo=true``, ``logprobs=k``, ``max_tokens=1`` (the generated
   token's top-k is the last position's row; 0 would mean "no limit" on some servers),
   ``temperature=0``. The prompt goes as token ids (the sequence, special tokens included) so the
   server cannot re-tokenise it; a server that refuses ids (llama-cpp-python's server takes text only)
   gets the sequence's text and adds its own special tokens (``prompt_format="auto"`` tries ids
   first, once). ``concurrency`` requests are in flight; replies may arrive in any order, shards are
   written in order. 408/425/429, every 5xx, timeouts and refused or dropped connections are retried
   with exponential backoff (``max_retries``; ``Retry-After`` honoured up to 60 s); ``timeout`` bounds
   each request as a whole, connect to last byte (:mod:`fastfuse.teachers.completion_client`).
2. **Replies.** The echoed prompt tokens must be our tokenisation (as ids, or as strings that can
   render our ids: :meth:`fastfuse.teachers.served_tokens.TokenStrings.consistent`), else ``ValueError``
   naming the sequence and the first differing position. Servers either echo every prompt token
   (vLLM: entry j+1 predicts token j+1) or hide a leading BOS (llama-cpp-python: the prediction
   after BOS alone is never reported; that row is written as "no teacher", see
   :mod:`fastfuse.teachers.resume_loop`). Top-k strings become ids through
   :class:`~fastfuse.teachers.served_tokens.TokenStrings`; gold log-probs give the per-sequence CE.
3. **Identity.** The weights are not here, so ``model_fingerprint`` is sha256 of the served model's
   name and the tokenizer's fingerprint; the URL (without user-info) is recorded (``model``) but a
   restarted server on another port resumes the same run.
4. **Values.** Every log-prob must be a possible one (:func:`fastfuse.teachers.resume_loop.checked_logprob`),
   else ``ValueError`` naming the sequence, position and field; secrets never appear in an error.
5. **Ranks.** ``rank``/``world_size`` split the corpus as local extraction does (the same parts).
"""
from __future__ import annotations

import hashlib
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from fastfuse.teachers.completion_client import (DEFAULT_MAX_RETRIES, DEFAULT_TIMEOUT, CompletionClient, Reply, ServerError,
                                       check_timeout, redacted_error, reply_cap)
from fastfuse.corpus import SourceSequence, special_tokens
from fastfuse.teachers.local_extract import rank_partition
from fastfuse.teachers.rank_parts import check_layout, part_name
from fastfuse.teachers.shards import tokenizer_fingerprint
from fastfuse.teachers.served_tokens import TokenStrings
from fastfuse.teachers.resume_loop import ShardRun, TopKRows, checked_logprob

__all__ = ["ServerError", "CompletionClient", "rows_from_choice", "served_fingerprint", "served_meta",
           "extract_served", "DEFAULT_CONCURRENCY", "DEFAULT_TIMEOUT", "DEFAULT_MAX_RETRIES"]

DEFAULT_CONCURRENCY = 8


def _entries(top: Any, strings: TokenStrings, k: int, where: str) -> list[tuple[int, float]]:
    """A reply's top log-probs at one position, k largest first, as (id, log-prob); strings are
    mapped only for the entries kept (a server may add the prompt token as a k+1-th entry). Every
    value must be a possible log-prob (:func:`fastfuse.teachers.resume_loop.checked_logprob`)."""
    if isinstance(top, dict):
        pairs = list(top.items())
    elif isinstance(top, list):  # [{"token": ..., "logprob": ...}] as some servers spell it
        pairs = [(e.get("token"), e.get("logprob")) for e in top if isinstance(e, dict)]
    else:
        raise ValueError(f"{where}: top_logprobs entry is {type(top).__name__}, expected an object")
    vals = [checked_logprob(v, f"{where}: top_logprobs entry {t!r:.40}") for t, v in pairs]
    order = sorted(range(len(pairs)), key=lambda j: -vals[j])[:k]
    if len(order) < k:
        raise ValueError(f"{where}: the server returned {len(pairs)} top log-probs for k = {k} (does it cap top-k, "
                         "or name several tokens by one string?)")
    out = []
    for j in order:
        try:
            out.append((strings.lookup(pairs[j][0]), vals[j]))
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
    return out


def _match(tokens: list, seq: np.ndarray, shift: int, strings: TokenStrings) -> int:
    """How many leading echoed tokens agree with ``seq[shift:]``."""
    n = min(len(tokens), len(seq) - shift)
    for j in range(n):
        if not strings.consistent(tokens[j], int(seq[shift + j])):
            return j
    return n


def rows_from_choice(choice: dict, seq: np.ndarray, k: int, strings: TokenStrings, where: str,
                     hidden_ok: bool) -> TopKRows:
    """One sequence's :class:`TopKRows` from a completion choice (module docstring, step 2);
    ``hidden_ok``: the sequence starts with a special token that the server may leave out of the echo."""
    lp = choice.get("logprobs") if isinstance(choice, dict) else None
    if not isinstance(lp, dict) or not isinstance(lp.get("tokens"), list):
        raise ValueError(f"{where}: the reply has no logprobs (the server must keep the prompt's logits: "
                         "llama-cpp-python --logits_all true)")
    tokens, tlp, top = lp["tokens"], lp.get("token_logprobs"), lp.get("top_logprobs")
    if not isinstance(tlp, list) or not isinstance(top, list) or not len(tokens) == len(tlp) == len(top):
        raise ValueError(f"{where}: logprobs.tokens, token_logprobs and top_logprobs differ in length")
    n, L = len(seq), len(tokens)
    candidates = [(0, (n, n + 1))] + ([(1, (n - 1, n))] if hidden_ok else [])
    found = None                  # the shift of the reading that matches
    closest = (0, -1)             # else (shift, tokens matched) of the one that comes closest
    for shift, lengths in candidates:
        m = _match(tokens, seq, shift, strings)
        if L in lengths and m == n - shift:
            found = shift
            break
        if m >= closest[1]:  # a tie: the hidden-BOS reading names the text token that differs
            closest = (shift, m)
    if found is None:
        shift, m = closest
        p = shift + m
        if p < n and m < L:
            got = f"it has {tokens[m]!r} where we have id {int(seq[p])} ({strings.surfaces[int(seq[p])]!r})"
        else:
            got = f"it echoed {L} tokens for our {n - shift} (plus at most one generated)"
        raise ValueError(f"{where}: the server tokenised it differently: first difference at position {p}: {got}; "
                         "tokenizer (--tokenizer) must be the served model's")
    shift = found
    rows = TopKRows.empty(n, k)
    for r in range(n):
        e = r + 1 - shift  # the echo entry that predicts token r + 1 (the generated one for r = n - 1)
        if e < 1 or e >= L:  # the hidden BOS's prediction; no generated token (stopped at EOS)
            continue
        if top[e] is None or (r < n - 1 and tlp[e] is None):
            raise ValueError(f"{where}: the reply has no log-probs at position {r} (top_logprobs or token_logprobs "
                             "is null)")
        rows.set_row(r, _entries(top[e], strings, k, f"{where}, position {r}"), f"{where}, position {r}")
        if r < n - 1:
            rows.gold[r] = checked_logprob(tlp[e], f"{where}, position {r}: token_logprobs", gold=True)
    return rows


def _groups(pending: Iterator[tuple[SourceSequence, str]], per_request: int, token_budget: int):
    group: list[tuple[SourceSequence, str]] = []
    used = 0
    for item in pending:
        n = len(item[0].input_ids)
        if group and (len(group) == per_request or used + n > token_budget):
            yield group
            group, used = [], 0
        group.append(item)
        used += n
    if group:
        yield group


class _Fetcher:
    """Builds one group's request, sends it, turns the reply into rows (thread-safe)."""

    def __init__(self, client: CompletionClient, served_model: str, k: int, strings: TokenStrings,
                 prompt_format: str, hidden_ok: bool):
        self.client, self.model, self.k, self.strings = client, served_model, k, strings
        self.format, self.hidden_ok = prompt_format, hidden_ok

    def payload(self, group, fmt: str) -> dict:
        prompts = [s.input_ids.tolist() if fmt == "ids" else text[s.char_start:s.char_end] for s, text in group]
        return {"model": self.model, "prompt": prompts[0] if len(prompts) == 1 else prompts, "echo": True,
                "logprobs": self.k, "max_tokens": 1, "temperature": 0.0, "n": 1, "stream": False,
                "return_tokens_as_token_ids": True}

    def refused(self, r, group) -> ValueError:
        err = self.client.refused(r, f"logprobs={self.k} for sequence {group[0][0].seq_index}")
        if r.status_code in (400, 422) and "logprob" in r.text.lower():     # the server's words, not ours
            return ValueError(f"k: {err}; servers cap top-k (vLLM: --max-logprobs, default 20): use a smaller k or "
                              "raise the server's cap")
        return err

    def post(self, group, fmt: str, final=None) -> Reply:
        tokens = sum(len(s.input_ids) for s, _ in group)
        return self.client.request("POST", "/v1/completions", self.payload(group, fmt), reply_cap(tokens, self.k), final)

    def __call__(self, group) -> list[TopKRows]:
        fmt = "ids" if self.format == "auto" else self.format
        if self.format == "auto":  # decided once, on the first request
            # llama-cpp-python answers a prompt it cannot read (ids) with HTTP 500 naming the prompt:
            # that one is final here (try text next); every other 5xx is retried as always
            r = self.post(group, fmt, final=lambda r: r.status_code == 500 and "prompt" in r.text)
            if r.status_code in (400, 422) or (r.status_code == 500 and "prompt" in r.text):
                first = self.refused(r, group)
                if str(first).startswith("k: "):
                    raise first
                r = self.post(group, "text")
                if r.status_code != 200:
                    raise ValueError(f"{first}; as text: {self.refused(r, group)}")
                fmt = "text"
            self.format = fmt
        else:
            r = self.post(group, fmt)
        if r.status_code != 200:
            raise self.refused(r, group)
        try:
            choices = sorted(r.json()["choices"], key=lambda c: c.get("index", 0))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ValueError(f"server_url: not a completions reply: {r.text[:200]!r}") from None
        if len(choices) != len(group):
            raise ValueError(f"server_url: {len(choices)} choices for {len(group)} prompts (does it take a list of "
                             "prompts? use prompts_per_request=1)")
        try:
            return [rows_from_choice(c, s.input_ids, self.k, self.strings, f"sequence {s.seq_index}", self.hidden_ok)
                    for c, (s, _) in zip(choices, group)]
        except ValueError as e:
            if self.format == "text" and "tokenised it differently" in str(e):
                raise ValueError(f"{e} (or the text of a sequence cut from a longer document tokenises differently "
                                 "alone: the server takes text only here, so split documents to fit the block "
                                 "with `fastfuse chunk`)") from None
            raise


def served_fingerprint(served_model: str, tok_fingerprint: str) -> str:
    """The run identity of a served source: the served model's name and the tokenizer."""
    return hashlib.sha256(f"served\n{served_model}\n{tok_fingerprint}".encode()).hexdigest()


def served_meta(tokenizer, served_model: str, model_label: str, source_name: str | None, k: int, block_size: int,
                token_budget: int, shard_size: int, default_name: str = "served") -> dict:
    """The shard run identity of a source whose rows come from elsewhere (a server, vLLM outputs):
    its vocabulary is the tokenizer's, its fingerprint :func:`served_fingerprint`."""
    tfp = tokenizer_fingerprint(tokenizer)
    return {"source_name": source_name or Path(served_model).name or default_name, "model": model_label,
            "tokenizer_fingerprint": tfp, "tokenizer_size": len(tokenizer), "vocab_size": len(tokenizer),
            "k": int(k), "block_size": int(block_size), "token_budget": int(token_budget),
            "shard_size": int(shard_size), "dtype": "served",
            "special_tokens": list(map(list, special_tokens(tokenizer))),
            "model_fingerprint": served_fingerprint(served_model, tfp)}


def extract_served(server_url: str, served_model: str, tokenizer, texts: Any, out_dir: str | os.PathLike,
                   k: int = 10, block_size: int = 2048, token_budget: int | None = None, prompts_per_request: int = 1,
                   shard_size: int = 4096, concurrency: int = DEFAULT_CONCURRENCY, api_key: str | None = None,
                   timeout: float = DEFAULT_TIMEOUT, max_retries: int = DEFAULT_MAX_RETRIES,
                   prompt_format: str = "auto", source_name: str | None = None, progress: bool = True,
                   text_field: str = "text", on_shard: Callable[[int, Path], None] | None = None,
                   rank: int = 0, world_size: int = 1) -> dict:
    """Top-k shards of a served source model (module docstring): ``tokenizer`` is the served model's
    (fast) tokenizer, ``texts`` a corpus (:func:`fastfuse.corpus.iter_corpus`), ``token_budget`` the
    prompt tokens one request may carry (default ``block_size``), ``timeout`` the seconds one request
    may take in all (connect, send, read; :mod:`fastfuse.teachers.completion_client`). Resumes a run in
    ``out_dir`` with the same settings; ``on_shard(i, path)`` is called after each shard is on disk.
    ``rank`` / ``world_size``: as :func:`fastfuse.teachers.local_extract.extract_topk` -- rank ``rank``'s share of
    the corpus into ``out_dir/rank-RRRRR-of-WWWWW``, the same parts a local extraction writes.
    Returns the summary of :func:`fastfuse.teachers.local_extract.extract_topk` plus ``rows_without_teacher``
    (positions the server did not report) and ``prompt_format``."""
    token_budget = block_size if token_budget is None else token_budget
    for name, v in (("k", k), ("block_size", block_size), ("token_budget", token_budget), ("shard_size", shard_size),
                    ("concurrency", concurrency), ("prompts_per_request", prompts_per_request)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name}: expected a positive int, got {v!r}")
    if token_budget < block_size:
        raise ValueError(f"token_budget: {token_budget} is smaller than block_size {block_size}")
    if prompt_format not in ("auto", "ids", "text"):
        raise ValueError(f"prompt_format: expected 'auto', 'ids' or 'text', got {prompt_format!r}")
    if not isinstance(served_model, str) or not served_model:
        raise ValueError(f"served_model: expected the model name the server serves, got {served_model!r}")
    check_timeout(timeout)
    if not isinstance(max_retries, int) or isinstance(max_retries, bool) or max_retries < 0:
        raise ValueError(f"max_retries: expected an int >= 0, got {max_retries!r}")
    n_real = len(tokenizer)
    if k > n_real:
        raise ValueError(f"k: {k} exceeds the tokenizer's {n_real} tokens")
    client = CompletionClient(server_url, api_key, timeout, max_retries)
    try:
        return _extract(client, served_model, tokenizer, texts, out_dir, int(k), int(block_size), int(token_budget),
                        int(prompts_per_request), int(shard_size), int(concurrency), prompt_format, source_name,
                        progress, text_field, on_shard, rank, world_size)
    except (ValueError, ServerError) as e:
        clean = redacted_error(e, client)      # a secret the server echoed into a token string, say
        if clean is None:
            raise
        raise clean from None


def _extract(client: CompletionClient, served_model: str, tokenizer, texts, out_dir, k: int, block_size: int,
             token_budget: int, prompts_per_request: int, shard_size: int, concurrency: int, prompt_format: str,
             source_name, progress: bool, text_field: str, on_shard, rank: int, world_size: int) -> dict:
    part = None
    if world_size != 1 or rank != 0:
        part = rank_partition(tokenizer, texts, block_size, text_field, rank, world_size)
    names = client.model_names()
    if names is not None and served_model not in names:
        raise ValueError(f"served_model: {client.base} serves {names}, not {served_model!r}")
    check_layout(out_dir, world_size)
    meta = served_meta(tokenizer, served_model, f"{served_model} at {client.base}", source_name, k, block_size,
                       token_budget, shard_size)
    desc = f"extract {served_model} (served)"
    if part is not None:
        out_dir = Path(out_dir) / part_name(rank, world_size)
        meta["partition"] = part
        desc += f" [rank {rank}/{world_size}]"
    prefix = special_tokens(tokenizer)[0]
    run = ShardRun(out_dir, meta, tokenizer, texts, block_size, shard_size, text_field, progress, desc=desc,
                   on_shard=on_shard, seq_end=part["seq_end"] if part is not None else None)
    fetch = _Fetcher(client, served_model, k, TokenStrings(tokenizer), prompt_format, hidden_ok=bool(prefix))
    groups = _groups(run.pending(), prompts_per_request, token_budget)
    window: deque = deque()

    def take_one() -> None:
        g, f = window.popleft()
        for (s, _), rows in zip(g, f.result()):
            run.add(s, rows)

    try:
        first = next(groups, None)
        if first is not None:  # alone, so that "auto" settles the prompt format once
            for (s, _), rows in zip(first, fetch(first)):
                run.add(s, rows)
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            try:
                for g in groups:
                    window.append((g, pool.submit(fetch, g)))
                    if len(window) > 2 * concurrency:  # bounded memory; results are taken in order
                        take_one()
                while window:
                    take_one()
            except BaseException:
                for _, f in window:
                    f.cancel()
                raise
    except BaseException:
        run.close()
        raise
    stats = run.finish()
    stats["prompt_format"] = fetch.format
    return stats
