"""The sparse torch path of the fusion loss: what ``impl="torch"`` runs (and ``impl="auto"`` off the
GPU without ``TRITON_INTERPRET=1``), and the teacher-side code every torch path shares.

The teacher is kept as ``S*K + 1`` (target id, coefficient) pairs per row and the loss/gradient are
computed over chunks of rows, so no ``[N, V]`` teacher and no full fp32 copy of the logits is ever
built. :func:`torch_sparse_teacher` + :func:`loss_and_grad_rows` run FuseLLM's default loss (the
same numbers as ``kernels/fused_ce.py``); :func:`teacher_rows` feeds the divergence rows
(``fastfuse.loss.torch_rows``). The dense float64 definition the tests compare these against is
``fastfuse.loss.reference.fused_loss_reference`` (for tests only).

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

This path masks every index by its full range like the kernels do (positions ``[0, Ts)``, source
ids ``[0, Vs)``, mapped ids and labels ``[0, V)``): bad ids with ``validate=False`` may give a
meaningless loss but never touch memory outside their own row (no out-of-range gather, no
device-side assert). Entries with coefficient 0 add nothing, even at a ``-inf`` logit.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from fastfuse.loss.checks import accumulator_dtype

__all__ = ["TAIL_EPS", "normalize_weights", "aligned_entries", "teacher_tail_mass", "student_logits",
           "torch_sparse_teacher", "merge_duplicates", "teacher_rows", "row_chunks", "row_outputs",
           "finish_grad_rows", "loss_and_grad_rows"]

# A source's missing mass below this is rounding of its stored log-softmax values (fp32: ~K * 6e-8),
# not mass: it counts as 0, so a teacher without a tail does not get a spurious one (whose
# reverse KL would jump from the support-restricted value towards P_o * log(P_o / R)).
TAIL_EPS = 1e-5


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


def aligned_entries(source_topk, align_map, temperature: float, dtype: torch.dtype,
                     V: Optional[int] = None, tail: bool = False) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per (source, token): mapped target ids ``[S, B, T, K]`` (-1 = dropped), teacher
    probabilities ``[S, B, T, K]`` (0 where dropped), ``has [S, B, T]`` (something survived) and the
    tail probability ``r [S, B, T]``. Without ``tail`` the survivors are renormalised (``r = 0``);
    with it the logprobs are log-probabilities and the source's missing mass
    ``1 - sum(exp(logprob))`` over its survivors is one more outcome of log-mass ``log r``, tempered
    with them: ``softmax([logprobs, log r] / temperature)``. A source without survivors: ``r = 0``;
    a missing mass under ``TAIL_EPS`` is the rounding of log-softmax values, not mass: 0 too."""
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
    if tail:
        kept = torch.where(valid, a_lp.exp(), torch.zeros_like(a_lp)).sum(-1, keepdim=True)
        missing = (1.0 - kept).clamp_min(0.0)
        missing = torch.where(missing < TAIL_EPS, torch.zeros_like(missing), missing)
        x = torch.cat([x, missing.log() / temperature], -1)
    m = x.amax(-1, keepdim=True)
    m = torch.where(has[..., None], m, torch.zeros_like(m))
    e = torch.exp(x - m)
    p = e / torch.where(has[..., None], e.sum(-1, keepdim=True), torch.ones_like(m))
    r = torch.where(has, p[..., K], torch.zeros_like(p[..., 0])) if tail else torch.zeros_like(p[..., 0])
    tid = torch.where(valid, tid, torch.full_like(tid, -1))
    return tid, p[..., :K], has, r


def teacher_tail_mass(source_topk, align_map, labels: Tensor, source_weights: Optional[Tensor] = None,
                      temperature: float = 1.0, V: Optional[int] = None,
                      dtype: torch.dtype = torch.float64) -> Tensor:
    """The fused teacher's missing mass ``R = sum_s w_s r_s`` ``[B, T]``: ``r_s`` is source s's
    tempered tail probability (:func:`aligned_entries` with ``tail``; 0 where it falls back)."""
    S = source_topk.ids.shape[0]
    B, T = labels.shape
    _, _, _, r = aligned_entries(source_topk, align_map, temperature, dtype, V, True)
    return (normalize_weights(source_weights, S, B, T, labels.device, dtype) * r).sum(0)


def student_logits(z: Tensor, spec) -> Tensor:
    """The student's transformed logits ``z' = softcap * tanh(logit_scale * z / softcap)`` (or
    ``logit_scale * z`` without a softcap)."""
    z = z * spec.logit_scale if spec.logit_scale != 1.0 else z
    return spec.softcap * torch.tanh(z / spec.softcap) if spec.softcap else z


def torch_sparse_teacher(source_topk, align_map, labels: Tensor, weights: Tensor,
                         lm_weight: float, temperature: float, ignore_index: int,
                         V: Optional[int] = None, tail: bool = False, dtype: torch.dtype = torch.float32
                         ) -> Tuple[Tensor, Tensor]:
    """The whole per-row target of the loss as ``S*K + 1`` sparse entries.

    Returns ``tids [N, S*K + 1]`` (int64, -1 = no entry) and ``coefs [N, S*K + 1]`` (``dtype``)
    such that the per-row loss is ``lse(z) - sum_e coefs[e] * z[tids[e]]`` and the gradient is
    ``softmax(z) - sum_e coefs[e] * one_hot(tids[e])``. Entry ``S*K`` is the label with
    coefficient ``lm_weight + (1 - lm_weight) * (weight of sources falling back to one-hot)``.
    Duplicate ids are *not* merged (sum them with ``scatter_add``). Ignored rows: all -1 / 0.
    ``weights`` is the normalised ``[S, B, T]`` (or ``[S, B*T]``) tensor from :func:`normalize_weights`.
    With ``V``, mapped ids and labels outside ``[0, V)`` are dropped (-1), never kept for a gather.
    With ``tail`` the kept entries carry the sources' probabilities with their missing mass kept out
    (see :func:`teacher_tail_mass`).
    """
    S, B, Ts, K = source_topk.ids.shape
    T = labels.shape[1]
    N = B * T
    tid, p, has, _ = aligned_entries(source_topk, align_map, temperature, dtype, V, tail)
    w = weights.to(dtype).reshape(S, B, T)
    coef = (1.0 - lm_weight) * p * w[..., None]                          # [S, B, T, K]
    label_coef = lm_weight + (1.0 - lm_weight) * torch.where(has, torch.zeros_like(w), w).sum(0)
    tids = torch.cat([tid.permute(1, 2, 0, 3).reshape(N, S * K), labels.reshape(N, 1).long()], 1)
    coefs = torch.cat([coef.permute(1, 2, 0, 3).reshape(N, S * K), label_coef.reshape(N, 1)], 1)
    ignored = (labels == ignore_index).reshape(N, 1)
    keep = (tids >= 0) & ~ignored & (True if V is None else tids < V)
    coefs = torch.where(keep, coefs, torch.zeros_like(coefs))
    tids = torch.where(keep, tids, torch.full_like(tids, -1))
    return tids, coefs


def merge_duplicates(tids: Tensor, coefs: Tensor) -> Tuple[Tensor, Tensor]:
    """Sum the coefficients of equal ids per row: ``tids/coefs [N, E]`` -> same shapes with unique
    ids (sorted; -1 entries and the emptied duplicates at coefficient 0)."""
    t, order = tids.long().sort(dim=1)
    c = coefs.gather(1, order)
    first = torch.ones_like(t, dtype=torch.bool)
    first[:, 1:] = t[:, 1:] != t[:, :-1]
    group = first.long().cumsum(1) - 1
    merged = torch.zeros_like(c).scatter_add_(1, group, torch.where(t >= 0, c, torch.zeros_like(c)))
    out_t = torch.full_like(t, -1).scatter_(1, group, t)
    keep = out_t >= 0
    return torch.where(keep, out_t, torch.full_like(out_t, -1)), torch.where(keep, merged, torch.zeros_like(merged))


def teacher_rows(source_topk, align_map, labels: Tensor, weights: Tensor, temperature: float,
                 ignore_index: int, V: int, tail: bool, dtype: torch.dtype = torch.float32
                 ) -> Tuple[Tensor, Tensor, Tensor]:
    """The fused teacher alone, for the divergence rows: unique ``tids [N, S*K + 1]`` (int64, -1 =
    none), their probabilities ``q [N, S*K + 1]`` (``dtype``; the label's fallback mass included)
    and the missing mass ``R [N]`` (0 without ``tail``). Ignored rows: all -1 / 0."""
    tids, q = merge_duplicates(*torch_sparse_teacher(source_topk, align_map, labels, weights, 0.0, temperature,
                                               ignore_index, V, tail, dtype))
    R = torch.zeros(labels.numel(), dtype=dtype, device=labels.device)
    if tail:
        _, _, _, r = aligned_entries(source_topk, align_map, temperature, dtype, V, True)
        R = (weights.to(dtype).reshape(r.shape) * r).sum(0).reshape(-1)
        R = torch.where(labels.reshape(-1) == ignore_index, torch.zeros_like(R), R)
    return tids, q, R


def row_chunks(B: int, T: int, step: int):
    """``(b, t0, t1, a, e)`` for chunks of at most ``step`` rows of ``[B, T, ...]`` logits, within one
    sequence each (``[T, V]`` views work for any strides, e.g. ``logits[:, :-1]``); ``[a, e)`` are
    the chunk's rows in the flattened ``B*T`` order."""
    for b in range(B):
        for t0 in range(0, T, step):
            t1 = min(T, t0 + step)
            yield b, t0, t1, b * T + t0, b * T + t1


def row_outputs(logits: Tensor, compute_grad: bool, inplace_grad: bool):
    """``(acc, loss [B*T], grad)`` of the torch row paths: the accumulator dtype, the per-row loss
    buffer in it, and the gradient buffer (``logits`` itself with ``inplace_grad``; None without
    ``compute_grad``)."""
    acc = accumulator_dtype(logits.dtype)
    loss = torch.empty(logits.shape[0] * logits.shape[1], dtype=acc, device=logits.device)
    grad = None
    if compute_grad:
        grad = logits if inplace_grad else torch.empty_like(logits, memory_format=torch.contiguous_format)
    return acc, loss, grad


def finish_grad_rows(g: Tensor, ignored_rows: Tensor, grad_scale: Optional[Tensor], a: int, e: int) -> Tensor:
    """Rows ``[a, e)`` of a gradient, in place: 0 on ``ignored_rows``, times ``grad_scale`` (None, one
    element, or one per row of the whole batch)."""
    g.masked_fill_(ignored_rows[:, None], 0.0)
    if grad_scale is not None:
        gs = grad_scale.reshape(-1).to(g.dtype)
        g.mul_(gs if gs.numel() == 1 else gs[a:e, None])
    return g


def loss_and_grad_rows(logits: Tensor, tids: Tensor, coefs: Tensor, ignored: Tensor,
                       grad_scale: Optional[Tensor], compute_grad: bool,
                       inplace_grad: bool = False, chunk_elems: int = 1 << 22
                       ) -> Tuple[Tensor, Optional[Tensor]]:
    """Per-row loss ``[N]`` (float32; float64 for float64 logits) and gradient ``[B, T, V]`` (logits
    dtype) in chunks of rows.

    ``logits [B, T, V]`` any float dtype; ``tids, coefs [N, E]`` from :func:`torch_sparse_teacher`;
    ``ignored [N]`` bool. The gradient is ``grad_scale * (softmax(z) - target)`` (``grad_scale``
    a float32 tensor of one element or one per row ``[N]``, or None for 1), rounded once to the
    logits dtype. Works in float32 (float64 for float64 logits) over chunks of about
    ``chunk_elems`` elements. With ``inplace_grad`` the gradient overwrites ``logits``. Target ids
    outside ``[0, V)`` and entries with coefficient 0 are skipped (no gather, no ``0 * -inf``).
    """
    B, T, V = logits.shape
    acc, loss, grad = row_outputs(logits, compute_grad, inplace_grad)
    for b, t0, t1, a, e in row_chunks(B, T, max(1, chunk_elems // max(V, 1))):
        z = logits[b, t0:t1].to(acc)
        ok = (tids[a:e] >= 0) & (tids[a:e] < V)
        tid = torch.where(ok, tids[a:e], torch.zeros_like(tids[a:e])).long()
        c = torch.where(ok, coefs[a:e].to(acc), torch.zeros((), dtype=acc, device=z.device))
        ign = ignored[a:e]
        lse = torch.logsumexp(z, dim=-1)
        zl = torch.where(c != 0, c * z.gather(1, tid), torch.zeros_like(c)).sum(1)
        loss[a:e] = torch.where(ign, torch.zeros_like(lse), lse - zl)
        if compute_grad:
            g = torch.softmax(z, dim=-1)
            g.scatter_add_(1, tid, -c)
            grad[b, t0:t1] = finish_grad_rows(g, ign, grad_scale, a, e).to(logits.dtype)
    return loss, grad
