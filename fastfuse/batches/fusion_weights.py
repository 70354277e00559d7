"""Fusion functions: per-source weights for ``fused_loss``'s ``source_weights`` (DESIGN.md §1).

Every weight function returns a float tensor ``[S, B]`` (one weight per source and sequence) or
``[S, B, T]`` (per token), ``>= 0`` and summing to 1 over S:

* :func:`min_ce_weights` — MinCE (FuseLLM): weight 1 on the source with the lowest cross-entropy
  on the gold text.
* :func:`avg_ce_weights` — AvgCE: ``softmax(-CE / tau)`` over the sources.
* :func:`reward_weights` — ProFuser's *inference mode*: sources ranked by a reward model's score
  of their generated responses (one-hot on the best, or ``softmax(reward / tau)``).
* :func:`fuse_weights` — dispatcher over method and level (sequence or token).
* :func:`token_choice_weights` — per target position, the source whose aligned top-k gives the gold
  token the highest probability (:func:`gold_probabilities`).

Conventions shared by all of them:

* **NaN means unavailable.** A source whose CE (or reward) is NaN at a sequence/token gets
  weight 0 there; if *every* source is NaN there, the weights are uniform ``1 / S``.
* **Ties** in MinCE / max-reward go to the lowest source index.
* **Infinities.** CE may be ``+inf`` (a source that gave the gold token probability 0): it is
  available but worst; if all available sources are ``+inf`` they tie. Negative CE is rejected.
* **Masks** (per-token mode) are ``[B, T]`` bool (or 0/1 integer) with ``True`` = valid token, the
  ``attention_mask`` convention; masked-out (padding) tokens get uniform weights.
* Outputs are float32 (float64 when the input is float64) on the input's device, with no grad.

**The target as a candidate (FuseLLM).** FuseLLM lets the target model's own predictions compete
with the sources: stack the target's CE as one more source row with :func:`with_target_candidate`
and give ``fused_loss`` the target's (frozen, initial) top-k as the source at the returned index.

**ProFuser** (Shi et al. 2024): *inference mode* weights come from :func:`reward_weights` on
:class:`fastfuse.integrations.reward.RewardScorer` scores of
:func:`fastfuse.integrations.reward.generate_responses` outputs; *training mode* weights are
:func:`min_ce_weights` on the gold responses; :class:`fastfuse.batches.schedules.ProgressiveSchedule`
moves from one to the other over training.
"""
from __future__ import annotations

import numbers
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "min_ce_weights",
    "avg_ce_weights",
    "reward_weights",
    "fuse_weights",
    "token_ce_to_sequence_ce",
    "with_target_candidate",
    "gold_probabilities",
    "token_choice_weights",
]

_METHODS = ("min_ce", "avg_ce")
_LEVELS = ("sequence", "token")
_REWARD_METHODS = ("max", "softmax")


# ---------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------


def _check_scores(x: Any, name: str, dims: tuple[int, ...], nonneg: bool) -> Tensor:
    """Floating tensor with ``x.dim() in dims`` and S >= 1; returns it as float32/float64."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {x.dtype}")
    if x.dim() not in dims:
        shapes = " or ".join({2: "[S, B]", 3: "[S, B, T]"}[d] for d in dims)
        raise ValueError(f"{name} must be {shapes}, got shape {tuple(x.shape)}")
    if x.shape[0] < 1:
        raise ValueError(f"{name} must have at least one source (S >= 1), got shape {tuple(x.shape)}")
    x = x.detach()
    if x.dtype != torch.float64:
        x = x.float()
    if nonneg and bool((x < 0).any()):
        raise ValueError(f"{name} must be >= 0 (or NaN for an unavailable source)")
    return x


def _check_tau(tau: Any) -> float:
    if isinstance(tau, bool) or not isinstance(tau, numbers.Real):
        raise TypeError(f"tau must be a real number, got {type(tau).__name__}")
    tau = float(tau)
    if not (tau > 0 and tau != float("inf")):
        raise ValueError(f"tau must be finite and > 0, got {tau}")
    return tau


def _check_mask(mask: Any, ce: Tensor, name: str = "mask") -> Tensor | None:
    """``mask`` [B, T] bool (or 0/1 integers), True = valid; returned as bool on ``ce``'s device."""
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(mask).__name__}")
    if ce.dim() != 3:
        raise ValueError(f"{name} is only accepted with per-token ce [S, B, T], got ce shape {tuple(ce.shape)}")
    if mask.dtype != torch.bool:
        if mask.is_floating_point() or mask.is_complex():
            raise TypeError(f"{name} must be a bool (or 0/1 integer) tensor, got {mask.dtype}")
        if bool(((mask != 0) & (mask != 1)).any()):
            raise ValueError(f"{name} must hold only 0 and 1")
        mask = mask != 0
    if tuple(mask.shape) != tuple(ce.shape[1:]):
        raise ValueError(f"{name} must be [B, T] = {tuple(ce.shape[1:])}, got {tuple(mask.shape)}")
    if mask.device != ce.device:
        raise ValueError(f"{name} is on {mask.device}, ce on {ce.device}")
    return mask


# ---------------------------------------------------------------------------------------------
# shared kernels (lower cost is better; NaN = unavailable)
# ---------------------------------------------------------------------------------------------


def _uniform_where_masked(w: Tensor, mask: Tensor | None) -> Tensor:
    if mask is None:
        return w
    return torch.where(mask.unsqueeze(0), w, torch.full_like(w, 1.0 / w.shape[0]))


def _argmin_onehot(cost: Tensor) -> Tensor:
    """One-hot over dim 0 on the lowest available cost (first on ties); uniform if none available."""
    avail = ~torch.isnan(cost)
    best = torch.where(avail, cost, torch.full_like(cost, float("inf"))).amin(0, keepdim=True)
    hit = avail & (cost == best)  # exact equality: ties, and infinite bests (+inf CE, +inf reward)
    first = hit.to(torch.int8).argmax(0, keepdim=True)  # first maximum = lowest source index
    onehot = torch.zeros_like(cost).scatter_(0, first, 1.0)
    any_avail = avail.any(0, keepdim=True)
    return torch.where(any_avail, onehot, torch.full_like(cost, 1.0 / cost.shape[0]))


def _softmin(cost: Tensor, tau: float) -> Tensor:
    """``softmax(-cost / tau)`` over dim 0 with NaN -> weight 0, equal infinities tie, none -> uniform."""
    avail = ~torch.isnan(cost)
    inf = torch.full_like(cost, float("inf"))
    best = torch.where(avail, cost, inf).amin(0, keepdim=True)
    # Shift by the best available cost; the best gets exp(0) = 1, so the sum is >= 1 wherever a
    # source is available. Costs equal to an infinite best are a tie (shift 0), not inf - inf.
    shifted = torch.where(avail & (cost == best), torch.zeros_like(cost), torch.where(avail, cost - best, inf))
    e = torch.exp(-shifted / tau)
    w = e / e.sum(0, keepdim=True).clamp_min(1.0)
    return torch.where(avail.any(0, keepdim=True), w, torch.full_like(cost, 1.0 / cost.shape[0]))


# ---------------------------------------------------------------------------------------------
# public weight functions
# ---------------------------------------------------------------------------------------------


def min_ce_weights(ce: Tensor, mask: Tensor | None = None) -> Tensor:
    """MinCE: weight 1 on the source with the lowest cross-entropy, 0 on the others.

    Args:
        ce: ``[S, B]`` per-sequence or ``[S, B, T]`` per-token cross-entropy of each source on the
            gold text, floating, ``>= 0``; NaN marks a source unavailable there (never chosen).
        mask: per-token mode only, ``[B, T]`` bool, True = valid token; padding gets uniform weights.

    Returns:
        ``ce``'s shape, float32 (float64 for float64 input): one-hot over S on the lowest CE, ties
        to the lowest source index; uniform ``1 / S`` where every source is NaN (or masked out).
    """
    cost = _check_scores(ce, "ce", (2, 3), nonneg=True)
    m = _check_mask(mask, cost)
    return _uniform_where_masked(_argmin_onehot(cost), m)


def avg_ce_weights(ce: Tensor, tau: float = 1.0, mask: Tensor | None = None) -> Tensor:
    """AvgCE: ``softmax(-ce / tau)`` over the sources.

    Args:
        ce: ``[S, B]`` or ``[S, B, T]`` cross-entropies, floating, ``>= 0``; NaN = unavailable.
        tau: temperature, finite and > 0 (small tau approaches MinCE, large tau uniform).
        mask: per-token mode only, ``[B, T]`` bool, True = valid token; padding gets uniform weights.

    Returns:
        ``ce``'s shape, float32 (float64 for float64 input), summing to 1 over S. NaN sources get
        0; where every source is NaN the weights are uniform. ``+inf`` CE gets 0 unless all
        available sources are ``+inf`` (then they share the weight equally).
    """
    tau = _check_tau(tau)
    cost = _check_scores(ce, "ce", (2, 3), nonneg=True)
    m = _check_mask(mask, cost)
    return _uniform_where_masked(_softmin(cost, tau), m)


def reward_weights(rewards: Tensor, method: str = "max", tau: float = 1.0) -> Tensor:
    """ProFuser inference mode: source weights from reward-model scores (higher is better).

    Args:
        rewards: ``[S, B]`` score of each source's generated response to each prompt (e.g. from
            :class:`RewardScorer`), floating; NaN = no response from that source.
        method: ``"max"`` -> one-hot on the highest reward (ties to the lowest source index);
            ``"softmax"`` -> ``softmax(rewards / tau)`` over S.
        tau: softmax temperature, finite and > 0 (validated for both methods).

    Returns:
        ``[S, B]`` float32 (float64 for float64 input), summing to 1 over S; NaN sources get 0,
        all-NaN columns are uniform.
    """
    if not isinstance(method, str) or method not in _REWARD_METHODS:
        raise ValueError(f"method must be one of {_REWARD_METHODS}, got {method!r}")
    tau = _check_tau(tau)
    r = _check_scores(rewards, "rewards", (2,), nonneg=False)
    if method == "max":
        return _argmin_onehot(-r)
    return _softmin(-r, tau)


def token_ce_to_sequence_ce(ce_tok: Tensor, mask: Tensor | None = None) -> Tensor:
    """Per-sequence CE as the mean per-token CE over valid tokens.

    Args:
        ce_tok: ``[S, B, T]`` per-token cross-entropies, floating, ``>= 0``.
        mask: ``[B, T]`` bool (True = valid token) or None (all valid).

    Returns:
        ``[S, B]`` float32 (float64 for float64 input). A NaN at a valid token makes that source's
        sequence CE NaN (the source is unavailable for the sequence); NaNs at masked tokens are
        ignored. A sequence with no valid token is NaN for every source (so uniform weights).
    """
    cost = _check_scores(ce_tok, "ce_tok", (3,), nonneg=True)
    m = _check_mask(mask, cost)
    if m is None:
        return cost.mean(2)
    valid = m.unsqueeze(0)
    total = torch.where(valid, cost, torch.zeros_like(cost)).sum(2)
    count = m.sum(1).to(cost.dtype)  # [B]
    return total / count  # 0 / 0 = NaN for empty sequences


def fuse_weights(
    ce: Tensor,
    method: str = "min_ce",
    level: str = "sequence",
    tau: float = 1.0,
    mask: Tensor | None = None,
) -> Tensor:
    """Source weights for ``fused_loss`` from cross-entropies: the one entry point over the options.

    Args:
        ce: ``[S, B]`` per-sequence or ``[S, B, T]`` per-token CE of each source on the gold text.
        method: ``"min_ce"`` (:func:`min_ce_weights`) or ``"avg_ce"`` (:func:`avg_ce_weights`).
        level: ``"sequence"`` -> ``[S, B]`` weights (a ``[S, B, T]`` ``ce`` is first reduced with
            :func:`token_ce_to_sequence_ce` over ``mask``); ``"token"`` -> ``[S, B, T]`` weights
            (needs a ``[S, B, T]`` ``ce``; masked tokens uniform).
        tau: AvgCE temperature (> 0); validated but unused by MinCE.
        mask: ``[B, T]`` bool, True = valid token; only with a ``[S, B, T]`` ``ce``.
    """
    if not isinstance(method, str) or method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    if not isinstance(level, str) or level not in _LEVELS:
        raise ValueError(f"level must be one of {_LEVELS}, got {level!r}")
    tau = _check_tau(tau)
    cost = _check_scores(ce, "ce", (2, 3), nonneg=True)
    if level == "token":
        if cost.dim() != 3:
            raise ValueError(f"level='token' needs per-token ce [S, B, T], got shape {tuple(cost.shape)}")
    elif cost.dim() == 3:
        cost, mask = token_ce_to_sequence_ce(cost, mask), None
    if method == "min_ce":
        return min_ce_weights(cost, mask=mask)
    return avg_ce_weights(cost, tau=tau, mask=mask)


def with_target_candidate(source_ce: Tensor, target_ce: Tensor) -> tuple[Tensor, int]:
    """Stack the target model's own CE as an extra candidate row (FuseLLM).

    Args:
        source_ce: ``[S, B]`` or ``[S, B, T]`` CE of the sources.
        target_ce: the target's CE, ``[B]`` / ``[B, T]`` (or with a leading 1: ``[1, B]`` /
            ``[1, B, T]``), same dtype kind and device.

    Returns:
        ``(ce, index)``: ``ce`` is ``[S + 1, ...]`` with the target as the last row and
        ``index == S`` its row. Any fusion function then treats the target as one more source;
        the loss needs the target's own (frozen) top-k as the source at ``index``.
    """
    src = _check_scores(source_ce, "source_ce", (2, 3), nonneg=False)
    if not isinstance(target_ce, Tensor):
        raise TypeError(f"target_ce must be a torch.Tensor, got {type(target_ce).__name__}")
    if not target_ce.is_floating_point():
        raise TypeError(f"target_ce must be a floating tensor, got {target_ce.dtype}")
    tgt = target_ce.detach()
    if tgt.dim() == src.dim() - 1:
        tgt = tgt.unsqueeze(0)
    if tuple(tgt.shape) != (1,) + tuple(src.shape[1:]):
        raise ValueError(
            f"target_ce must be {tuple(src.shape[1:])} (or with a leading 1) to match source_ce "
            f"{tuple(src.shape)}, got {tuple(target_ce.shape)}"
        )
    if tgt.device != src.device:
        raise ValueError(f"target_ce is on {tgt.device}, source_ce on {src.device}")
    return torch.cat([source_ce.detach(), tgt.to(source_ce.dtype)], 0), src.shape[0]


def gold_probabilities(ids: Tensor, logprobs: Tensor, pos: Tensor, vocab: Tensor, labels: Tensor,
                       ignore_index: int = -100) -> Tensor:
    """The probability each source's aligned distribution gives the gold target token, per target position.

    Args:
        ids, logprobs: ``[S, B, Ts, K]`` the sources' top-k (source ids, -1 = none; log-probabilities).
        pos: ``[S, B, T]`` int, target position -> 1-to-1 aligned source position or -1.
        vocab: ``[S, Vs]`` int, source id -> target id or -1.
        labels: ``[B, T]`` int, the gold next target token (``ignore_index`` where none).

    Returns:
        ``[S, B, T]`` float32: the summed probability of the top-k entries that map to the label (0 when
        none does: the label is outside the source's top-k); NaN where the source has no aligned
        position or the label is ignored (the source is unavailable there).
    """
    for name, t in (("ids", ids), ("logprobs", logprobs), ("pos", pos), ("vocab", vocab), ("labels", labels)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    S, B, Ts, K = ids.shape
    if logprobs.shape != ids.shape or pos.shape[:2] != (S, B) or tuple(labels.shape) != tuple(pos.shape[1:]):
        raise ValueError(f"shapes: ids {tuple(ids.shape)}, logprobs {tuple(logprobs.shape)}, pos {tuple(pos.shape)}, "
                         f"labels {tuple(labels.shape)} must be [S, B, Ts, K] x2, [S, B, T], [B, T]")
    aligned = (pos >= 0) & (pos < Ts) & (labels != ignore_index).unsqueeze(0)
    j = torch.where(aligned, pos, torch.zeros_like(pos)).long()[..., None].expand(-1, -1, -1, K)
    a_ids = ids.long().gather(2, j)                                       # [S, B, T, K]
    a_p = logprobs.float().gather(2, j).exp()
    ok = (a_ids >= 0) & (a_ids < vocab.shape[1])
    s_idx = torch.arange(S, device=ids.device)[:, None, None, None]
    tid = vocab.long()[s_idx, torch.where(ok, a_ids, torch.zeros_like(a_ids))]
    hit = ok & (tid == labels.long().unsqueeze(0).unsqueeze(-1))
    p = torch.where(hit, a_p, torch.zeros_like(a_p)).sum(-1)
    return torch.where(aligned, p, torch.full_like(p, float("nan")))


def token_choice_weights(gold_p: Tensor) -> Tensor:
    """One-hot ``[S, B, T]`` on the source with the highest gold probability at each target position
    (:func:`gold_probabilities`; ties to the lowest source index); uniform where every source is NaN
    (unavailable) or gives the gold token probability 0 (it is in no source's top-k)."""
    p = _check_scores(gold_p, "gold_p", (3,), nonneg=True)
    w = _argmin_onehot(-p)
    best = torch.where(torch.isnan(p), torch.zeros_like(p), p).amax(0, keepdim=True)
    return torch.where(best > 0, w, torch.full_like(w, 1.0 / p.shape[0]))
