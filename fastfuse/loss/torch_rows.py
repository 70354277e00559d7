"""Loss and gradient rows of every divergence x tail x student transform, in torch, in stages.

The row math that ``kernels/divergence.py`` runs in one program per row, written as stages over
a *slice* of the vocabulary so that the vocabulary-parallel loss can run it on each rank's shard
and combine the stages' small per-row outputs with collectives (one process: one slice, nothing to
combine). For a row with raw logits ``z``, transformed ``z'`` (:func:`fastfuse.loss.torch_path.student_logits`),
``u = z' / tau``, ``p = softmax(u)``, the teacher's unique sparse entries ``(tid_e, q_e)`` (its
set ``A`` is where ``q_e > 0``) and missing mass ``R``:

1. :func:`local_stats` -- per-row statistics of the slice: ``lse(z')``, ``lse(u)``, and what the
   tail needs (``sum u``, ``sum p u``); combined over slices by :func:`combine_stats`;
2. :func:`gather_sparse` -- ``z'`` at the teacher ids and at the label that the slice owns (-inf
   elsewhere; combined by a max);
3. :func:`row_terms` -- everything else from those: the divergence ``D``, the constant ``c =
   <p, dD/dp>`` and the off-``A`` gradient coefficient. Each divergence is a sum over outcomes of
   ``F(p, q)``; its gradient w.r.t. ``u`` is ``G(p_v, q_v) - p_v * c`` with ``G = p * dF/dp``
   (:func:`terms`). Off ``A`` the teacher is 0 (``"renormalize"``), the bucket outcome
   (``"bucket"``: every such id gets ``p_v * dF/dp(P_o, R)``), or ``R / (V - |A|)``
   (``"uniform"``: a per-element term; JSD, skew KLs and TVD then need the row sums of ``F`` and
   ``G`` over the vocabulary, :func:`tail_sums`, one more pass);
4. :func:`grad_slice` -- the gradient of the slice, the sparse entries overwritten exactly.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from fastfuse.loss.torch_path import finish_grad_rows, row_chunks, row_outputs, student_logits

__all__ = ["terms", "teacher_ids", "local_stats", "combine_stats", "gather_sparse", "row_terms",
           "tail_sums", "finish_terms", "grad_slice", "torch_divergence_rows"]

_NEG_INF = float("-inf")


def _log(x: Tensor) -> Tensor:
    """``log x`` with ``log 0 = -inf`` and no warning-prone negative inputs."""
    return torch.where(x > 0, x, torch.ones_like(x)).log().masked_fill(x <= 0, _NEG_INF)


def terms(spec, p: Tensor, logp: Tensor, q: Tensor) -> Tuple[Tensor, Tensor]:
    """Elementwise ``F(p, q)`` (the outcome's share of ``D``) and ``G = p * dF/dp`` with
    ``0 log 0 = 0``; ``p = exp(logp)``. Finite wherever ``D`` is (``q > 0`` where reverse KL's
    ``p > 0``)."""
    zero = torch.zeros_like(p)
    qpos, ppos = q > 0, p > 0
    logq = _log(q)
    div, mix = spec.divergence, spec.mix
    if spec.entry.closed_form == "cross_entropy":            # ce, forward_kl
        F = torch.where(qpos, -q * logp, zero)
        if div == "forward_kl":
            F = F + torch.where(qpos, q * logq, zero)
        return F, -q
    if div == "reverse_kl":
        F = torch.where(ppos, p * (logp - logq), zero)
        return F, torch.where(ppos, F + p, zero)
    if div == "tvd":
        return 0.5 * (p - q).abs(), 0.5 * p * torch.sign(p - q)
    a, b = math.log(mix), math.log1p(-mix)
    if div == "jsd":            # m = beta q + (1 - beta) p
        logm = torch.logaddexp(a + logq, b + logp)
        kp = torch.where(ppos, p * (logp - logm), zero)
        return mix * torch.where(qpos, q * (logq - logm), zero) + (1 - mix) * kp, (1 - mix) * kp
    if div == "skew_kl":        # KL(q || alpha q + (1 - alpha) p)
        logm = torch.logaddexp(a + logq, b + logp)
        F = torch.where(qpos, q * (logq - logm), zero)
        return F, torch.where(qpos & ppos, -(1 - mix) * q * torch.exp(logp - logm), zero)
    if div == "skew_reverse_kl":    # KL(p || alpha p + (1 - alpha) q)
        logm = torch.logaddexp(a + logp, b + logq)
        F = torch.where(ppos, p * (logp - logm), zero)
        return F, F + torch.where(qpos & ppos, (1 - mix) * q * torch.exp(logp - logm), zero)
    raise NotImplementedError(f"terms: no formula for divergence {div!r} (docs/DESIGN.md \"Adding a divergence\")")


# the row statistic a "uniform" tail's closed form needs (spec.Divergence.closed_form)
_UNIFORM_STAT = {"cross_entropy": "sum_u", "reverse_kl": "sum_pu"}


def _stat_columns(spec) -> Tuple[str, ...]:
    cols: Tuple[str, ...] = ("lse_g", "lse_d")
    if spec.tail == "uniform" and spec.entry.closed_form is not None:
        cols += (_UNIFORM_STAT[spec.entry.closed_form],)
    if spec.tail == "bucket":
        cols += ("lse_off",)
    return cols


def teacher_ids(tids: Tensor, q: Tensor) -> Tensor:
    """The ids of the teacher's set ``A`` (``q > 0``), -1 elsewhere: what :func:`local_stats` needs."""
    return torch.where((tids >= 0) & (q > 0), tids.long(), torch.full_like(tids, -1, dtype=torch.long))


def local_stats(z: Tensor, spec, acc: torch.dtype = torch.float32, a_ids: Optional[Tensor] = None,
                vocab_start: int = 0) -> Tensor:
    """Per-row statistics ``[n, k]`` of a logits slice ``z [n, V_r]`` (columns
    ``_stat_columns(spec)``; ``sum_pu`` is ``sum softmax_slice(u) * u``; ``lse_off``, for the
    bucket, the log-sum-exp of ``u`` over the slice's ids outside ``A`` -- ``a_ids`` from
    :func:`teacher_ids` -- so that the bucket's student mass is a direct sum, not ``1 - sum_A p``,
    which cancels to 0 for a confident student)."""
    zt = student_logits(z.to(acc), spec)
    u = zt / spec.student_temperature if spec.student_temperature != 1.0 else zt
    lse_g = torch.logsumexp(zt, -1)
    lse_d = torch.logsumexp(u, -1) if u is not zt else lse_g
    cols = [lse_g, lse_d]
    names = _stat_columns(spec)
    if "sum_u" in names:
        cols.append(u.sum(-1))
    if "sum_pu" in names:
        pl = torch.exp(u - torch.where(torch.isfinite(lse_d), lse_d, torch.zeros_like(lse_d))[:, None])
        cols.append(torch.where(pl > 0, pl * u, torch.zeros_like(pl)).sum(-1))
    if "lse_off" in names:
        if a_ids is None:
            raise ValueError("local_stats: the bucket tail needs a_ids (teacher_ids(tids, q))")
        ids = a_ids - vocab_start
        own = (ids >= 0) & (ids < z.shape[1])
        idx = torch.where(own, ids, torch.zeros_like(ids))
        in_a = torch.zeros(u.shape, dtype=torch.int32, device=u.device).scatter_add_(1, idx, own.to(torch.int32))
        cols.append(torch.logsumexp(u.masked_fill(in_a > 0, _NEG_INF), -1))
    return torch.stack(cols, -1)


def combine_stats(stats: Tensor, spec) -> Dict[str, Tensor]:
    """Merge per-slice statistics ``[W, n, k]`` (W slices of one row set) into named ``[n]`` rows."""
    names = _stat_columns(spec)
    out = {"lse_g": torch.logsumexp(stats[..., 0], 0), "lse_d": torch.logsumexp(stats[..., 1], 0)}
    if "sum_u" in names:
        out["sum_u"] = stats[..., 2].sum(0)
    if "sum_pu" in names:
        w = torch.exp(stats[..., 1] - out["lse_d"])        # each slice's share of the softmax
        out["sum_pu"] = torch.where(w > 0, w * stats[..., 2], torch.zeros_like(w)).sum(0)
    if "lse_off" in names:
        out["lse_off"] = torch.logsumexp(stats[..., names.index("lse_off")], 0)
    return out


def gather_sparse(z: Tensor, tids: Tensor, labels: Tensor, spec, vocab_start: int = 0,
                  acc: torch.dtype = torch.float32) -> Tensor:
    """``z'`` at the teacher ids ``tids [n, E]`` and the labels ``[n]`` that the slice
    ``[vocab_start, vocab_start + V_r)`` holds, -inf elsewhere: ``[n, E + 1]`` (label last)."""
    ids = torch.cat([tids.long(), labels.long().reshape(-1, 1)], 1) - vocab_start
    own = (ids >= 0) & (ids < z.shape[1])
    zg = z.gather(1, torch.where(own, ids, torch.zeros_like(ids))).to(acc)
    return torch.where(own, student_logits(zg, spec), torch.full_like(zg, _NEG_INF))


def row_terms(spec, st: Dict[str, Tensor], zs: Tensor, tids: Tensor, q: Tensor, R: Tensor,
              V: int) -> Dict[str, Tensor]:
    """Row scalars from the combined statistics ``st`` and sparse logits ``zs [n, E + 1]``:
    ``p_e``, ``logp_e``, ``inA``, ``R`` (effective), ``u_R`` and, except for the tail-pass
    divergences (which :func:`finish_terms` completes after :func:`tail_sums`), ``D``, ``c``,
    ``gamma`` (bucket/renormalize off-``A`` coefficient) and the restricted reverse KL's ``lse_A``."""
    tau = spec.student_temperature
    acc = zs.dtype
    u_e = zs[:, :-1] / tau
    q = q.to(acc)
    inA = (tids >= 0) & (q > 0)
    logp = (u_e - st["lse_d"][:, None]).masked_fill(~inA, _NEG_INF)
    p = logp.exp()
    n_a = inA.sum(1)
    R = R.to(acc)
    n_off = (V - n_a).to(acc)
    if spec.tail == "uniform":
        R = torch.where(n_off > 0, R, torch.zeros_like(R))
    u_R = torch.where(n_off > 0, R / n_off.clamp_min(1), torch.zeros_like(R)) if spec.tail == "uniform" else 0 * R
    out = dict(p=p, logp=logp, inA=inA, q=q, R=R, u_R=u_R, zs=zs)
    F_a, G_a = terms(spec, p, logp, torch.where(inA, q, torch.zeros_like(q)))
    F_a, G_a = F_a.masked_fill(~inA, 0.0), G_a.masked_fill(~inA, 0.0)
    P_A = p.sum(1)
    P_o = (1.0 - P_A).clamp_min(0.0)
    log_P_o = _log(P_o)
    if "lse_off" in st:                     # the bucket: the direct sum (no cancellation), in log space
        log_P_o = (st["lse_off"] - st["lse_d"]).clamp_max(0.0)      # (P_o itself may underflow)
        P_o = torch.exp(log_P_o)
    restrict = torch.zeros_like(inA[:, 0])
    if spec.divergence == "reverse_kl":
        restrict = torch.ones_like(restrict) if spec.tail == "renormalize" else R == 0
    out["restrict"] = restrict
    if spec.divergence == "reverse_kl":        # over the teacher's support where it has no tail
        lse_A = torch.logsumexp(u_e.masked_fill(~inA, _NEG_INF), 1)
        lt = (u_e - torch.where(torch.isfinite(lse_A), lse_A, torch.zeros_like(lse_A))[:, None])
        lt = lt.masked_fill(~inA, _NEG_INF)
        pt = lt.exp()
        D_r = torch.where(inA & (pt > 0), pt * (lt - _log(q)), torch.zeros_like(pt)).sum(1)
        out.update(p_restricted=pt, logp_restricted=lt, D_restricted=D_r)
    if spec.needs_tail_pass:
        out.update(F_A=F_a.sum(1), G_A=G_a.sum(1), G_a=G_a)
        return out
    gamma = torch.zeros_like(R)
    if spec.tail == "uniform":
        if spec.entry.closed_form == "cross_entropy":
            # (a -inf logit in A makes the loss +inf through F_A; keep it out of this difference)
            sum_off_u = st["sum_u"] - torch.where(inA & torch.isfinite(u_e), u_e, torch.zeros_like(u_e)).sum(1)
            F_off = torch.where(u_R > 0, -u_R * (sum_off_u - n_off * st["lse_d"]), torch.zeros_like(R))
            if spec.divergence == "forward_kl":
                F_off = F_off + torch.where(u_R > 0, R * _log(u_R), torch.zeros_like(R))
            G_off = -u_R * n_off
        else:                                   # reverse_kl with a tail
            plogp_off = (st["sum_pu"] - st["lse_d"]) - torch.where(inA & (p > 0), p * logp, torch.zeros_like(p)).sum(1)
            F_off = torch.where(u_R > 0, plogp_off - _log(u_R) * P_o, torch.zeros_like(R))
            G_off = torch.where(u_R > 0, F_off + P_o, torch.zeros_like(R))
    else:                                       # renormalize / bucket: one outcome off A
        F_o, G_o = terms(spec, P_o, log_P_o, R)
        F_off, G_off = F_o, G_o
        gamma = torch.where(P_o > 0, G_o / torch.where(P_o > 0, P_o, torch.ones_like(P_o)), torch.zeros_like(P_o))
        if "lse_off" in st and spec.entry.closed_form == "cross_entropy":
            # p_v * gamma = -R p_v / P_o = -R exp(u_v - lse_off): grad_slice takes it in log space
            gamma = torch.zeros_like(gamma)
            # (R = 0, or no student mass off A -- an infinite loss -- carry +inf: no term, as gamma = 0 did)
            keep = (R > 0) & torch.isfinite(st["lse_off"])
            out["bucket_lse_off"] = torch.where(keep, st["lse_off"], torch.full_like(R, float("inf")))
    out.update(D=F_a.sum(1) + F_off, c=G_a.sum(1) + G_off, gamma=gamma, G_a=G_a)
    return out


def tail_sums(z: Tensor, spec, rt: Dict[str, Tensor], st: Dict[str, Tensor],
              acc: torch.dtype = torch.float32) -> Tensor:
    """``[n, 2]``: the slice's sums of ``F(p_v, u_R)`` and ``G(p_v, u_R)`` over every id (the tail
    pass of ``spec.needs_tail_pass`` divergences; summed over slices)."""
    u = student_logits(z.to(acc), spec) / spec.student_temperature
    logp = u - st["lse_d"][:, None]
    F, G = terms(spec, logp.exp(), logp, rt["u_R"][:, None].expand_as(u))
    return torch.stack([F.sum(1), G.sum(1)], -1)


def finish_terms(spec, rt: Dict[str, Tensor], sums: Optional[Tensor]) -> Dict[str, Tensor]:
    """Complete :func:`row_terms` with the combined :func:`tail_sums` (a no-op without a tail pass):
    the off-``A`` sums are the row sums minus the ``A`` entries evaluated with ``u_R``."""
    if not spec.needs_tail_pass:
        return rt
    assert sums is not None, "a tail-pass divergence needs its tail_sums"
    uR = rt["u_R"][:, None].expand_as(rt["p"])
    F_u, G_u = terms(spec, rt["p"], rt["logp"], uR)
    F_off = sums[:, 0] - torch.where(rt["inA"], F_u, torch.zeros_like(F_u)).sum(1)
    G_off = sums[:, 1] - torch.where(rt["inA"], G_u, torch.zeros_like(G_u)).sum(1)
    return dict(rt, D=rt["F_A"] + F_off, c=rt["G_A"] + G_off, gamma=torch.zeros_like(rt["R"]))


def row_loss(spec, lm_weight: float, st, rt) -> Tensor:
    """Per-row loss ``lm_weight * (lse(z') - z'_y) + (1 - lm_weight) * k * D``."""
    D = torch.where(rt["restrict"], rt["D_restricted"], rt["D"]) if "D_restricted" in rt else rt["D"]
    gold = st["lse_g"] - rt["zs"][:, -1]
    return lm_weight * gold + (1.0 - lm_weight) * spec.div_weight * D


def grad_slice(z: Tensor, spec, lm_weight: float, st, rt, tids: Tensor, labels: Tensor, vocab_start: int = 0,
               acc: torch.dtype = torch.float32) -> Tensor:
    """``dL/dz`` ``[n, V_r]`` (``acc``) of the slice, before the caller's scale and ignored-row mask."""
    zt = student_logits(z.to(acc), spec)
    tau = spec.student_temperature
    u = zt / tau if tau != 1.0 else zt
    pg = torch.exp(zt - st["lse_g"][:, None])
    pd = torch.exp(u - st["lse_d"][:, None]) if tau != 1.0 else pg
    wd = (1.0 - lm_weight) * spec.div_weight / tau
    c = rt["c"][:, None]
    restrict = rt["restrict"][:, None]
    if spec.tail != "uniform":              # the dense divergence gradient is p_d (gamma - c)
        # (a support-restricted reverse KL has none: its c, of the unrestricted form, may be inf)
        coef = torch.where(restrict, torch.zeros_like(c), wd * (rt["gamma"][:, None] - c))
        g = pg * (lm_weight + coef) if tau == 1.0 else lm_weight * pg + coef * pd
        if "bucket_lse_off" in rt:          # CE / forward KL's bucket share -R p_v / P_o, in log space
            # (u_v <= lse_off off A; A ids are overwritten below; rows without the term carry +inf)
            R = rt["R"][:, None]
            g = g - wd * R * torch.exp((u - rt["bucket_lse_off"][:, None]).clamp_max(0.0))
    else:
        u_R = rt["u_R"][:, None]
        if spec.entry.closed_form == "cross_entropy":       # G = -q
            dg = -u_R - pd * c
        elif spec.entry.closed_form == "reverse_kl":        # G = p (log p + 1 - log q)
            log_q = torch.where(u_R > 0, _log(u_R), torch.zeros_like(u_R))
            dg = torch.where(pd > 0, pd * ((u - st["lse_d"][:, None]) + (1.0 - log_q - c)), torch.zeros_like(pd))
        else:                                               # per-element terms
            _, G = terms(spec, pd, u - st["lse_d"][:, None], u_R.expand_as(pd))
            dg = G - pd * c
        g = lm_weight * pg + wd * torch.where(restrict, torch.zeros_like(dg), dg)
    # the sparse entries, exactly: teacher ids in A, then the label's -lm_weight
    ids = tids.long() - vocab_start
    own = (ids >= 0) & (ids < z.shape[1]) & rt["inA"]
    idx = torch.where(own, ids, torch.zeros_like(ids))
    p_e, c_e = rt["p"], rt["c"][:, None]
    dg_e = rt["G_a"] - p_e * c_e
    if "p_restricted" in rt:
        pt, lt = rt["p_restricted"], rt["logp_restricted"]
        D = rt["D_restricted"][:, None]
        dg_r = torch.where(rt["inA"] & (pt > 0), pt * (lt - _log(rt["q"]) - D), torch.zeros_like(pt))
        dg_e = torch.where(restrict, dg_r, dg_e)
    pg_e = torch.exp(rt["zs"][:, :-1] - st["lse_g"][:, None])
    val = lm_weight * pg_e + wd * dg_e
    # stored, not added as (exact - dense): a bucket's dense formula at an A id can be ~1e15 (p_a ~ 1
    # times R / P_o), which would swallow the exact value; owned ids are unique: no write order
    rows = torch.arange(g.shape[0], device=g.device)[:, None].expand_as(idx)
    g[rows[own], idx[own]] = val[own]
    lab = labels.long() - vocab_start
    lown = (lab >= 0) & (lab < z.shape[1])
    li = torch.where(lown, lab, torch.zeros_like(lab))[:, None]
    g.scatter_add_(1, li, (-lm_weight * lown.to(acc))[:, None])
    if spec.softcap or spec.logit_scale != 1.0:
        chain = spec.logit_scale * (1.0 - (zt / spec.softcap) ** 2) if spec.softcap else spec.logit_scale
        g = g * chain
    return g


def torch_divergence_rows(logits: Tensor, tids: Tensor, q: Tensor, R: Tensor, labels: Tensor, ignored: Tensor,
                          spec, lm_weight: float, grad_scale: Optional[Tensor], compute_grad: bool,
                          inplace_grad: bool = False, chunk_elems: int = 1 << 22) -> Tuple[Tensor, Optional[Tensor]]:
    """Per-row loss ``[N]`` (float32; float64 for float64 logits) and gradient ``[B, T, V]`` (logits dtype; ``grad_scale *
    dL/dz``, rounded once) of ``logits [B, T, V]`` in chunks of rows: the one-slice run of the
    stages above (the torch path of ``fused_loss`` for every non-default spec)."""
    B, T, V = logits.shape
    acc, loss, grad = row_outputs(logits, compute_grad, inplace_grad)
    for b, t0, t1, a, e in row_chunks(B, T, max(1, chunk_elems // max(V, 1))):
        z = logits[b, t0:t1]
        st = combine_stats(local_stats(z, spec, acc, teacher_ids(tids[a:e], q[a:e]))[None], spec)
        zs = gather_sparse(z, tids[a:e], labels[a:e], spec, 0, acc)
        rt = row_terms(spec, st, zs, tids[a:e], q[a:e], R[a:e], V)
        if spec.needs_tail_pass:
            rt = finish_terms(spec, rt, tail_sums(z, spec, rt, st, acc))
        ign = ignored[a:e]
        rows = row_loss(spec, lm_weight, st, rt)
        loss[a:e] = torch.where(ign, torch.zeros_like(rows), rows)
        if compute_grad:
            g = grad_slice(z, spec, lm_weight, st, rt, tids[a:e], labels[a:e], 0, acc)
            grad[b, t0:t1] = finish_grad_rows(g, ign, grad_scale, a, e).to(logits.dtype)
    return loss, grad
