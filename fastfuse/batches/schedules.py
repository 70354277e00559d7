"""Schedules: small step -> float objects usable from any training loop.

* :class:`ConstantSchedule` and :class:`LinearSchedule` give ``lm_weight`` (the weight of the
  gold-token CE in ``L = lm_weight * CE(z, y) + (1 - lm_weight) * CE(z, q)``, DESIGN.md §1) per step.
* :class:`ProgressiveSchedule` is ProFuser's progressive fusion (Shi et al. 2024): ``alpha(step)``
  moves the source weights from *inference mode* (reward-model scores of the sources' generated
  responses, ``alpha = 0``) to *training mode* (MinCE on the gold responses, ``alpha = 1``);
  :meth:`ProgressiveSchedule.mix` blends the two ``[S, B]`` (or ``[S, B, T]``) weight tensors.

Steps are non-negative integers; every schedule is clamped past its last step. Schedules hold
no state, so they are safe to share between processes and to call out of order.
"""
from __future__ import annotations

import math
import numbers
import operator
from typing import Any

import torch
from torch import Tensor

__all__ = ["ConstantSchedule", "LinearSchedule", "ProgressiveSchedule"]

_PROGRESSIVE_KINDS = ("linear", "step", "cosine")


def _check_real(value: object, name: str, lo: float | None = None, hi: float | None = None) -> float:
    """``value`` as a finite float, optionally in ``[lo, hi]``; TypeError/ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {v}")
    return v


def _check_int(value: Any, name: str, minimum: int) -> int:
    """``value`` as an int >= ``minimum`` (bools rejected); TypeError/ValueError naming ``name``."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, got bool")
    try:
        v = operator.index(value)  # int, numpy integers, integer 0-d tensors
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}") from None
    if v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v}")
    return v


class ConstantSchedule:
    """``schedule(step) -> value`` for every step >= 0 (e.g. ``lm_weight = 0.9`` as in FuseLLM)."""

    def __init__(self, value: float) -> None:
        self.value = _check_real(value, "value")

    def __call__(self, step: int) -> float:
        _check_int(step, "step", 0)
        return self.value

    def __repr__(self) -> str:
        return f"ConstantSchedule(value={self.value})"


class LinearSchedule:
    """Linear from ``start`` at step 0 to ``end`` at ``total_steps``, then constant at ``end``.

    ``schedule(step) = start + (end - start) * min(step, total_steps) / total_steps``.
    """

    def __init__(self, start: float, end: float, total_steps: int) -> None:
        self.start = _check_real(start, "start")
        self.end = _check_real(end, "end")
        self.total_steps = _check_int(total_steps, "total_steps", 1)

    def __call__(self, step: int) -> float:
        s = min(_check_int(step, "step", 0), self.total_steps)
        if s == self.total_steps:
            return self.end  # exact endpoint, no rounding
        return self.start + (self.end - self.start) * (s / self.total_steps)

    def __repr__(self) -> str:
        return f"LinearSchedule(start={self.start}, end={self.end}, total_steps={self.total_steps})"


class ProgressiveSchedule:
    """ProFuser's progression from inference-mode to training-mode source weights.

    ``alpha(step)`` is the weight of the *training-mode* (MinCE) weights; ``1 - alpha`` that of
    the *inference-mode* (reward) weights. With progress ``p = min(step, total_steps) / total_steps``:

    * ``kind="linear"``: ``alpha = start + (end - start) * p``
    * ``kind="cosine"``: ``alpha = start + (end - start) * (1 - cos(pi * p)) / 2``
    * ``kind="step"``:   ``alpha = start`` while ``p < step_at``, then ``end``

    ``start`` and ``end`` are the alpha values at step 0 and at ``total_steps`` (both in [0, 1];
    the defaults 0 -> 1 go from pure inference mode to pure training mode). ``step_at`` (in
    [0, 1], a fraction of ``total_steps``) is used by ``kind="step"`` only. ``alpha`` is monotone
    in ``step`` (non-decreasing when ``end >= start``) and clamped after ``total_steps``.
    """

    def __init__(
        self,
        total_steps: int,
        kind: str = "linear",
        start: float = 0.0,
        end: float = 1.0,
        step_at: float = 0.5,
    ) -> None:
        self.total_steps = _check_int(total_steps, "total_steps", 1)
        if kind not in _PROGRESSIVE_KINDS:
            raise ValueError(f"kind must be one of {_PROGRESSIVE_KINDS}, got {kind!r}")
        self.kind = kind
        self.start = _check_real(start, "start", 0.0, 1.0)
        self.end = _check_real(end, "end", 0.0, 1.0)
        self.step_at = _check_real(step_at, "step_at", 0.0, 1.0)

    def alpha(self, step: int) -> float:
        """Weight in [0, 1] of the training-mode weights at ``step`` (an int >= 0)."""
        s = min(_check_int(step, "step", 0), self.total_steps)
        p = s / self.total_steps
        if self.kind == "step":
            return self.start if p < self.step_at else self.end
        if s == self.total_steps:
            return self.end  # exact endpoint, no rounding
        if self.kind == "cosine":
            p = (1.0 - math.cos(math.pi * p)) / 2.0
        return self.start + (self.end - self.start) * p

    __call__ = alpha

    def mix(self, inference_weights: Tensor, training_weights: Tensor, step: int) -> Tensor:
        """``(1 - alpha) * inference_weights + alpha * training_weights``, renormalised over dim 0.

        Both weight tensors are ``[S, B]`` or ``[S, B, T]`` floats >= 0 of one shape and device
        (e.g. :func:`fastfuse.batches.fusion_weights.reward_weights` and :func:`fastfuse.batches.fusion_weights.min_ce_weights`).
        Returns that shape in the promoted dtype, summing to 1 over S; where the blend sums to 0
        (only possible with unnormalised inputs) the result is uniform over S.
        """
        a = self.alpha(step)
        for name, w in (("inference_weights", inference_weights), ("training_weights", training_weights)):
            if not isinstance(w, Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(w).__name__}")
            if not w.is_floating_point():
                raise TypeError(f"{name} must be a floating tensor, got {w.dtype}")
            if w.dim() not in (2, 3) or w.shape[0] < 1:
                raise ValueError(f"{name} must be [S, B] or [S, B, T] with S >= 1, got {tuple(w.shape)}")
            if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
                raise ValueError(f"{name} must be finite and >= 0")
        if inference_weights.shape != training_weights.shape:
            raise ValueError(
                f"training_weights shape {tuple(training_weights.shape)} != "
                f"inference_weights shape {tuple(inference_weights.shape)}"
            )
        if inference_weights.device != training_weights.device:
            raise ValueError(
                f"training_weights is on {training_weights.device}, "
                f"inference_weights on {inference_weights.device}"
            )
        w = (1.0 - a) * inference_weights + a * training_weights
        total = w.sum(0, keepdim=True)
        uniform = torch.full_like(w, 1.0 / w.shape[0])
        return torch.where(total > 0, w / total.clamp_min(torch.finfo(w.dtype).tiny), uniform)

    def __repr__(self) -> str:
        return (
            f"ProgressiveSchedule(total_steps={self.total_steps}, kind={self.kind!r}, "
            f"start={self.start}, end={self.end}, step_at={self.step_at})"
        )
