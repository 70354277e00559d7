"""Triton kernel: the fused sparse teacher of one target row, deduplicated.

One program per target row ``n = b * T + t``. For each source ``s`` it follows
``j = pos[s, b, t]`` to the source row ``(s, b, j)``, maps the ``K`` kept ids through
``vocab[s]`` by indirect loads, takes ``softmax(logprobs / temperature)`` over the surviving
entries and scales it by ``(1 - lm_weight) * w[s, n]``; a source with no survivor (or
``j == -1``) puts its weight on the label instead. The output is the whole target of the row
(gold + teacher) as ``E = S*K + 1`` entries ``(tid, coef)`` with **unique** target ids:
duplicates (within or across sources, or equal to the label) are merged into their first
occurrence and the others get ``tid = -1, coef = 0``. Entry ``S*K`` is the label. Because the
ids are unique, the loss kernel can write the sparse gradient terms without atomics or races.

Cost per row: ``S*S`` comparisons (runtime loops) of ``[BLOCK_K, BLOCK_K]`` tiles (source entries are recomputed
instead of kept, since Triton has no per-source register arrays); tiny next to the ``V``-long
loss pass for the sizes of the method (S <= 8, K <= 64).

Every indirect access is masked by its full range -- positions ``0 <= j < Ts``, source ids
``0 <= id < Vs``, mapped ids and labels ``0 <= tid < V`` -- compared in int64 *before* the int32
store, so with ``validate=False`` a bad entry is dropped (as if it were -1; a bad label loses its
coefficient) and never read through or silently truncated (a label of ``2**40`` is not 0).
"""
import triton
import triton.language as tl


@triton.jit
def _source_entries(si, n, b, N, Ts, K, Vs, V, ids_ptr, lp_ptr, pos_ptr, vocab_ptr, w_ptr,
                    temperature, one_minus_lm, B, BLOCK_K: tl.constexpr, TAIL: tl.constexpr):
    """(target ids [BLOCK_K] (-1 = dropped), coefficients [BLOCK_K], label fallback weight, the
    source's weighted tail probability ``w_s r_s`` (0 without ``TAIL``))."""
    koffs = tl.arange(0, BLOCK_K)
    j = tl.load(pos_ptr + si * N + n).to(tl.int64)
    w = tl.load(w_ptr + si * N + n).to(tl.float32)
    j_ok = (j >= 0) & (j < Ts)
    jj = tl.where(j_ok, j, 0)
    base = ((si * B + b) * Ts + jj) * K
    # (vector compare: the interpreter rejects masks built as vector & scalar-bool)
    jv = koffs * 0 + j
    kmask = (koffs < K) & (jv >= 0) & (jv < Ts)
    ids = tl.load(ids_ptr + base + koffs, mask=kmask, other=-1).to(tl.int64)
    id_ok = kmask & (ids >= 0) & (ids < Vs)
    tid = tl.load(vocab_ptr + si * Vs + tl.where(id_ok, ids, 0), mask=id_ok, other=-1).to(tl.int64)
    tid = tl.where((tid >= 0) & (tid < V), tid, -1)
    lp_raw = tl.load(lp_ptr + base + koffs, mask=kmask, other=float("-inf")).to(tl.float32)
    lp = lp_raw / temperature
    valid = (tid >= 0) & (lp > float("-inf"))
    x = tl.where(valid, lp, float("-inf"))
    mx = tl.max(x, axis=0)
    has = mx > float("-inf")
    if TAIL:
        # the missing mass 1 - sum(kept probabilities) is one more outcome, tempered with them
        kept = tl.sum(tl.where(valid, tl.exp(lp_raw), 0.0), axis=0)
        missing = tl.maximum(1.0 - kept, 0.0)
        # below fastfuse.loss.reference.TAIL_EPS the missing mass is rounding, not mass
        lt = tl.log(tl.where(missing < 1e-5, 0.0, missing)) / temperature
        mx = tl.maximum(mx, lt)
    e = tl.where(valid, tl.exp(x - tl.where(has, mx, 0.0)), 0.0)
    denom = tl.where(has, tl.sum(e, axis=0), 1.0)
    r = 0.0
    if TAIL:
        et = tl.where(has, tl.exp(lt - mx), 0.0)
        denom += et
        r = w * et / denom
    coef = one_minus_lm * w * (e / denom)
    tid = tl.where(valid, tid, -1)
    fallback = tl.where(has, 0.0, one_minus_lm * w)
    return tid, coef, fallback, r


@triton.jit
def sparse_teacher_kernel(
    ids_ptr, lp_ptr, pos_ptr, vocab_ptr, w_ptr, labels_ptr,
    tids_out_ptr, coefs_out_ptr, tail_out_ptr,
    B, N, Ts, K, Vs, V, E,
    lm_weight, temperature, ignore_index,
    S, BLOCK_K: tl.constexpr, TAIL: tl.constexpr = False,
):
    """ids/lp ``[S, B, Ts, K]``, pos/w ``[S, N]``, vocab ``[S, Vs]``, labels ``[N]`` (all
    contiguous) -> tids int32 ``[N, E]``, coefs fp32 ``[N, E]``, ``E = S*K + 1``; ``V`` the target
    vocabulary size (ids outside ``[0, V)`` are dropped)."""
    n = tl.program_id(0).to(tl.int64)
    T = N // B
    b = n // T
    koffs = tl.arange(0, BLOCK_K)
    label = tl.load(labels_ptr + n).to(tl.int64)
    ignored = label == ignore_index
    bad_label = (label < 0) | (label >= V)        # not ignore_index, yet no target id: dropped
    one_minus_lm = 1.0 - lm_weight
    label_coef = lm_weight + 0.0
    out_t = tids_out_ptr + n * E
    out_c = coefs_out_ptr + n * E
    tail_mass = 0.0
    for si in range(0, S):          # runtime loops: S*S inlined copies would bloat compile time
        tid_i, coef_i, fb_i, r_i = _source_entries(si, n, b, N, Ts, K, Vs, V, ids_ptr, lp_ptr, pos_ptr,
                                                   vocab_ptr, w_ptr, temperature, one_minus_lm, B,
                                                   BLOCK_K, TAIL)
        tail_mass += r_i
        is_label = (tid_i == label) & (tid_i >= 0)
        label_coef += fb_i + tl.sum(tl.where(is_label, coef_i, 0.0), axis=0)
        merged = tl.zeros([BLOCK_K], dtype=tl.float32)
        dup = is_label.to(tl.int32)
        for sj in range(0, S):
            tid_j, coef_j, fb_j, _ = _source_entries(sj, n, b, N, Ts, K, Vs, V, ids_ptr, lp_ptr,
                                                     pos_ptr, vocab_ptr, w_ptr, temperature,
                                                     one_minus_lm, B, BLOCK_K, TAIL)
            eq = (tid_i[:, None] == tid_j[None, :]) & (tid_i[:, None] >= 0)
            merged += tl.sum(tl.where(eq, coef_j[None, :], 0.0), axis=1)
            # entry (sj, k') comes before (si, k): sj < si, or same source and k' < k
            src_j = koffs[None, :] * 0 + sj
            earlier = (src_j < si) | ((src_j == si) & (koffs[None, :] < koffs[:, None]))
            dup = tl.maximum(dup, tl.max((eq & earlier).to(tl.int32), axis=1))
        keep = (tid_i >= 0) & (dup == 0) & ((koffs * 0 + label) != ignore_index)
        kmask = koffs < K
        tl.store(out_t + si * K + koffs, tl.where(keep, tid_i, -1).to(tl.int32), mask=kmask)
        tl.store(out_c + si * K + koffs, tl.where(keep, merged, 0.0), mask=kmask)
    tl.store(out_t + S * K, tl.where(ignored | bad_label, -1, label).to(tl.int32))
    tl.store(out_c + S * K, tl.where(ignored, 0.0, label_coef))
    if TAIL:
        tl.store(tail_out_ptr + n, tl.where(ignored, 0.0, tail_mass))


def sparse_teacher(ids, logprobs, pos, vocab, labels, weights, lm_weight: float,
                   temperature: float, ignore_index: int, V: int = 2 ** 31 - 1, tail=None):
    """Launch :func:`sparse_teacher_kernel`. ids/logprobs ``[S, B, Ts, K]``, pos ``[S, B, T]``,
    vocab ``[S, Vs]``, labels ``[B, T]``, weights ``[S, B*T]`` (normalised, float32); ``V`` the
    target vocabulary size (mapped ids and labels outside ``[0, V)`` are dropped).
    Returns tids int32 ``[N, S*K + 1]`` and coefs float32 ``[N, S*K + 1]``. With ``tail`` (a
    float32 ``[N]`` tensor) the sources keep their missing mass as one more tempered outcome
    (``fastfuse.loss.reference.teacher_tail_mass``) and the fused ``R = sum_s w_s r_s`` goes to ``tail``."""
    import torch

    S, B, Ts, K = ids.shape
    N = labels.numel()
    E = S * K + 1
    tids = torch.empty(N, E, dtype=torch.int32, device=labels.device)
    coefs = torch.empty(N, E, dtype=torch.float32, device=labels.device)
    sparse_teacher_kernel[(N,)](
        ids.contiguous(), logprobs.contiguous(), pos.contiguous(), vocab.contiguous(),
        weights.contiguous(), labels.contiguous(), tids, coefs, coefs if tail is None else tail,
        B, N, Ts, K, vocab.shape[1], int(V), E,
        float(lm_weight), float(temperature), int(ignore_index),
        S=S, BLOCK_K=max(2, triton.next_power_of_2(K)), TAIL=tail is not None, num_warps=1 if K <= 16 else 2,
    )
    return tids, coefs
