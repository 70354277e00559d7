"""Triton kernel: fused gold + sparse-teacher cross-entropy of one row, loss and gradient.

One program per target row (``n = b * T + t``, logits addressed through separate ``b``/``t``
strides so views such as ``logits[:, :-1]`` work without a copy). Per row:

1. online log-sum-exp over ``V`` in ``BLOCK_V`` chunks (running max and rescaled sum, fp32; a
   leading run of all ``-inf`` chunks keeps ``m = -inf, s = 0`` instead of ``exp(-inf - -inf)``);
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

Memory safety: every indirect access is masked by its full range (``0 <= tid < V`` here, ids,
positions and vocabulary entries in ``sparse_teacher.py``), so bad ids with ``validate=False`` may
give a meaningless loss but never touch memory outside their own row. Entries with coefficient 0
add nothing (not ``0 * -inf``).

Reads the row twice (the second read mostly from L2) and writes it once; no fp32 copy of the
logits and no dense teacher. Rows with ``V <= SINGLE_BLOCK_MAX_V`` (32000-token vocabularies)
take the ``SINGLE_BLOCK`` path instead: the row is one block held in registers, read once.
``scale`` is read on the device at ``scale_ptr + n * scale_stride`` (stride 0: one scalar, e.g.
``1 / #non-ignored``; stride 1: per row, e.g. a ``"none"`` grad_output) and applied in fp32
before the single rounding to the gradient dtype. :func:`rescale_kernel` multiplies a gradient
by ``grad_output`` later without a host sync (it skips rows whose factor is 1 on the device).

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

RESCALE_BLOCK = 4096


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
def _gather_sparse_loss(row, tids_ptr, coefs_ptr, loss_ptr, n, E, V, lse, BLOCK_E: tl.constexpr):
    """Load row n's sparse target (ids, coefficients), gather those logits from ``row`` and store
    ``loss = lse - sum coef * z[id]``. Runs before any gradient store, so ``inplace_grad`` is safe.
    Ids outside ``[0, V)`` are neither read nor (later) written."""
    eoffs = tl.arange(0, BLOCK_E)
    emask = eoffs < E
    tid = tl.load(tids_ptr + n * E + eoffs, mask=emask, other=-1).to(tl.int64)
    coef = tl.load(coefs_ptr + n * E + eoffs, mask=emask, other=0.0)
    has = (tid >= 0) & (tid < V)
    zt = tl.load(row + tl.where(has, tid, 0), mask=has, other=0.0).to(tl.float32)
    # coef == 0 adds nothing, even at a -inf logit (0 * -inf would be NaN)
    tl.store(loss_ptr + n, lse - tl.sum(coef * tl.where(has & (coef != 0.0), zt, 0.0), axis=0))
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
    tids_ptr, coefs_ptr, labels_ptr, loss_ptr, scale_ptr, scale_stride,
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
        tid, coef, has, zt = _gather_sparse_loss(row, tids_ptr, coefs_ptr, loss_ptr, n, E, V, lse, BLOCK_E)
        if COMPUTE_GRAD:
            scale = tl.load(scale_ptr + n * scale_stride).to(tl.float32)
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
            # while every value so far is -inf, shift by 0: exp(-inf - -inf) would be NaN
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
            s = s * tl.exp(m - m_ref) + tl.sum(tl.exp(x - m_ref), axis=0)
            m = m_new
        lse = m + tl.log(s)
        # 2. gather the sparse target's logits (before any gradient store: inplace-safe)
        tid, coef, has, zt = _gather_sparse_loss(row, tids_ptr, coefs_ptr, loss_ptr, n, E, V, lse, BLOCK_E)
        # 3. gradient
        if COMPUTE_GRAD:
            scale = tl.load(scale_ptr + n * scale_stride).to(tl.float32)
            tl.debug_barrier()      # inplace: every gather above precedes the row overwrite
            for start in range(0, V, BLOCK_V):
                o = start + offs
                x = tl.load(row + o, mask=o < V, other=float("-inf"),
                            eviction_policy="evict_first").to(tl.float32)
                g = tl.exp(x - lse) * scale
                tl.store(grow + o, g.to(grad_ptr.dtype.element_ty), mask=o < V)
            tl.debug_barrier()      # the sparse stores overwrite dense ones of the same addresses
            _store_sparse_grad(grow, tid, coef, has, zt, lse, scale)


@triton.jit
def rescale_kernel(x_ptr, stride_b, stride_t, T, V, f_ptr, f_stride, BLOCK: tl.constexpr):
    """Row ``n`` of ``x`` times ``f[n * f_stride]`` (in fp32, one rounding). A factor of exactly 1
    (the usual ``loss.backward()``) returns at once: the test runs on the device, no host sync."""
    n = tl.program_id(0).to(tl.int64)
    f = tl.load(f_ptr + n * f_stride).to(tl.float32)
    if f != 1.0:
        o = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        p = x_ptr + (n // T) * stride_b + (n % T) * stride_t + o
        x = tl.load(p, mask=o < V).to(tl.float32)
        tl.store(p, (x * f).to(x_ptr.dtype.element_ty), mask=o < V)


def rescale_rows_(x, factor):
    """``x [B, T, V]`` or ``[R, C]`` (unit last stride) times ``factor`` in place: a float32 tensor
    of one element, or one per row (``B*T`` / ``R``). No host sync; free when the factor is 1."""
    import torch

    x3 = x if x.dim() == 3 else x.unsqueeze(0)
    B, T, V = x3.shape
    f = factor.to(torch.float32).reshape(-1).contiguous()
    rescale_kernel[(B * T, triton.cdiv(V, RESCALE_BLOCK))](
        x3, x3.stride(0), x3.stride(1), T, V, f, 0 if f.numel() == 1 else 1,
        BLOCK=RESCALE_BLOCK, num_warps=8)
    return x


def ce_rows(logits, grad, tids, coefs, labels, ignore_index: int, scale, compute_grad: bool):
    """Run :func:`fused_ce_kernel` on ``logits [B, T, V]`` (unit last stride, any b/t strides) with
    the sparse targets ``tids``/``coefs [B*T, E]`` (unique ids, from ``sparse_teacher``; row slices
    are fine) and ``labels [B*T]``. With ``compute_grad`` the gradient times ``scale`` (float32, one
    element or one per row) goes to ``grad`` (same shape; may be ``logits`` itself). Per-row loss
    float32 ``[B*T]``. Inputs already validated or not: ids out of range are masked."""
    import torch

    B, T, V = logits.shape
    E = tids.shape[1]
    loss = torch.empty(B * T, dtype=torch.float32, device=logits.device)
    if grad is None:
        grad = logits  # never written (COMPUTE_GRAD=False)
    scale = scale.to(torch.float32).reshape(-1).contiguous()
    block_v, num_warps = launch_config(V)
    fused_ce_kernel[(B * T,)](
        logits, logits.stride(0), logits.stride(1),
        grad, grad.stride(0), grad.stride(1),
        tids, coefs, labels.reshape(-1).contiguous(), loss, scale, 0 if scale.numel() == 1 else 1,
        T, V, E, int(ignore_index),
        BLOCK_V=block_v, BLOCK_E=max(2, triton.next_power_of_2(E)), COMPUTE_GRAD=bool(compute_grad),
        SINGLE_BLOCK=block_v >= V,
        num_warps=num_warps,
    )
    return loss


def fused_loss_rows(logits, ids, logprobs, pos, vocab, labels, weights, lm_weight: float,
                    temperature: float, ignore_index: int, scale, compute_grad: bool,
                    inplace_grad: bool):
    """Sparse teacher + :func:`ce_rows` in one call: per-row loss float32 ``[B*T]`` and gradient
    ``[B, T, V]`` (``None`` without ``compute_grad``; the ``logits`` tensor itself with
    ``inplace_grad``). ``weights [S, B*T]`` normalised float32; ``scale`` as for :func:`ce_rows`."""
    import torch

    from .sparse_teacher import sparse_teacher

    B, T, V = logits.shape
    tids, coefs = sparse_teacher(ids, logprobs, pos, vocab, labels, weights, lm_weight,
                                 temperature, ignore_index, V)
    grad = None
    if compute_grad:
        grad = logits if inplace_grad else torch.empty((B, T, V), dtype=logits.dtype, device=logits.device)
    loss = ce_rows(logits, grad, tids, coefs, labels, ignore_index, scale, compute_grad)
    return loss, grad
