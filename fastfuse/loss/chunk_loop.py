"""Chunks of tokens: how many (:func:`default_chunk_tokens`, a budget of :data:`CHUNK_BYTES` of logits, for
the linear loss's chunks and the vocabulary-parallel loss's collective rounds), and the chunk loop of
``fused_linear_loss``, one process or vocabulary-parallel: per chunk of ``n``
tokens the logits ``h_c @ W.T (+ b)`` into one reused ``[n, V]`` buffer (``torch.mm``/``addmm``, in
the input dtype), a row pass that overwrites them with ``scale * dL/dlogits``, then
``d_hidden_c = dlogits_c @ W`` (into ``d_hidden``'s rows), ``d_weight (+)= dlogits_c.T @ h_c`` (the
first chunk writes it, the others ``addmm_``) and ``d_bias += dlogits_c.sum(0)`` (fp32 or fp64
accumulator). The algorithm and its precision choices: ``fastfuse/loss/linear_loss.py``'s docstring."""
from __future__ import annotations

import math
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

from fastfuse.loss.checks import accumulator_dtype

__all__ = ["CHUNK_BYTES", "default_chunk_tokens", "chunk_loop"]

CHUNK_BYTES = 512 << 20     # logits per chunk (fused_linear_loss) or per collective round (vocabulary-parallel)


def default_chunk_tokens(N: int, V: int, element_size: int, budget: Optional[int] = None) -> int:
    """Tokens per chunk: the most that keep ``n * V`` logits under ``budget`` bytes (default
    :data:`CHUNK_BYTES`; multiples of 128 when that is >= 128), then balanced so that all chunks
    have about the same size."""
    cap = max(1, (CHUNK_BYTES if budget is None else budget) // max(V * element_size, 1))
    if cap >= 128:
        cap = cap // 128 * 128
    chunks = math.ceil(N / cap)
    return min(N, math.ceil(N / chunks))


def chunk_loop(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], chunk: int, need,
               row_pass: Callable[[Tensor, int, int, bool], Tensor]
               ) -> Tuple[Tensor, Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]]:
    """Per-token losses ``[N]`` (``accumulator_dtype(hidden.dtype)``) of ``hidden [N, H]`` against
    ``weight [V, H]`` (and ``bias [V]``), and ``(d_hidden, d_weight, d_bias)`` for the gradients
    flagged in ``need`` (None for the others). ``row_pass(z, r0, r1, compute_grad)`` returns the
    losses of rows ``[r0, r1)`` from their logits ``z [r1 - r0, V]`` and, with ``compute_grad``,
    overwrites ``z`` with their (scaled) gradient."""
    N = hidden.shape[0]
    V = weight.shape[0]
    acc = accumulator_dtype(hidden.dtype)
    compute_grad = any(need)
    d_hidden = torch.empty_like(hidden) if need[0] else None
    d_weight = torch.empty_like(weight) if need[1] else None
    d_bias = torch.zeros(V, dtype=acc, device=hidden.device) if (need[2] and bias is not None) else None
    loss = torch.empty(N, dtype=acc, device=hidden.device)
    buf = torch.empty(min(chunk, N), V, dtype=hidden.dtype, device=hidden.device)
    wt = weight.t()
    with torch.no_grad(), torch.autocast(hidden.device.type, enabled=False):   # dtypes as given
        for i, r0 in enumerate(range(0, N, chunk)):
            r1 = min(N, r0 + chunk)
            h = hidden[r0:r1]
            z = buf[: r1 - r0]
            if bias is None:
                torch.mm(h, wt, out=z)
            else:
                torch.addmm(bias, h, wt, out=z)
            loss[r0:r1] = row_pass(z, r0, r1, compute_grad)
            if not compute_grad:
                continue
            if d_hidden is not None:
                torch.mm(z, weight, out=d_hidden[r0:r1])
            if d_weight is not None:
                if i == 0:
                    torch.mm(z.t(), h, out=d_weight)
                else:
                    d_weight.addmm_(z.t(), h)
            if d_bias is not None:
                d_bias += z.sum(0, dtype=acc)
    if d_bias is not None and bias is not None:
        d_bias = d_bias.to(bias.dtype)
    return loss, (d_hidden, d_weight, d_bias)
