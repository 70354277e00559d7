"""Triton kernel: fused gold + sparse-teacher cross-entropy of one row, loss and gradient.

One program per target row (``n = b * T + t``, logits addressed through separate ``b``/``t``
strides so views such as ``logits[:, :-1]`` work without a copy). Per row:

1. online log-sum-exp over ``V`` in ``BLOCK_V`` chunks (running max and rescaled sum, fp32);
   loaded with ``evict_last`` so the second pass can hit L2;
2. indirect load of the ``E = S*K + 1`` logits named by the sparse target (``tids``/``coefs``
   from ``sparse_teacher.py``: unique ids, label included, coefficients summing to 1), so
   ``loss = lse - sum_e coef_e * z[tid_e]`` -- done *before* any gradient is written, so the
   gradient may overwrite the logits (``inplace_grad``);
3. if a gradient is wanted: dense pass writing ``scale * softmax(z)`` over the row, a CTA barrier,
   then ``scale * (softmax(z[tid_e]) - coef_e)`` stored at the ``E`` sparse ids from the fp32
   logits kept in registers (exact, not a read-modify-write of the rounded dense value). Ids are
   unique, so the sparse stores never race; the barrier orders them after the dense stores of
   the same addresses. Ignored rows (label == ignore_index) get loss 0 and a zero gradient row.

Reads the row twice (the second read mostly from L2) and writes it once; no fp32 copy of the
logits and no dense teacher. Rows with ``V <= SINGLE_BLOCK_MAX_V`` (32000-token vocabularies)
take the ``SINGLE_BLOCK`` path instead: the row is one block held in registers, read once. ``scale`` (a device scalar: ``1 / #non-ignored`` for "mean") is
folded into the gradient so that the backward only multiplies by ``grad_output`` when that is
not 1.

Hopper defaults (not tuned on hardware; see ``launch_config``): two-pass rows use
``BLOCK_V = 4096`` with ``num_warps = 16`` -- 8 fp32 values per thread per chunk, enough for
16-byte vector loads and few loop trips (32 for a 128k vocab), small enough for several CTAs
per SM; single-block rows use ``next_power_of_2(V)`` with 16 warps (64 values per thread at
V = 32000). ``FORCE_CONFIG`` overrides both for experiments.
"""
import triton
import triton.language as tl


# Set to (BLOCK_V, num_warps) to override launch_config (benchmarks compare variants with it).
FORCE_CONFIG = None

# Rows up to this length are held on chip: one block covers the row, read once from HBM.
SINGLE_BLOCK_MAX_V = 32768


def launch_config(V: int):
    """(BLOCK_V, num_warps) for a vocabulary of size V (Hopper-oriented defaults, untuned).

    ``V <= SINGLE_BLOCK_MAX_V`` (e.g. 32000): the whole row in one block (one HBM read, fp32
    in registers: 32768 / (16 warps * 32 lanes) = 64 values per thread). Larger ``V``: two
    passes over ``BLOCK_V = 4096`` chunks, 16 warps.
    """
    if FORCE_CONFIG is not None:
        return FORCE_CONFIG
    if V <= SINGLE_BLOCK_MAX_V:
        bv = max(16, triton.next_power_of_2(V))
        return bv, 16 if bv >= 16384 else (8 if bv >= 4096 else 4)
    return 4096, 16


@triton.jit
def _gather_sparse_loss(row, tids_ptr, coefs_ptr, loss_ptr, n, E, lse, BLOCK_E: tl.constexpr):
    """Load row n's sparse target (ids, coefficients), gather those logits from ``row`` and store
    ``loss = lse - sum coef * z[id]``. Runs before any gradient store, so ``inplace_grad`` is safe."""
    eoffs = tl.arange(0, BLOCK_E)
    emask = eoffs < E
    tid = tl.load(tids_ptr + n * E + eoffs, mask=emask, other=-1).to(tl.int64)
    coef = tl.load(coefs_ptr + n * E + eoffs, mask=emask, other=0.0)
    has = tid >= 0
    zt = tl.load(row + tl.where(has, tid, 0), mask=has, other=0.0).to(tl.float32)
    tl.store(loss_ptr + n, lse - tl.sum(tl.where(has, coef * zt, 0.0), axis=0))
    return tid, coef, has, zt


@triton.jit
def _store_sparse_grad(grow, tid, coef, has, zt, lse, scale):
    """``scale * (softmax(z[id]) - coef)`` at the (unique) sparse ids, from the fp32 gathered logits."""
    gs = (tl.exp(tl.where(has, zt - lse, float("-inf"))) - coef) * scale
    tl.store(grow + tl.where(has, tid, 0), gs.to(grow.dtype.element_ty), mask=has)


@triton.jit
def fused_ce_kernel(
    logits_ptr, stride_lb, stride_lt,
    grad_ptr, stride_gb, stride_gt,
    tids_ptr, coefs_ptr, labels_ptr, loss_ptr, scale_ptr,
    T, V, E, ignore_index,
    BLOCK_V: tl.constexpr, BLOCK_E: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
    SINGLE_BLOCK: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    b = n // T
    t = n % T
    row = logits_ptr + b * stride_lb + t * stride_lt
    grow = grad_ptr + b * stride_gb + t * stride_gt
    label = tl.load(labels_ptr + n).to(tl.int64)
    offs = tl.arange(0, BLOCK_V)
    if label == ignore_index:
        tl.store(loss_ptr + n, 0.0)
        if COMPUTE_GRAD:
            zero = tl.zeros([BLOCK_V], dtype=grad_ptr.dtype.element_ty)
            for start in range(0, V, BLOCK_V):
                o = start + offs
                tl.store(grow + o, zero, mask=o < V)
    elif SINGLE_BLOCK:
        # the whole row in one block: one read, gradient from the registers
        msk = offs < V
        x = tl.load(row + offs, mask=msk, other=float("-inf")).to(tl.float32)
        m = tl.max(x, axis=0)
        lse = m + tl.log(tl.sum(tl.exp(x - m), axis=0))
        tid, coef, has, zt = _gather_sparse_loss(row, tids_ptr, coefs_ptr, loss_ptr, n, E, lse, BLOCK_E)
        if COMPUTE_GRAD:
            scale = tl.load(scale_ptr).to(tl.float32)
            tl.debug_barrier()      # inplace: every gather above precedes the row overwrite
            tl.store(grow + offs, (tl.exp(x - lse) * scale).to(grad_ptr.dtype.element_ty), mask=msk)
            tl.debug_barrier()      # the sparse stores overwrite dense ones of the same addresses
            _store_sparse_grad(grow, tid, coef, has, zt, lse, scale)
    else:
        # 1. online log-sum-exp
        m = float("-inf")
        s = 0.0
        for start in range(0, V, BLOCK_V):
            o = start + offs
            x = tl.load(row + o, mask=o < V, other=float("-inf"),
                        eviction_policy="evict_last").to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
            m = m_new
        lse = m + tl.log(s)
        # 2. gather the sparse target's logits (before any gradient store: inplace-safe)
        tid, coef, has, zt = _gather_sparse_loss(row, tids_ptr, coefs_ptr, loss_ptr, n, E, lse, BLOCK_E)
        # 3. gradient
        if COMPUTE_GRAD:
            scale = tl.load(scale_ptr).to(tl.float32)
            tl.debug_barrier()      # inplace: every gather above precedes the row overwrite
            for start in range(0, V, BLOCK_V):
                o = start + offs
                x = tl.load(row + o, mask=o < V, other=float("-inf"),
                            eviction_policy="evict_first").to(tl.float32)
                g = tl.exp(x - lse) * scale
                tl.store(grow + o, g.to(grad_ptr.dtype.element_ty), mask=o < V)
            tl.debug_barrier()      # the sparse stores overwrite dense ones of the same addresses
            _store_sparse_grad(grow, tid, coef, has, zt, lse, scale)


def fused_loss_rows(logits, ids, logprobs, pos, vocab, labels, weights, lm_weight: float,
                    temperature: float, ignore_index: int, scale, compute_grad: bool,
                    inplace_grad: bool):
    """Per-row loss float32 ``[B*T]`` and gradient ``[B, T, V]`` (``None`` without
    ``compute_grad``; the ``logits`` tensor itself with ``inplace_grad``).

    ``logits [B, T, V]`` with unit last stride; ``weights [S, B*T]`` normalised float32;
    ``scale`` a 0-d float32 device tensor folded into the gradient. Inputs already validated.
    """
    import torch

    from .sparse_teacher import sparse_teacher

    B, T, V = logits.shape
    N = B * T
    tids, coefs = sparse_teacher(ids, logprobs, pos, vocab, labels, weights, lm_weight,
                                 temperature, ignore_index)
    E = tids.shape[1]
    loss = torch.empty(N, dtype=torch.float32, device=logits.device)
    if compute_grad:
        grad = logits if inplace_grad else torch.empty((B, T, V), dtype=logits.dtype,
                                                       device=logits.device)
    else:
        grad = logits  # never written (COMPUTE_GRAD=False)
    block_v, num_warps = launch_config(V)
    fused_ce_kernel[(N,)](
        logits, logits.stride(0), logits.stride(1),
        grad, grad.stride(0), grad.stride(1),
        tids, coefs, labels.contiguous(), loss, scale.to(torch.float32).reshape(1),
        T, V, E, int(ignore_index),
        BLOCK_V=block_v, BLOCK_E=max(2, triton.next_power_of_2(E)), COMPUTE_GRAD=bool(compute_grad),
        SINGLE_BLOCK=block_v >= V,
        num_warps=num_warps,
    )
    return loss, (grad if compute_grad else None)
