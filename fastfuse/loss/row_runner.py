"""The rows of one loss call: the one prepare step of every entry point, and the row-runner
interface the two autograd Functions (``fastfuse.loss.autograd``) run them through.

:func:`prepare_rows` turns validated arguments into :class:`RowData`: the sparse target of all
``N`` rows (:func:`build_target`), the flat labels, the ignored rows and the reduction's scale.
A :class:`RowRunner` then computes the loss and gradient of rows of logits -- all of them, or one
chunk of a linear loss at a time. Two implementations: :class:`LocalRows` (here: the whole
vocabulary in this process) and ``fastfuse.loss.parallel.stages.VocabParallelRows`` (this rank's
vocabulary slice, combined over a process group). Two row codes in :class:`LocalRows`, picked by
the :class:`~fastfuse.loss.spec.DivergenceSpec`:

* the default spec (FuseLLM's CE, no student transform) keeps the original one: gold and teacher
  merged into ``S*K + 1`` coefficients, ``kernels/fused_ce.py`` or ``torch_path.loss_and_grad_rows``
  -- bit for bit what it computed before the divergence family existed;
* every other spec: the teacher alone (unique ids, probabilities ``q``, missing mass ``R``) and
  ``kernels/divergence.py`` or ``torch_rows.torch_divergence_rows``.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from fastfuse.loss.checks import LossArgs, Teacher
from fastfuse.loss import torch_path
from fastfuse.loss.torch_rows import torch_divergence_rows

__all__ = ["RowTarget", "RowData", "build_target", "prepare_rows", "run_rows", "RowRunner", "LocalRows"]


class RowTarget(NamedTuple):
    """``tids [N, E]`` and ``coefs [N, E]`` (default spec: gold + teacher coefficients; otherwise
    the teacher's probabilities ``q``, unique ids) and ``tail [N]`` (the teacher's missing mass;
    ``None`` for the default spec)."""
    tids: Tensor
    coefs: Tensor
    tail: Optional[Tensor]

    def rows(self, r0: int, r1: int) -> "RowTarget":
        return RowTarget(self.tids[r0:r1], self.coefs[r0:r1], None if self.tail is None else self.tail[r0:r1])


class RowData(NamedTuple):
    """What every row of a call needs: its :class:`RowTarget`, ``labels [N]``, ``ignored [N]`` and
    ``scale`` (one element: ``1 / #non-ignored`` for ``"mean"``, else 1; a device scalar)."""
    target: RowTarget
    labels: Tensor
    ignored: Tensor
    scale: Tensor


def build_target(use_triton: bool, spec, ids, logprobs, pos, vocab, labels, weights, lm_weight: float,
                 temperature: float, ignore_index: int, V: int, dtype: torch.dtype = torch.float32,
                 teacher_form: bool = False) -> RowTarget:
    """The :class:`RowTarget` of every row (inputs validated, 3-d layout; ``weights [S, N]``); the
    torch path computes its coefficients in ``dtype`` (float64 for float64 logits). With
    ``teacher_form`` the teacher alone (unique ids, ``q``, ``R``) whatever the spec: the
    vocabulary-parallel loss runs the staged rows for every spec."""
    with torch.no_grad():
        if spec.is_default and not teacher_form:
            if use_triton:
                from fastfuse.kernels.sparse_teacher import sparse_teacher
                tids, coefs = sparse_teacher(ids, logprobs, pos, vocab, labels, weights, lm_weight, temperature,
                                             ignore_index, V)
            else:
                tids, coefs = torch_path.torch_sparse_teacher(SimpleNamespace(ids=ids, logprobs=logprobs),
                                                              SimpleNamespace(pos=pos, vocab=vocab), labels,
                                                              weights, lm_weight, temperature, ignore_index, V,
                                                              dtype=dtype)
            return RowTarget(tids, coefs, None)
        if use_triton:
            from fastfuse.kernels.sparse_teacher import sparse_teacher
            tail = torch.zeros(labels.numel(), dtype=torch.float32, device=labels.device)
            tids, q = sparse_teacher(ids, logprobs, pos, vocab, labels, weights, 0.0, temperature, ignore_index, V,
                                     tail=tail if spec.uses_tail_mass else None)
            return RowTarget(tids, q, tail)
        return RowTarget(*torch_path.teacher_rows(SimpleNamespace(ids=ids, logprobs=logprobs),
                                                  SimpleNamespace(pos=pos, vocab=vocab), labels, weights,
                                                  temperature, ignore_index, V, spec.uses_tail_mass, dtype))


def prepare_rows(use_triton: bool, spec, teacher: Teacher, args: LossArgs, V: int, acc: torch.dtype,
                 teacher_form: bool = False) -> RowData:
    """The prepare step of every entry point: normalised source weights, the :class:`RowTarget` of
    every row over a vocabulary of ``V`` ids (coefficients in ``acc`` on the torch path), the flat
    labels, the ignored rows and the reduction's scale (``teacher_form``: see :func:`build_target`)."""
    ids, logprobs, pos, vocab, labels, source_weights = teacher
    B, T = labels.shape
    S, N, dev = ids.shape[0], B * T, labels.device
    weights = torch_path.normalize_weights(source_weights, S, B, T, dev, acc).reshape(S, N)
    target = build_target(use_triton, spec, ids, logprobs, pos, vocab, labels, weights, float(args.lm_weight),
                          float(args.temperature), args.ignore_index, V, acc, teacher_form)
    flat = labels.reshape(N).contiguous()
    ignored = flat == args.ignore_index
    if args.reduction == "mean":        # a device scalar: no host sync
        scale = (1.0 / ignored.logical_not().sum().clamp_min(1).to(acc)).reshape(1)
    else:
        scale = torch.ones(1, dtype=acc, device=dev)
    return RowData(target, flat, ignored, scale)


def run_rows(use_triton: bool, spec, lm_weight: float, logits: Tensor, target: RowTarget, labels: Tensor,
             ignored: Tensor, ignore_index: int, scale: Tensor, compute_grad: bool, inplace: bool
             ) -> Tuple[Tensor, Optional[Tensor]]:
    """Per-row loss ``[N]`` float32 and ``scale * dL/dlogits`` (``None`` without ``compute_grad``;
    ``logits`` itself with ``inplace``) of ``logits [B, T, V]`` against ``target``'s rows."""
    if use_triton:
        grad = None
        if compute_grad:
            grad = logits if inplace else torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        if spec.is_default:
            from fastfuse.kernels.fused_ce import ce_rows
            loss = ce_rows(logits, grad, target.tids, target.coefs, labels, ignore_index, scale, compute_grad)
        else:
            from fastfuse.kernels.divergence import divergence_rows
            loss = divergence_rows(logits, grad, target.tids, target.coefs, target.tail, labels, ignore_index, scale,
                                   compute_grad, spec, lm_weight)
        return loss, grad
    if spec.is_default:
        return torch_path.loss_and_grad_rows(logits, target.tids, target.coefs, ignored, scale, compute_grad, inplace)
    assert target.tail is not None      # build_target gives every non-default spec its tail mass (zeros: none)
    return torch_divergence_rows(logits, target.tids, target.coefs, target.tail, labels, ignored, spec, lm_weight,
                                 scale, compute_grad, inplace)


class RowRunner:
    """The rows of one loss call, as the autograd Functions see them. ``data`` covers every row
    (``N``); ``chunk``: tokens per chunk of the linear loss (0 for the logits loss).

    :meth:`rows` is what an implementation provides; :meth:`tokens` / :meth:`tokens_grad` (how the
    hidden states reach the rows and their gradient goes back) and :meth:`rescale_` have the
    one-process defaults here."""

    def __init__(self, data: RowData, chunk: int = 0):
        self.data, self.chunk = data, chunk

    @property
    def scale(self) -> Tensor:
        return self.data.scale

    def part(self, r0: int, r1: int, scale: Tensor) -> Tuple[RowTarget, Tensor, Tensor, Tensor]:
        """The target, labels, ignored flags and ``scale`` (one element, or one per row) of rows
        ``[r0, r1)``."""
        d = self.data
        return (d.target.rows(r0, r1), d.labels[r0:r1], d.ignored[r0:r1],
                scale[r0:r1] if scale.numel() > 1 else scale)

    def rows(self, logits: Tensor, r0: int, scale: Tensor, compute_grad: bool, inplace: bool
             ) -> Tuple[Tensor, Optional[Tensor]]:
        """Per-row loss ``[B*T]`` (float32; float64 for float64 logits) of ``logits [B, T, V]``, rows
        ``[r0, r0 + B*T)`` of the call, and with ``compute_grad`` ``scale * dL/dlogits`` in the
        logits dtype (rounded once; into ``logits`` itself with ``inplace``), else None."""
        raise NotImplementedError

    def tokens(self, hidden: Tensor) -> Tensor:
        """``[N, H]``: every row's hidden state."""
        return hidden.reshape(-1, hidden.shape[-1])

    def tokens_grad(self, d_tokens: Tensor, hidden: Tensor) -> Tensor:
        """``d_hidden`` (``hidden``'s shape) from the gradient of :meth:`tokens`' output."""
        return d_tokens.view(hidden.shape)

    def rescale_(self, g: Tensor, factor: Tensor) -> Tensor:
        """``g *= factor`` in place (one element, or one per row of ``g [B, T, V]``); no host sync."""
        return g.mul_(factor.reshape(*g.shape[:-1], 1) if factor.numel() > 1 else factor.reshape(()))


class LocalRows(RowRunner):
    """The whole vocabulary in this process: the Triton row kernels, or the torch row paths."""

    def __init__(self, data: RowData, use_triton: bool, spec, lm_weight: float, ignore_index: int, chunk: int = 0):
        super().__init__(data, chunk)
        self.use_triton, self.spec, self.lm_weight, self.ignore_index = use_triton, spec, lm_weight, ignore_index

    def rows(self, logits, r0, scale, compute_grad, inplace):
        target, labels, ignored, scale = self.part(r0, r0 + logits.shape[0] * logits.shape[1], scale)
        return run_rows(self.use_triton, self.spec, self.lm_weight, logits, target, labels, ignored,
                        self.ignore_index, scale, compute_grad, inplace)

    def rescale_(self, g, factor):
        # the Triton rescale is a device-side no-op when the factor is 1 (the usual loss.backward())
        if self.use_triton and g.stride(-1) == 1:
            from fastfuse.kernels.fused_ce import rescale_rows_
            rescale_rows_(g if g.dim() > 1 else g.reshape(1, -1), factor)
            return g
        return super().rescale_(g, factor)
