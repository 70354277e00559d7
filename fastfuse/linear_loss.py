"""``fused_linear_loss``: the fusion loss from hidden states and the lm_head weight, without ever
holding the full ``[N, V]`` logits.

Exactly ``fused_loss(hidden @ weight.T + bias, ...)`` (same teacher semantics, same validation: it
calls :func:`fastfuse.fused_loss` on chunks). The tokens are processed in chunks along the sequence
dimension; per chunk (DESIGN.md §4):

1. ``logits_c = hidden_c @ weight.T (+ bias)`` in the input dtype (tensor cores for bf16/fp16,
   fp32 accumulation inside the matmul);
2. ``fused_loss(logits_c, ..., reduction="sum", inplace_grad=True)``: one pass writes the loss and
   ``dL/dlogits_c`` *into the logits buffer* (Triton on CUDA, the chunked torch path on CPU);
3. ``d_hidden_c = dlogits_c @ weight``, ``d_weight += dlogits_c.T @ hidden_c``, ``d_bias += sum``.

For ``"mean"``/``"sum"`` the gradients are complete at the end of the forward (the loss is the last
op of the graph: three matmuls in all), and the backward only scales them by ``grad_output``.
For ``"none"`` the backward needs per-token ``grad_output``, so it recomputes the chunk logits
(four matmuls). Extra memory: one chunk of logits (``chunk_tokens x V``, default <= 256 MiB),
``d_hidden`` and ``d_weight`` (weight dtype, accumulated chunk by chunk).

Compared with Liger-Kernel's fused linear cross-entropy (same chunk-and-matmul structure, hard labels
only) this adds the sparse multi-source teacher; Apple's Cut Cross-Entropy instead fuses the matmul
into the log-sum-exp kernel and never writes a logits chunk, which saves memory bandwidth on GPU but
recomputes the logits in the backward. The teacher logits are gathered from the chunk's logits in
the input dtype (as ``fused_loss`` on bf16 logits does), not by separate fp32 dot products.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastfuse.loss import AlignMap, SourceTopK, fused_loss

__all__ = ["fused_linear_loss"]

_CHUNK_BYTES = 256 << 20


def _chunk_len(B: int, T: int, V: int, elem: int, chunk_tokens: Optional[int]) -> int:
    """Sequence positions per chunk (all B sequences at once)."""
    tokens = chunk_tokens if chunk_tokens is not None else max(_CHUNK_BYTES // max(V * elem, 1), 1)
    return max(1, min(T, tokens // max(B, 1)))


class _FusedLinearLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, ids, logprobs, pos, vocab, labels, weights, lm_weight, temperature,
                ignore_index, reduction, impl, validate, chunk):
        B, T, H = hidden.shape
        V = weight.shape[0]
        need = ctx.needs_input_grad[:3]
        ctx.save_for_backward(hidden, weight, bias, ids, logprobs, pos, vocab, labels, weights)
        ctx.opts = (lm_weight, temperature, ignore_index, impl, chunk)
        ctx.reduction = reduction
        per_token = weights is not None and weights.dim() == 3
        grad_now = reduction != "none" and any(need)
        d_hidden = torch.zeros_like(hidden) if grad_now and need[0] else None
        d_weight = torch.zeros_like(weight) if grad_now and need[1] else None
        d_bias = torch.zeros_like(bias) if grad_now and bias is not None and need[2] else None
        if reduction == "mean":  # one host sync: the token count scales every chunk's gradient
            count = max(int((labels != ignore_index).sum()), 1)
            scale = 1.0 / count
        else:
            scale = 1.0
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        rows = []
        for t0 in range(0, T, chunk):
            t1 = min(T, t0 + chunk)
            h = hidden[:, t0:t1]
            logits = h @ weight.T
            if bias is not None:
                logits = logits + bias
            topk, amap = SourceTopK(ids, logprobs), AlignMap(pos[:, :, t0:t1], vocab)
            w = weights[:, :, t0:t1] if per_token else weights
            kw = dict(source_weights=w, lm_weight=lm_weight, temperature=temperature, ignore_index=ignore_index,
                      impl=impl, validate=validate)
            if not grad_now:
                rows.append(fused_loss(logits, topk, amap, labels[:, t0:t1], reduction="none", **kw))
                continue
            with torch.enable_grad():
                logits = logits.detach().requires_grad_(True)
                loss_c = fused_loss(logits, topk, amap, labels[:, t0:t1], reduction="sum", inplace_grad=True, **kw)
                (g,) = torch.autograd.grad(loss_c, logits)  # the logits buffer, now dL/dlogits
            total += loss_c.detach()
            g2 = g.reshape(-1, V)
            if d_hidden is not None:
                d_hidden[:, t0:t1] = g @ weight
            if d_weight is not None:
                d_weight.addmm_(g2.T, h.reshape(-1, H))
            if d_bias is not None:
                d_bias.add_(g2.sum(0, dtype=torch.float32).to(d_bias.dtype))
            del g, g2, logits
        if reduction == "none":
            return torch.cat(rows, dim=1)
        if not grad_now:  # no gradient wanted: the loss from the per-token rows
            return sum(r.sum() for r in rows) * scale
        if scale != 1.0:
            for d in (d_hidden, d_weight, d_bias):
                if d is not None:
                    d.mul_(scale)
        ctx.grads = (d_hidden, d_weight, d_bias)
        return total * scale

    @staticmethod
    def backward(ctx, grad_output):
        hidden, weight, bias, ids, logprobs, pos, vocab, labels, weights = ctx.saved_tensors
        if ctx.reduction != "none":
            grads = []
            for d in ctx.grads:
                if d is not None and not (grad_output.numel() == 1 and float(grad_output) == 1.0):
                    d = d * grad_output.to(d.dtype)
                grads.append(d)
            ctx.grads = None
            return (*grads,) + (None,) * 13
        # "none": recompute the chunk logits and backpropagate the per-token grad_output
        lm_weight, temperature, ignore_index, impl, chunk = ctx.opts
        B, T, H = hidden.shape
        V = weight.shape[0]
        per_token = weights is not None and weights.dim() == 3
        need = ctx.needs_input_grad[:3]
        d_hidden = torch.empty_like(hidden) if need[0] else None
        d_weight = torch.zeros_like(weight) if need[1] else None
        d_bias = torch.zeros_like(bias) if bias is not None and need[2] else None
        for t0 in range(0, T, chunk):
            t1 = min(T, t0 + chunk)
            h = hidden[:, t0:t1]
            with torch.enable_grad():
                logits = (h @ weight.T if bias is None else h @ weight.T + bias).detach().requires_grad_(True)
                w = weights[:, :, t0:t1] if per_token else weights
                loss_c = fused_loss(logits, SourceTopK(ids, logprobs), AlignMap(pos[:, :, t0:t1], vocab),
                                    labels[:, t0:t1], source_weights=w, lm_weight=lm_weight, temperature=temperature,
                                    ignore_index=ignore_index, reduction="none", impl=impl, validate=False,
                                    inplace_grad=True)
                (g,) = torch.autograd.grad(loss_c, logits, grad_output[:, t0:t1])
            if d_hidden is not None:
                d_hidden[:, t0:t1] = g @ weight
            if d_weight is not None:
                d_weight.addmm_(g.reshape(-1, V).T, h.reshape(-1, H))
            if d_bias is not None:
                d_bias.add_(g.reshape(-1, V).sum(0, dtype=torch.float32).to(d_bias.dtype))
        return (d_hidden, d_weight, d_bias) + (None,) * 13


def fused_linear_loss(hidden: Tensor, weight: Tensor, source_topk: SourceTopK, align_map: AlignMap, labels: Tensor,
                      bias: Optional[Tensor] = None, source_weights: Optional[Tensor] = None, lm_weight: float = 0.9,
                      temperature: float = 1.0, ignore_index: int = -100, reduction: str = "mean", *,
                      impl: str = "auto", validate: bool = True, chunk_tokens: Optional[int] = None) -> Tensor:
    """:func:`fastfuse.fused_loss` of ``hidden @ weight.T + bias``, never holding all the logits.

    Args:
        hidden: ``[B, T, H]`` (or ``[N, H]``, read as ``B = 1``) final hidden states, float32/bf16/fp16.
        weight: ``[V, H]`` lm_head weight, same dtype and device as ``hidden``.
        bias: optional ``[V]``.
        source_topk, align_map, labels, source_weights, lm_weight, temperature, ignore_index,
        reduction, impl, validate: as for :func:`fastfuse.fused_loss` (``labels`` ``[B, T]``).
        chunk_tokens: tokens per chunk (default: as many as fit 256 MiB of logits).

    Gradients flow to ``hidden``, ``weight`` and ``bias``. See the module docstring for the algorithm.
    """
    for name, x in (("hidden", hidden), ("weight", weight)):
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise TypeError(f"{name} must be float32, bfloat16 or float16, got {x.dtype}")
    if hidden.dim() == 2:
        hidden = hidden.unsqueeze(0)
        if labels.dim() == 1:
            labels = labels.unsqueeze(0)
        ids, logprobs = source_topk
        pos, vocab = align_map
        source_topk = SourceTopK(ids.unsqueeze(1) if ids.dim() == 3 else ids,
                                 logprobs.unsqueeze(1) if logprobs.dim() == 3 else logprobs)
        align_map = AlignMap(pos.unsqueeze(1) if pos.dim() == 2 else pos, vocab)
        if source_weights is not None and source_weights.dim() == 1:
            source_weights = source_weights.unsqueeze(1)
        elif source_weights is not None and source_weights.dim() == 2 and source_weights.shape[1] == hidden.shape[1] != 1:
            source_weights = source_weights.unsqueeze(1)
        squeeze = True
    else:
        squeeze = False
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be [B, T, H] or [N, H], got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be [V, H={hidden.shape[-1]}] (lm_head weight), got shape {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype {weight.dtype} differs from hidden dtype {hidden.dtype}")
    if weight.device != hidden.device:
        raise ValueError(f"weight is on {weight.device}, hidden on {hidden.device}")
    if bias is not None:
        if not isinstance(bias, Tensor) or bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must be a [V={weight.shape[0]}] tensor or None, got "
                             f"{tuple(bias.shape) if isinstance(bias, Tensor) else type(bias).__name__}")
        if bias.dtype != hidden.dtype or bias.device != hidden.device:
            raise TypeError(f"bias must have hidden's dtype and device ({hidden.dtype}, {hidden.device})")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if chunk_tokens is not None and (not isinstance(chunk_tokens, int) or chunk_tokens < 1):
        raise ValueError(f"chunk_tokens must be a positive int or None, got {chunk_tokens!r}")
    if not isinstance(labels, Tensor) or labels.shape != hidden.shape[:2]:
        raise ValueError(f"labels must be a tensor of shape {tuple(hidden.shape[:2])} (B, T of hidden), got "
                         f"{tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__}")
    B, T, _ = hidden.shape
    chunk = _chunk_len(B, T, weight.shape[0], hidden.element_size(), chunk_tokens)
    hidden = hidden.contiguous()
    loss = _FusedLinearLoss.apply(hidden, weight, bias, source_topk.ids, source_topk.logprobs, align_map.pos,
                                  align_map.vocab, labels, source_weights, float(lm_weight), float(temperature),
                                  ignore_index, reduction, impl, validate, chunk)
    if squeeze and reduction == "none":
        loss = loss.squeeze(0)
    return loss
