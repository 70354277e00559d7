"""What both loss entry points share: dtype sets, tensor checks, the loss-argument checks and the
one rule that picks an implementation.

``fused_loss`` and ``fused_linear_loss`` (one process or vocabulary-parallel) call
:func:`check_loss_args` and :func:`choose_impl` so that they can never disagree on what they accept
or on which backend runs (a second copy of the backend rule once drifted: one entry point raised
where the other silently fell back), and :func:`check_logits` / :func:`check_lm_head` for the
tensors the loss differentiates.
"""
from __future__ import annotations

import os
import warnings
from typing import Any, Mapping, NamedTuple, Optional

import torch
from torch import Tensor

from fastfuse.loss.spec import LOSS_OPTIONS, DivergenceSpec, make_spec

__all__ = ["FLOATS", "ALL_FLOATS", "INTS", "IMPLS", "SECOND_BACKWARD", "LossArgs", "Teacher", "loss_options",
           "resolve_impl", "choose_impl", "float64_path", "accumulator_dtype", "check_tensor", "check_logits",
           "check_lm_head", "check_loss_args"]

FLOATS = (torch.float32, torch.bfloat16, torch.float16)
# float64 runs only on the torch path (exact comparisons, gradcheck); the kernels take FLOATS
ALL_FLOATS = FLOATS + (torch.float64,)
INTS = (torch.int32, torch.int64)
IMPLS = ("auto", "triton", "torch")
# the old name of impl="torch" (it named the sparse torch path, not the dense reference): one more release
DEPRECATED_IMPLS = {"reference": "torch"}

# Both losses hand their gradient over (or overwrite it in place) in the first backward, so a second
# backward through the same graph (retain_graph=True) cannot be answered: one message for both.
SECOND_BACKWARD = ("{}: backward through the same loss twice; its gradient is computed once and handed over "
                   "by the first backward (retain_graph=True does not keep it). Call the loss again instead.")

_NEEDS_INTERPRETER = ("impl='triton' on CPU tensors needs TRITON_INTERPRET=1, set before triton and "
                      "fastfuse.kernels are first imported")


class LossArgs(NamedTuple):
    """The arguments of a loss call besides the tensors it differentiates, as the caller passed them
    (``options``: the :data:`~fastfuse.loss.spec.LOSS_OPTIONS` keywords; ``impl`` already resolved
    by :func:`resolve_impl`). What the vocabulary-parallel entry points take instead of a dozen
    positional parameters."""
    source_topk: Any
    align_map: Any
    labels: Any
    source_weights: Any
    lm_weight: Any
    temperature: Any
    ignore_index: Any
    reduction: Any
    options: Mapping[str, Any]
    impl: str
    validate: bool


class Teacher(NamedTuple):
    """The validated teacher-side tensors in the 3-d layout (:func:`check_loss_args`)."""
    ids: Tensor
    logprobs: Tensor
    pos: Tensor
    vocab: Tensor
    labels: Tensor
    source_weights: Optional[Tensor]


def loss_options(values: Mapping[str, Any]) -> dict:
    """The :data:`~fastfuse.loss.spec.LOSS_OPTIONS` entries of ``values`` (an entry point's ``locals()``)."""
    return {name: values[name] for name in LOSS_OPTIONS}


def resolve_impl(impl):
    """``impl`` with the deprecated ``"reference"`` replaced by ``"torch"`` (and a
    ``DeprecationWarning`` pointing at the caller of the entry point that called this)."""
    if isinstance(impl, str) and impl in DEPRECATED_IMPLS:
        new = DEPRECATED_IMPLS[impl]
        warnings.warn(f"impl={impl!r} is deprecated and will be removed in the next release: use impl={new!r} "
                      "(it names the sparse torch path; the dense reference is fastfuse.loss.reference, for tests)",
                      DeprecationWarning, stacklevel=3)
        return new
    return impl


def _interpreter_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - depends on the installation
        return False
    return True


def _kernels_interpreted() -> bool:
    """The kernels were compiled for the interpreter (the variable was set before their import)."""
    from fastfuse.kernels import fused_ce
    return type(fused_ce.fused_ce_kernel).__name__ == "InterpretedFunction"


def choose_impl(impl: str, device: torch.device) -> str:
    """``"triton"`` or ``"torch"`` for a call with ``impl`` on tensors on ``device``.

    ``"auto"``: Triton on CUDA; on CPU Triton only when the kernels run under the interpreter
    (``TRITON_INTERPRET=1`` set before they were imported), else the torch path -- ``"auto"``
    never fails for the backend's sake. ``"triton"`` raises ``ValueError`` where it cannot run;
    ``"torch"`` always runs the torch path.
    """
    if impl == "torch":
        return "torch"
    if impl == "auto":
        if not _triton_importable():
            return "torch"
        if device.type == "cuda":
            return "triton"
        if device.type == "cpu" and _interpreter_requested() and _kernels_interpreted():
            return "triton"
        return "torch"
    if impl == "triton":
        if not _triton_importable():
            raise ValueError("impl='triton' needs the triton package")
        if device.type == "cpu":
            if not (_interpreter_requested() and _kernels_interpreted()):
                raise ValueError(_NEEDS_INTERPRETER)
            return "triton"
        if device.type != "cuda":
            raise ValueError(f"impl='triton' needs CUDA (or CPU with TRITON_INTERPRET=1) tensors, got {device}")
        return "triton"
    raise ValueError(f"impl must be one of {', '.join(map(repr, IMPLS))}, got {impl!r}")


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """What the torch paths compute and return losses in for inputs of ``dtype``: float64 for
    float64, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def float64_path(impl: str, dtype: torch.dtype, device: torch.device, owner: str) -> bool:
    """Whether a call on ``dtype`` inputs on ``device`` runs the Triton kernels (:func:`choose_impl`):
    float64 takes the torch path (``"auto"``) or is refused (``"triton"``: the kernels compute in fp32)."""
    if dtype != torch.float64:
        return choose_impl(impl, device) == "triton"
    if impl == "triton":
        raise ValueError(f"impl='triton' takes float32/bfloat16/float16 {owner}; float64 runs on the torch path "
                         "(impl='auto' or 'torch')")
    choose_impl(impl, device)           # still refuses an unknown impl
    return False


def check_lm_head(hidden, weight, bias, chunk_tokens, shard: bool = False) -> None:
    """The checks ``fused_linear_loss`` makes of ``hidden``, the lm_head ``weight`` (``[V, H]``; with
    ``shard``, this rank's ``[V_r, H]``), ``bias`` and ``chunk_tokens``: ``ValueError`` /
    ``TypeError`` naming the argument."""
    floats = "float32, bfloat16 or float16 (float64 on the torch path)"
    check_tensor("hidden", hidden, ALL_FLOATS, floats)
    check_tensor("weight", weight, ALL_FLOATS, floats)
    if hidden.dim() not in (2, 3):
        raise ValueError(f"hidden must be [B, T, H] or [N, H], got shape {tuple(hidden.shape)}")
    H = hidden.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != H or weight.shape[0] == 0:
        what = (f"[V_r, H={H}] (this rank's shard of the lm_head weight, V_r > 0)" if shard else
                f"[V, H={H}] (the lm_head weight)")
        raise ValueError(f"weight must be {what}, got shape {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype {weight.dtype} differs from hidden dtype {hidden.dtype}")
    if weight.device != hidden.device:
        raise ValueError(f"weight is on {weight.device}, hidden on {hidden.device}")
    if bias is not None:
        check_tensor("bias", bias)
        V = weight.shape[0]
        if bias.shape != (V,):
            what = f"[V_r={V}] (this rank's shard)" if shard else f"[V={V}]"
            raise ValueError(f"bias must be {what} or None, got shape {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias dtype {bias.dtype} differs from hidden dtype {hidden.dtype}")
        if bias.device != hidden.device:
            raise ValueError(f"bias is on {bias.device}, hidden on {hidden.device}")
    if chunk_tokens is not None and (isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int)
                                     or chunk_tokens < 1):
        raise ValueError(f"chunk_tokens must be a positive int or None, got {chunk_tokens!r}")


def check_tensor(name: str, x, dtypes=None, what: str = ""):
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if dtypes is not None and x.dtype not in dtypes:
        raise TypeError(f"{name} must be {what}, got {x.dtype}")


def check_logits(logits, shard: bool = False) -> None:
    """The checks ``fused_loss`` makes of ``target_logits`` itself (with ``shard``: this rank's
    vocabulary shard): ``TypeError`` / ``ValueError`` naming the argument."""
    check_tensor("target_logits", logits, ALL_FLOATS, "float32, bfloat16 or float16 (float64 on the torch path)")
    v = "V_r" if shard else "V"
    if logits.dim() not in (2, 3):
        what = " (this rank's vocabulary shard)" if shard else ""
        raise ValueError(f"target_logits must be [B, T, {v}] or [N, {v}]{what}, got shape {tuple(logits.shape)}")
    if logits.numel() == 0:
        where = " on every rank" if shard else ""
        raise ValueError(f"target_logits must be non-empty{where}, got shape {tuple(logits.shape)}")
    if logits.stride(-1) != 1:
        raise ValueError("target_logits must be contiguous in its last (vocabulary) dimension")


def _number(name: str, value) -> float:
    """A real number (a 1-element tensor too), else ``TypeError`` naming the argument."""
    if isinstance(value, bool) or not (isinstance(value, (int, float)) or
                                       (isinstance(value, Tensor) and value.numel() == 1)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    return float(value)


def _refuse_dead_rows(logits: Tensor, candidates: Tensor) -> None:
    """``ValueError`` naming the first row among ``candidates`` (rows whose label's logit is -inf)
    whose logits are all -inf: no distribution, a NaN loss. Runs only when there are candidates."""
    for idx in candidates.nonzero().tolist():
        if bool(torch.isneginf(logits[tuple(idx)]).all()):
            where = f"({', '.join(map(str, idx))})" if logits.dim() > 2 else str(idx[0])
            raise ValueError(f"target_logits: row {where} has logits that are all -inf (no distribution: its loss "
                             "would be NaN); mask it with ignore_index")


def check_loss_args(lead, V, dev, args: LossArgs, owner: str = "target_logits", logits: Optional[Tensor] = None,
                    validate: Optional[bool] = None) -> tuple[DivergenceSpec, Teacher]:
    """Every check of the loss arguments but those of the tensors the loss differentiates, for
    logits of shape ``lead + (V,)`` on ``dev``; ``owner`` names that tensor in the messages. Shared
    by every entry point. ``lead`` of length 1 (``[N, V]``) is read as ``B = 1``. With a
    ``"uniform"``/``"bucket"`` tail the logprobs must be log-probabilities: a source row whose kept
    probabilities sum past 1 (beyond fp16 rounding) is refused. With ``logits`` (the logits tensor
    itself), ``validate`` also refuses a kept row whose logits are all -inf (read where the label's
    logit is -inf: no pass over the logits). ``validate`` (default ``args.validate``): the
    data-dependent checks, one host sync. Returns the validated spec (:func:`make_spec` of
    ``args.options``) and the :class:`Teacher` tensors in the 3-d layout."""
    source_topk, align_map, labels, source_weights = args.source_topk, args.align_map, args.labels, args.source_weights
    lm_weight, temperature, ignore_index, reduction, impl = (args.lm_weight, args.temperature, args.ignore_index,
                                                             args.reduction, args.impl)
    validate = args.validate if validate is None else validate
    check_tensor("labels", labels, INTS, "int64 (or int32)")
    spec = make_spec(**args.options)
    tail_mass = spec.uses_tail_mass
    if not isinstance(reduction, str) or reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if not isinstance(impl, str) or impl not in IMPLS:
        raise ValueError(f"impl must be one of {', '.join(map(repr, IMPLS))}, got {impl!r}")
    if not (hasattr(source_topk, "ids") and hasattr(source_topk, "logprobs")):
        raise TypeError("source_topk must be a fastfuse.SourceTopK(ids, logprobs)")
    if not (hasattr(align_map, "pos") and hasattr(align_map, "vocab")):
        raise TypeError("align_map must be a fastfuse.AlignMap(pos, vocab)")
    ids, logprobs, pos, vocab = source_topk.ids, source_topk.logprobs, align_map.pos, align_map.vocab
    check_tensor("source_topk.ids", ids, INTS, "int32 or int64")
    check_tensor("source_topk.logprobs", logprobs)
    if not logprobs.is_floating_point():
        raise TypeError(f"source_topk.logprobs must be a float tensor, got {logprobs.dtype}")
    check_tensor("align_map.pos", pos, INTS, "int32 (or int64)")
    check_tensor("align_map.vocab", vocab, INTS, "int32 (or int64)")
    if source_weights is not None:
        check_tensor("source_weights", source_weights)
        if not source_weights.is_floating_point():
            raise TypeError(f"source_weights must be a float tensor, got {source_weights.dtype}")
    lm_weight, temperature = _number("lm_weight", lm_weight), _number("temperature", temperature)
    if not 0.0 <= lm_weight <= 1.0:
        raise ValueError(f"lm_weight must be in [0, 1], got {lm_weight}")
    if not (temperature > 0.0 and temperature != float("inf")):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if not -2 ** 63 <= ignore_index < 2 ** 63:     # the kernels compare it as int64
        raise ValueError(f"ignore_index must fit in int64, got {ignore_index}")
    if len(lead) == 1:      # [N, H]: B = 1, fused_loss's 2-d conventions
        N2 = lead[0]
        lead = (1, N2)
        labels = labels.unsqueeze(0) if labels.dim() == 1 else labels
        ids = ids.unsqueeze(1) if ids.dim() == 3 else ids
        logprobs = logprobs.unsqueeze(1) if logprobs.dim() == 3 else logprobs
        pos = pos.unsqueeze(1) if pos.dim() == 2 else pos
        if source_weights is not None and (source_weights.dim() == 1 or
                                           (source_weights.dim() == 2 and source_weights.shape[1] == N2 != 1)):
            source_weights = source_weights.unsqueeze(1)
    B, T = lead
    if B * T == 0:
        raise ValueError(f"{owner} must be non-empty, got {B * T} tokens")
    if labels.shape != (B, T):
        raise ValueError(f"labels must have shape {(B, T)} (B, T of {owner}), got {tuple(labels.shape)}")
    if ids.dim() != 4:
        raise ValueError(f"source_topk.ids must be [S, B, Ts, K], got shape {tuple(ids.shape)}")
    S, Bi, Ts, K = ids.shape
    if Bi != B:
        raise ValueError(f"source_topk.ids has batch size {Bi}, {owner} has {B}")
    if not 1 <= S <= 8:
        raise ValueError(f"number of sources S must be in 1..8, got S={S} (source_topk.ids)")
    if not 1 <= K <= 64:
        raise ValueError(f"top-k K must be in 1..64, got K={K} (source_topk.ids)")
    if Ts == 0:
        raise ValueError("source_topk.ids has Ts = 0 source positions")
    if logprobs.shape != ids.shape:
        raise ValueError(f"source_topk.logprobs must have the shape of ids {tuple(ids.shape)}, "
                         f"got {tuple(logprobs.shape)}")
    if pos.shape != (S, B, T):
        raise ValueError(f"align_map.pos must have shape {(S, B, T)} (S, B, T), got {tuple(pos.shape)}")
    if vocab.dim() != 2 or vocab.shape[0] != S or vocab.shape[1] == 0:
        raise ValueError(f"align_map.vocab must have shape [S={S}, Vs_max > 0], got {tuple(vocab.shape)}")
    if source_weights is not None and source_weights.shape not in ((S, B), (S, B, T)):
        raise ValueError(f"source_weights must have shape {(S, B)} or {(S, B, T)}, "
                         f"got {tuple(source_weights.shape)}")
    for name, x in (("labels", labels), ("source_topk.ids", ids), ("source_topk.logprobs", logprobs),
                    ("align_map.pos", pos), ("align_map.vocab", vocab), ("source_weights", source_weights)):
        if x is not None and x.device != dev:
            raise ValueError(f"{name} is on {x.device}, {owner} on {dev}")
    if validate:            # the data-dependent checks: one fused host sync
        Vs = vocab.shape[1]
        checks = [
            ("source_topk.ids", f"must be -1 (padding) or in [0, Vs_max={Vs})", ((ids < -1) | (ids >= Vs)).any()),
            ("align_map.vocab", f"must be -1 or a target id in [0, V={V})", ((vocab < -1) | (vocab >= V)).any()),
            ("align_map.pos", f"must be -1 or a source position in [0, Ts={Ts})", ((pos < -1) | (pos >= Ts)).any()),
            ("labels", f"must be ignore_index={ignore_index} or in [0, V={V})",
             ((labels != ignore_index) & ((labels < 0) | (labels >= V))).any()),
            ("source_topk.logprobs", "must not be NaN or +inf at non-padding entries",
             ((ids >= 0) & (torch.isnan(logprobs) | torch.isposinf(logprobs))).any()),
        ]
        if tail_mass:
            kept = torch.where((ids >= 0) & (logprobs > float("-inf")), logprobs.float().exp(),
                               torch.zeros((), device=dev)).sum(-1)
            checks.append(("source_topk.logprobs", "must be log-probabilities with tail='uniform' or 'bucket' (the kept "
                           "entries of a source position sum to more than 1: logits, not log-softmax values?)",
                           (kept > 1.01).any()))
        if source_weights is not None:
            checks.append(("source_weights", "must be finite and >= 0",
                           (~torch.isfinite(source_weights) | (source_weights < 0)).any()))
        dead = None
        if logits is not None:
            lab = labels.reshape(logits.shape[:-1])
            kept = (lab != ignore_index) & (lab >= 0) & (lab < V)
            at_label = logits.gather(-1, torch.where(kept, lab, 0).long().unsqueeze(-1)).squeeze(-1)
            dead = kept & torch.isneginf(at_label)
            checks.append(("target_logits", "", dead.any()))
        for (name, msg, _), bad in zip(checks, torch.stack([c[2] for c in checks]).tolist()):
            if bad and name == "target_logits":
                assert logits is not None and dead is not None     # the check above ran
                _refuse_dead_rows(logits, dead)
            elif bad:
                raise ValueError(f"{name} {msg}")
    return spec, Teacher(ids, logprobs, pos, vocab, labels, source_weights)
