"""Public entry point of the fused knowledge-fusion loss: validation, dispatch, autograd.

The math lives in ``fastfuse.loss.reference`` (pure torch) and ``fastfuse.kernels`` (Triton); this
module only checks inputs, picks an implementation and wraps it in an ``autograd.Function``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from fastfuse.batch import AlignMap, SourceTopK
from fastfuse.loss import reference as _ref
from fastfuse.loss.checks import (ALL_FLOATS, INTS, SECOND_BACKWARD, accumulator_dtype, check_teacher_args, check_tensor,
                                float64_path)
from fastfuse.loss.spec import make_spec
from fastfuse.loss.row_runner import Consume, RowTarget, build_target, run_rows
from fastfuse.loss.parallel.losses import vocab_parallel_loss
from fastfuse.loss.parallel.layout import is_dtensor

__all__ = ["fused_loss"]


class _FusedLoss(torch.autograd.Function):
    """float32/bfloat16: the forward computes per-row loss *and* gradient (``scale`` folded in) and
    the backward multiplies it by ``grad_output`` on the device (free when that is 1). float16: the
    forward computes the loss only and the backward the gradient with ``scale * grad_output``
    applied in fp32 before the one rounding -- folding ``1/#tokens`` into an fp16 gradient first
    would flush ``scale * softmax`` (~1e-10 at V = 128k) to 0 before a GradScaler's 2**16 arrives."""

    @staticmethod
    def forward(ctx, logits, tids, coefs, tail, labels, ignored, scale, ignore_index, reduction, inplace, use_triton,
                spec, lm_weight):
        B, T, V = logits.shape
        need = ctx.needs_input_grad[0]
        ctx.defer = need and logits.dtype == torch.float16
        grad_now = need and not ctx.defer
        ctx.row_args = (use_triton, spec, lm_weight)
        loss_rows, grad = run_rows(*ctx.row_args, logits, RowTarget(tids, coefs, tail), labels, ignored,
                                   ignore_index, scale, grad_now, inplace)
        ctx.reduction, ctx.shape, ctx.inplace = reduction, (B, T), inplace
        ctx.ignore_index, ctx.done = ignore_index, False
        if grad_now:
            ctx.save_for_backward(grad)
        elif ctx.defer:
            ctx.save_for_backward(logits, tids, coefs, tail, labels, ignored, scale)
        if reduction == "none":
            return loss_rows.view(B, T)
        total = loss_rows.sum()
        return total * scale.reshape(()) if reduction == "mean" else total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        if ctx.done:
            raise RuntimeError(SECOND_BACKWARD.format("fused_loss"))
        ctx.done = True
        # grad_output stays on the device: no bool(grad_output == 1) host sync
        go = grad_output.to(accumulator_dtype(grad_output.dtype)).reshape(-1)
        if ctx.defer:
            logits, tids, coefs, tail, labels, ignored, scale = ctx.saved_tensors
            _, grad = run_rows(*ctx.row_args, logits, RowTarget(tids, coefs, tail), labels, ignored,
                               ctx.ignore_index, scale * go, True, ctx.inplace)
        else:
            (grad,) = ctx.saved_tensors
            if ctx.row_args[0]:
                from fastfuse.kernels.fused_ce import rescale_rows_
                rescale_rows_(grad, go)
            else:       # torch path: one pass (the kernel skips it when grad_output is 1)
                grad.mul_(go.reshape(*ctx.shape, 1) if go.numel() > 1 else go.reshape(()))
        return (grad,) + (None,) * 12


def fused_loss(target_logits: Tensor, source_topk: SourceTopK, align_map: AlignMap,
               labels: Tensor, source_weights: Optional[Tensor] = None, lm_weight: float = 0.9,
               temperature: float = 1.0, ignore_index: int = -100, reduction: str = "mean",
               *, divergence: str = "ce", tail: str = "renormalize", alpha: Optional[float] = None,
               beta: Optional[float] = None, logit_scale: float = 1.0, softcap: Optional[float] = None,
               student_temperature: float = 1.0, hinton_scale: bool = False,
               inplace_grad: bool = False, impl: str = "auto", validate: bool = True,
               process_group=None, vocab_start: Optional[int] = None) -> Tensor:
    """Knowledge-fusion loss of target logits against gold labels and a fused sparse teacher.

    Per token: ``lm_weight * CE(z, label) + (1 - lm_weight) * CE(z, q)``
    ``= lse(z) - lm_weight * z[label] - (1 - lm_weight) * sum_v q_v z[v]``, where the fused
    teacher ``q = sum_s w_s * teacher_s``. For source ``s`` at target position ``(b, t)`` with
    ``j = align_map.pos[s, b, t]``: if ``j >= 0`` the ``K`` entries of ``source_topk`` row
    ``(s, b, j)`` whose id is not -1, whose mapped id ``align_map.vocab[s, id]`` is not -1 and
    whose logprob is not ``-inf`` survive, and ``teacher_s = softmax(logprobs / temperature)``
    over them (duplicate target ids summed); if ``j == -1`` or nothing survives, ``teacher_s``
    is one-hot on the label.

    That is the default (FuseLLM's loss). In general the row loss is
    ``lm_weight * CE(z', label) + (1 - lm_weight) * k * D(softmax(z' / student_temperature), q)``
    with the student's transformed logits ``z'`` and ``D`` one of the divergences below; every
    combination is fused (no dense teacher, no fp32 copy of the logits) with exact gradients, and
    ``fastfuse.loss.reference.fused_loss_reference`` is its dense float64 definition (README "Divergences").

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
        divergence: ``"ce"`` (default), ``"forward_kl"`` (same gradient; the value is KL(q||p)),
            ``"reverse_kl"`` KL(p||q), ``"jsd"`` (``beta`` in (0, 1), default 0.5: with
            ``m = beta q + (1 - beta) p``, ``beta KL(q||m) + (1 - beta) KL(p||m)``), ``"skew_kl"``
            KL(q || alpha q + (1 - alpha) p), ``"skew_reverse_kl"`` KL(p || alpha p + (1 - alpha) q)
            (``alpha`` in (0, 1), default 0.1), ``"tvd"`` 1/2 sum |p - q|.
        tail: the teacher's missing mass ``R`` (what its kept entries leave of 1, the logprobs then
            being log-probabilities): ``"renormalize"`` (default, FuseLLM: the teacher lives on its
            kept ids, renormalised; reverse KL compares the student renormalised there too),
            ``"uniform"`` (``R`` spread evenly over every other target id) or ``"bucket"`` (one
            extra outcome on both sides: teacher ``R``, student the mass of every other id). Under
            ``"uniform"`` JSD, the skew KLs and TVD read the row three times instead of twice.
        alpha, beta: the mixing parameter of the skew divergences / the JSD (see ``divergence``).
        logit_scale, softcap: the student's own logit transform, applied first:
            ``z' = softcap * tanh(logit_scale * z / softcap)`` (``logit_scale * z`` without
            ``softcap``), e.g. Gemma 2's ``final_logit_softcapping``; the gradient is chained through it.
        student_temperature: divides ``z'`` in the divergence term only (the gold CE uses ``z'``).
        hinton_scale: multiply the divergence term by ``student_temperature ** 2``.
        inplace_grad: write the gradient into ``target_logits``'s buffer (during the forward;
            for float16 during the backward) -- saves ``N * V`` elements of memory. The logits are
            *consumed* and marked dirty: autograd raises its version-counter error if a node saved
            them (e.g. ``torch.tanh`` producing them) or if they are a leaf; do not read them
            after the call. Only when ``target_logits`` requires grad.
        impl: ``"auto"`` (Triton on CUDA, or on CPU when ``TRITON_INTERPRET=1``; otherwise the
            chunked torch path), ``"triton"`` or ``"reference"`` (chunked sparse torch path).
        validate: run the data-dependent checks (id ranges, negative weights, NaN logprobs,
            label range). They cost a few reductions over the small index tensors
            (``O(S*B*Ts*K + S*Vs + S*B*T)``, plus ``min``/``max`` of the labels) and **one**
            host sync. Shape/dtype/device checks are always done (free). A kept row whose
            logits are all -inf is refused too (``ValueError`` naming the row; found from the
            labels' logits, no pass over the logits); with ``validate=False`` such a row's loss is
            NaN (so is a mean or sum over it) and its gradient NaN. With
            ``validate=False`` bad ids may give a meaningless loss but never touch memory outside
            their own row: every indirect access is masked by its full range.
        process_group, vocab_start: tensor parallelism (README "Tensor parallelism"): with a
            ``torch.distributed`` group, ``target_logits`` is this rank's vocabulary shard
            ``[B, T, V_r]`` holding target ids ``[vocab_start, vocab_start + V_r)`` (default: the
            shards contiguous in group-rank order); a DTensor sharded on its last dim needs neither.
            ``V = sum V_r``; labels, teacher and every other argument are the same on every rank,
            and the returned loss (the whole vocabulary's) too. ``fastfuse.loss.parallel.losses``.

    The gradient flows to ``target_logits`` only. For float32/bfloat16 it is computed in the
    forward pass (one read of the logits for the log-sum-exp, a second, L2-friendly, one for the
    gradient write) and the backward multiplies it by ``grad_output`` on the device; for float16
    the forward only computes the loss (one read) and the backward the gradient with
    ``scale * grad_output`` applied in fp32 before the single rounding, as torch's cross-entropy
    under autocast does -- so a GradScaler's ``2**16`` cannot meet an already underflowed
    ``softmax / #tokens``. The gradient is stored in the logits dtype (or in the logits buffer with
    ``inplace_grad``). The loss is float32 whatever the logits dtype (float64
    for float64 logits, which run on the torch path). ``backward`` may run once.

    Costs and syncs. Extra memory: the gradient (``N * V`` elements of the logits dtype, none
    with ``inplace_grad``) plus ``O(N * S * K)`` for the sparse teacher; never a dense teacher
    or an fp32 copy of the logits. Neither forward (with ``validate=False``) nor backward has a
    host sync: ``scale`` and ``grad_output`` are read by the kernels. float32/bfloat16: a
    ``grad_output`` of exactly 1 (the usual ``loss.backward()``) costs nothing more (the rescale
    kernel returns at once); any other (``loss / accumulation_steps``, ``"none"``) one
    memory-bound rescale of the gradient. float16: one more read of the logits than the
    forward-gradient path, but never a separate rescale. On CPU without ``TRITON_INTERPRET=1`` the torch path works on chunks of about
    4M logits at a time (float32 softmax of the chunk), so memory stays ``O(N * V)`` only for
    the gradient itself.
    """
    if process_group is not None or vocab_start is not None or is_dtensor(target_logits):
        return vocab_parallel_loss(target_logits, source_topk, align_map, labels, source_weights, lm_weight,
                                   temperature, ignore_index, reduction,
                                   dict(divergence=divergence, tail=tail, alpha=alpha, beta=beta, logit_scale=logit_scale,
                                        softcap=softcap, student_temperature=student_temperature,
                                        hinton_scale=hinton_scale), inplace_grad, impl, validate, process_group,
                                   vocab_start)
    if not isinstance(target_logits, Tensor):
        raise TypeError(f"target_logits must be a torch.Tensor, got {type(target_logits).__name__}")
    if target_logits.dtype not in ALL_FLOATS:
        raise TypeError(f"target_logits must be float32, bfloat16 or float16 (float64 on the torch path), "
                        f"got {target_logits.dtype}")
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
    spec = make_spec(divergence, tail, alpha, beta, logit_scale, softcap, student_temperature, hinton_scale)
    ids, logprobs, pos, vocab, labels, source_weights = check_teacher_args(
        target_logits.shape[:-1], V, dev, source_topk, align_map, labels, source_weights, lm_weight, temperature,
        ignore_index, reduction, impl, validate, tail_mass=spec.uses_tail_mass, logits=target_logits)
    lm_weight, temperature = float(lm_weight), float(temperature)
    if squeeze:
        target_logits = target_logits.unsqueeze(0)
    B, T, _ = target_logits.shape
    S = ids.shape[0]

    use_triton = float64_path(impl, target_logits.dtype, dev, "target_logits")
    N = B * T
    acc = accumulator_dtype(target_logits.dtype)
    weights = _ref.normalize_weights(source_weights, S, B, T, dev, acc).reshape(S, N)
    target = build_target(use_triton, spec, ids, logprobs, pos, vocab, labels, weights, lm_weight, temperature,
                          ignore_index, V, acc)
    ignored = (labels == ignore_index).reshape(N)
    if reduction == "mean":         # a device scalar: no host sync
        scale = (1.0 / ignored.logical_not().sum().clamp_min(1).to(acc)).reshape(1)
    else:
        scale = torch.ones(1, dtype=acc, device=dev)
    inplace = bool(inplace_grad) and target_logits.requires_grad and torch.is_grad_enabled()
    if inplace:
        target_logits = Consume.apply(target_logits)
    loss = _FusedLoss.apply(target_logits, target.tids, target.coefs, target.tail, labels.reshape(N), ignored, scale,
                            int(ignore_index), reduction, inplace, use_triton, spec, lm_weight)
    if squeeze and reduction == "none":
        loss = loss.squeeze(0)
    return loss


