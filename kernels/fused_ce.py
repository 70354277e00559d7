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

Two-pass rows (``V > SINGLE_BLOCK_MAX_V``) are read twice and written once; the launch is chosen
from ``LAUNCH_TABLE`` by (V class, dtype, compute-capability major), see ``launch_config``. The
default two-pass entry (``"2pass_l2"``) runs one 32-warp CTA per SM over 8192-element chunks, so
only ~one row per SM (~34 MB of bf16 rows at V = 128256 on 132 SMs) is in flight and the
``evict_last`` first read can still be in L2 for the second; both chunk loops are software
pipelined (``tl.range(..., num_stages)``), the gradient is stored ``evict_first``, and pass 1 keeps
a running max and sum *per lane* (``LANE_STATS``), reduced across the CTA once per row instead of
once per chunk. ``"2pass_v1"`` (4096-element chunks, 16 warps, 3 CTAs/SM, ~100 MB in flight, a
CTA-wide reduction per chunk) stays reachable through ``launch.forced("fused_ce", "2pass_v1")``.
Rows with ``V <= SINGLE_BLOCK_MAX_V`` (32000-token vocabularies) take the ``SINGLE_BLOCK`` path:
the row is one block held in registers, read once -- 128 registers, one CTA per SM.

Only a GPU can confirm (none was used to write this) the L2 hit rate of the second read, the time
against the copy floor and which configuration wins: ``benchmarks/gpu_candidates.py`` times each
of ``CANDIDATES`` and writes the winners to ``launch_tuned.json`` (see ``launch.py``).
Compiled with a GPU launch's alignment, pipelined loads become ``cp.async``, which carries no L2
eviction hint: pass 1's ``evict_last`` is then lost and the re-read relies on the small number
of rows in flight (a GPU should also time pass 1 at ``num_stages = 1``).

``scale`` is read on the device at ``scale_ptr + n * scale_stride`` (stride 0: one scalar, e.g.
``1 / #non-ignored``; stride 1: per row, e.g. a ``"none"`` grad_output) and applied in fp32
before the single rounding to the gradient dtype. :func:`rescale_kernel` multiplies a gradient
by ``grad_output`` later without a host sync (it skips rows whose factor is 1 on the device).
"""
from typing import NamedTuple

import triton
import triton.language as tl

from .launch import forced_config, tuned


class RowConfig(NamedTuple):
    """How ``fused_ce_kernel`` runs a row: ``block_v`` elements per chunk (0: the whole row in one
    block, ``next_power_of_2(V)``), ``num_warps``, ``num_stages`` of the software-pipelined chunk
    loops and ``lane_stats`` (per-lane running max/sum reduced once per row, instead of a CTA-wide
    reduction per chunk). ``num_stages = 1`` with ``lane_stats = False`` is the v1 two-pass loop.
    ``hoist``: the label and sparse-target loads issued before pass 1 (their latency hidden behind
    it); ``persistent``: ``min(rows, SMs)`` programs, each looping over rows (lane-stats path)."""
    block_v: int
    num_warps: int
    num_stages: int = 1
    lane_stats: bool = False
    hoist: bool = False
    persistent: bool = False


# Named configurations; LAUNCH_TABLE picks among them, launch.forced("fused_ce", ...) may name one.
CONFIGS = {
    # the whole row in registers, read once (V <= SINGLE_BLOCK_MAX_V); 128 registers at 16 warps,
    # so ONE CTA per SM: a GPU run must compare it with "2pass_l2" at V = 32000 (gpu_loss.py's
    # fastfuse vs fastfuse_2pass providers) -- SINGLE_BLOCK_MAX_V is the switch
    "single_block": RowConfig(0, 16),
    # v1 (until 2026-11-30): 4096-element chunks, 16 warps, 40 registers -> 3 CTAs/SM, ~400 rows of
    # 256 KiB (~100 MB) in flight on an H100, twice its 50 MB L2: the evict_last re-read mostly misses
    "2pass_v1": RowConfig(4096, 16),
    # one CTA per SM (32 warps = 1024 threads, <= 64 registers): ~132 rows x 256 KiB ~ 34 MB in
    # flight on an H100/H200, so the second read can hit L2; 8 values per thread per chunk,
    # 3-stage pipelined loads (3 x 16 KiB of shared memory in bf16), per-lane running max/sum
    "2pass_l2": RowConfig(8192, 32, 3, True),
    # fp32 rows are twice as long in bytes: 2 stages keep the shared-memory ring at 64 KiB
    "2pass_l2_fp32": RowConfig(8192, 32, 2, True),
    # candidates beside today's (a GPU picks: benchmarks/gpu_candidates.py): deeper pipelines, the
    # label / teacher loads above pass 1, and a persistent grid (no CTA drain/launch between rows)
    "2pass_l2_s4": RowConfig(8192, 32, 4, True),
    "2pass_l2_s5": RowConfig(8192, 32, 5, True),
    "2pass_l2_hoist": RowConfig(8192, 32, 3, True, hoist=True),
    "2pass_l2_persistent": RowConfig(8192, 32, 3, True, hoist=True, persistent=True),
}
# what gpu_candidates.py times per vocabulary class (today's LAUNCH_TABLE choice among them)
CANDIDATES = {"two_pass": ["2pass_l2", "2pass_l2_s4", "2pass_l2_s5", "2pass_l2_hoist", "2pass_l2_persistent"],
              "one_block": ["single_block", "2pass_l2", "2pass_l2_s4", "2pass_l2_persistent"]}

# (vocabulary-size class, dtype, architecture major) -> configuration name, reason beside it.
# "one_block": V <= SINGLE_BLOCK_MAX_V; "two_pass": larger V. Untuned on hardware.
LAUNCH_TABLE = {
    ("one_block", "bf16", 9): "single_block",   # one HBM read; 1 CTA/SM (GPU must compare)
    ("one_block", "fp16", 9): "single_block",   # same as bf16
    ("one_block", "fp32", 9): "single_block",   # same; 32768 fp32 = 128 KiB per row in flight
    ("one_block", "bf16", 8): "single_block",   # A100: same register budget (64K per SM)
    ("one_block", "fp16", 8): "single_block",   # same
    ("one_block", "fp32", 8): "single_block",   # same
    ("two_pass", "bf16", 9): "2pass_l2",        # 132 SMs x 256 KiB rows ~ 34 MB < 50 MB L2
    ("two_pass", "fp16", 9): "2pass_l2",        # same bytes as bf16
    ("two_pass", "fp32", 9): "2pass_l2_fp32",   # 512 KiB rows: ~68 MB in flight, above L2 anyway
    ("two_pass", "bf16", 8): "2pass_l2",        # A100: 108 SMs x 256 KiB ~ 27 MB < 40 MB L2
    ("two_pass", "fp16", 8): "2pass_l2",        # same bytes as bf16
    ("two_pass", "fp32", 8): "2pass_l2_fp32",   # ~54 MB in flight, above L2; 64 KiB of 164 KiB smem
}

# Rows up to this length are held on chip: one block covers the row, read once from HBM.
SINGLE_BLOCK_MAX_V = 32768

RESCALE_BLOCK = 4096
# the backward's grad_output multiply: "grid2d" a [rows, V / 4096] grid (today's), "row" one program
# per row looping over it (a factor of 1 costs one load per row, not V / 4096 programs per row)
RESCALES = {"grid2d": (RESCALE_BLOCK, 8), "row": (8192, 16)}

_DTYPE_KEY = {"torch.bfloat16": "bf16", "torch.float16": "fp16", "torch.float32": "fp32"}


def launch_config(V: int, dtype=None, arch: int = 9) -> RowConfig:
    """The :class:`RowConfig` for rows of ``V`` logits of ``dtype`` (a torch dtype; None: bf16) on
    compute capability major ``arch`` (9: Hopper and later, anything older: the sm_80 entries),
    from a GPU run's ``launch_tuned.json`` or ``LAUNCH_TABLE`` unless one is forced
    (``launch.forced("fused_ce", ...)``: a name in ``CONFIGS``, a ``RowConfig`` or ``(BLOCK_V,
    num_warps)``). Single-block rows get ``BLOCK_V = next_power_of_2(V)`` and fewer warps when short
    (64 values per thread at 32768). fp32 rows keep at most 2 pipeline stages on the lane-stats path
    (twice the bytes per stage: 3 spill on sm_80 under Triton 3.6)."""
    cfg = forced_config("fused_ce")
    dkey = _DTYPE_KEY.get(str(dtype), "bf16")
    if cfg is None:
        key = ("one_block" if V <= SINGLE_BLOCK_MAX_V else "two_pass", dkey, 9 if arch >= 9 else 8)
        cfg = tuned("fused_ce", "/".join(map(str, key))) or LAUNCH_TABLE[key]
    if isinstance(cfg, str):
        cfg = CONFIGS[cfg]
    cfg = RowConfig(*cfg)
    if cfg.block_v == 0:
        bv = max(16, triton.next_power_of_2(V))
        return RowConfig(bv, 16 if bv >= 16384 else (8 if bv >= 4096 else 4))
    if dkey == "fp32" and cfg.lane_stats and cfg.num_stages > 2:
        cfg = cfg._replace(num_stages=2)
    return cfg


@triton.jit
def _gather_sparse(row, tids_ptr, coefs_ptr, n, E, V, BLOCK_E: tl.constexpr):
    """Load row n's sparse target (ids, coefficients) and gather those logits from ``row``; before
    any gradient store, so ``inplace_grad`` is safe. Ids outside ``[0, V)`` are never read."""
    eoffs = tl.arange(0, BLOCK_E)
    emask = eoffs < E
    tid = tl.load(tids_ptr + n * E + eoffs, mask=emask, other=-1).to(tl.int64)
    coef = tl.load(coefs_ptr + n * E + eoffs, mask=emask, other=0.0)
    has = (tid >= 0) & (tid < V)
    zt = tl.load(row + tl.where(has, tid, 0), mask=has, other=0.0).to(tl.float32)
    return tid, coef, has, zt


@triton.jit
def _store_loss(loss_ptr, n, lse, coef, has, zt):
    """``loss = lse - sum coef * z[id]``; coef == 0 adds nothing, even at a -inf logit (not 0 * -inf)."""
    tl.store(loss_ptr + n, lse - tl.sum(coef * tl.where(has & (coef != 0.0), zt, 0.0), axis=0))


@triton.jit
def _gather_sparse_loss(row, tids_ptr, coefs_ptr, loss_ptr, n, E, V, lse, BLOCK_E: tl.constexpr):
    tid, coef, has, zt = _gather_sparse(row, tids_ptr, coefs_ptr, n, E, V, BLOCK_E)
    _store_loss(loss_ptr, n, lse, coef, has, zt)
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
    T, V, E, ignore_index, N,
    BLOCK_V: tl.constexpr, BLOCK_E: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
    SINGLE_BLOCK: tl.constexpr, LANE_STATS: tl.constexpr = False, NUM_STAGES: tl.constexpr = 1,
    HOIST: tl.constexpr = False, PERSISTENT: tl.constexpr = False,
):
    """Rows ``program_id`` (or, ``PERSISTENT``, every ``num_programs``-th row from it) of ``N``."""
    if PERSISTENT:
        for r in tl.range(tl.program_id(0), N, tl.num_programs(0)):
            _ce_row(tl.full([], 0, tl.int64) + r, logits_ptr, stride_lb, stride_lt, grad_ptr, stride_gb, stride_gt, tids_ptr,
                    coefs_ptr, labels_ptr, loss_ptr, scale_ptr, scale_stride, T, V, E, ignore_index, BLOCK_V,
                    BLOCK_E, COMPUTE_GRAD, SINGLE_BLOCK, LANE_STATS, NUM_STAGES, HOIST)
    else:
        _ce_row(tl.program_id(0).to(tl.int64), logits_ptr, stride_lb, stride_lt, grad_ptr, stride_gb, stride_gt,
                tids_ptr, coefs_ptr, labels_ptr, loss_ptr, scale_ptr, scale_stride, T, V, E, ignore_index, BLOCK_V,
                BLOCK_E, COMPUTE_GRAD, SINGLE_BLOCK, LANE_STATS, NUM_STAGES, HOIST)


@triton.jit
def _ce_row(n, logits_ptr, stride_lb, stride_lt, grad_ptr, stride_gb, stride_gt, tids_ptr, coefs_ptr, labels_ptr,
            loss_ptr, scale_ptr, scale_stride, T, V, E, ignore_index, BLOCK_V: tl.constexpr,
            BLOCK_E: tl.constexpr, COMPUTE_GRAD: tl.constexpr, SINGLE_BLOCK: tl.constexpr,
            LANE_STATS: tl.constexpr, NUM_STAGES: tl.constexpr, HOIST: tl.constexpr):
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
    elif LANE_STATS:
        if HOIST:       # 2. first: the gathers' latency overlaps pass 1 (nothing is stored yet)
            tid, coef, has, zt = _gather_sparse(row, tids_ptr, coefs_ptr, n, E, V, BLOCK_E)
        # 1. online log-sum-exp, one running (max, sum) per lane; one exp per element: the larger
        # of (m, x) becomes the max, exp(smaller - larger) rescales the sum or adds to it
        mv = tl.full([BLOCK_V], float("-inf"), tl.float32)
        sv = tl.zeros([BLOCK_V], tl.float32)
        for start in tl.range(0, V, BLOCK_V, num_stages=NUM_STAGES):
            o = start + offs
            x = tl.load(row + o, mask=o < V, other=float("-inf"),
                        eviction_policy="evict_last").to(tl.float32)
            hi = tl.maximum(mv, x)
            # both -inf: add 0, not exp(-inf - -inf)
            e = tl.where(hi == float("-inf"), 0.0, tl.exp(tl.minimum(mv, x) - hi))
            sv = tl.where(x > mv, sv * e + 1.0, sv + e)
            mv = hi
        m = tl.max(mv, axis=0)
        m_ref = tl.where(m == float("-inf"), 0.0, m)
        lse = m + tl.log(tl.sum(sv * tl.exp(mv - m_ref), axis=0))
        # 2. gather the sparse target's logits (before any gradient store: inplace-safe)
        if HOIST:
            _store_loss(loss_ptr, n, lse, coef, has, zt)
        else:
            tid, coef, has, zt = _gather_sparse_loss(row, tids_ptr, coefs_ptr, loss_ptr, n, E, V, lse, BLOCK_E)
        # 3. gradient: pipelined re-read (meant to hit L2), streaming stores
        if COMPUTE_GRAD:
            scale = tl.load(scale_ptr + n * scale_stride).to(tl.float32)
            tl.debug_barrier()      # inplace: every gather above precedes the row overwrite
            for start in tl.range(0, V, BLOCK_V, num_stages=NUM_STAGES):
                o = start + offs
                x = tl.load(row + o, mask=o < V, other=float("-inf"),
                            eviction_policy="evict_first").to(tl.float32)
                g = tl.exp(x - lse) * scale
                tl.store(grow + o, g.to(grad_ptr.dtype.element_ty), mask=o < V,
                         eviction_policy="evict_first")
            tl.debug_barrier()      # the sparse stores overwrite dense ones of the same addresses
            _store_sparse_grad(grow, tid, coef, has, zt, lse, scale)
    else:
        # v1 ("2pass_v1"): 1. online log-sum-exp, CTA-wide reduction per chunk
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


@triton.jit
def rescale_row_kernel(x_ptr, stride_b, stride_t, T, V, f_ptr, f_stride, BLOCK: tl.constexpr):
    """``rescale_kernel`` with one program per row looping over it: a factor of 1 returns after
    one load per row."""
    n = tl.program_id(0).to(tl.int64)
    f = tl.load(f_ptr + n * f_stride).to(tl.float32)
    if f != 1.0:
        p = x_ptr + (n // T) * stride_b + (n % T) * stride_t
        for start in range(0, V, BLOCK):
            o = start + tl.arange(0, BLOCK)
            x = tl.load(p + o, mask=o < V).to(tl.float32)
            tl.store(p + o, (x * f).to(x_ptr.dtype.element_ty), mask=o < V)


def rescale_rows_(x, factor):
    """``x [B, T, V]`` or ``[R, C]`` (unit last stride) times ``factor`` in place: a float32 tensor
    of one element, or one per row (``B*T`` / ``R``). No host sync; free when the factor is 1.
    The launch: ``RESCALES`` by name, forced or from a GPU run's table, else ``"grid2d"``."""
    import torch

    x3 = x if x.dim() == 3 else x.unsqueeze(0)
    B, T, V = x3.shape
    f = factor.to(torch.float32).reshape(-1).contiguous()
    arch = torch.cuda.get_device_capability(x.device)[0] if x.is_cuda else 9
    name = forced_config("rescale") or tuned("rescale", str(arch)) or "grid2d"
    block, warps = RESCALES[name]
    kernel, grid = ((rescale_row_kernel, (B * T,)) if name == "row" else
                    (rescale_kernel, (B * T, triton.cdiv(V, block))))
    kernel[grid](x3, x3.stride(0), x3.stride(1), T, V, f, 0 if f.numel() == 1 else 1, BLOCK=block, num_warps=warps)
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
    arch = torch.cuda.get_device_capability(logits.device)[0] if logits.is_cuda else 9
    cfg = launch_config(V, logits.dtype, arch)
    persistent = cfg.persistent and cfg.lane_stats and cfg.block_v < V
    programs = B * T
    if persistent:      # one program per SM (a CPU run: 3, so the interpreter loops over rows too)
        programs = min(B * T, torch.cuda.get_device_properties(logits.device).multi_processor_count
                       if logits.is_cuda else 3)
    fused_ce_kernel[(programs,)](
        logits, logits.stride(0), logits.stride(1),
        grad, grad.stride(0), grad.stride(1),
        tids, coefs, labels.reshape(-1).contiguous(), loss, scale, 0 if scale.numel() == 1 else 1,
        T, V, E, int(ignore_index), B * T,
        BLOCK_V=cfg.block_v, BLOCK_E=max(2, triton.next_power_of_2(E)), COMPUTE_GRAD=bool(compute_grad),
        SINGLE_BLOCK=cfg.block_v >= V, LANE_STATS=cfg.lane_stats, NUM_STAGES=cfg.num_stages,
        HOIST=cfg.hoist and cfg.lane_stats, PERSISTENT=persistent, num_warps=cfg.num_warps,
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
