"""Pure-torch implementations of the fused knowledge-fusion loss.

Two implementations of the semantics of :func:`fastfuse.fused_loss` (see its docstring and
DESIGN.md §1), both without Triton:

* :func:`fused_loss_reference` -- the *dense* reference: builds the fused teacher ``q`` as a
  ``[B, T, V]`` tensor with ``scatter_add`` and evaluates
  ``lm_weight * CE(z, y) + (1 - lm_weight) * CE(z, q)`` with autograd. Simple, differentiable,
  usable in float64; it is what the tests compare every fast path against. Memory ``O(B*T*V)``.
* :func:`sparse_teacher` + :func:`loss_and_grad_rows` -- the *sparse* torch path that
  ``fused_loss`` uses on CPU without Triton: the teacher is kept as ``S*K + 1`` (target id,
  coefficient) pairs per row and the loss/gradient are computed over chunks of rows, so no
  ``[N, V]`` teacher and no full fp32 copy of the logits is ever built.

Both take ``source_topk`` / ``align_map`` as any objects with ``.ids, .logprobs`` /
``.pos, .vocab`` attributes (``fastfuse.SourceTopK`` / ``fastfuse.AlignMap``) and expect
already-validated inputs in the 3-d layout (``[B, T, V]`` logits).

Semantics shared by all implementations (the spec):

* for source ``s`` at target position ``(b, t)`` with ``j = pos[s, b, t] >= 0`` the entries of
  row ``(s, b, j)`` survive when ``id != -1``, ``vocab[s, id] != -1`` and the logprob is not
  ``-inf``; the teacher is ``softmax(logprobs / temperature)`` over the survivors, mapped to
  target ids (duplicate target ids summed);
* if ``j == -1`` or nothing survives, the teacher of that source is one-hot on the label;
* weights are normalised over ``S`` per token; a token whose weights are all zero gets uniform
  weights ``1 / S``;
* positions with ``label == ignore_index`` contribute zero loss and zero gradient; ``"mean"``
  divides by the number of non-ignored tokens (0 when every token is ignored, not NaN).

The sparse torch path masks every index by its full range like the kernels do (positions
``[0, Ts)``, source ids ``[0, Vs)``, mapped ids and labels ``[0, V)``): bad ids with
``validate=False`` may give a meaningless loss but never touch memory outside their own row (no
out-of-range gather, no device-side assert). Entries with coefficient 0 add nothing, even at a
``-inf`` logit.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = [
    "normalize_weights",
    "dense_teacher",
    "fused_loss_reference",
    "sparse_teacher",
    "loss_and_grad_rows",
    "random_inputs",
    "tolerance",
    "LINEAR_REL_TOL",
]

# Agreement of the fast paths with the float64 reference, per logits dtype (the one table the
# tests and the GPU benchmarks share; kept here, not in tests/, so that benchmarks need no pytest):
# (rtol, atol) of a per-token loss, and (rtol, atol) of one gradient entry of a per-token loss with
# unit grad_output (softmax entries are <= 1, rounded once to the dtype: rtol a few of its ulps).
_TOL = {torch.float32: ((1e-5, 1e-6), (5e-5, 1e-6)), torch.bfloat16: ((2e-2, 1.6e-2), (1e-2, 1.6e-2)),
        torch.float16: ((2e-3, 2e-3), (2e-3, 2e-3))}
# fused_linear_loss: relative (norm) errors of loss and gradients (the matmuls round in the input dtype)
LINEAR_REL_TOL = {torch.float32: 2e-4, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def normalize_weights(source_weights: Optional[Tensor], S: int, B: int, T: int,
                      device: torch.device, dtype: torch.dtype = torch.float32) -> Tensor:
    """Per-token source weights ``[S, B, T]`` normalised to sum 1 over ``S``.

    ``source_weights`` is ``None`` (uniform), ``[S, B]`` (per sequence) or ``[S, B, T]``
    (per token), all ``>= 0``. Where every weight of a token is 0 the weights become ``1 / S``.
    """
    if source_weights is None:
        return torch.full((S, B, T), 1.0 / S, device=device, dtype=dtype)
    w = source_weights.to(device=device, dtype=dtype)
    if w.dim() == 2:
        w = w[:, :, None].expand(S, B, T)
    total = w.sum(0, keepdim=True)
    uniform = torch.full_like(w, 1.0 / S)
    return torch.where(total > 0, w / torch.where(total > 0, total, torch.ones_like(total)),
                       uniform)


def _aligned_entries(source_topk, align_map, temperature: float, dtype: torch.dtype,
                     V: Optional[int] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """Per (source, token): mapped target ids ``[S, B, T, K]`` (-1 = dropped), teacher
    probabilities ``[S, B, T, K]`` (0 where dropped) and ``has [S, B, T]`` (something survived)."""
    ids, lp = source_topk.ids, source_topk.logprobs
    pos, vocab = align_map.pos, align_map.vocab
    S, B, Ts, K = ids.shape
    Vs = vocab.shape[1]
    T = pos.shape[2]
    aligned = (pos >= 0) & (pos < Ts)                                    # [S, B, T]
    j = torch.where(aligned, pos, torch.zeros_like(pos)).long()
    idx = j[..., None].expand(S, B, T, K)
    a_ids = torch.gather(ids.long(), 2, idx)                             # [S, B, T, K]
    a_lp = torch.gather(lp, 2, idx).to(dtype)
    s_idx = torch.arange(S, device=ids.device)[:, None, None, None]
    id_ok = (a_ids >= 0) & (a_ids < Vs)
    tid = vocab.long()[s_idx, torch.where(id_ok, a_ids, torch.zeros_like(a_ids))]   # [S, B, T, K]
    tid_ok = (tid >= 0) if V is None else (tid >= 0) & (tid < V)
    valid = aligned[..., None] & id_ok & tid_ok & (a_lp > float("-inf"))
    x = torch.where(valid, a_lp / temperature, torch.full_like(a_lp, float("-inf")))
    has = valid.any(-1)
    m = x.amax(-1, keepdim=True)
    m = torch.where(has[..., None], m, torch.zeros_like(m))
    e = torch.exp(x - m)
    p = e / torch.where(has[..., None], e.sum(-1, keepdim=True), torch.ones_like(m))
    tid = torch.where(valid, tid, torch.full_like(tid, -1))
    return tid, p, has


def dense_teacher(source_topk, align_map, labels: Tensor, V: int,
                  source_weights: Optional[Tensor] = None, temperature: float = 1.0,
                  ignore_index: int = -100, dtype: torch.dtype = torch.float64) -> Tensor:
    """The fused teacher ``q`` as a dense ``[B, T, V]`` tensor (rows of ignored tokens are 0)."""
    S = source_topk.ids.shape[0]
    B, T = labels.shape
    device = labels.device
    tid, p, has = _aligned_entries(source_topk, align_map, temperature, dtype, V)
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


def fused_loss_reference(target_logits: Tensor, source_topk, align_map, labels: Tensor,
                         source_weights: Optional[Tensor] = None, lm_weight: float = 0.9,
                         temperature: float = 1.0, ignore_index: int = -100,
                         reduction: str = "mean") -> Tensor:
    """Dense reference of :func:`fastfuse.fused_loss` (``[B, T, V]`` logits, ``[B, T]`` labels).

    Computes in the dtype of ``target_logits`` (use float64 in tests); differentiable with
    respect to ``target_logits`` through plain autograd.
    """
    B, T, V = target_logits.shape
    dtype = target_logits.dtype
    q = dense_teacher(source_topk, align_map, labels, V, source_weights, temperature,
                      ignore_index, dtype)
    ignored = labels == ignore_index
    lab = torch.where(ignored, torch.zeros_like(labels), labels).long()
    logp = torch.log_softmax(target_logits, dim=-1)
    ce_gold = -logp.gather(-1, lab[..., None]).squeeze(-1)
    ce_teacher = -(q * logp).sum(-1)
    loss = lm_weight * ce_gold + (1.0 - lm_weight) * ce_teacher
    loss = loss.masked_fill(ignored, 0.0)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / (~ignored).sum().clamp_min(1)


def sparse_teacher(source_topk, align_map, labels: Tensor, weights: Tensor,
                   lm_weight: float, temperature: float, ignore_index: int,
                   V: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """The whole per-row target of the loss as ``S*K + 1`` sparse entries.

    Returns ``tids [N, S*K + 1]`` (int64, -1 = no entry) and ``coefs [N, S*K + 1]`` (float32)
    such that the per-row loss is ``lse(z) - sum_e coefs[e] * z[tids[e]]`` and the gradient is
    ``softmax(z) - sum_e coefs[e] * one_hot(tids[e])``. Entry ``S*K`` is the label with
    coefficient ``lm_weight + (1 - lm_weight) * (weight of sources falling back to one-hot)``.
    Duplicate ids are *not* merged (sum them with ``scatter_add``). Ignored rows: all -1 / 0.
    ``weights`` is the normalised ``[S, B, T]`` (or ``[S, B*T]``) tensor from :func:`normalize_weights`.
    With ``V``, mapped ids and labels outside ``[0, V)`` are dropped (-1), never kept for a gather.
    """
    S, B, Ts, K = source_topk.ids.shape
    T = labels.shape[1]
    N = B * T
    tid, p, has = _aligned_entries(source_topk, align_map, temperature, torch.float32, V)
    w = weights.to(torch.float32).reshape(S, B, T)
    coef = (1.0 - lm_weight) * p * w[..., None]                          # [S, B, T, K]
    label_coef = lm_weight + (1.0 - lm_weight) * torch.where(has, torch.zeros_like(w), w).sum(0)
    tids = torch.cat([tid.permute(1, 2, 0, 3).reshape(N, S * K), labels.reshape(N, 1).long()], 1)
    coefs = torch.cat([coef.permute(1, 2, 0, 3).reshape(N, S * K), label_coef.reshape(N, 1)], 1)
    ignored = (labels == ignore_index).reshape(N, 1)
    keep = (tids >= 0) & ~ignored & (True if V is None else tids < V)
    coefs = torch.where(keep, coefs, torch.zeros_like(coefs))
    tids = torch.where(keep, tids, torch.full_like(tids, -1))
    return tids, coefs


def loss_and_grad_rows(logits: Tensor, tids: Tensor, coefs: Tensor, ignored: Tensor,
                       grad_scale: Optional[Tensor], compute_grad: bool,
                       inplace_grad: bool = False, chunk_elems: int = 1 << 22
                       ) -> Tuple[Tensor, Optional[Tensor]]:
    """Per-row loss ``[N]`` (float32) and gradient ``[B, T, V]`` (logits dtype) in chunks of rows.

    ``logits [B, T, V]`` any float dtype; ``tids, coefs [N, E]`` from :func:`sparse_teacher`;
    ``ignored [N]`` bool. The gradient is ``grad_scale * (softmax(z) - target)`` (``grad_scale``
    a float32 tensor of one element or one per row ``[N]``, or None for 1), rounded once to the
    logits dtype. Works in float32 (float64 for float64 logits) over chunks of about
    ``chunk_elems`` elements. With ``inplace_grad`` the gradient overwrites ``logits``. Target ids
    outside ``[0, V)`` and entries with coefficient 0 are skipped (no gather, no ``0 * -inf``).
    """
    B, T, V = logits.shape
    N = B * T
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    loss = torch.empty(N, dtype=torch.float32, device=logits.device)
    grad = None
    if compute_grad:
        grad = logits if inplace_grad else torch.empty_like(logits, memory_format=torch.contiguous_format)
    step = max(1, chunk_elems // max(V, 1))
    for b in range(B):                      # [T, V] views work for any strides (e.g. logits[:, :-1])
        for t0 in range(0, T, step):
            t1 = min(T, t0 + step)
            a, e = b * T + t0, b * T + t1
            z = logits[b, t0:t1].to(acc)
            ok = (tids[a:e] >= 0) & (tids[a:e] < V)
            tid = torch.where(ok, tids[a:e], torch.zeros_like(tids[a:e])).long()
            c = torch.where(ok, coefs[a:e].to(acc), torch.zeros((), dtype=acc, device=z.device))
            ign = ignored[a:e]
            lse = torch.logsumexp(z, dim=-1)
            zl = torch.where(c != 0, c * z.gather(1, tid), torch.zeros_like(c)).sum(1)
            loss[a:e] = torch.where(ign, torch.zeros_like(lse), lse - zl).float()
            if compute_grad:
                g = torch.softmax(z, dim=-1)
                g.scatter_add_(1, tid, -c)
                g.masked_fill_(ign[:, None], 0.0)
                if grad_scale is not None:
                    gs = grad_scale.reshape(-1).to(acc)
                    g.mul_(gs if gs.numel() == 1 else gs[a:e, None])
                grad[b, t0:t1] = g.to(logits.dtype)
    return loss, grad


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
                  weights: Optional[str] = "token", generator: Optional[torch.Generator] = None):
    """Random inputs of :func:`fastfuse.fused_loss` for tests and benchmarks.

    Returns ``dict(target_logits, source_topk=(ids, logprobs), align_map=(pos, vocab), labels,
    source_weights)`` with plain tuples (wrap them in ``SourceTopK`` / ``AlignMap``). Source ids
    are padded (-1) with probability ``p_pad``, positions unaligned with ``p_unaligned``, source
    vocabulary entries unmapped with ``p_unmapped``, labels ignored with ``p_ignore``. With
    ``map_range`` the vocabulary maps into ``[0, map_range)`` only, which makes duplicate target
    ids frequent. ``weights``: ``None``, ``"seq"`` ([S, B]) or ``"token"`` ([S, B, T]).
    """
    g = generator
    dev = torch.device(device)

    def rand(*shape):
        return torch.rand(*shape, generator=g).to(dev)

    z = (torch.randn(B, T, V, generator=g) * logit_scale).to(device=dev, dtype=dtype)
    ids = torch.randint(0, Vs, (S, B, Ts, K), generator=g).to(dev)
    ids = torch.where(rand(S, B, Ts, K) < p_pad, torch.full_like(ids, -1), ids).to(torch.int32)
    lp = torch.log_softmax(torch.randn(S, B, Ts, K, generator=g) * 2, -1).to(dev)
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
