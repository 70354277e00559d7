"""``fused_linear_loss``: the fusion loss from hidden states and the lm_head weight, without ever
holding the full ``[N, V]`` logits.

Exactly ``fused_loss(hidden @ weight.T + bias, ...)``: same teacher semantics, same reference
(``fastfuse.loss.reference``), same kernels. The algorithm (DESIGN.md §4):

0. the sparse target of every token (gold label + fused teacher, ``<= S*K + 1`` (id, coef) pairs
   per row) is built once for all ``N = B*T`` tokens by the same code as ``fused_loss`` (the
   Triton ``sparse_teacher`` kernel, or ``reference.sparse_teacher`` on the torch path);
1. per chunk of ``n`` consecutive tokens (flattened ``[N, H]`` rows, so chunks are contiguous
   whatever ``B`` and ``T``): ``logits_c = hidden_c @ weight.T (+ bias)`` into one reused
   ``[n, V]`` buffer, in the input dtype (tensor cores for bf16/fp16, fp32 accumulation inside
   the matmul);
2. the row code of ``fused_loss`` (``fastfuse.loss.row_runner.run_rows``: ``kernels/fused_ce.py``, or
   ``kernels/divergence.py`` for the divergence family; their torch paths off the GPU) writes the
   per-row loss and overwrites the buffer with ``scale * dL/dlogits_c``, ``scale = 1 / #non-ignored`` for ``"mean"`` (a device scalar: no
   host sync);
3. ``d_hidden_c = dlogits_c @ weight`` (written straight into ``d_hidden``'s rows),
   ``d_weight (+)= dlogits_c.T @ hidden_c`` (first chunk ``mm`` into the gradient, then
   ``addmm_``: one read-modify-write of ``d_weight`` per chunk), ``d_bias += dlogits_c.sum(0)``
   (fp32 accumulator, ``V`` floats).

For ``"mean"``/``"sum"`` in float32/bfloat16 the gradients are complete at the end of the forward
(the loss is the last op of the graph: three matmuls, ``6*N*H*V`` FLOPs); the backward only
multiplies them by ``grad_output`` on the device (a no-op kernel when it is 1 on CUDA: no host
sync). For ``"none"`` the backward needs the per-token ``grad_output`` *before* the ``d_weight``
matmul, and float16 needs ``scale * grad_output`` applied in fp32 before the chunk gradient is
rounded (``softmax / #tokens`` underflows fp16 long before a GradScaler's ``2**16`` arrives), so
there the forward computes only the loss (one matmul) and the backward recomputes the chunk
logits (three more; ``8*N*H*V`` FLOPs in all). The row kernel reads that factor (one scalar or one
per row) on the device. ``backward`` may run once (a second one raises).

Chunk size: by default as many tokens as keep the chunk's logits under 512 MiB (2048 tokens for
``V = 128256`` in bf16, 8192 for ``V = 32000``), balanced over the chunks. ``d_weight``'s
read-modify-write (``2*V*H`` elements per chunk) then costs ``~1/n`` of the chunk's
``2*n*V*H``-FLOP matmul in bytes per FLOP, i.e. stays compute-bound for ``n >= ~1100`` on an H100
(DESIGN.md §4). Extra memory: the chunk buffer, ``O(N * (S*K + 1))`` for the sparse targets and
``V`` floats for the bias gradient; the gradients themselves (``hidden``'s and ``weight``'s shape
and dtype) are the only other allocations.

Precision choices (documented, deliberate):

* ``d_weight`` is accumulated in the weight's dtype: each chunk's matmul accumulates in fp32 and
  adds the bf16 running sum with ``beta = 1`` (one rounding per chunk, ``ceil(N / n)`` roundings
  in all, 4 for N = 8192). An fp32 accumulator would cost ``4*V*H`` bytes (2 GiB at
  ``V = 128256, H = 4096``) -- more than the whole memory budget. Liger-Kernel makes the same
  choice; fp32 inputs get an fp32 ``d_weight`` anyway.
* The teacher/gold logits ``z[tid]`` are gathered from the chunk's logits **in the input dtype**
  (bf16-rounded for bf16 inputs), not by separate fp32 dot products ``h_n . W[tid]`` as DESIGN.md
  §4 suggests. That keeps the result *exactly* ``fused_loss(hidden @ W.T + b)`` (whose log-sum-exp
  and gradient also see the rounded logits), so the loss is the exact loss of the logits whose
  gradient we return; an fp32 gather would lower the loss's rounding error (about ``2^-9 |z|``
  per gathered logit, averaged over ``S*K+1`` entries) but make loss and gradient disagree, and
  costs ``N*(S*K+1)*H`` extra multiply-adds with a gather of ``W`` rows.

Compared with the two published fused linear cross-entropies (hard labels only):

* **Liger-Kernel** (``ops/fused_linear_cross_entropy.py``): the same structure -- chunks of
  tokens, logits materialised per chunk, the CE kernel overwrites them with their gradient in the
  forward, then ``grad_input = grad_logits @ W`` and ``grad_weight += grad_logits.T @ x`` -- so
  the same 3 matmuls and a backward that only rescales. Differences: Liger sizes chunks so the
  chunk's logits are about as big as the input (``next_pow2(N / ceil(V / H))`` tokens: 256 at
  N = 8192, H = 4096, V = 128256, i.e. 32 chunks that each re-read and re-write ``grad_weight``
  and feed cuBLAS 256-row matmuls), we by a byte budget (2048 tokens there, 4 chunks); its
  ``grad_weight``/``grad_bias`` start as ``zeros_like`` and accumulate in the weight dtype (ours:
  the first chunk writes ``d_weight`` directly, the bias gradient accumulates in fp32); older
  versions count the non-ignored tokens with ``.item()`` (a host sync), ours stays on device; we
  add the sparse multi-source teacher (``S*K + 1`` gathered logits per row, duplicate ids merged)
  with per-token source weights.
* **Apple's Cut Cross-Entropy** (``cce_lse_forward.py``, ``cce_backward.py``): fuses the matmul
  into the log-sum-exp kernel (blocks of logits live only in registers/SMEM), gathers the label
  logit with a separate fp32 ``indexed_dot``, and in the backward recomputes the logits blockwise
  and applies both gradient matmuls in the same kernel: 4 matmuls in all (``8*N*H*V`` FLOPs)
  against our 3, minus the blocks its gradient filtering skips (softmax entries below the dtype's
  resolution, an approximation we do not make). It needs no logits buffer at all (memory
  ``O(N + V)`` beyond the gradients) but hand-written matmul kernels; we use cuBLAS at the
  measured matmul rate and pay one ``[n, V]`` buffer plus one memory-bound row pass per chunk
  (read twice, the second mostly from L2, written once).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from fastfuse.loss import reference as _ref
from fastfuse.loss.checks import (INTS, SECOND_BACKWARD, accumulator_dtype, check_lm_head, check_teacher_args, check_tensor,
                                float64_path)
from fastfuse.loss.spec import make_spec
from fastfuse.loss.chunk_loop import chunk_loop
from fastfuse.batch import AlignMap, SourceTopK
from fastfuse.loss.row_runner import RowTarget, build_target, run_rows
from fastfuse.loss.parallel.losses import vocab_parallel_linear_loss
from fastfuse.loss.parallel.layout import is_dtensor

__all__ = ["fused_linear_loss"]

CHUNK_BYTES = 512 << 20     # default budget for one chunk of logits


def default_chunk_tokens(N: int, V: int, element_size: int, budget: int = CHUNK_BYTES) -> int:
    """Tokens per chunk: the most that keep ``n * V`` logits under ``budget`` bytes (multiples
    of 128 when that is >= 128), then balanced so that all chunks have about the same size."""
    cap = max(1, budget // max(V * element_size, 1))
    if cap >= 128:
        cap = cap // 128 * 128
    chunks = math.ceil(N / cap)
    return min(N, math.ceil(N / chunks))


class _FusedLinearLoss(torch.autograd.Function):
    """Inputs already validated: hidden ``[N, H]`` contiguous, tids/coefs ``[N, E]``,
    labels/ignored ``[N]``, scale a 1-element float32 tensor."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, tids, coefs, tail, labels, ignored, scale, ignore_index, reduction, chunk,
                use_triton, spec, lm_weight):
        need = ctx.needs_input_grad[:3]
        # "none" needs the per-token grad_output before the d_weight matmul; float16 must apply
        # scale * grad_output before the rounding of the chunk gradient (else it underflows): both
        # compute the loss here and the gradients in the backward (one more matmul)
        grad_now = reduction != "none" and hidden.dtype != torch.float16 and any(need)
        rows = (use_triton, spec, lm_weight, RowTarget(tids, coefs, tail))
        loss_rows, grads = _chunks(hidden, weight, bias, rows, labels, ignored, scale, ignore_index, chunk,
                                   need if grad_now else (False, False, False))
        ctx.reduction, ctx.grad_now, ctx.done, ctx.use_triton = reduction, grad_now, False, use_triton
        if grad_now:
            ctx.grads = grads
        else:
            ctx.save_for_backward(hidden, weight, bias, tids, coefs, tail, labels, ignored, scale)
            ctx.opts = (ignore_index, chunk, use_triton, spec, lm_weight)
        if reduction == "none":
            return loss_rows
        return loss_rows.sum() * scale.reshape(())

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.done:
            raise RuntimeError(SECOND_BACKWARD.format("fused_linear_loss"))
        ctx.done = True
        # stays on the device: no host sync
        go = grad_output.to(accumulator_dtype(grad_output.dtype)).reshape(-1)
        if ctx.grad_now:
            grads, ctx.grads = ctx.grads, None
            return tuple(None if g is None else _rescale(g, go, ctx.use_triton) for g in grads) + (None,) * 12
        hidden, weight, bias, tids, coefs, tail, labels, ignored, scale = ctx.saved_tensors
        ignore_index, chunk, use_triton, spec, lm_weight = ctx.opts
        rows = (use_triton, spec, lm_weight, RowTarget(tids, coefs, tail))
        _, grads = _chunks(hidden, weight, bias, rows, labels, ignored, scale * go, ignore_index, chunk,
                           ctx.needs_input_grad[:3])
        return grads + (None,) * 12


def _rescale(g: Tensor, factor: Tensor, use_triton: bool) -> Tensor:
    """``g *= factor`` (one float32 element) without a host sync; a device-side no-op when it is 1
    on the Triton path, one pass over ``g`` otherwise (tiny next to the matmuls)."""
    if use_triton and g.stride(-1) == 1:
        from fastfuse.kernels.fused_ce import rescale_rows_
        return rescale_rows_(g if g.dim() == 2 else g.reshape(1, -1), factor)
    return g.mul_(factor.reshape(()))


def _chunks(hidden, weight, bias, rows, labels, ignored, scale, ignore_index, chunk, need
            ) -> Tuple[Tensor, Tuple[Optional[Tensor], ...]]:
    """The chunk loop (:func:`fastfuse.loss.chunk_loop.chunk_loop`) with this module's row pass: per-row
    losses ``[N]`` float32 and (d_hidden, d_weight, d_bias) for the gradients flagged in ``need``,
    times ``scale`` (float32: one element, or one per row ``[N]``), applied to each row's gradient in
    fp32 before its rounding to the chunk dtype. ``rows`` is ``(use_triton, spec, lm_weight,
    RowTarget)`` for :func:`fastfuse.loss.row_runner.run_rows`."""
    use_triton, spec, lm_weight, target = rows
    per_row = scale.numel() > 1

    def row_pass(z, r0, r1, compute_grad):
        return run_rows(use_triton, spec, lm_weight, z.unsqueeze(0), target.rows(r0, r1), labels[r0:r1],
                        ignored[r0:r1], ignore_index, scale[r0:r1] if per_row else scale, compute_grad,
                        inplace=True)[0]
    return chunk_loop(hidden, weight, bias, chunk, need, row_pass)


def fused_linear_loss(hidden: Tensor, weight: Tensor, source_topk: SourceTopK, align_map: AlignMap, labels: Tensor,
                      bias: Optional[Tensor] = None, source_weights: Optional[Tensor] = None, lm_weight: float = 0.9,
                      temperature: float = 1.0, ignore_index: int = -100, reduction: str = "mean", *,
                      divergence: str = "ce", tail: str = "renormalize", alpha: Optional[float] = None,
                      beta: Optional[float] = None, logit_scale: float = 1.0, softcap: Optional[float] = None,
                      student_temperature: float = 1.0, hinton_scale: bool = False,
                      inplace_grad: bool = True, impl: str = "auto", validate: bool = True,
                      chunk_tokens: Optional[int] = None, process_group=None, vocab_start: Optional[int] = None,
                      sequence_parallel: bool = False) -> Tensor:
    """:func:`fastfuse.fused_loss` of ``hidden @ weight.T + bias``, never holding all the logits.

    Args:
        hidden: ``[B, T, H]`` final hidden states (or ``[N, H]``, read as ``B = 1, T = N`` with the
            2-d conventions of ``fused_loss``), float32/bfloat16/float16.
        weight: ``[V, H]`` lm_head weight, same dtype and device as ``hidden``.
        source_topk, align_map, labels, source_weights, lm_weight, temperature, ignore_index,
        reduction, validate, divergence, tail, alpha, beta, logit_scale, softcap,
        student_temperature, hinton_scale: as for :func:`fastfuse.fused_loss` (``labels [B, T]``
            already shifted: ``labels[:, t]`` is the token predicted at position ``t``); the
            divergence family runs through the same row code as there, on each chunk's logits.
        bias: optional ``[V]``, same dtype and device.
        inplace_grad: accepted for signature compatibility with ``fused_loss``; the chunk logits
            are internal buffers and always overwritten by their gradient.
        impl: ``"auto"`` (Triton row kernel on CUDA, or on CPU with ``TRITON_INTERPRET=1``; the
            torch row path otherwise), ``"triton"`` or ``"reference"`` (torch row path). The
            matmuls are always ``torch.mm``/``addmm`` (cuBLAS on CUDA).
        chunk_tokens: tokens per chunk (default: chunks of logits under 512 MiB, see
            :func:`default_chunk_tokens`).
        process_group, vocab_start, sequence_parallel: tensor parallelism (README "Tensor
            parallelism"): ``weight`` (and ``bias``) are this rank's vocabulary shard ``[V_r, H]``
            (``[V_r]``) of an lm_head split by rows over ``process_group``, holding target ids
            ``[vocab_start, vocab_start + V_r)`` (default: contiguous in group-rank order); a
            DTensor weight sharded on dim 0 (``ColwiseParallel``) needs neither. ``hidden`` is whole
            on every rank and ``d_hidden`` is all-reduced over the group; with
            ``sequence_parallel=True`` (or a DTensor ``hidden`` sharded on its token dim) it is this
            rank's share of the tokens (``[B, T_r, H]``, or ``[N_r, H]`` of the flattened tokens in
            rank order), gathered here, and ``d_hidden`` is reduce-scattered back to it; labels and
            teacher always cover every token. ``fastfuse.loss.parallel.losses``.

    Returns the float32 loss (scalar, or ``[B, T]`` / ``[N]`` for ``"none"``). Gradients flow to
    ``hidden``, ``weight`` and ``bias``; for ``"mean"``/``"sum"`` they are computed in the forward
    (the loss must be the last op before ``backward``, and ``backward`` may run once). Extra
    memory: one ``[chunk_tokens, V]`` buffer in the input dtype plus ``O(N * (S*K + 1))``. No host
    sync in the forward with ``validate=False``. See the module docstring for the algorithm,
    precision choices and comparison with Liger-Kernel and Cut Cross-Entropy.
    """
    if (process_group is not None or vocab_start is not None or sequence_parallel is not False or is_dtensor(weight)
            or is_dtensor(hidden)):
        return vocab_parallel_linear_loss(
            hidden, weight, source_topk, align_map, labels, bias, source_weights, lm_weight, temperature, ignore_index,
            reduction, dict(divergence=divergence, tail=tail, alpha=alpha, beta=beta, logit_scale=logit_scale,
                            softcap=softcap, student_temperature=student_temperature, hinton_scale=hinton_scale),
            impl, validate, chunk_tokens, process_group, vocab_start, sequence_parallel, default_chunk_tokens)
    check_lm_head(hidden, weight, bias, chunk_tokens)
    H, V, dev = hidden.shape[-1], weight.shape[0], hidden.device
    check_tensor("labels", labels, INTS, "int64 (or int32)")
    squeeze = hidden.dim() == 2
    spec = make_spec(divergence, tail, alpha, beta, logit_scale, softcap, student_temperature, hinton_scale)
    ids, logprobs, pos, vocab, labels, source_weights = check_teacher_args(
        hidden.shape[:-1], V, dev, source_topk, align_map, labels, source_weights, lm_weight, temperature,
        ignore_index, reduction, impl, validate, owner="hidden", tail_mass=spec.uses_tail_mass)
    B, T = labels.shape
    N = B * T
    S = ids.shape[0]

    use_triton = float64_path(impl, hidden.dtype, dev, "hidden")

    # the sparse targets of all N rows, once (the same code fused_loss runs)
    acc = accumulator_dtype(hidden.dtype)
    weights = _ref.normalize_weights(source_weights, S, B, T, dev, acc).reshape(S, N)
    lm_weight, temperature = float(lm_weight), float(temperature)
    target = build_target(use_triton, spec, ids, logprobs, pos, vocab, labels, weights, lm_weight, temperature,
                          ignore_index, V, acc)
    flat_labels = labels.reshape(N).contiguous()
    ignored = flat_labels == ignore_index
    if reduction == "mean":
        scale = (1.0 / ignored.logical_not().sum().clamp_min(1).to(acc)).reshape(1)
    else:
        scale = torch.ones(1, dtype=acc, device=dev)
    chunk = chunk_tokens if chunk_tokens is not None else default_chunk_tokens(N, V, hidden.element_size())
    loss = _FusedLinearLoss.apply(hidden.reshape(N, H).contiguous(), weight, bias, target.tids, target.coefs,
                                  target.tail, flat_labels, ignored, scale, int(ignore_index), reduction, min(chunk, N),
                                  use_triton, spec, lm_weight)
    if reduction == "none":
        loss = loss.reshape(N) if squeeze else loss.reshape(B, T)
    return loss
