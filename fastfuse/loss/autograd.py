"""The two autograd Functions of the fusion loss: from logits (:class:`FusedLogitsLoss`) and from
hidden states and the lm_head (:class:`FusedLinearLoss`), each over a
:class:`~fastfuse.loss.row_runner.RowRunner` -- local rows or vocabulary-parallel rows, the same
Function for both.

What they share is written once below: when the gradient is computed (in the forward, or deferred
to the backward), the reduction, the backward's ``grad_output`` cast and its once-only guard.

float32/bfloat16: the forward computes the per-row loss *and* the gradient (``scale`` folded in) and
the backward multiplies it by ``grad_output`` on the device (free when that is 1 on the Triton
path). float16: the forward computes the loss only and the backward the gradient with
``scale * grad_output`` applied in fp32 before the one rounding -- folding ``1/#tokens`` into an
fp16 gradient first would flush ``scale * softmax`` (~1e-10 at V = 128k) to 0 before a GradScaler's
2**16 arrives. The linear loss defers for ``reduction="none"`` too: its per-token ``grad_output``
is needed before the ``d_weight`` matmul. A deferred vocabulary-parallel backward runs the
collectives again: every rank must call backward.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from fastfuse.loss.checks import SECOND_BACKWARD, accumulator_dtype
from fastfuse.loss.chunk_loop import chunk_loop
from fastfuse.loss.row_runner import RowRunner

__all__ = ["FusedLogitsLoss", "FusedLinearLoss", "consume"]


def consume(logits: Tensor) -> None:
    """``inplace_grad``: the logits' buffer is about to hold their gradient. Autograd is told of the
    write (the version counter is bumped, as a kernel that writes through a pointer must do), so a
    node that saved the logits -- a softcap's ``tanh`` saves its output -- fails its version check
    instead of back-propagating gradient values as logits. A leaf that requires grad, or a view of
    one, is refused: its ``.grad`` would be its own overwritten buffer."""
    base = logits if logits._base is None else logits._base
    if (logits.is_leaf and logits.requires_grad) or (base.is_leaf and base.requires_grad):
        raise ValueError("inplace_grad=True: target_logits is a leaf tensor that requires grad (or a view of one); "
                         "its gradient would overwrite it. Pass a computed buffer (e.g. the lm_head's output) or "
                         "inplace_grad=False")
    torch.autograd.graph.increment_version(logits)


def _gradient_in_forward(needed: bool, dtype: torch.dtype, per_token_factor_first: bool = False) -> bool:
    """Compute the gradient in the forward (else in the backward): not for float16, and not when the
    per-token ``grad_output`` is needed before the gradient is reduced over tokens."""
    return needed and dtype != torch.float16 and not per_token_factor_first


def _reduce(rows: Tensor, reduction: str, scale: Tensor, shape) -> Tensor:
    if reduction == "none":
        return rows.view(shape)
    total = rows.sum()
    return total * scale.reshape(()) if reduction == "mean" else total


def _grad_factor(ctx, grad_output: Tensor, owner: str) -> Tensor:
    """``grad_output`` flat in the accumulator dtype, on the device (no host sync); a second
    backward through the same call raises."""
    if ctx.done:
        raise RuntimeError(SECOND_BACKWARD.format(owner))
    ctx.done = True
    return grad_output.to(accumulator_dtype(grad_output.dtype)).reshape(-1)


class FusedLogitsLoss(torch.autograd.Function):
    """``fused_loss`` of ``logits [B, T, V]`` (or this rank's ``[B, T, V_r]``); with ``inplace`` the
    gradient is written into the logits' buffer (:func:`consume`)."""

    @staticmethod
    def forward(ctx, logits: Tensor, runner: RowRunner, reduction: str, inplace: bool):
        if inplace:
            consume(logits)
        need = ctx.needs_input_grad[0]
        now = _gradient_in_forward(need, logits.dtype)
        rows, grad = runner.rows(logits, 0, runner.scale, now, inplace)
        ctx.runner, ctx.inplace, ctx.deferred, ctx.done = runner, inplace, need and not now, False
        if now:
            ctx.save_for_backward(grad)
        elif ctx.deferred:
            ctx.save_for_backward(logits)
        return _reduce(rows, reduction, runner.scale, logits.shape[:-1])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        go = _grad_factor(ctx, grad_output, "fused_loss")
        runner, ctx.runner = ctx.runner, None
        (saved,) = ctx.saved_tensors
        if ctx.deferred:
            _, grad = runner.rows(saved, 0, runner.scale * go, True, ctx.inplace)
        else:
            grad = runner.rescale_(saved, go)
        return grad, None, None, None


def _linear_rows(runner: RowRunner, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], scale: Tensor, need
                 ) -> Tuple[Tensor, Tuple[Optional[Tensor], ...]]:
    """Per-row losses ``[N]`` and (d_hidden, d_weight, d_bias) for the gradients flagged in ``need``,
    times ``scale`` (one element or one per row, applied to each row's gradient before its rounding
    to the chunk dtype), through :func:`~fastfuse.loss.chunk_loop.chunk_loop`."""
    def row_pass(z, r0, r1, compute_grad):
        return runner.rows(z.unsqueeze(0), r0, scale, compute_grad, True)[0]

    loss, (d_tokens, d_weight, d_bias) = chunk_loop(runner.tokens(hidden), weight, bias, runner.chunk, need, row_pass)
    return loss, (None if d_tokens is None else runner.tokens_grad(d_tokens, hidden), d_weight, d_bias)


class FusedLinearLoss(torch.autograd.Function):
    """``fused_linear_loss`` of ``hidden`` and the lm_head ``weight`` (``bias``), whole or this rank's
    vocabulary shard; ``runner.chunk`` tokens per chunk of logits."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], runner: RowRunner, reduction: str):
        need = ctx.needs_input_grad[:3]
        now = _gradient_in_forward(any(need), hidden.dtype, per_token_factor_first=reduction == "none")
        rows, grads = _linear_rows(runner, hidden, weight, bias, runner.scale, need if now else (False,) * 3)
        ctx.runner, ctx.now, ctx.done = runner, now, False
        if now:
            ctx.grads = grads       # not inputs: ctx holds them until the backward hands them over
        else:
            ctx.save_for_backward(hidden, weight, bias)
        return _reduce(rows, reduction, runner.scale, rows.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        go = _grad_factor(ctx, grad_output, "fused_linear_loss")
        runner, ctx.runner = ctx.runner, None
        if ctx.now:
            grads, ctx.grads = ctx.grads, None
            return tuple(None if g is None else runner.rescale_(g, go) for g in grads) + (None, None)
        hidden, weight, bias = ctx.saved_tensors
        _, grads = _linear_rows(runner, hidden, weight, bias, runner.scale * go, ctx.needs_input_grad[:3])
        return grads + (None, None)
