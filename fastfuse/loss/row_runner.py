"""The per-row target of the fusion loss and the one call that runs its rows, for both entry points.

``fused_loss`` and ``fused_linear_loss`` build the sparse target of all ``N`` rows once
(:func:`build_target`) and run the row code on logits -- all of them, or one chunk at a time --
through :func:`run_rows`. Two row codes, picked by the :class:`~fastfuse.loss.spec.DivergenceSpec`:

* the default spec (FuseLLM's CE, no student transform) keeps the original one: gold and teacher
  merged into ``S*K + 1`` coefficients, ``kernels/fused_ce.py`` or ``reference.loss_and_grad_rows``
  -- bit for bit what it computed before the divergence family existed;
* every other spec: the teacher alone (unique ids, probabilities ``q``, missing mass ``R``) and
  ``kernels/divergence.py`` or ``divergence_rows.divergence_rows``.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from fastfuse.loss import reference as _ref
from fastfuse.loss.torch_rows import divergence_rows

__all__ = ["RowTarget", "build_target", "run_rows", "Consume"]


class RowTarget(NamedTuple):
    """``tids [N, E]`` and ``coefs [N, E]`` (default spec: gold + teacher coefficients; otherwise
    the teacher's probabilities ``q``, unique ids) and ``tail [N]`` (the teacher's missing mass;
    ``None`` for the default spec)."""
    tids: Tensor
    coefs: Tensor
    tail: Optional[Tensor]

    def rows(self, r0: int, r1: int) -> "RowTarget":
        return RowTarget(self.tids[r0:r1], self.coefs[r0:r1], None if self.tail is None else self.tail[r0:r1])


def build_target(use_triton: bool, spec, ids, logprobs, pos, vocab, labels, weights, lm_weight: float,
                 temperature: float, ignore_index: int, V: int, dtype: torch.dtype = torch.float32,
                 teacher_form: bool = False) -> RowTarget:
    """The :class:`RowTarget` of every row (inputs validated, 3-d layout; ``weights [S, N]``); the
    torch path computes its coefficients in ``dtype`` (float64 for float64 logits). With
    ``teacher_form`` the teacher alone (unique ids, ``q``, ``R``) whatever the spec: the
    vocabulary-parallel loss runs the staged rows for every spec."""
    with torch.no_grad():
        if spec.is_default and not teacher_form:
            if use_triton:
                from fastfuse.kernels.sparse_teacher import sparse_teacher
                tids, coefs = sparse_teacher(ids, logprobs, pos, vocab, labels, weights, lm_weight, temperature,
                                             ignore_index, V)
            else:
                tids, coefs = _ref.sparse_teacher(SimpleNamespace(ids=ids, logprobs=logprobs),
                                                  SimpleNamespace(pos=pos, vocab=vocab), labels, weights,
                                                  lm_weight, temperature, ignore_index, V, dtype=dtype)
            return RowTarget(tids, coefs, None)
        if use_triton:
            from fastfuse.kernels.sparse_teacher import sparse_teacher
            tail = torch.zeros(labels.numel(), dtype=torch.float32, device=labels.device)
            tids, q = sparse_teacher(ids, logprobs, pos, vocab, labels, weights, 0.0, temperature, ignore_index, V,
                                     tail=tail if spec.uses_tail_mass else None)
            return RowTarget(tids, q, tail)
        return RowTarget(*_ref.teacher_rows(SimpleNamespace(ids=ids, logprobs=logprobs),
                                            SimpleNamespace(pos=pos, vocab=vocab), labels, weights, temperature,
                                            ignore_index, V, spec.uses_tail_mass, dtype))


def run_rows(use_triton: bool, spec, lm_weight: float, logits: Tensor, target: RowTarget, labels: Tensor,
             ignored: Tensor, ignore_index: int, scale: Tensor, compute_grad: bool, inplace: bool
             ) -> Tuple[Tensor, Optional[Tensor]]:
    """Per-row loss ``[N]`` float32 and ``scale * dL/dlogits`` (``None`` without ``compute_grad``;
    ``logits`` itself with ``inplace``) of ``logits [B, T, V]`` against ``target``'s rows."""
    if use_triton:
        grad = None
        if compute_grad:
            grad = logits if inplace else torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        if spec.is_default:
            from fastfuse.kernels.fused_ce import ce_rows
            loss = ce_rows(logits, grad, target.tids, target.coefs, labels, ignore_index, scale, compute_grad)
        else:
            from fastfuse.kernels.divergence import divergence_rows as kernel_rows
            loss = kernel_rows(logits, grad, target.tids, target.coefs, target.tail, labels, ignore_index, scale,
                               compute_grad, spec, lm_weight)
        return loss, grad
    if spec.is_default:
        return _ref.loss_and_grad_rows(logits, target.tids, target.coefs, ignored, scale, compute_grad, inplace)
    return divergence_rows(logits, target.tids, target.coefs, target.tail, labels, ignored, spec, lm_weight, scale,
                           compute_grad, inplace)


class Consume(torch.autograd.Function):
    """Marks the logits dirty for ``inplace_grad`` (``fused_loss``, one process or vocabulary-parallel):
    their buffer is overwritten by the gradient, so any node that saved them (e.g. a logit softcap's
    tanh, which saves its output) must fail autograd's version check instead of back-propagating
    gradient values as logits. A separate Function because autograd lets a Function that dirties a
    view return only that one tensor."""

    @staticmethod
    def forward(ctx, logits):
        ctx.mark_dirty(logits)
        return logits

    @staticmethod
    def backward(ctx, grad):
        return grad
