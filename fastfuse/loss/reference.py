"""The dense float64 reference of the fusion loss, for tests only.

:func:`fused_loss_reference` builds the fused teacher ``q`` as a ``[B, T, V]`` tensor with
``scatter_add`` (:func:`dense_teacher`) and evaluates
``lm_weight * CE(z', y) + (1 - lm_weight) * k * D(softmax(z' / tau), q)`` straight from the
definitions (:func:`divergence_dense`) with autograd. Simple, differentiable, usable in float64;
it is what the tests compare every fast path (Triton kernels, the sparse torch path
``fastfuse.loss.torch_path``, the vocabulary-parallel rows) against. Memory ``O(B*T*V)``: not for
training. The teacher semantics it implements are listed in ``fastfuse.loss.torch_path``; it shares
only the per-source alignment of the top-k entries (:func:`~fastfuse.loss.torch_path.aligned_entries`)
and the weight normalisation with that path.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastfuse.loss.torch_path import aligned_entries, normalize_weights, student_logits, teacher_tail_mass

__all__ = ["dense_teacher", "divergence_dense", "fused_loss_reference"]


def dense_teacher(source_topk, align_map, labels: Tensor, V: int,
                  source_weights: Optional[Tensor] = None, temperature: float = 1.0,
                  ignore_index: int = -100, dtype: torch.dtype = torch.float64, tail: bool = False) -> Tensor:
    """The fused teacher ``q`` as a dense ``[B, T, V]`` tensor (rows of ignored tokens are 0). With
    ``tail`` its kept entries are the sources' probabilities with their missing mass kept out
    (``q`` then sums to ``1 - R``, :func:`teacher_tail_mass`)."""
    S = source_topk.ids.shape[0]
    B, T = labels.shape
    device = labels.device
    tid, p, has, _ = aligned_entries(source_topk, align_map, temperature, dtype, V, tail)
    w = normalize_weights(source_weights, S, B, T, device, dtype)        # [S, B, T]
    ignored = labels == ignore_index
    lab = torch.where(ignored, torch.zeros_like(labels), labels).long()
    q = torch.zeros(B, T, V, dtype=dtype, device=device)
    for s in range(S):
        contrib = torch.where(tid[s] >= 0, p[s] * w[s][..., None], torch.zeros_like(p[s]))
        q.scatter_add_(2, tid[s].clamp_min(0), contrib)
        fallback = torch.where(has[s], torch.zeros_like(w[s]), w[s])    # one-hot on the label
        q.scatter_add_(2, lab[..., None], fallback[..., None])
    return q.masked_fill(ignored[..., None], 0.0)


def _xlogy_ratio(a: Tensor, b: Tensor) -> Tensor:
    """``sum a * log(a / b)`` over the last dim with ``0 log 0 = 0`` (autograd-safe where ``a = 0``)."""
    pos = a > 0
    safe_a = torch.where(pos, a, torch.ones_like(a))
    safe_b = torch.where(pos, b, torch.ones_like(b))
    return torch.where(pos, a * (safe_a.log() - safe_b.log()), torch.zeros_like(a)).sum(-1)


def divergence_dense(logp: Tensor, q: Tensor, R: Tensor, spec) -> Tensor:
    """``D(p, q)`` per row of the student log-probs ``logp [..., V]`` against the dense teacher
    ``q [..., V]`` with missing mass ``R [...]``, straight from the definitions (README
    "Divergences"). Tails: ``"renormalize"`` compares full distributions (``q`` sums to 1);
    ``"uniform"`` spreads ``R`` evenly over the ``V - |A|`` ids where ``q = 0`` (dropped when there
    are none); ``"bucket"`` adds one outcome, teacher ``R``, student the mass of those ids. Reverse
    KL compares the student renormalised over the teacher's support where the teacher has no mass
    anywhere else (always under ``"renormalize"``, and where ``R = 0`` otherwise)."""
    name, mix = spec.divergence, spec.mix
    inA = q > 0
    p = logp.exp()
    if spec.tail == "uniform":
        n_off = (~inA).sum(-1, keepdim=True)
        fill = torch.where(n_off > 0, R[..., None] / n_off.clamp_min(1), torch.zeros_like(R[..., None]))
        q = torch.where(inA, q, fill.expand_as(q))
    elif spec.tail == "bucket":
        p = torch.cat([torch.where(inA, p, torch.zeros_like(p)),
                       torch.where(inA, torch.zeros_like(p), p).sum(-1, keepdim=True)], -1)
        q = torch.cat([q, R[..., None]], -1)
        inA = torch.cat([inA, torch.zeros_like(inA[..., :1])], -1)
    if name == "reverse_kl":
        restrict = torch.ones_like(R, dtype=torch.bool) if spec.tail == "renormalize" else R == 0
        on_a = torch.where(inA, p, torch.zeros_like(p))
        p = torch.where(restrict[..., None], on_a / on_a.sum(-1, keepdim=True), p)
        return _xlogy_ratio(p, q)
    if name == "ce":
        safe_p = torch.where(q > 0, p, torch.ones_like(p))
        return torch.where(q > 0, -q * safe_p.log(), torch.zeros_like(q)).sum(-1)
    if name == "forward_kl":
        return _xlogy_ratio(q, p)
    if name == "jsd":
        m = mix * q + (1 - mix) * p
        return mix * _xlogy_ratio(q, m) + (1 - mix) * _xlogy_ratio(p, m)
    if name == "skew_kl":
        return _xlogy_ratio(q, mix * q + (1 - mix) * p)
    if name == "skew_reverse_kl":
        return _xlogy_ratio(p, mix * p + (1 - mix) * q)
    if name == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    raise NotImplementedError(f"divergence_dense: no formula for {name!r} (docs/DESIGN.md \"Adding a divergence\")")


def fused_loss_reference(target_logits: Tensor, source_topk, align_map, labels: Tensor,
                         source_weights: Optional[Tensor] = None, lm_weight: float = 0.9,
                         temperature: float = 1.0, ignore_index: int = -100,
                         reduction: str = "mean", **divergence) -> Tensor:
    """Dense reference of :func:`fastfuse.fused_loss` (``[B, T, V]`` logits, ``[B, T]`` labels).

    ``divergence``: the keywords of ``fused_loss`` (``divergence``, ``tail``, ``alpha``, ``beta``,
    ``logit_scale``, ``softcap``, ``student_temperature``, ``hinton_scale``). The row loss is
    ``lm_weight * CE(z', y) + (1 - lm_weight) * k * D(softmax(z' / tau), q)`` evaluated on dense
    ``[B, T, V]`` tensors (:func:`student_logits`, :func:`divergence_dense`). Computes in the dtype
    of ``target_logits`` (use float64 in tests); differentiable through plain autograd.
    """
    from fastfuse.loss.spec import make_spec
    spec = make_spec(**divergence)
    B, T, V = target_logits.shape
    dtype = target_logits.dtype
    q = dense_teacher(source_topk, align_map, labels, V, source_weights, temperature,
                      ignore_index, dtype, tail=spec.uses_tail_mass)
    R = torch.zeros(B, T, dtype=dtype, device=labels.device)
    if spec.uses_tail_mass:
        R = teacher_tail_mass(source_topk, align_map, labels, source_weights, temperature, V, dtype)
    ignored = labels == ignore_index
    lab = torch.where(ignored, torch.zeros_like(labels), labels).long()
    z = student_logits(target_logits, spec)
    ce_gold = -torch.log_softmax(z, dim=-1).gather(-1, lab[..., None]).squeeze(-1)
    if spec.is_default:     # the original formula, kept literally
        div = -(q * torch.log_softmax(z, dim=-1)).sum(-1)
    else:
        div = divergence_dense(torch.log_softmax(z / spec.student_temperature, dim=-1), q, R, spec)
    loss = lm_weight * ce_gold + (1.0 - lm_weight) * spec.div_weight * div
    loss = loss.masked_fill(ignored, 0.0)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / (~ignored).sum().clamp_min(1)
