"""The teachers of online fusion (:class:`fastfuse.batches.online.OnlineTeachers`): each one scores token
sequences of its own tokenizer and returns their top-k rows, nothing written to disk.

- :class:`LocalTeacher`: a Hugging Face causal LM on its own device and dtype; the forward and the
  top-k on the device are offline extraction's own step (:func:`fastfuse.teachers.local_extract.topk_rows`), so the
  same sequences give the same bits as ``extract_topk``.
- :class:`ServedTeacher`: a model behind an OpenAI-compatible ``/v1/completions`` endpoint, read with
  the client and the reply parser of ``extract --server`` (:mod:`fastfuse.teachers.served`): prompt
  log-probs, ``echo=true``; the prompt goes as ids, or as text where the server takes text only.

A sequence a teacher cannot score -- longer than ``max_length``, or a server that refuses it or
tokenises its text otherwise -- gets ``None``: "no teacher" for that sequence, never a guess.
Teachers are frozen: eval mode, no gradient, run under ``torch.inference_mode()``.
"""
from __future__ import annotations

import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

import numpy as np

from fastfuse.corpus import pad_token_id, special_tokens
from fastfuse.teachers.completion_client import DEFAULT_MAX_RETRIES, DEFAULT_TIMEOUT, CompletionClient, reply_cap
from fastfuse.teachers.local_extract import DEFAULT_TOKEN_BUDGET, model_vocab_size, resolve_device_dtype, topk_rows
from fastfuse.teachers.resume_loop import TopKRows
from fastfuse.teachers.served import rows_from_choice
from fastfuse.teachers.served_tokens import TokenStrings

__all__ = ["LocalTeacher", "ServedTeacher", "as_teacher"]

PROMPT_FORMATS = ("auto", "ids", "text")


def _positive(name: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise ValueError(f"{name}: expected a positive int, got {v!r}")
    return int(v)


def _positive_or_none(name: str, v: Any) -> int | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise ValueError(f"{name}: expected a positive int or None, got {v!r}")
    return int(v)


class LocalTeacher:
    """A local causal LM as an online teacher.

    ``model`` is called as ``model(input_ids, attention_mask)`` (a Hugging Face causal LM); it is moved
    to ``device`` / ``dtype`` (defaults as :func:`fastfuse.extract_topk`: CUDA if available, bf16 there,
    fp32 on CPU), put in eval mode and frozen (``requires_grad_(False)``). ``k``: top-k kept per
    position. ``max_length``: the longest sequence (special tokens included) it scores, default the
    model's ``max_position_embeddings`` / ``n_positions``. ``token_budget``: padded tokens per forward.
    """

    def __init__(self, model, tokenizer, k: int = 10, device=None, dtype=None, max_length: int | None = None,
                 token_budget: int = DEFAULT_TOKEN_BUDGET):
        self.k = _positive("k", k)
        self.token_budget = _positive("token_budget", token_budget)
        self.device, self.dtype = resolve_device_dtype(device, dtype)
        self.tokenizer = tokenizer
        self.n_real = len(tokenizer)
        self.vocab_size = model_vocab_size(model)
        if self.vocab_size < self.n_real:
            raise ValueError(f"model: logits have {self.vocab_size} columns, fewer than the tokenizer's "
                             f"{self.n_real} tokens")
        if self.k > self.n_real:
            raise ValueError(f"k: {k} exceeds the tokenizer's {self.n_real} tokens")
        cfg = getattr(model, "config", None)
        limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
        self.max_length = _positive_or_none("max_length", max_length) or (limit if isinstance(limit, int) else None)
        self.pad_id = pad_token_id(tokenizer)
        self.model = model.to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)

    def score(self, seqs: Sequence[np.ndarray], texts: Sequence[str]) -> list[TopKRows | None]:
        """Top-k rows of each sequence (``None`` where it is longer than ``max_length``)."""
        import torch

        self.model.eval()           # a parent module's .train() must not reach a teacher
        fits = [j for j, s in enumerate(seqs) if self.max_length is None or len(s) <= self.max_length]
        out: list[TopKRows | None] = [None] * len(seqs)
        if fits:
            with torch.inference_mode():
                rows = topk_rows(self.model, [seqs[j] for j in fits], self.k, self.n_real, self.device, self.pad_id,
                                 self.token_budget, fits, "teacher")
            for j, r in zip(fits, rows):
                out[j] = r
        return out


class ServedTeacher:
    """A served model as an online teacher: ``server_url`` (``http://host:port``), ``served_model``
    (its name there) and ``tokenizer`` (the served model's fast tokenizer). One request per sequence,
    ``concurrency`` at a time; ``timeout`` / ``max_retries`` / ``api_key`` as ``extract_served``.
    ``prompt_format``: ``"ids"``, ``"text"`` or ``"auto"`` (ids until the server refuses them, then
    text for good). ``max_length``: longer sequences are not sent (no teacher). :attr:`refused`
    counts the sequences the server refused or tokenised otherwise."""

    def __init__(self, server_url: str, served_model: str, tokenizer, k: int = 10, max_length: int | None = None,
                 api_key: str | None = None, timeout: float = DEFAULT_TIMEOUT, max_retries: int = DEFAULT_MAX_RETRIES,
                 concurrency: int = 8, prompt_format: str = "auto"):
        if prompt_format not in PROMPT_FORMATS:
            raise ValueError(f"prompt_format: expected one of {PROMPT_FORMATS}, got {prompt_format!r}")
        if not isinstance(served_model, str) or not served_model:
            raise ValueError(f"served_model: expected the served model's name, got {served_model!r}")
        self.k = _positive("k", k)
        self.max_length = _positive_or_none("max_length", max_length)
        self.concurrency = _positive("concurrency", concurrency)
        self.client = CompletionClient(server_url, api_key, timeout, max_retries)
        self.served_model, self.tokenizer, self.format = served_model, tokenizer, prompt_format
        self.strings = TokenStrings(tokenizer)
        self.hidden_ok = bool(special_tokens(tokenizer)[0])
        self.vocab_size = len(tokenizer)
        self.refused = 0

    def payload(self, seq: np.ndarray, text: str, fmt: str) -> dict:
        return {"model": self.served_model, "prompt": seq.tolist() if fmt == "ids" else text, "echo": True,
                "logprobs": self.k, "max_tokens": 1, "temperature": 0.0, "n": 1, "stream": False,
                "return_tokens_as_token_ids": True}

    def score_one(self, seq: np.ndarray, text: str, where: str) -> TopKRows | None:
        formats = ["ids", "text"] if self.format == "auto" else [self.format]
        reply = None
        for fmt in formats:
            # llama-cpp-python answers an ids prompt with HTTP 500 naming the prompt: final while deciding
            final = (lambda r: r.status_code == 500 and "prompt" in r.text) if len(formats) > 1 and fmt == "ids" else None
            r = self.client.request("POST", "/v1/completions", self.payload(seq, text, fmt),
                                    reply_cap(len(seq), self.k), final)
            if r.status_code in (401, 403, 404):
                raise self.client.refused(r, f"logprobs={self.k} for {where}")
            if r.status_code == 200:
                reply = r
                if self.format == "auto":
                    self.format = fmt
                break
        if reply is None:           # refused (too long for its context, say): no teacher here
            self.refused += 1
            return None
        try:
            choice = sorted(reply.json()["choices"], key=lambda c: c.get("index", 0))[0]
        except (ValueError, KeyError, TypeError, AttributeError, IndexError):
            raise ValueError(f"server_url: not a completions reply: {reply.text[:200]!r}") from None
        try:
            return rows_from_choice(choice, seq, self.k, self.strings, where, self.hidden_ok)
        except ValueError as e:
            if "tokenised it differently" not in str(e):
                raise
            self.refused += 1       # its tokenisation is not ours: no alignment is better than a wrong one
            return None

    def score(self, seqs: Sequence[np.ndarray], texts: Sequence[str]) -> list[TopKRows | None]:
        """Top-k rows of each sequence (``None``: not scored; see the class docstring)."""
        todo = [j for j, s in enumerate(seqs) if self.max_length is None or len(s) <= self.max_length]
        out: list[TopKRows | None] = [None] * len(seqs)
        if not todo:
            return out
        first = todo[0]             # alone, so that "auto" settles the prompt format once
        out[first] = self.score_one(seqs[first], texts[first], f"sequence {first}")
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            for j, r in zip(todo[1:], pool.map(lambda j: self.score_one(seqs[j], texts[j], f"sequence {j}"), todo[1:])):
                out[j] = r
        if all(out[j] is None for j in todo):
            warnings.warn(f"ServedTeacher({self.client.base}, {self.served_model!r}): the server refused or tokenised "
                          f"otherwise all {len(todo)} sequences of this batch: no teacher for any (is `tokenizer` the "
                          "served model's?)", RuntimeWarning, stacklevel=3)
        return out


def as_teacher(name: str, teacher: Any):
    """A teacher object, or ``(model, tokenizer)`` as a :class:`LocalTeacher` with the defaults."""
    if isinstance(teacher, (LocalTeacher, ServedTeacher)) or (hasattr(teacher, "score") and hasattr(teacher, "tokenizer")
                                                               and hasattr(teacher, "vocab_size")):
        return teacher
    if isinstance(teacher, tuple) and len(teacher) == 2:
        return LocalTeacher(*teacher)
    raise TypeError(f"teachers['{name}']: expected a LocalTeacher, a ServedTeacher or a (model, tokenizer) pair, "
                    f"got {type(teacher).__name__}")
