"""``fused_linear_loss``: the fusion loss from hidden states and the lm_head weight, without ever
holding the full ``[N, V]`` logits.

Exactly ``fused_loss(hidden @ weight.T + bias, ...)``: same teacher semantics, same reference
(``fastfuse.loss.reference``), same row code, same kernels. The algorithm (DESIGN.md §4):

0. the sparse target of every token (gold label + fused teacher, ``<= S*K + 1`` (id, coef) pairs
   per row) is built once for all ``N = B*T`` tokens by the same code as ``fused_loss`` (the
   Triton ``sparse_teacher`` kernel, or ``torch_path.torch_sparse_teacher`` on the torch path);
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

from typing import Optional

from torch import Tensor

from fastfuse.batch import AlignMap, SourceTopK
from fastfuse.loss.autograd import FusedLinearLoss
from fastfuse.loss.checks import (LossArgs, accumulator_dtype, check_lm_head, check_loss_args, float64_path, loss_options,
                                  resolve_impl)
from fastfuse.loss.chunk_loop import default_chunk_tokens
from fastfuse.loss.row_runner import LocalRows, prepare_rows
from fastfuse.loss.parallel.losses import vocab_parallel_linear_loss
from fastfuse.loss.parallel.layout import is_dtensor

__all__ = ["fused_linear_loss", "default_chunk_tokens"]


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
            torch row path otherwise), ``"triton"`` or ``"torch"`` (torch row path; ``"reference"``
            is its deprecated old name). The matmuls are always ``torch.mm``/``addmm`` (cuBLAS on CUDA).
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
    args = LossArgs(source_topk, align_map, labels, source_weights, lm_weight, temperature, ignore_index, reduction,
                    loss_options(locals()), resolve_impl(impl), validate)
    if (process_group is not None or vocab_start is not None or sequence_parallel is not False or is_dtensor(weight)
            or is_dtensor(hidden)):
        return vocab_parallel_linear_loss(hidden, weight, bias, args, chunk_tokens, process_group, vocab_start,
                                          sequence_parallel)
    check_lm_head(hidden, weight, bias, chunk_tokens)
    H, V, dev = hidden.shape[-1], weight.shape[0], hidden.device
    spec, teacher = check_loss_args(hidden.shape[:-1], V, dev, args, owner="hidden")
    B, T = teacher.labels.shape
    N = B * T
    use_triton = float64_path(args.impl, hidden.dtype, dev, "hidden")
    # the sparse targets of all N rows, once (the same code fused_loss runs)
    data = prepare_rows(use_triton, spec, teacher, args, V, accumulator_dtype(hidden.dtype))
    chunk = chunk_tokens if chunk_tokens is not None else default_chunk_tokens(N, V, hidden.element_size())
    runner = LocalRows(data, use_triton, spec, float(lm_weight), ignore_index, min(chunk, N))
    loss = FusedLinearLoss.apply(hidden.reshape(N, H).contiguous(), weight, bias, runner, reduction)
    if reduction == "none":
        loss = loss.reshape(N) if hidden.dim() == 2 else loss.reshape(B, T)
    return loss
