"""Triton kernel: one row of any divergence x tail x student transform, loss and gradient.

The row math of ``fastfuse/loss/torch_rows.py`` (its docstring has the derivation) in one program
per row ``n = b * T + t``, for every non-default :class:`fastfuse.loss.spec.DivergenceSpec`
(the default, FuseLLM's CE, keeps the original ``fused_ce.py`` kernel bit for bit):

1. pass 1 over the row in ``BLOCK_V`` chunks, per-lane online statistics of the transformed
   logits ``z' = softcap * tanh(logit_scale * z / softcap)``: ``lse(z')`` for the gold CE,
   ``lse(z' / tau)`` for the divergence (a second running max/sum only when ``tau != 1``), and what
   the ``"uniform"`` tail needs: ``sum u`` (CE / forward KL), ``sum p u`` (reverse KL);
2. the ``<= S*K + 1`` unique teacher entries and the label are gathered (before any gradient
   store: ``inplace_grad``-safe) and the row's scalars computed: the divergence ``D``, ``c =
   <p, dD/dp>``, the bucket/renormalize off-teacher coefficient and, for reverse KL over the
   teacher's support, the restricted student;
3. only for ``"uniform"`` JSD / skew KLs / TVD: one more pass summing the per-element tail terms
   (3 reads of the row instead of 2 -- the documented cost of those combinations); under
   ``"bucket"``, for a row whose student leaves under 1% of its mass off the teacher's ids, one more
   pass summing the small probabilities in fp64 (``1 - sum_A p`` alone would cancel to 0);
4. the gradient pass writes ``scale * dL/dz`` over the row, then the exact values at the teacher
   ids and the label (unique ids: no races; a barrier orders them after the dense stores).

Every combination of ``"renormalize"``/``"bucket"``, and ``"uniform"`` with CE / forward KL /
reverse KL, reads the row twice (like the CE kernel) and does a few more flops per element (two
exps with a student temperature, a tanh with a softcap). Masking as in ``fused_ce.py``: indirect
accesses are bounded by ``[0, V)``; ignored rows get loss 0 and a zero gradient.

Launches (:data:`LAUNCHES`): today's ``"generic"`` and the candidates only a GPU can rank
(``benchmarks/gpu_candidates.py``): every chunk loop (pass 1, tail pass, the bucket's fp64 passes,
gradient) pipelined 3-5 deep, step 2's loads hoisted above pass 1, a persistent grid.
"""
import triton
import triton.language as tl

from .divergence_math import (  # noqa: F401  (the codes are the kernel's public names too)
    BUCKET, CE, FORWARD_KL, JSD, RENORMALIZE, REVERSE_KL, SKEW_KL, SKEW_REVERSE_KL, TVD, UNIFORM, divergence_terms,
    lane_logsumexp, online_update, transform_grad, transform_logits)
from .launch import forced_config, tuned

# Named launches (elements per chunk, warps, software-pipelining depth of the chunk loops).
LAUNCHES = {
    # 32-warp CTAs, 4 values per thread per chunk -- <= 48 registers and no spills on sm_80/sm_90 in
    # every combination (16 warps spilled under "uniform"; tests/kernels/test_kernels_compile.py checks).
    # Meant as one CTA per SM like fused_ce's "2pass_l2" (few rows in flight, so the second read can
    # hit L2), but the lighter combinations compile to <= 32 registers, so two CTAs fit per SM (~68 MB
    # of bf16 rows at V = 128256 on 132 SMs, above a 50 MB L2): "generic_persistent" pins one per SM
    # (benchmarks/kernel_resources.py prints the CTAs per SM)
    "generic": dict(block_v=4096, num_warps=32, num_stages=1),
    # candidates a GPU compares (benchmarks/gpu_candidates.py): the chunk loops (pass 1, tail pass,
    # gradient) software-pipelined 3-5 deep
    "generic_s3": dict(block_v=4096, num_warps=32, num_stages=3),
    "generic_s4": dict(block_v=4096, num_warps=32, num_stages=4),
    "generic_s5": dict(block_v=4096, num_warps=32, num_stages=5),
    # the teacher entries' and the label's loads issued before pass 1 (their latency hidden behind
    # it), and that on a persistent grid: one program per SM looping over rows (no CTA drain and
    # launch between rows)
    "generic_hoist": dict(block_v=4096, num_warps=32, num_stages=3, hoist=True),
    # (maxnreg: one CTA per SM is the design, so all 64 registers a 1024-thread CTA may have -- left to
    # itself ptxas aims at two CTAs per SM, 32 registers, and spills under a tail pass; 2048-element
    # chunks: with 4096 the bucket's fp64 pass spills 24 B under triton 3.6.0)
    "generic_persistent": dict(block_v=2048, num_warps=32, num_stages=3, hoist=True, persistent=True, maxnreg=64),
}
# architecture major -> launch name, reason beside it; what divergence_rows runs unless a launch is
# given, forced (launch.forced("divergence", name or dict)) or a GPU run's winner (launch_tuned.json,
# CUDA only). No GPU (the interpreter): the sm_90 entry. Untuned on hardware.
LAUNCH_TABLE = {
    9: "generic",   # H100/H200: 132 SMs x one 1024-thread CTA ~ 132 rows in flight, no spills
    8: "generic",   # A100: same register budget (64K per SM), 108 rows in flight, no spills
}


def launch_config(arch=None) -> dict:
    """The launch (``block_v``, ``num_warps``, ``num_stages``; optionally ``hoist``, ``persistent``,
    ``maxnreg``) of rows on compute capability major ``arch`` (9: Hopper and later, anything older:
    the sm_80 entry; None: no GPU): the forced one, else a GPU run's winner, else :data:`LAUNCH_TABLE`."""
    cfg = forced_config("divergence") or (tuned("divergence", str(arch)) if arch is not None else None) or \
        LAUNCH_TABLE[9 if arch is None or arch >= 9 else 8]
    return dict(LAUNCHES[cfg] if isinstance(cfg, str) else cfg)


@triton.jit
def divergence_kernel(
    logits_ptr, stride_lb, stride_lt, grad_ptr, stride_gb, stride_gt,
    tids_ptr, q_ptr, tail_ptr, labels_ptr, loss_ptr, scale_ptr, scale_stride,
    T, V, E, ignore_index, N,
    lm_weight, kdiv, wd, inv_tau, mix, log_a, log_b, logit_scale, softcap,
    DIV: tl.constexpr, TAIL: tl.constexpr, TRANSFORM: tl.constexpr, TEMPERED: tl.constexpr,
    TAIL_PASS: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_E: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
    NUM_STAGES: tl.constexpr = 1, HOIST: tl.constexpr = False, PERSISTENT: tl.constexpr = False,
):
    """Row ``program_id`` (or, ``PERSISTENT``, every ``num_programs``-th row from it) of ``N``."""
    if PERSISTENT:
        for r in tl.range(tl.program_id(0), N, tl.num_programs(0)):
            _divergence_row(
                tl.full([], 0, tl.int64) + r, logits_ptr, stride_lb, stride_lt, grad_ptr, stride_gb, stride_gt,
                tids_ptr, q_ptr, tail_ptr, labels_ptr, loss_ptr, scale_ptr, scale_stride, T, V, E, ignore_index,
                lm_weight, kdiv, wd, inv_tau, mix, log_a, log_b, logit_scale, softcap, DIV, TAIL, TRANSFORM,
                TEMPERED, TAIL_PASS, BLOCK_V, BLOCK_E, COMPUTE_GRAD, NUM_STAGES, HOIST)
    else:
        _divergence_row(
            tl.program_id(0).to(tl.int64), logits_ptr, stride_lb, stride_lt, grad_ptr, stride_gb, stride_gt,
            tids_ptr, q_ptr, tail_ptr, labels_ptr, loss_ptr, scale_ptr, scale_stride, T, V, E, ignore_index,
            lm_weight, kdiv, wd, inv_tau, mix, log_a, log_b, logit_scale, softcap, DIV, TAIL, TRANSFORM,
            TEMPERED, TAIL_PASS, BLOCK_V, BLOCK_E, COMPUTE_GRAD, NUM_STAGES, HOIST)


@triton.jit
def _gather_entries(row, tids_ptr, q_ptr, n, E, V, label, logit_scale, softcap, TRANSFORM: tl.constexpr,
                    BLOCK_E: tl.constexpr):
    """The row's teacher entries (ids, probabilities, transformed logits) and the label's logit."""
    eoffs = tl.arange(0, BLOCK_E)
    tid = tl.load(tids_ptr + n * E + eoffs, mask=eoffs < E, other=-1).to(tl.int64)
    q = tl.load(q_ptr + n * E + eoffs, mask=eoffs < E, other=0.0)
    has = (tid >= 0) & (tid < V)
    zr = tl.load(row + tl.where(has, tid, 0), mask=has, other=0.0).to(tl.float32)
    zt_e = tl.where(has, transform_logits(zr, logit_scale, softcap, TRANSFORM), float("-inf"))
    lab_ok = (label >= 0) & (label < V)
    zy = tl.load(row + tl.where(lab_ok, label, 0), mask=lab_ok, other=0.0).to(tl.float32)
    zt_y = tl.where(lab_ok, transform_logits(zy, logit_scale, softcap, TRANSFORM), float("-inf"))
    return tid, q, has, zr, zt_e, lab_ok, zt_y


@triton.jit
def _divergence_row(
    n, logits_ptr, stride_lb, stride_lt, grad_ptr, stride_gb, stride_gt,
    tids_ptr, q_ptr, tail_ptr, labels_ptr, loss_ptr, scale_ptr, scale_stride,
    T, V, E, ignore_index,
    lm_weight, kdiv, wd, inv_tau, mix, log_a, log_b, logit_scale, softcap,
    DIV: tl.constexpr, TAIL: tl.constexpr, TRANSFORM: tl.constexpr, TEMPERED: tl.constexpr,
    TAIL_PASS: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_E: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
    NUM_STAGES: tl.constexpr, HOIST: tl.constexpr,
):
    row = logits_ptr + (n // T) * stride_lb + (n % T) * stride_lt
    grow = grad_ptr + (n // T) * stride_gb + (n % T) * stride_gt
    label = tl.load(labels_ptr + n).to(tl.int64)
    offs = tl.arange(0, BLOCK_V)
    NEG = float("-inf")
    if label == ignore_index:
        tl.store(loss_ptr + n, 0.0)
        if COMPUTE_GRAD:
            zero = tl.zeros([BLOCK_V], dtype=grad_ptr.dtype.element_ty)
            for start in range(0, V, BLOCK_V):
                tl.store(grow + start + offs, zero, mask=start + offs < V)
    else:
        if HOIST:       # 2.'s loads first: their latency overlaps pass 1 (nothing is stored yet)
            tid, q, has, zr, zt_e, lab_ok, zt_y = _gather_entries(row, tids_ptr, q_ptr, n, E, V, label, logit_scale,
                                                                  softcap, TRANSFORM, BLOCK_E)
        # 1. per-lane online statistics
        mg = tl.full([BLOCK_V], NEG, tl.float32)
        sg = tl.zeros([BLOCK_V], tl.float32)
        md = tl.full([BLOCK_V], NEG, tl.float32)
        sd = tl.zeros([BLOCK_V], tl.float32)
        su = tl.zeros([BLOCK_V], tl.float32)        # sum u / running sum of e^(u - m) u
        for start in tl.range(0, V, BLOCK_V, num_stages=NUM_STAGES):
            o = start + offs
            msk = o < V
            x = tl.load(row + o, mask=msk, other=0.0, eviction_policy="evict_last").to(tl.float32)
            zt = tl.where(msk, transform_logits(x, logit_scale, softcap, TRANSFORM), NEG)
            mg, sg, _, _ = online_update(mg, sg, zt)
            u = zt * inv_tau
            if TEMPERED or (TAIL == UNIFORM and DIV == REVERSE_KL):
                md, sd, wo, wx = online_update(md, sd, u)
                if TAIL == UNIFORM and DIV == REVERSE_KL:      # running sum of e^(u - m) u, rescaled with sd
                    su = su * wo + tl.where(wx > 0.0, wx * u, 0.0)
            if TAIL == UNIFORM and (DIV == CE or DIV == FORWARD_KL):
                su += tl.where(msk, u, 0.0)
        lse_g, _ = lane_logsumexp(mg, sg)
        lse_d = lse_g
        sum_pu = tl.sum(su, axis=0)             # sum u ("uniform" CE / forward KL)
        if TEMPERED or (TAIL == UNIFORM and DIV == REVERSE_KL):
            lse_d, wl = lane_logsumexp(md, sd)
            if TAIL == UNIFORM and DIV == REVERSE_KL:
                sum_pu = tl.sum(su * wl, axis=0) / tl.sum(sd * wl, axis=0)
        # 2. the sparse entries and the row's scalars (no store to the row yet)
        if not HOIST:
            tid, q, has, zr, zt_e, lab_ok, zt_y = _gather_entries(row, tids_ptr, q_ptr, n, E, V, label, logit_scale,
                                                                  softcap, TRANSFORM, BLOCK_E)
        u_e = zt_e * inv_tau
        inA = has & (q > 0.0)
        logp = tl.where(inA, u_e - lse_d, NEG)
        p = tl.exp(logp)
        qa = tl.where(inA, q, 0.0)
        n_off = (V - tl.sum(inA.to(tl.int32), axis=0)).to(tl.float32)
        R = tl.load(tail_ptr + n)
        u_R = R * 0.0
        if TAIL == UNIFORM:
            R = tl.where(n_off > 0.0, R, 0.0)
            u_R = tl.where(n_off > 0.0, R / tl.maximum(n_off, 1.0), 0.0)
        F_a, G_a = divergence_terms(p, logp, qa, mix, log_a, log_b, DIV)
        F_a = tl.where(inA, F_a, 0.0)
        G_a = tl.where(inA, G_a, 0.0)
        P_o = tl.maximum(1.0 - tl.sum(p, axis=0), 0.0)
        logP_o = tl.log(P_o)
        if TAIL == BUCKET:
            if P_o < 1e-2:
                # a confident student: 1 - sum_A p cancels (to 0 under ~1e-7). Every off-A
                # probability is below P_o + 1e-4 (the estimate's error is far smaller), so sum in
                # fp64 only the terms below that and take away A's terms below it, computed by the
                # same fp32 expression as in the loop (the same values): no large term to cancel
                small = P_o + 1e-4
                tot = tl.zeros([BLOCK_V], tl.float64)
                for start in tl.range(0, V, BLOCK_V, num_stages=NUM_STAGES):
                    o = start + offs
                    x = tl.load(row + o, mask=o < V, other=0.0).to(tl.float32)
                    e = tl.exp(transform_logits(x, logit_scale, softcap, TRANSFORM) * inv_tau - lse_d)
                    tot += tl.where((o < V) & (e < small), e, 0.0).to(tl.float64)
                e_a = tl.where(inA, tl.exp(transform_logits(zr, logit_scale, softcap, TRANSFORM) * inv_tau - lse_d), 1.0)
                e_a = tl.where(inA & (e_a < small), e_a, 0.0).to(tl.float64)
                P_o = tl.maximum(tl.sum(tot, axis=0) - tl.sum(e_a, axis=0), 0.0).to(tl.float32)
                logP_o = tl.log(P_o)
                if P_o < 1e-12:
                    # so confident that the sum above loses P_o (fp32 terms underflow, or A's terms
                    # dwarf it): the log-sum-exp of u over the ids outside A, with a membership test
                    # against the E teacher entries -- a cost only such rows pay
                    mo = tl.full([BLOCK_V], NEG, tl.float32)
                    so = tl.zeros([BLOCK_V], tl.float32)
                    for start in tl.range(0, V, BLOCK_V, num_stages=NUM_STAGES):
                        o = start + offs
                        x = tl.load(row + o, mask=o < V, other=0.0).to(tl.float32)
                        keep = o < V
                        for j in range(0, E):
                            tj = tl.load(tids_ptr + n * E + j).to(tl.int64)
                            tj = tl.where(tl.load(q_ptr + n * E + j) > 0.0, tj, -1)     # in A, or none
                            keep = keep & (o != tj)
                        uo = tl.where(keep, transform_logits(x, logit_scale, softcap, TRANSFORM) * inv_tau, NEG)
                        mo, so, _, _ = online_update(mo, so, uo)
                    lse_off, _ = lane_logsumexp(mo, so)
                    logP_o = tl.minimum(lse_off - lse_d, 0.0)
                    P_o = tl.exp(logP_o)
        restrict = False
        D_r = 0.0
        lt = logp
        if DIV == REVERSE_KL:
            restrict = (TAIL == RENORMALIZE) | (R == 0.0)
            mA = tl.max(tl.where(inA, u_e, NEG), axis=0)
            mA_ref = tl.where(mA == NEG, 0.0, mA)
            lse_A = mA + tl.log(tl.sum(tl.where(inA, tl.exp(u_e - mA_ref), 0.0), axis=0))
            lt = tl.where(inA, u_e - tl.where(lse_A == NEG, 0.0, lse_A), NEG)
            D_r = tl.sum(tl.where(inA & (lt > NEG), tl.exp(lt) * (lt - tl.log(q)), 0.0), axis=0)
        gamma = 0.0
        if TAIL_PASS:
            # 3. the per-element tail terms over the whole row, then minus the A entries' share
            sf = tl.zeros([BLOCK_V], tl.float32)
            sgv = tl.zeros([BLOCK_V], tl.float32)
            for start in tl.range(0, V, BLOCK_V, num_stages=NUM_STAGES):
                o = start + offs
                msk = o < V
                x = tl.load(row + o, mask=msk, other=0.0).to(tl.float32)
                lv = transform_logits(x, logit_scale, softcap, TRANSFORM) * inv_tau - lse_d
                Fv, Gv = divergence_terms(tl.exp(lv), lv, u_R + 0.0 * lv, mix, log_a, log_b, DIV)
                sf += tl.where(msk, Fv, 0.0)
                sgv += tl.where(msk, Gv, 0.0)
            F_u, G_u = divergence_terms(p, logp, u_R + 0.0 * p, mix, log_a, log_b, DIV)
            F_off = tl.sum(sf, axis=0) - tl.sum(tl.where(inA, F_u, 0.0), axis=0)
            G_off = tl.sum(sgv, axis=0) - tl.sum(tl.where(inA, G_u, 0.0), axis=0)
        elif TAIL == UNIFORM:
            if DIV == REVERSE_KL:
                plogp_off = (sum_pu - lse_d) - tl.sum(tl.where(inA & (p > 0.0), p * logp, 0.0), axis=0)
                F_off = tl.where(u_R > 0.0, plogp_off - tl.log(u_R) * P_o, 0.0)
                G_off = tl.where(u_R > 0.0, F_off + P_o, 0.0)
            else:
                # (a -inf logit in A makes the loss +inf through F_A; keep it out of this difference)
                sum_off_u = sum_pu - tl.sum(tl.where(inA & (u_e > NEG), u_e, 0.0), axis=0)
                F_off = tl.where(u_R > 0.0, -u_R * (sum_off_u - n_off * lse_d), 0.0)
                if DIV == FORWARD_KL:
                    F_off += tl.where(u_R > 0.0, R * tl.log(u_R), 0.0)
                G_off = -u_R * n_off
        else:
            F_off, G_off = divergence_terms(P_o, logP_o, R, mix, log_a, log_b, DIV)
            gamma = tl.where(P_o > 0.0, G_off / tl.where(P_o > 0.0, P_o, 1.0), 0.0)
            if TAIL == BUCKET and (DIV == CE or DIV == FORWARD_KL):
                gamma = 0.0         # -R p_v / P_o = -R exp(lpd - logP_o): below, in log space
        has_off = (R > 0.0) & (logP_o > NEG)     # the bucket's log-space term (CE / forward KL) applies
        D = tl.sum(F_a, axis=0) + F_off
        c = tl.sum(G_a, axis=0) + G_off
        D = tl.where(restrict, D_r, D)
        tl.store(loss_ptr + n, lm_weight * (lse_g - zt_y) + kdiv * D)
        # 4. the gradient
        if COMPUTE_GRAD:
            scale = tl.load(scale_ptr + n * scale_stride).to(tl.float32)
            tl.debug_barrier()      # inplace: every gather above precedes the row overwrite
            for start in tl.range(0, V, BLOCK_V, num_stages=NUM_STAGES):
                o = start + offs
                msk = o < V
                x = tl.load(row + o, mask=msk, other=0.0, eviction_policy="evict_first").to(tl.float32)
                zt = transform_logits(x, logit_scale, softcap, TRANSFORM)
                pg = tl.exp(zt - lse_g)
                lpd = zt * inv_tau - lse_d
                if TEMPERED or (TAIL == UNIFORM and DIV == REVERSE_KL):
                    pd = tl.exp(lpd)
                else:
                    pd = pg                 # lse_d is lse_g: one exp per element
                if TAIL == UNIFORM:
                    _, Gv = divergence_terms(pd, lpd, u_R + 0.0 * pd, mix, log_a, log_b, DIV)
                    dg = Gv - pd * c
                else:
                    dg = pd * (gamma - c)
                    if TAIL == BUCKET and (DIV == CE or DIV == FORWARD_KL):
                        dg -= tl.where(has_off, R * tl.exp(tl.minimum(lpd - logP_o, 0.0)), 0.0)
                dg = tl.where(restrict, 0.0, dg)
                g = (lm_weight * pg + wd * dg) * transform_grad(zt, logit_scale, softcap, TRANSFORM) * scale
                tl.store(grow + o, g.to(grad_ptr.dtype.element_ty), mask=msk, eviction_policy="evict_first")
            tl.debug_barrier()      # the sparse stores overwrite dense ones of the same addresses
            # teacher ids in A (and the label among them): exact values
            dg_e = G_a - p * c
            if DIV == REVERSE_KL:
                pt = tl.exp(lt)
                dg_e = tl.where(restrict, tl.where(inA & (pt > 0.0), pt * (lt - tl.log(q) - D_r), 0.0), dg_e)
            is_lab = tid == label
            g_e = lm_weight * (tl.exp(zt_e - lse_g) - tl.where(is_lab, 1.0, 0.0)) + wd * dg_e
            g_e = g_e * transform_grad(zt_e, logit_scale, softcap, TRANSFORM) * scale
            tl.store(grow + tl.where(inA, tid, 0), g_e.to(grad_ptr.dtype.element_ty), mask=inA)
            # the label when it is not in A: the dense value minus lm_weight
            lab_alone = lab_ok & (tl.sum((inA & is_lab).to(tl.int32), axis=0) == 0)
            lpy = zt_y * inv_tau - lse_d
            py = tl.exp(lpy)
            if TAIL == UNIFORM:
                _, Gy = divergence_terms(py, lpy, u_R, mix, log_a, log_b, DIV)
                dgy = Gy - py * c
            else:
                dgy = py * (gamma - c)
                if TAIL == BUCKET and (DIV == CE or DIV == FORWARD_KL):
                    dgy -= tl.where(has_off, R * tl.exp(tl.minimum(lpy - logP_o, 0.0)), 0.0)
            dgy = tl.where(restrict, 0.0, dgy)
            gy = (lm_weight * (tl.exp(zt_y - lse_g) - 1.0) + wd * dgy) * transform_grad(zt_y, logit_scale, softcap,
                                                                                 TRANSFORM) * scale
            tl.store(grow + tl.where(lab_alone, label, 0), gy.to(grad_ptr.dtype.element_ty), mask=lab_alone)


def divergence_rows(logits, grad, tids, q, R, labels, ignore_index: int, scale, compute_grad: bool, spec,
                    lm_weight: float, launch=None):
    """Run :func:`divergence_kernel` on ``logits [B, T, V]`` (unit last stride) with the teacher's
    unique entries ``tids/q [B*T, E]``, missing mass ``R [B*T]`` and ``labels [B*T]``; the
    gradient times ``scale`` goes to ``grad`` (may be ``logits``). Per-row loss float32 ``[B*T]``.
    ``launch``: a name in :data:`LAUNCHES` or a dict like its entries (None: :func:`launch_config`)."""
    import math

    import torch

    B, T, V = logits.shape
    E = tids.shape[1]
    loss = torch.empty(B * T, dtype=torch.float32, device=logits.device)
    if grad is None:
        grad = logits
    scale = scale.to(torch.float32).reshape(-1).contiguous()
    if launch is None:
        launch = launch_config(torch.cuda.get_device_capability(logits.device)[0] if logits.is_cuda else None)
    elif isinstance(launch, str):
        launch = LAUNCHES[launch]
    block_v, num_warps, num_stages = launch["block_v"], launch["num_warps"], launch["num_stages"]
    programs = B * T
    persistent = bool(launch.get("persistent", False))
    if persistent:      # one program per SM (a CPU run: 3, so the interpreter loops over rows too)
        programs = min(B * T, torch.cuda.get_device_properties(logits.device).multi_processor_count
                       if logits.is_cuda else 3)
    mix = spec.mix if spec.mix > 0 else 0.5
    tau = spec.student_temperature
    transform = 2 if spec.softcap else (1 if spec.logit_scale != 1.0 else 0)
    divergence_kernel[(programs,)](
        logits, logits.stride(0), logits.stride(1), grad, grad.stride(0), grad.stride(1),
        tids, q, R, labels.reshape(-1).contiguous(), loss, scale, 0 if scale.numel() == 1 else 1,
        T, V, E, int(ignore_index), B * T,
        float(lm_weight), (1.0 - lm_weight) * spec.div_weight, (1.0 - lm_weight) * spec.div_weight / tau,
        1.0 / tau, mix, math.log(mix), math.log1p(-mix), spec.logit_scale, spec.softcap or 1.0,
        DIV=spec.div_code, TAIL=spec.tail_code, TRANSFORM=transform, TEMPERED=tau != 1.0,
        TAIL_PASS=spec.needs_tail_pass, BLOCK_V=min(block_v, max(16, triton.next_power_of_2(V))),
        BLOCK_E=max(2, triton.next_power_of_2(E)), COMPUTE_GRAD=bool(compute_grad), NUM_STAGES=num_stages,
        HOIST=bool(launch.get("hoist", False)), PERSISTENT=persistent, num_warps=num_warps,
        **({"maxnreg": launch["maxnreg"]} if launch.get("maxnreg") else {}),
    )
    return loss
