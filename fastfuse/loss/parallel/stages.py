"""The rows of the vocabulary-parallel loss: the stages of ``fastfuse.loss.torch_rows`` on this
rank's vocabulary slice, combined over the process group -- :class:`VocabParallelRows`, the
row runner (``fastfuse.loss.row_runner.RowRunner``) that the two autograd Functions of
``fastfuse.loss.autograd`` run here as they run the local rows.

Per chunk of rows (the same chunks on every rank, so the collectives pair up):

1. ``local_stats`` of the slice ``[n, k]`` and ``gather_sparse`` -- the transformed logits at the
   teacher ids and the label that this rank owns, -inf elsewhere ``[n, E + 1]`` -- packed into one
   ``[n, k + E + 1]`` tensor and all-gathered (round 1); every rank then combines them alike
   (``combine_stats``; a max over the ranks for the sparse logits) and holds the same row scalars;
2. for the ``"uniform"`` tail of JSD, the skew KLs and TVD: ``tail_sums`` of the slice, all-reduced
   (round 2);
3. ``row_terms`` / ``row_loss`` on the combined scalars (identical on every rank) and
   ``grad_slice``: the gradient of this rank's slice only.

No rank holds an ``[N, V]`` tensor: the largest are a chunk's ``[n, V_r]`` logits (in
``fused_linear_loss`` one buffer, overwritten by their gradient) and the float32 temporaries of the
stages, which run on slices of ``SLICE_ELEMS`` logits.
The torch ops run on CUDA too; the Triton row kernels are not used here because the stages need a
collective between the passes over a row, inside what the kernels do in one program.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastfuse.loss.checks import accumulator_dtype
from fastfuse.loss.torch_rows import (combine_stats, finish_terms, gather_sparse, grad_slice, local_stats,
                                      row_loss, row_terms, tail_sums, teacher_ids)
from fastfuse.loss.torch_path import finish_grad_rows, row_chunks
from fastfuse.loss.row_runner import RowData, RowRunner, RowTarget
from fastfuse.loss.parallel.layout import VocabLayout

__all__ = ["SLICE_ELEMS", "VocabParallelRows"]


SLICE_ELEMS = 1 << 22     # logits per stage call: bounds the float32 temporaries (as torch_divergence_rows)


def _rows(d, a: int, e: int):
    return {k: v[a:e] for k, v in d.items()}


class VocabParallelRows(RowRunner):
    """This rank's vocabulary slice (``layout``) of every row; ``chunk`` rows per collective round
    (the same on every rank, so that the collectives pair up), and the tokens of a chunk of the
    linear loss. ``hidden`` is whole on every rank, or under sequence parallelism
    (``layout.tokens``) this rank's share of the tokens."""

    def __init__(self, data: RowData, layout: VocabLayout, spec, lm_weight: float, chunk: int):
        super().__init__(data, chunk)
        self.layout, self.spec, self.lm_weight = layout, spec, lm_weight

    def rows(self, logits, r0, scale, compute_grad, inplace):
        B, T, _ = logits.shape
        acc = accumulator_dtype(logits.dtype)
        grad = None
        if compute_grad:
            grad = logits if inplace else torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        loss = torch.empty(B * T, dtype=acc, device=logits.device)
        for b, t0, t1, a, e in row_chunks(B, T, self.chunk):
            loss[a:e] = self.round(logits[b, t0:t1], *self.part(r0 + a, r0 + e, scale),
                                   None if grad is None else grad[b, t0:t1], acc)
        return loss, grad

    def round(self, z: Tensor, target: RowTarget, labels: Tensor, ignored: Tensor, scale: Tensor,
              grad_out: Optional[Tensor], acc: torch.dtype) -> Tensor:
        """One chunk ``z [n, V_r]`` of this rank's logits: the per-row loss ``[n]`` (``acc``, the same
        on every rank; 0 on ignored rows), and ``scale * dL/dz`` (``scale``: one element or one per
        row) written into ``grad_out [n, V_r]`` (``z`` itself allowed) when given. One collective
        round (two with a tail pass) for the whole chunk; the stages run on slices of
        ``SLICE_ELEMS`` logits."""
        spec, layout, lm_weight = self.spec, self.layout, self.lm_weight
        tids, q, R = target
        assert R is not None                # build_target gives every non-default spec its tail mass
        n, Vr = z.shape
        step = max(1, SLICE_ELEMS // max(Vr, 1))
        parts = [(a, min(n, a + step)) for a in range(0, n, step)]
        a_ids = teacher_ids(tids, q)
        stats = torch.cat([local_stats(z[a:e], spec, acc, a_ids[a:e], layout.start) for a, e in parts])
        sparse = torch.cat([gather_sparse(z[a:e], tids[a:e], labels[a:e], spec, layout.start, acc) for a, e in parts])
        k = stats.shape[1]
        every = layout.all_gather(torch.cat([stats, sparse], 1))         # [W, n, k + E + 1]
        st = combine_stats(every[..., :k], spec)
        rt = row_terms(spec, st, every[..., k:].amax(0), tids, q, R, layout.total)
        if spec.needs_tail_pass:
            sums = torch.cat([tail_sums(z[a:e], spec, _rows(rt, a, e), _rows(st, a, e), acc) for a, e in parts])
            rt = finish_terms(spec, rt, layout.all_reduce(sums))
        rows = row_loss(spec, lm_weight, st, rt)
        rows = torch.where(ignored, torch.zeros_like(rows), rows)
        if grad_out is not None:
            for a, e in parts:      # slice a's gradient reads only z[a:e]: writing it into z is safe
                g = grad_slice(z[a:e], spec, lm_weight, _rows(st, a, e), _rows(rt, a, e), tids[a:e], labels[a:e],
                               layout.start, acc)
                grad_out[a:e] = finish_grad_rows(g, ignored[a:e], scale, a, e)
        return rows

    def tokens(self, hidden):
        """Every token's hidden state ``[N, H]``: gathered from the ranks' shares under sequence
        parallelism."""
        H = hidden.shape[-1]
        h3 = hidden if hidden.dim() == 3 else hidden.unsqueeze(0)
        return (self.layout.gather_tokens(h3) if self.layout.tokens is not None else h3).reshape(-1, H)

    def tokens_grad(self, d_tokens, hidden):
        """Each rank's ``d_hidden`` is its vocabulary slice's part: summed over the group (all-reduce;
        under sequence parallelism the reduce-scatter to this rank's tokens)."""
        with torch.no_grad():
            if self.layout.tokens is not None:
                rows = hidden.shape[0] if hidden.dim() == 3 else 1
                d = self.layout.scatter_tokens(d_tokens.view(rows, -1, hidden.shape[-1]))
                return d.reshape(hidden.shape)
            return self.layout.all_reduce(d_tokens).view(hidden.shape)
