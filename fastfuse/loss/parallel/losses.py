"""Vocabulary-parallel (tensor-parallel) fusion loss: ``fused_loss`` and ``fused_linear_loss`` when
the target's lm_head, and so its logits, are sharded by vocabulary over a process group (Megatron's
vocab-parallel output layer; torch's ``ColwiseParallel``, a DTensor ``Shard(0)`` weight).

``fused_loss(..., process_group=pg)`` / ``fused_linear_loss(..., process_group=pg)`` (or a DTensor
logits / weight argument) come here. Each rank holds the ids ``[start, start + V_r)`` of the
vocabulary ``V = sum V_r`` (``fastfuse.loss.parallel.layout``); it builds the whole sparse teacher (small:
``N x (S*K + 1)``), handles the label and the teacher entries it owns and computes the gradient of
its own slice; per chunk of rows one all-gather of ``[n, k + E + 1]`` row statistics, and one
all-reduce of ``[n, 2]`` more for the tail-pass divergences (``fastfuse.loss.parallel.stages``).
``d_hidden`` is summed over the group (all-reduce, or reduce-scatter under sequence parallelism).

Every rank validates its arguments as the one-process losses do (the same errors, with
``V = sum V_r``), then the ranks exchange one small vector (``layout.agree``): shapes, dtypes,
the loss arguments, gradient flags and, with ``validate``, fingerprints of labels and teacher. One
all-gather and one host sync per call (also with ``validate=False``: the ranges are read from it).
"""
from __future__ import annotations

import zlib

import torch
from torch import Tensor

from fastfuse.loss.autograd import FusedLinearLoss, FusedLogitsLoss
from fastfuse.loss.checks import (INTS, LossArgs, accumulator_dtype, check_lm_head, check_logits, check_loss_args,
                                  check_tensor, float64_path)
from fastfuse.loss.chunk_loop import default_chunk_tokens
from fastfuse.loss.row_runner import prepare_rows
from fastfuse.loss.spec import LOSS_OPTIONS
from fastfuse.loss.parallel.stages import VocabParallelRows
from fastfuse.loss.parallel.layout import agree, dtensor_local, fingerprint, group_of, is_dtensor, vocab_layout

__all__ = ["vocab_parallel_loss", "vocab_parallel_linear_loss"]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_ARGS = "the loss arguments ({})".format(", ".join(LOSS_OPTIONS + ("lm_weight", "temperature", "ignore_index",
                                                                    "reduction", "impl", "validate")))
_SHOWN = {"the dtype": lambda c: str(_DTYPES[c]) if 0 <= c < len(_DTYPES) else "?", _ARGS: lambda h: f"{h:#010x}"}
_TEACHER_SHAPES = ("S (sources)", "K (top-k)", "Ts (source positions)", "Vs_max (align_map.vocab columns)",
                   "E (teacher entries per row, S*K + 1)", "source_weights (0: none, 1: [S, B], 2: [S, B, T])")


def _resolve(x, dim: int, name: str, process_group):
    """(local tensor, group, rank) of a vocabulary-sharded ``x`` (a DTensor, or a plain shard). What
    fails here fails alike on every rank (types, placements, the group), before any collective."""
    check_tensor(name, x)
    if process_group is not None:
        group_of(process_group)
    if is_dtensor(x):
        x, process_group = dtensor_local(x, dim, name, process_group)
    elif process_group is None:
        raise ValueError(f"process_group: the vocabulary-parallel loss (vocab_start, sequence_parallel or a DTensor "
                         f"argument) needs the group that {name} is sharded over ({name} is a plain tensor)")
    group, rank, _ = group_of(process_group)
    return x, group, rank


def _check_vocab_start(vocab_start, sharded_dtensor: bool, name: str):
    if vocab_start is None:
        return
    if sharded_dtensor:
        raise ValueError(f"vocab_start: {name} is a DTensor, whose range is read from its placement (leave "
                         "vocab_start None)")
    if isinstance(vocab_start, bool) or not isinstance(vocab_start, int) or vocab_start < 0:
        raise ValueError(f"vocab_start must be None or an int >= 0 (the first target id of this rank's shard), "
                         f"got {vocab_start!r}")


def _args_hash(spec, args: LossArgs) -> int:
    key = repr((tuple(spec), float(args.lm_weight), float(args.temperature), args.ignore_index, args.reduction,
                args.impl, bool(args.validate)))
    return zlib.crc32(key.encode())


def _teacher_fields(teacher) -> dict:
    S, _, Ts, K = teacher.ids.shape
    kind = 0 if teacher.source_weights is None else teacher.source_weights.dim() - 1
    return dict(zip(_TEACHER_SHAPES, (S, K, Ts, teacher.vocab.shape[1], S * K + 1, kind)))


def _exchange(fields, free, group, dev, fp, error, owner):
    """:func:`~fastfuse.loss.parallel.layout.agree` on ``fields`` (zeros where this rank's checks failed); re-raises
    this rank's own error, after the exchange."""
    if fp is None:
        fp = torch.zeros(6, dtype=torch.int64, device=dev)
    per_rank = agree(fields, free, group, dev, fp, error is not None, owner, _SHOWN)
    if error is not None:
        raise error
    return per_rank


def vocab_parallel_loss(target_logits, args: LossArgs, inplace_grad, process_group, vocab_start) -> Tensor:
    """``fused_loss`` on this rank's logits ``[B, T, V_r]`` (or a DTensor sharded on its last dim);
    ``args`` as ``fused_loss`` received them. Returns the loss of the whole vocabulary, the same on
    every rank."""
    owner = "fused_loss"
    if inplace_grad and is_dtensor(target_logits) and target_logits.requires_grad:
        raise ValueError("inplace_grad=True: a DTensor's local shard is a view autograd does not let a loss overwrite; "
                         "pass the local [B, T, V_r] shard (ColwiseParallel(use_local_output=True)) with process_group")
    logits, group, rank = _resolve(target_logits, -1, "target_logits", process_group)
    dev = logits.device
    names = ("the logits' dimensions", "N (tokens, B*T)", "B", *_TEACHER_SHAPES, "the dtype",
             "target_logits requiring grad", "inplace_grad", _ARGS, "vocab_start given", "V_r", "vocab_start")
    fields, fp, error = dict.fromkeys(names, 0), None, None
    try:
        check_logits(logits, shard=True)
        _check_vocab_start(vocab_start, is_dtensor(target_logits), "target_logits")
        lead = tuple(logits.shape[:-1])
        spec, teacher = check_loss_args(lead, 0, dev, args, validate=False)
        use_triton = float64_path(args.impl, logits.dtype, dev, "target_logits")
        needs_grad = logits.requires_grad and torch.is_grad_enabled()
        fields = dict(zip(names, (logits.dim(), teacher.labels.numel(), teacher.labels.shape[0],
                                  *_teacher_fields(teacher).values(), _DTYPES.index(logits.dtype),
                                  needs_grad, bool(inplace_grad) and needs_grad, _args_hash(spec, args),
                                  vocab_start is not None, logits.shape[-1], vocab_start or 0)))
        if args.validate:
            fp = fingerprint(teacher, dev)
    except Exception as e:      # every rank must reach the exchange, the failing one included
        error = e
    per_rank = _exchange(fields, ("V_r", "vocab_start"), group, dev, fp, error, owner)
    layout = vocab_layout(group, rank, [d["V_r"] for d in per_rank],
                          [d["vocab_start"] for d in per_rank] if vocab_start is not None else None)
    # the data checks against the whole vocabulary: the same data on every rank, so all raise alike
    check_loss_args(lead, layout.total, dev, args)
    data = prepare_rows(use_triton, spec, teacher, args, layout.total, accumulator_dtype(logits.dtype),
                        teacher_form=True)
    squeeze = logits.dim() == 2
    if squeeze:
        logits = logits.unsqueeze(0)
    inplace = bool(inplace_grad) and logits.requires_grad and torch.is_grad_enabled()
    # rows per collective round: the same on every rank (the shapes agree, V_r is the largest shard's)
    rows = default_chunk_tokens(data.labels.numel(), layout.max_size, logits.element_size())
    runner = VocabParallelRows(data, layout, spec, float(args.lm_weight), rows)
    loss = FusedLogitsLoss.apply(logits, runner, args.reduction, inplace)
    return loss.squeeze(0) if squeeze and args.reduction == "none" else loss


def _resolve_hidden(hidden, group, sequence_parallel):
    """(local hidden, sequence_parallel) for a plain ``hidden`` or a DTensor one: replicated, or
    sharded on its token dimension over the group (then sequence parallel)."""
    if not isinstance(sequence_parallel, bool):
        raise TypeError(f"sequence_parallel must be a bool, got {type(sequence_parallel).__name__}")
    if not is_dtensor(hidden):
        return hidden, sequence_parallel
    from torch.distributed.tensor import Replicate

    if all(isinstance(p, Replicate) for p in hidden.placements):
        if sequence_parallel:
            raise ValueError("sequence_parallel=True but hidden is a replicated DTensor (all tokens on every rank)")
        return hidden.to_local(), False
    local, _ = dtensor_local(hidden, hidden.dim() - 2, "hidden", group)
    return local, True


def vocab_parallel_linear_loss(hidden, weight, bias, args: LossArgs, chunk_tokens, process_group, vocab_start,
                               sequence_parallel) -> Tensor:
    """``fused_linear_loss`` with this rank's ``weight [V_r, H]`` shard (or a DTensor sharded on dim
    0) and ``bias [V_r]``; ``hidden`` whole on every rank, or with ``sequence_parallel`` this rank's
    share of the tokens (``[B, T_r, H]``: of dim 1; ``[N_r, H]``: of the flattened tokens, in rank
    order); ``args`` as ``fused_linear_loss`` received them."""
    owner = "fused_linear_loss"
    labels = args.labels
    sharded_weight = is_dtensor(weight)
    weight, group, rank = _resolve(weight, 0, "weight", process_group)
    if is_dtensor(bias):
        bias, _ = dtensor_local(bias, 0, "bias", group)
    check_tensor("hidden", hidden)
    hidden, seq = _resolve_hidden(hidden, group, sequence_parallel)
    dev = hidden.device
    names = ("hidden's dimensions", "N (tokens, B*T)", "B", "H (hidden size)", *_TEACHER_SHAPES, "the dtype",
             "hidden requiring grad", "weight requiring grad", "bias requiring grad", "bias given", "chunk_tokens",
             "sequence_parallel", _ARGS, "vocab_start given", "V_r", "vocab_start", "T_r")
    fields, fp, error = dict.fromkeys(names, 0), None, None
    try:
        check_lm_head(hidden, weight, bias, chunk_tokens, shard=True)
        H = hidden.shape[-1]
        _check_vocab_start(vocab_start, sharded_weight, "weight")
        lead = tuple(hidden.shape[:-1])
        if seq:     # labels and teacher cover every rank's tokens: the lead of the gathered hidden
            check_tensor("labels", labels, INTS, "int64 (or int32)")
            if labels.dim() == 0 or (hidden.dim() == 3 and labels.dim() != 2):
                raise ValueError(f"labels must be [B, T] for the whole sequence (hidden is this rank's "
                                 f"[B, T_r, H] share), got shape {tuple(labels.shape)}")
            lead = (hidden.shape[0], labels.shape[1]) if hidden.dim() == 3 else (labels.shape[-1],)
        spec, teacher = check_loss_args(lead, 0, dev, args, owner="hidden", validate=False)
        use_triton = float64_path(args.impl, hidden.dtype, dev, "hidden")
        grad_on = torch.is_grad_enabled()
        fields = dict(zip(names, (hidden.dim(), teacher.labels.numel(), teacher.labels.shape[0], H,
                                  *_teacher_fields(teacher).values(), _DTYPES.index(hidden.dtype),
                                  grad_on and hidden.requires_grad, grad_on and weight.requires_grad,
                                  grad_on and bias is not None and bias.requires_grad, bias is not None,
                                  -1 if chunk_tokens is None else chunk_tokens, seq, _args_hash(spec, args),
                                  vocab_start is not None, weight.shape[0], vocab_start or 0,
                                  hidden.shape[-2] if hidden.dim() == 3 else hidden.shape[0])))
        if args.validate:
            fp = fingerprint(teacher, dev)
    except Exception as e:      # every rank must reach the exchange, the failing one included
        error = e
    per_rank = _exchange(fields, ("V_r", "vocab_start", "T_r"), group, dev, fp, error, owner)
    tokens = None
    if seq:
        tokens = [d["T_r"] for d in per_rank]
        if sum(tokens) != lead[-1]:
            raise ValueError(f"hidden: the ranks' shares of the tokens ({tokens}) add up to {sum(tokens)}, but labels "
                             f"hold {lead[-1]} per sequence (sequence_parallel: labels cover the whole sequence)")
    layout = vocab_layout(group, rank, [d["V_r"] for d in per_rank],
                          [d["vocab_start"] for d in per_rank] if vocab_start is not None else None, tokens)
    check_loss_args(lead, layout.total, dev, args, owner="hidden")
    data = prepare_rows(use_triton, spec, teacher, args, layout.total, accumulator_dtype(hidden.dtype),
                        teacher_form=True)
    N = data.labels.numel()
    chunk = chunk_tokens if chunk_tokens is not None else default_chunk_tokens(N, layout.max_size,
                                                                               hidden.element_size())
    runner = VocabParallelRows(data, layout, spec, float(args.lm_weight), min(chunk, N))
    loss = FusedLinearLoss.apply(hidden.contiguous(), weight, bias, runner, args.reduction)
    if args.reduction == "none":
        loss = loss.reshape(N) if hidden.dim() == 2 else loss.reshape(teacher.labels.shape)
    return loss
