"""Public entry point of the fused knowledge-fusion loss: validation, dispatch, autograd.

The math lives in ``fastfuse.reference`` (pure torch) and ``fastfuse.kernels`` (Triton); this
module only checks inputs, picks an implementation and wraps it in an ``autograd.Function``.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from fastfuse import reference as _ref
from fastfuse._dispatch import FLOATS, INTS, check_teacher_args, check_tensor, choose_impl

__all__ = ["SourceTopK", "AlignMap", "fused_loss"]



class SourceTopK(NamedTuple):
    """Top-k next-token distributions of ``S`` source models, in source positions.

    ids: int32/int64 ``[S, B, Ts, K]`` source-vocabulary ids, -1 = padding.
    logprobs: float ``[S, B, Ts, K]`` log-probs (or logits) of the kept top-k; only their
        differences matter (the teacher is ``softmax(logprobs / temperature)`` over the kept,
        mappable entries). ``-inf`` marks an entry with zero probability.
    """
    ids: Tensor
    logprobs: Tensor


class AlignMap(NamedTuple):
    """Alignment of each source to the target tokenisation and vocabulary.

    pos: int32 ``[S, B, T]``: source position aligned to target position ``t``, or -1.
    vocab: int32 ``[S, Vs_max]``: source id -> target id, or -1 (no counterpart).
    """
    pos: Tensor
    vocab: Tensor


class _FusedLoss(torch.autograd.Function):
    """Forward computes per-row loss *and* gradient; backward only rescales the gradient."""

    @staticmethod
    def forward(ctx, logits, ids, logprobs, pos, vocab, labels, weights, lm_weight, temperature,
                ignore_index, reduction, inplace_grad, impl):
        B, T, V = logits.shape
        N = B * T
        compute_grad = ctx.needs_input_grad[0]
        not_ignored = labels != ignore_index
        count = not_ignored.sum()
        if reduction == "mean":
            scale = 1.0 / count.clamp_min(1).to(torch.float32)
        else:
            scale = torch.ones((), dtype=torch.float32, device=logits.device)
        inplace = inplace_grad and compute_grad
        if impl == "triton":
            from fastfuse.kernels.fused_ce import fused_loss_rows
            loss_rows, grad = fused_loss_rows(
                logits, ids, logprobs, pos, vocab, labels, weights, lm_weight, temperature,
                ignore_index, scale, compute_grad, inplace)
        else:
            topk, amap = SourceTopK(ids, logprobs), AlignMap(pos, vocab)
            tids, coefs = _ref.sparse_teacher(topk, amap, labels, weights, lm_weight,
                                              temperature, ignore_index)
            loss_rows, grad = _ref.loss_and_grad_rows(
                logits, tids, coefs, ~not_ignored.reshape(N), scale, compute_grad, inplace)
        ctx.reduction = reduction
        ctx.shape = (B, T)
        if compute_grad:
            ctx.save_for_backward(grad)
        if reduction == "none":
            return loss_rows.view(B, T)
        total = loss_rows.sum()
        return total * scale if reduction == "mean" else total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        if ctx.reduction == "none":
            grad.mul_(grad_output.reshape(*ctx.shape, 1))
        elif not bool(grad_output == 1):
            # One scalar host sync: skips a full pass over [N, V] in the common case
            # (``loss.backward()`` with grad_output == 1). Otherwise a memory-bound rescale.
            grad.mul_(grad_output)
        return (grad,) + (None,) * 12


def fused_loss(target_logits: Tensor, source_topk: SourceTopK, align_map: AlignMap,
               labels: Tensor, source_weights: Optional[Tensor] = None, lm_weight: float = 0.9,
               temperature: float = 1.0, ignore_index: int = -100, reduction: str = "mean",
               *, inplace_grad: bool = False, impl: str = "auto",
               validate: bool = True) -> Tensor:
    """FuseLLM loss of target logits against gold labels and a fused sparse teacher.

    Per token: ``lm_weight * CE(z, label) + (1 - lm_weight) * CE(z, q)``
    ``= lse(z) - lm_weight * z[label] - (1 - lm_weight) * sum_v q_v z[v]``, where the fused
    teacher ``q = sum_s w_s * teacher_s``. For source ``s`` at target position ``(b, t)`` with
    ``j = align_map.pos[s, b, t]``: if ``j >= 0`` the ``K`` entries of ``source_topk`` row
    ``(s, b, j)`` whose id is not -1, whose mapped id ``align_map.vocab[s, id]`` is not -1 and
    whose logprob is not ``-inf`` survive, and ``teacher_s = softmax(logprobs / temperature)``
    over them (duplicate target ids summed); if ``j == -1`` or nothing survives, ``teacher_s``
    is one-hot on the label.

    Args:
        target_logits: ``[B, T, V]`` float32/bfloat16/float16 (last dim contiguous). ``[N, V]``
            is read as ``B = 1, T = N``; then ``labels`` is ``[N]``, ``source_topk`` tensors may
            be ``[S, Ts, K]``, ``align_map.pos`` ``[S, N]``, and ``source_weights`` ``[S]``
            (per sequence) or ``[S, N]`` (per token) -- the 3-d shapes with ``B = 1`` work too.
        source_topk: :class:`SourceTopK` with ids/logprobs ``[S, B, Ts, K]``.
        align_map: :class:`AlignMap` with pos ``[S, B, T]`` and vocab ``[S, Vs_max]``.
        labels: integer ``[B, T]``: gold next token per position (already shifted);
            ``ignore_index`` positions contribute 0 loss and 0 gradient.
        source_weights: ``None`` (uniform), ``[S, B]`` per sequence or ``[S, B, T]`` per token,
            ``>= 0``; normalised over ``S`` per token. A token whose weights are all 0 gets
            uniform weights ``1 / S``.
        lm_weight: weight of the gold cross-entropy, in ``[0, 1]``.
        temperature: ``> 0``; the teacher is ``softmax(logprobs / temperature)``.
        reduction: ``"mean"`` over non-ignored tokens (0, not NaN, when all are ignored),
            ``"sum"``, or ``"none"`` -> ``[B, T]`` (``[N]`` for 2-d logits) float32.
        inplace_grad: write the gradient into ``target_logits``'s buffer during the forward
            (saves ``N * V`` elements of memory). The logits are *consumed*: do not read them
            after the call. Only when ``target_logits`` requires grad.
        impl: ``"auto"`` (Triton on CUDA, or on CPU when ``TRITON_INTERPRET=1``; otherwise the
            chunked torch path), ``"triton"`` or ``"reference"`` (chunked sparse torch path).
        validate: run the data-dependent checks (id ranges, negative weights, NaN logprobs,
            label range). They cost a few reductions over the small index tensors
            (``O(S*B*Ts*K + S*Vs + S*B*T)``, plus ``min``/``max`` of the labels) and **one**
            host sync. Shape/dtype/device checks are always done (free).

    The gradient flows to ``target_logits`` only; it is computed in the forward pass (one read
    of the logits for the log-sum-exp, a second, L2-friendly, one for the gradient write) and
    stored in the logits dtype (or in the logits buffer with ``inplace_grad``). The loss is
    float32 whatever the logits dtype.

    Costs and syncs. Extra memory: the gradient (``N * V`` elements of the logits dtype, none
    with ``inplace_grad``) plus ``O(N * S * K)`` for the sparse teacher; never a dense teacher
    or an fp32 copy of the logits. The forward has no host sync with ``validate=False``. The
    backward of ``"mean"``/``"sum"`` does one scalar sync to test ``grad_output == 1`` (the
    usual ``loss.backward()``), which skips a pass over ``[N, V]``; any other ``grad_output``
    (e.g. ``loss / accumulation_steps``) and ``"none"`` cost one memory-bound rescale of the
    gradient. On CPU without ``TRITON_INTERPRET=1`` the torch path works on chunks of about
    4M logits at a time (float32 softmax of the chunk), so memory stays ``O(N * V)`` only for
    the gradient itself.
    """
    if not isinstance(target_logits, Tensor):
        raise TypeError(f"target_logits must be a torch.Tensor, got {type(target_logits).__name__}")
    if target_logits.dtype not in FLOATS:
        raise TypeError(f"target_logits must be float32, bfloat16 or float16, got {target_logits.dtype}")
    if target_logits.dim() not in (2, 3):
        raise ValueError(f"target_logits must be [B, T, V] or [N, V], got shape {tuple(target_logits.shape)}")
    V = target_logits.shape[-1]
    if V == 0 or target_logits.numel() == 0:
        raise ValueError(f"target_logits must be non-empty, got shape {tuple(target_logits.shape)}")
    if target_logits.stride(-1) != 1:
        raise ValueError("target_logits must be contiguous in its last (vocabulary) dimension")
    check_tensor("labels", labels, INTS, "int64 (or int32)")
    dev = target_logits.device
    squeeze = target_logits.dim() == 2
    ids, logprobs, pos, vocab, labels, source_weights = check_teacher_args(
        target_logits.shape[:-1], V, dev, source_topk, align_map, labels, source_weights, lm_weight, temperature,
        ignore_index, reduction, impl, validate)
    lm_weight, temperature = float(lm_weight), float(temperature)
    if squeeze:
        target_logits = target_logits.unsqueeze(0)
    B, T, _ = target_logits.shape
    S = ids.shape[0]

    impl = choose_impl(impl, dev)
    weights = _ref.normalize_weights(source_weights, S, B, T, dev).reshape(S, B * T)
    loss = _FusedLoss.apply(target_logits, ids, logprobs, pos, vocab, labels, weights, lm_weight,
                            temperature, ignore_index, reduction, bool(inplace_grad), impl)
    if squeeze and reduction == "none":
        loss = loss.squeeze(0)
    return loss


