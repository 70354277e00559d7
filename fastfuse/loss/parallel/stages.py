"""The rows of the vocabulary-parallel loss: the stages of ``fastfuse.loss.torch_rows`` on this
rank's vocabulary slice, combined over the process group, and the two autograd Functions
(logits in; hidden states and the lm_head weight shard in).

Per chunk of rows (the same chunks on every rank, so the collectives pair up):

1. ``local_stats`` of the slice ``[n, k]`` and ``gather_sparse`` -- the transformed logits at the
   teacher ids and the label that this rank owns, -inf elsewhere ``[n, E + 1]`` -- packed into one
   ``[n, k + E + 1]`` tensor and all-gathered (round 1); every rank then combines them alike
   (``combine_stats``; a max over the ranks for the sparse logits) and holds the same row scalars;
2. for the ``"uniform"`` tail of JSD, the skew KLs and TVD: ``tail_sums`` of the slice, all-reduced
   (round 2);
3. ``row_terms`` / ``row_loss`` on the combined scalars (identical on every rank) and
   ``grad_slice``: the gradient of this rank's slice only.

No rank holds an ``[N, V]`` tensor: the largest are a chunk's ``[n, V_r]`` logits (in
``fused_linear_loss`` one buffer, overwritten by their gradient) and the float32 temporaries of the
stages, which run on slices of ``SLICE_ELEMS`` logits.
The torch ops run on CUDA too; the Triton row kernels are not used here because the stages need a
collective between the passes over a row, inside what the kernels do in one program.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from fastfuse.loss.checks import SECOND_BACKWARD, accumulator_dtype
from fastfuse.loss.torch_rows import (combine_stats, finish_terms, gather_sparse, grad_slice, local_stats,
                                      needs_tail_pass, row_loss, row_terms, tail_sums, teacher_ids)
from fastfuse.loss.chunk_loop import chunk_loop
from fastfuse.loss.reference import row_chunks
from fastfuse.loss.row_runner import RowTarget
from fastfuse.loss.parallel.layout import VocabLayout

__all__ = ["SLICE_ELEMS", "Plan", "shard_rows", "logits_rows", "linear_chunks", "VocabParallelLoss",
           "VocabParallelLinearLoss"]


SLICE_ELEMS = 1 << 22     # logits per stage call: bounds the float32 temporaries (as divergence_rows)


class Plan(NamedTuple):
    """What every rank runs alike: the layout, the loss, and ``chunk`` rows per collective round."""
    layout: VocabLayout
    spec: object
    lm_weight: float
    reduction: str
    chunk: int


def _rows(d, a: int, e: int):
    return {k: v[a:e] for k, v in d.items()}


def shard_rows(z: Tensor, target: RowTarget, labels: Tensor, ignored: Tensor, scale: Tensor, plan: Plan,
               grad_out: Optional[Tensor], acc: torch.dtype) -> Tensor:
    """One chunk ``z [n, V_r]`` of this rank's logits: the per-row loss ``[n]`` (``acc``, the same on
    every rank; 0 on ignored rows), and ``scale * dL/dz`` (``scale``: one element or one per row)
    written into ``grad_out [n, V_r]`` (``z`` itself allowed) when given. One collective round (two
    with a tail pass) for the whole chunk; the stages run on slices of ``SLICE_ELEMS`` logits."""
    spec, layout = plan.spec, plan.layout
    tids, q, R = target
    n, Vr = z.shape
    step = max(1, SLICE_ELEMS // max(Vr, 1))
    parts = [(a, min(n, a + step)) for a in range(0, n, step)]
    a_ids = teacher_ids(tids, q)
    stats = torch.cat([local_stats(z[a:e], spec, acc, a_ids[a:e], layout.start) for a, e in parts])
    sparse = torch.cat([gather_sparse(z[a:e], tids[a:e], labels[a:e], spec, layout.start, acc) for a, e in parts])
    k = stats.shape[1]
    every = layout.all_gather(torch.cat([stats, sparse], 1))         # [W, n, k + E + 1]
    st = combine_stats(every[..., :k], spec)
    rt = row_terms(spec, st, every[..., k:].amax(0), tids, q, R, layout.total)
    if needs_tail_pass(spec):
        sums = torch.cat([tail_sums(z[a:e], spec, _rows(rt, a, e), _rows(st, a, e), acc) for a, e in parts])
        rt = finish_terms(spec, rt, layout.all_reduce(sums))
    rows = row_loss(spec, plan.lm_weight, st, rt)
    rows = torch.where(ignored, torch.zeros_like(rows), rows)
    if grad_out is not None:
        s = scale.reshape(-1).to(acc)
        for a, e in parts:      # slice a's gradient reads only z[a:e]: writing it into z is safe
            g = grad_slice(z[a:e], spec, plan.lm_weight, _rows(st, a, e), _rows(rt, a, e), tids[a:e], labels[a:e],
                           layout.start, acc)
            g.masked_fill_(ignored[a:e, None], 0.0)
            grad_out[a:e] = g.mul_(s if s.numel() == 1 else s[a:e, None])
    return rows


def logits_rows(logits: Tensor, target: RowTarget, labels: Tensor, ignored: Tensor, scale: Tensor, plan: Plan,
                grad: Optional[Tensor]) -> Tensor:
    """Per-row loss ``[N]`` of this rank's ``logits [B, T, V_r]``, and ``scale * dL/dlogits`` written
    into ``grad`` (any ``[B, T, V_r]`` buffer, ``logits`` itself included) when it is given."""
    B, T, _ = logits.shape
    acc = accumulator_dtype(logits.dtype)
    loss = torch.empty(B * T, dtype=acc, device=logits.device)
    per_row = scale.numel() > 1
    for b, t0, t1, a, e in row_chunks(B, T, plan.chunk):
        loss[a:e] = shard_rows(logits[b, t0:t1], target.rows(a, e), labels[a:e], ignored[a:e],
                               scale[a:e] if per_row else scale, plan, None if grad is None else grad[b, t0:t1], acc)
    return loss


def linear_chunks(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], target: RowTarget, labels: Tensor,
                  ignored: Tensor, scale: Tensor, plan: Plan, need) -> Tuple[Tensor, Tuple[Optional[Tensor], ...]]:
    """Per-row losses ``[N]`` of ``hidden @ weight.T + bias`` (this rank's ``[V_r, H]`` shard) and the
    gradients flagged in ``need``: ``d_hidden`` summed over the group (all-reduce; under sequence
    parallelism the reduce-scatter to this rank's tokens), ``d_weight``/``d_bias`` of the shard.
    The chunk loop is ``fused_linear_loss``'s (:func:`fastfuse.loss.chunk_loop.chunk_loop`)."""
    layout = plan.layout
    H = hidden.shape[-1]
    h3 = hidden if hidden.dim() == 3 else hidden.unsqueeze(0)
    full = (layout.gather_tokens(h3) if layout.tokens is not None else h3).reshape(-1, H)
    acc = accumulator_dtype(hidden.dtype)
    per_row = scale.numel() > 1

    def row_pass(z, r0, r1, compute_grad):
        # z becomes the chunk's gradient, rounded once to the input dtype
        return shard_rows(z, target.rows(r0, r1), labels[r0:r1], ignored[r0:r1],
                          scale[r0:r1] if per_row else scale, plan, z if compute_grad else None, acc)
    loss, (d_full, d_weight, d_bias) = chunk_loop(full, weight, bias, plan.chunk, need, row_pass)
    d_hidden = None
    if d_full is not None:      # each rank's d_hidden is its vocabulary slice's part: sum them
        with torch.no_grad():
            if layout.tokens is not None:
                d_hidden = layout.scatter_tokens(d_full.view(h3.shape[0], -1, H)).reshape(hidden.shape)
            else:
                d_hidden = layout.all_reduce(d_full).view(hidden.shape)
    return loss, (d_hidden, d_weight, d_bias)


class VocabParallelLoss(torch.autograd.Function):
    """``fused_loss`` on this rank's ``[B, T, V_r]`` logits. As there: the gradient is computed in
    the forward and rescaled by ``grad_output`` in the backward, except for float16, whose backward
    computes it with ``scale * grad_output`` applied before the rounding (and then runs the
    collectives again: every rank must call backward)."""

    @staticmethod
    def forward(ctx, logits, tids, q, R, labels, ignored, scale, plan, inplace):
        B, T, _ = logits.shape
        need = ctx.needs_input_grad[0]
        ctx.defer = need and logits.dtype == torch.float16
        grad = None
        if need and not ctx.defer:
            grad = logits if inplace else torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        loss = logits_rows(logits, RowTarget(tids, q, R), labels, ignored, scale, plan, grad)
        ctx.plan, ctx.inplace, ctx.shape, ctx.done = plan, inplace, (B, T), False
        if grad is not None:
            ctx.save_for_backward(grad)
        elif ctx.defer:
            ctx.save_for_backward(logits, tids, q, R, labels, ignored, scale)
        if plan.reduction == "none":
            return loss.view(B, T)
        total = loss.sum()
        return total * scale.reshape(()) if plan.reduction == "mean" else total

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.done:
            raise RuntimeError(SECOND_BACKWARD.format("fused_loss"))
        ctx.done = True
        go = grad_output.to(accumulator_dtype(grad_output.dtype)).reshape(-1)
        if ctx.defer:
            logits, tids, q, R, labels, ignored, scale = ctx.saved_tensors
            grad = logits if ctx.inplace else torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
            logits_rows(logits, RowTarget(tids, q, R), labels, ignored, scale * go, ctx.plan, grad)
        else:
            (grad,) = ctx.saved_tensors
            grad.mul_(go.reshape(*ctx.shape, 1) if go.numel() > 1 else go.reshape(()))
        return (grad,) + (None,) * 8


class VocabParallelLinearLoss(torch.autograd.Function):
    """``fused_linear_loss`` with this rank's weight (and bias) shard; ``hidden`` is the whole
    ``[N, H]`` (or ``[B, T, H]``), or under sequence parallelism this rank's share of the tokens.
    Gradients in the forward for ``"mean"``/``"sum"`` (not float16), else in the backward, which
    then runs the collectives again."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, tids, q, R, labels, ignored, scale, plan):
        need = ctx.needs_input_grad[:3]
        grad_now = plan.reduction != "none" and hidden.dtype != torch.float16 and any(need)
        loss, grads = linear_chunks(hidden, weight, bias, RowTarget(tids, q, R), labels, ignored, scale, plan,
                                    need if grad_now else (False, False, False))
        ctx.grad_now, ctx.done, ctx.plan = grad_now, False, plan
        if grad_now:
            ctx.grads = grads
        else:
            ctx.save_for_backward(hidden, weight, bias, tids, q, R, labels, ignored, scale)
        if plan.reduction == "none":
            return loss
        return loss.sum() * scale.reshape(())

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.done:
            raise RuntimeError(SECOND_BACKWARD.format("fused_linear_loss"))
        ctx.done = True
        go = grad_output.to(accumulator_dtype(grad_output.dtype)).reshape(-1)
        if ctx.grad_now:
            grads, ctx.grads = ctx.grads, None
            return tuple(None if g is None else g.mul_(go.reshape(())) for g in grads) + (None,) * 7
        hidden, weight, bias, tids, q, R, labels, ignored, scale = ctx.saved_tensors
        _, grads = linear_chunks(hidden, weight, bias, RowTarget(tids, q, R), labels, ignored, scale * go, ctx.plan,
                                 ctx.needs_input_grad[:3])
        return grads + (None,) * 7
