"""On-policy fusion (GKD's ``lambda``): the student continues the batch's prompts, the online teachers
score the student's own tokens, and the loss is the divergence on those tokens alone.

:func:`on_policy_batch` is one such batch: prompts (the first ``prompt_tokens`` of each sequence, or
``prompt_lengths`` per row) -> ``model.generate`` (sampling at ``temperature`` from the full
distribution, ``max_new_tokens``, stopping at EOS) -> the continuations, right-padded ->
:class:`fastfuse.batches.online.OnlineTeachers` -> the collator's batch with the prompt's positions masked
(``labels = ignore_index`` wherever the predicted token is a prompt token), and also the positions no
teacher is aligned to (there is no teacher there to learn from; the sampled token is no gold label).
The caller uses ``lm_weight=0``: the divergence alone (reverse KL and JSD(beta) are the usual choices).
The teachers' collator weights the sources as it does offline; a weighting that reads the labels
(``min_ce``, ``avg_ce``, ``token``) reads the student's *sampled* tokens here, so ``"equal"`` (or a
separate :class:`~fastfuse.batches.online.OnlineTeachers` with it) is the neutral choice for these batches.

:class:`OnPolicy` draws which batches are on-policy (a seeded RNG: a fraction ``fraction`` of them) and
builds the others from the batch's own text, scored online -- what :class:`fastfuse.FusionTrainer`
does with ``teachers=``.
"""
from __future__ import annotations

import random
from typing import Any

import torch

__all__ = ["generate_continuations", "on_policy_batch", "OnPolicy", "prompt_lengths"]


def prompt_lengths(attention_mask: torch.Tensor, prompt_tokens: int | None, given: torch.Tensor | None = None) -> torch.Tensor:
    """Tokens of each row that form its prompt: ``given`` (int ``[B]``), else ``min(prompt_tokens,
    length - 1)`` (at least one token), else half of each sequence."""
    lengths = attention_mask.sum(1).long().cpu()
    if (lengths < 1).any():
        raise ValueError("attention_mask: every row needs at least one token to prompt the student with")
    if given is not None:
        p = torch.as_tensor(given).long().cpu().reshape(-1)
        if p.shape != lengths.shape or (p < 1).any() or (p > lengths).any():
            raise ValueError(f"prompt_lengths: expected {len(lengths)} values in [1, row length], got {p.tolist()}")
        return p
    if prompt_tokens is None:
        return (lengths // 2).clamp_min(1)
    return torch.minimum(torch.full_like(lengths, int(prompt_tokens)), (lengths - 1).clamp_min(1))


@torch.no_grad()
def generate_continuations(model, input_ids: torch.Tensor, prompts: torch.Tensor, max_new_tokens: int,
                           temperature: float, pad_token_id: int, eos_token_id: int | None = None):
    """The student's continuations: ``(ids [B, T'], attention_mask [B, T'])`` right-padded, each row its
    prompt (``input_ids[b, :prompts[b]]``) then the sampled tokens up to and including the first EOS.
    Generation runs in eval mode (no dropout) and leaves the model's mode as it was."""
    B = input_ids.shape[0]
    dev = next(model.parameters()).device
    P = int(prompts.max())
    left = torch.full((B, P), pad_token_id, dtype=torch.long)
    lmask = torch.zeros((B, P), dtype=torch.long)
    for b in range(B):
        p = int(prompts[b])
        left[b, P - p:] = input_ids[b, :p].cpu()
        lmask[b, P - p:] = 1
    sample = temperature > 0
    kw = dict(do_sample=True, temperature=float(temperature), top_k=0, top_p=1.0) if sample else dict(do_sample=False)
    was_training = model.training
    model.eval()
    try:
        out = model.generate(input_ids=left.to(dev), attention_mask=lmask.to(dev), max_new_tokens=int(max_new_tokens),
                             min_new_tokens=1, pad_token_id=pad_token_id, eos_token_id=eos_token_id, **kw).cpu()
    finally:
        model.train(was_training)
    rows = []
    for b in range(B):
        new = out[b, P:]
        if eos_token_id is not None:
            stop = (new == eos_token_id).nonzero()
            if len(stop):
                new = new[: int(stop[0]) + 1]
        rows.append(torch.cat([input_ids[b, : int(prompts[b])].cpu(), new]))
    T = max(len(r) for r in rows)
    ids = torch.full((B, T), pad_token_id, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, : len(r)] = r
        mask[b, : len(r)] = 1
    return ids, mask


def on_policy_batch(model, teachers, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    prompt_tokens: int | None = None, given_prompts: torch.Tensor | None = None,
                    max_new_tokens: int = 64, temperature: float = 1.0, eos_token_id: int | None = None) -> dict[str, Any]:
    """One on-policy batch (module docstring): the collator's dict for the student's continuations, with
    ``labels`` masked at the prompt and where no teacher is aligned, plus ``prompt_lengths``."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: expected a positive int, got {max_new_tokens!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature < float("inf"):
        raise ValueError(f"temperature: expected a finite number >= 0 (0: greedy), got {temperature!r}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    prompts = prompt_lengths(attention_mask, prompt_tokens, given_prompts)
    ids, mask = generate_continuations(model, input_ids, prompts, max_new_tokens, temperature,
                                       teachers.pad_token_id, eos_token_id)
    batch = teachers(ids, mask)
    labels = batch["labels"].clone()
    cols = torch.arange(labels.shape[1])[None]
    labels[cols < (prompts[:, None] - 1)] = teachers.ignore_index      # predicting a prompt token
    taught = (batch["align_map"].pos >= 0).any(0)                      # [B, T]: some teacher aligned
    labels[~taught] = teachers.ignore_index
    batch["labels"] = labels
    batch["prompt_lengths"] = prompts
    return batch


class OnPolicy:
    """Which batches are on-policy, and the batches themselves (module docstring).

    ``teachers``: an :class:`~fastfuse.batches.online.OnlineTeachers`. ``fraction``: GKD's ``lambda`` in [0, 1].
    ``seed``: the draw's RNG. ``prompt_tokens``, ``max_new_tokens``, ``temperature``, ``eos_token_id``:
    as :func:`on_policy_batch`.
    """

    def __init__(self, teachers, fraction: float = 0.0, seed: int = 0, prompt_tokens: int | None = None,
                 max_new_tokens: int = 64, temperature: float = 1.0, eos_token_id: int | None = None):
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction <= 1.0:
            raise ValueError(f"on_policy: expected a fraction in [0, 1] (GKD's lambda), got {fraction!r}")
        if not callable(teachers) or not hasattr(teachers, "collator"):
            raise TypeError(f"teachers: expected a fastfuse.OnlineTeachers, got {type(teachers).__name__}")
        self.teachers, self.fraction, self.rng = teachers, float(fraction), random.Random(seed)
        self.prompt_tokens, self.max_new_tokens = prompt_tokens, max_new_tokens
        self.temperature, self.eos_token_id = temperature, eos_token_id
        self.counts = {"on_policy": 0, "off_policy": 0}

    def prepare(self, model, inputs: dict[str, Any], training: bool = True) -> tuple[dict[str, Any], bool]:
        """``(batch, on_policy)``: for a share ``fraction`` of training batches the student's
        continuations (:func:`on_policy_batch`), else the batch's own text scored online (unless it
        already carries teacher fields)."""
        draw = training and self.fraction > 0 and self.rng.random() < self.fraction
        if draw:
            self.counts["on_policy"] += 1
            return on_policy_batch(model, self.teachers, inputs["input_ids"], inputs.get("attention_mask"),
                                   prompt_tokens=self.prompt_tokens, given_prompts=inputs.get("prompt_lengths"),
                                   max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                                   eos_token_id=self.eos_token_id), True
        self.counts["off_policy"] += 1
        if "source_topk" in inputs:
            return inputs, False
        return self.teachers(inputs["input_ids"], inputs.get("attention_mask")), False
