"""Test and benchmark helpers shared by ``tests/`` and ``benchmarks/`` (no pytest needed): random
inputs of the fusion loss and the tolerances every fast path must meet against the float64
reference (``fastfuse.loss.reference``)."""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["random_inputs", "tolerance", "LINEAR_REL_TOL"]

# Agreement of the fast paths with the float64 reference, per logits dtype (the one table the
# tests and the GPU benchmarks share; kept here, not in tests/, so that benchmarks need no pytest):
# (rtol, atol) of a per-token loss, and (rtol, atol) of one gradient entry of a per-token loss with
# unit grad_output (softmax entries are <= 1, rounded once to the dtype: rtol a few of its ulps).
_TOL = {torch.float32: ((1e-5, 1e-6), (5e-5, 1e-6)), torch.bfloat16: ((2e-2, 1.6e-2), (1e-2, 1.6e-2)),
        torch.float16: ((2e-3, 2e-3), (2e-3, 2e-3)), torch.float64: ((1e-9, 1e-12), (1e-9, 1e-12))}
# fused_linear_loss: relative (norm) errors of loss and gradients (the matmuls round in the input dtype)
LINEAR_REL_TOL = {torch.float32: 2e-4, torch.bfloat16: 2e-2, torch.float16: 4e-3, torch.float64: 1e-9}


def tolerance(dtype: torch.dtype, reduction: str = "sum", n_tokens: int = 1, grad_output: float = 1.0,
              logit_max: float = 0.0) -> dict:
    """``dict(loss=dict(rtol, atol), grad=dict(rtol, atol))`` for ``torch.testing.assert_close`` of a
    fast path against the float64 reference with ``dtype`` logits. The gradient tolerance is of
    the gradient actually compared: times ``|grad_output|`` (its largest entry for ``"none"``) and
    divided by ``n_tokens`` (the non-ignored tokens) for ``"mean"`` -- an absolute tolerance made
    for per-token gradients would be vacuous for a mean over thousands of tokens. Logits as large as
    ``logit_max`` shift the fp32 log-sum-exp by ~``logit_max * 2**-23`` (a relative error of every
    softmax entry): beyond 100 the gradient tolerance grows with them. The loss atol is scaled by
    the caller with the loss magnitude where it matters."""
    (lr, la), (gr, ga) = _TOL[dtype]
    g = ga * abs(float(grad_output)) / (max(int(n_tokens), 1) if reduction == "mean" else 1)
    g *= max(1.0, float(logit_max) / 100)
    return dict(loss=dict(rtol=lr, atol=la), grad=dict(rtol=gr, atol=g))


def random_inputs(B: int = 2, T: int = 5, V: int = 300, S: int = 3, K: int = 10, Ts: int = 7,
                  Vs: int = 400, *, dtype: torch.dtype = torch.float32, device="cpu",
                  logit_scale: float = 3.0, p_unaligned: float = 0.2, p_pad: float = 0.1,
                  p_unmapped: float = 0.1, p_ignore: float = 0.1, map_range: Optional[int] = None,
                  weights: Optional[str] = "token", generator: Optional[torch.Generator] = None,
                  missing_mass: float = 0.0, p_neginf: float = 0.0):
    """Random inputs of :func:`fastfuse.fused_loss` for tests and benchmarks.

    Returns ``dict(target_logits, source_topk=(ids, logprobs), align_map=(pos, vocab), labels,
    source_weights)`` with plain tuples (wrap them in ``SourceTopK`` / ``AlignMap``). Source ids
    are padded (-1) with probability ``p_pad``, positions unaligned with ``p_unaligned``, source
    vocabulary entries unmapped with ``p_unmapped``, labels ignored with ``p_ignore``. With
    ``map_range`` the vocabulary maps into ``[0, map_range)`` only, which makes duplicate target
    ids frequent. ``weights``: ``None``, ``"seq"`` ([S, B]) or ``"token"`` ([S, B, T]). The
    logprobs are log-softmax values over ``K`` times a kept mass drawn in ``[1 - missing_mass, 1]``
    per source position (so a ``"uniform"``/``"bucket"`` tail has mass to model); with
    ``p_neginf`` that share of them is ``-inf``.
    """
    g = generator
    dev = torch.device(device)

    def rand(*shape):
        return torch.rand(*shape, generator=g).to(dev)

    z = (torch.randn(B, T, V, generator=g) * logit_scale).to(device=dev, dtype=dtype)
    ids = torch.randint(0, Vs, (S, B, Ts, K), generator=g).to(dev)
    ids = torch.where(rand(S, B, Ts, K) < p_pad, torch.full_like(ids, -1), ids).to(torch.int32)
    lp = torch.log_softmax(torch.randn(S, B, Ts, K, generator=g) * 2, -1)
    if missing_mass:
        lp = lp + torch.log1p(-missing_mass * torch.rand(S, B, Ts, 1, generator=g))
    if p_neginf:
        lp = torch.where(torch.rand(S, B, Ts, K, generator=g) < p_neginf, torch.full_like(lp, float("-inf")), lp)
    lp = lp.to(dev)
    pos = torch.randint(0, Ts, (S, B, T), generator=g).to(dev)
    pos = torch.where(rand(S, B, T) < p_unaligned, torch.full_like(pos, -1), pos).to(torch.int32)
    hi = V if map_range is None else min(V, map_range)
    vocab = torch.randint(0, hi, (S, Vs), generator=g).to(dev)
    vocab = torch.where(rand(S, Vs) < p_unmapped, torch.full_like(vocab, -1), vocab).to(torch.int32)
    labels = torch.randint(0, V, (B, T), generator=g).to(dev)
    labels = torch.where(rand(B, T) < p_ignore, torch.full_like(labels, -100), labels)
    w = None
    if weights == "seq":
        w = rand(S, B)
    elif weights == "token":
        w = rand(S, B, T)
    return dict(target_logits=z, source_topk=(ids, lp), align_map=(pos, vocab), labels=labels,
                source_weights=w)
