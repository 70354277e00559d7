"""Public entry point of the fused knowledge-fusion loss from logits: validation and dispatch.

The math lives in ``fastfuse.loss.torch_path`` / ``fastfuse.loss.torch_rows`` (pure torch) and
``fastfuse.kernels`` (Triton); this module only checks inputs, prepares the rows
(``fastfuse.loss.row_runner``) and hands them to the autograd Function (``fastfuse.loss.autograd``),
or to the vocabulary-parallel path (``fastfuse.loss.parallel``).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastfuse.batch import AlignMap, SourceTopK
from fastfuse.loss.autograd import FusedLogitsLoss
from fastfuse.loss.checks import (LossArgs, accumulator_dtype, check_logits, check_loss_args, float64_path, loss_options,
                                  resolve_impl)
from fastfuse.loss.row_runner import LocalRows, prepare_rows
from fastfuse.loss.parallel.losses import vocab_parallel_loss
from fastfuse.loss.parallel.layout import is_dtensor

__all__ = ["fused_loss"]


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
            *consumed* and autograd is told of the write: its version-counter error is raised if a
            node saved them (e.g. ``torch.tanh`` producing them); a leaf (or a view of one) is
            refused (``ValueError``); do not read them after the call. Only when
            ``target_logits`` requires grad.
        impl: ``"auto"`` (Triton on CUDA, or on CPU when ``TRITON_INTERPRET=1``; otherwise the
            chunked torch path), ``"triton"`` or ``"torch"`` (the chunked sparse torch path,
            ``fastfuse.loss.torch_path``; ``"reference"``, its old name, is accepted for one more
            release with a ``DeprecationWarning``).
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
    args = LossArgs(source_topk, align_map, labels, source_weights, lm_weight, temperature, ignore_index, reduction,
                    loss_options(locals()), resolve_impl(impl), validate)
    if process_group is not None or vocab_start is not None or is_dtensor(target_logits):
        return vocab_parallel_loss(target_logits, args, inplace_grad, process_group, vocab_start)
    check_logits(target_logits)
    V, dev = target_logits.shape[-1], target_logits.device
    spec, teacher = check_loss_args(target_logits.shape[:-1], V, dev, args, logits=target_logits)
    squeeze = target_logits.dim() == 2
    if squeeze:
        target_logits = target_logits.unsqueeze(0)
    use_triton = float64_path(args.impl, target_logits.dtype, dev, "target_logits")
    acc = accumulator_dtype(target_logits.dtype)
    runner = LocalRows(prepare_rows(use_triton, spec, teacher, args, V, acc), use_triton, spec, float(lm_weight),
                       ignore_index)
    inplace = bool(inplace_grad) and target_logits.requires_grad and torch.is_grad_enabled()
    loss = FusedLogitsLoss.apply(target_logits, runner, reduction, inplace)
    if squeeze and reduction == "none":
        loss = loss.squeeze(0)
    return loss
