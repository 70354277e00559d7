"""Hugging Face causal LMs: the fusion loss through the final hidden states and the lm_head,
without running the lm_head over the whole sequence (:func:`fastfuse.fused_linear_loss`).

The loss is computed *inside* the model's forward, called through its wrappers (DDP, accelerate):
for that one call the lm_head is replaced by a module that turns the hidden states it receives into
the loss. Calling the unwrapped backbone instead would bypass DDP's forward, and computing the loss
after a forward that returned hidden states would use the lm_head weight outside it: DDP with
``find_unused_parameters=True`` (Hugging Face ``Trainer``'s default) then marks that weight unused
and fails when its gradient arrives ("Expected to mark a variable ready only once"), and
accelerate's mixed-precision autocast, which wraps only the forward, would not apply.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Mapping, Optional

import torch
from torch import Tensor

from fastfuse.loss.linear_loss import fused_linear_loss
from fastfuse.loss.spec import make_spec
from fastfuse.loss.torch_path import student_logits
from fastfuse.batch import AlignMap, SourceTopK
from fastfuse.loss.parallel.layout import is_dtensor

__all__ = ["causal_lm_fusion_loss", "backbone_and_head", "final_hidden_states", "unwrap_model", "logit_transform"]

# config attributes of models that transform the logits after the lm_head, and the student transform
# of the fusion loss that reproduces each (None: not supported, the model raises)
_LOGIT_TRANSFORMS: dict[str, Callable[[Any], dict[str, float]] | None] = {
    "final_logit_softcapping": lambda v: {"softcap": float(v)},     # Gemma 2/3: c * tanh(z / c)
    "logit_scale": lambda v: {"logit_scale": float(v)},              # Cohere: z * s
    "logits_scaling": lambda v: {"logit_scale": 1.0 / float(v)},     # Granite: z / s
    "output_multiplier_scale": None,
}


def _transform_values(model) -> dict:
    config = getattr(model, "config", None)
    return {attr: getattr(config, attr, None) for attr in _LOGIT_TRANSFORMS
            if getattr(config, attr, None) not in (None, 1, 1.0, 0, 0.0, False)}


def logit_transform(model) -> dict:
    """The keywords (``logit_scale``, ``softcap``) of the fusion loss that reproduce what ``model``
    does to its logits after the lm_head (Gemma 2/3's final soft-capping, Cohere's and Granite's
    scaling), read from its config; ``{}`` for a model that uses its logits as they are."""
    out: dict = {}
    for attr, value in _transform_values(model).items():
        make = _LOGIT_TRANSFORMS[attr]
        if make is None:
            raise NotImplementedError(f"model: {type(model).__name__} transforms its logits after the lm_head "
                                      f"(config.{attr}={value}); use fastfuse.fused_loss on model(...).logits")
        out.update(make(value))
    return out


def backbone_and_head(model) -> tuple[Any, Any]:
    """(the model without its lm_head, the lm_head module) of a Hugging Face causal LM.

    The backbone is ``model.get_decoder()`` when the model has one, else the attribute named by
    ``model.base_model_prefix`` (``model.model`` for Llama, ``model.transformer`` for GPT-2); it may
    be ``None`` (then :func:`final_hidden_states` asks the model for ``output_hidden_states``).
    The head is ``model.get_output_embeddings()`` (``model.lm_head``); with tied embeddings its
    weight *is* the input embedding matrix, so gradients reach it through both uses.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or not isinstance(getattr(head, "weight", None), Tensor):
        raise TypeError(f"model: expected a Hugging Face causal LM with an lm_head (get_output_embeddings()), got "
                        f"{type(model).__name__}")
    for attr, value in _transform_values(model).items():
        if _LOGIT_TRANSFORMS[attr] is None:
            raise NotImplementedError(f"model: {type(model).__name__} transforms its logits after the lm_head "
                                      f"(config.{attr}={value}); use fastfuse.fused_loss on model(...).logits")
    if "logit_scale" in _transform_values(model) and "logits_scaling" in _transform_values(model):
        raise NotImplementedError(f"model: {type(model).__name__}'s config sets both logit_scale and logits_scaling")
    backbone = None
    if hasattr(model, "get_decoder"):
        try:
            backbone = model.get_decoder()
        except (AttributeError, NotImplementedError, TypeError):
            backbone = None
    if backbone is None or backbone is model:
        prefix = getattr(model, "base_model_prefix", None)
        backbone = getattr(model, prefix, None) if prefix else None
    if backbone is model:
        backbone = None
    return backbone, head


def _wrapper_chain(model) -> Iterator[Any]:
    """``model``, then each module it wraps under ``.module`` (``DistributedDataParallel``,
    ``DataParallel``, DeepSpeed, FSDP), innermost last."""
    yield model
    while isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
        yield model


def unwrap_model(model):
    """The model inside ``model``'s wrappers (the innermost of :func:`_wrapper_chain`); ``model``
    itself when unwrapped."""
    for model in _wrapper_chain(model):
        pass
    return model


def final_hidden_states(model, input_ids: Tensor, **model_inputs) -> Tensor:
    """``[B, T, H]`` final hidden states (after the last norm) of an *unwrapped* ``model`` without
    its lm_head. It runs the backbone directly, bypassing any DDP wrapper: to train, use
    :func:`causal_lm_fusion_loss`, which goes through the wrapper."""
    backbone, _ = backbone_and_head(model)
    if backbone is not None:
        out = backbone(input_ids=input_ids, **model_inputs)
        return out[0] if isinstance(out, tuple) else out.last_hidden_state
    # no separate backbone: ask for the hidden states, with the lm_head on one position only
    out = model(input_ids=input_ids, output_hidden_states=True, logits_to_keep=1, **model_inputs)
    return out.hidden_states[-1]


def causal_lm_fusion_loss(model, batch: Mapping[str, Any], source_topk: Optional[SourceTopK] = None,
                          align_map: Optional[AlignMap] = None, *, labels_shifted: Optional[bool] = None,
                          return_hidden: bool = False, **loss_kwargs):
    """The fusion loss of a Hugging Face causal LM on ``batch``, through :func:`fastfuse.fused_linear_loss`.

    Args:
        model: a ``*ForCausalLM`` (Llama, Qwen2, Mistral, GPT-2, Phi, ...), plain or wrapped
            (``DistributedDataParallel``, accelerate, DeepSpeed: the model is found through
            ``.module``, see :func:`unwrap_model`). ``model`` itself is called on
            ``batch["input_ids"]`` (plus ``attention_mask`` / ``position_ids`` when present), so the
            wrapper's forward runs (DDP's gradient bookkeeping, accelerate's autocast), with the
            lm_head swapped for that call (``set_output_embeddings``, restored in a ``finally``)
            for a module that hands the final hidden states and ``lm_head.weight`` (and
            ``lm_head.bias`` when it has one) to ``fused_linear_loss``: the lm_head never runs on the
            whole sequence and the ``[B, T, V]`` logits never exist. Tied embeddings need nothing
            special. Models that rescale or soft-cap their logits after the lm_head (Gemma 2/3's
            ``final_logit_softcapping``, Cohere's ``logit_scale``, Granite's ``logits_scaling``)
            get the same transform inside the loss (:func:`logit_transform`: ``softcap`` /
            ``logit_scale`` of ``fused_linear_loss``, exact gradients); a transform it does not
            know raises ``NotImplementedError``, and so does ``torch.nn.DataParallel`` over several
            GPUs (it splits the batch but not the teacher: use DDP). An lm_head made
            vocabulary-parallel by ``torch.distributed.tensor.parallel.ColwiseParallel`` (alone or
            under FSDP2) runs the vocabulary-parallel ``fused_linear_loss`` (``examples/tp_step.py``).
        batch: a mapping with ``input_ids [B, T]`` and ``labels [B, T]`` (``ignore_index`` = -100
            by default for padding/prompt tokens), optionally ``attention_mask``, ``position_ids``,
            ``source_topk``, ``align_map``, ``source_weights``.
        source_topk, align_map: default to ``batch["source_topk"]`` / ``batch["align_map"]``.
            They (and per-token ``source_weights``) are indexed by the **predicting** position ``t``
            (its teacher is the distribution of token ``t + 1``, DESIGN.md §1) whatever the
            labels convention.
        labels_shifted: the labels convention.

            * ``False``: Hugging Face's convention, ``labels[:, t]`` is token ``t`` itself (usually
              ``input_ids`` with padding set to -100) and the loss at position ``t`` is against
              ``labels[:, t + 1]``, shifted here as ``model(input_ids, labels=labels)`` does. The
              last position has no target and is ignored.
            * ``True``: ``labels[:, t]`` is already the token after position ``t`` (the
              ``fused_loss`` convention, and what :class:`fastfuse.FusionCollator` builds).
            * ``None`` (default): ``True`` when ``batch`` carries ``source_topk`` (a FusionCollator
              batch), ``False`` when the teacher comes as arguments next to a Hugging Face batch.
              Pass it explicitly when building batches by hand: a wrong choice shifts the loss by
              one token.
        return_hidden: also return the ``[B, T, H]`` final hidden states, detached, in the dtype the
            loss used (the autocast dtype under autocast), e.g. to evaluate other loss terms.
        loss_kwargs: passed to ``fused_linear_loss`` (``lm_weight``, ``temperature``, ``reduction``,
            ``chunk_tokens``, ``ignore_index``, ``validate``, ``divergence``, ``tail``, ...).
            ``source_weights`` defaults to ``batch.get("source_weights")``; ``logit_scale`` /
            ``softcap`` come from the model's config (passing them raises ``ValueError``).

    Returns the float32 loss (``[B, T]`` for ``reduction="none"``, the last position 0 when the
    labels were shifted here), or ``(loss, hidden)`` with ``return_hidden``. Under
    ``torch.autocast`` (yours, or accelerate's around the forward) the hidden states and the
    lm_head weight are cast to the autocast dtype, as ``lm_head(hidden)`` would be.
    """
    if not isinstance(batch, Mapping):
        raise TypeError(f"batch must be a mapping (dict of tensors), got {type(batch).__name__}")
    source_topk = batch.get("source_topk") if source_topk is None else source_topk
    align_map = batch.get("align_map") if align_map is None else align_map
    missing = [k for k, v in (("input_ids", batch.get("input_ids")), ("labels", batch.get("labels")),
                              ("source_topk", source_topk), ("align_map", align_map)) if v is None]
    if missing:
        raise ValueError(f"batch: missing {missing} (pass source_topk/align_map as arguments or batch entries)")
    assert source_topk is not None and align_map is not None      # (missing says so)
    inner = _check_wrappers(model)
    _, head = backbone_and_head(inner)
    transform = logit_transform(inner)
    clash = sorted({"logit_scale", "softcap"} & set(loss_kwargs))
    if clash:
        raise ValueError(f"loss_kwargs: {clash} set, but the model's config already fixes its logit transform "
                         f"({transform or 'none'}); it is applied inside the loss")
    loss_kwargs.update(transform)
    labels = batch["labels"]
    if not isinstance(labels, Tensor) or labels.dim() != 2:
        raise ValueError(f"batch['labels'] must be a [B, T] tensor, got "
                         f"{tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__}")
    if labels_shifted is None:
        labels_shifted = batch.get("source_topk") is not None
    if not labels_shifted:
        # HF convention: position t predicts labels[:, t + 1]; the last position has no target
        ignore_index = loss_kwargs.get("ignore_index", -100)
        labels = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), ignore_index)], dim=1)
    loss_kwargs.setdefault("source_weights", batch.get("source_weights"))

    def loss_of(hidden: Tensor) -> tuple[Tensor, Tensor]:
        _check_vocab_parallel_head(inner, head, hidden, labels)
        if hidden.dim() != 3 or tuple(hidden.shape[:2]) != tuple(labels.shape):
            raise RuntimeError(f"model: its lm_head received hidden states of shape {tuple(hidden.shape)} for "
                               f"labels of shape {tuple(labels.shape)}; expected [B, T, H] for the whole batch")
        weight, bias = head.weight, getattr(head, "bias", None)
        if torch.is_autocast_enabled(hidden.device.type):
            dtype = torch.get_autocast_dtype(hidden.device.type)
            hidden, weight = hidden.to(dtype), weight.to(dtype)
            bias = bias.to(dtype) if bias is not None else None
        loss = fused_linear_loss(hidden, weight, source_topk, align_map, labels, bias=bias, **loss_kwargs)
        return loss, hidden

    inputs = {k: batch[k] for k in ("attention_mask", "position_ids") if batch.get(k) is not None}
    fusion_head = _FusionHead(loss_of)
    with _output_embeddings_replaced(inner, fusion_head):
        outputs = model(input_ids=batch["input_ids"], **inputs)
    if fusion_head.calls != 1:
        raise NotImplementedError(f"model: {type(inner).__name__}'s forward called its lm_head "
                                  f"(get_output_embeddings()) {fusion_head.calls} times, expected once")
    head_loss, head_hidden = fusion_head.loss, fusion_head.hidden
    assert head_loss is not None and head_hidden is not None      # (set by its one call)
    # the loss as the wrapper returned it, so that DDP's output hooks stay in the graph
    loss = outputs.logits if hasattr(outputs, "logits") else outputs[0]
    if not isinstance(loss, Tensor) or loss.shape != head_loss.shape or loss.dtype != torch.float32:
        raise NotImplementedError(f"model: {type(inner).__name__} transforms the output of its lm_head; use "
                                  f"fastfuse.fused_loss on model(...).logits")
    if transform:
        # the model applied its logit transform to our loss: check it did exactly that, then take
        # the loss itself, the wrapper's output kept in the graph with a zero weight
        expected = student_logits(head_loss.detach(), make_spec(**transform))   # the loss's own transform
        if not torch.allclose(loss.detach(), expected, rtol=1e-4, atol=1e-5):
            raise NotImplementedError(f"model: {type(inner).__name__} transforms the output of its lm_head beyond "
                                      f"its config's {transform}; use fastfuse.fused_loss on model(...).logits")
        # (0 * (out - out.detach()) alone would be NaN for an infinite loss; where() keeps it 0)
        loss = head_loss + 0.0 * torch.where(torch.isfinite(loss), loss - loss.detach(), torch.zeros_like(loss))
    return (loss, head_hidden.detach()) if return_hidden else loss


class _FusionHead(torch.nn.Module):
    """Stands in for the lm_head during one forward: returns ``loss_of(hidden)``'s loss instead of
    the logits, and keeps the loss and the hidden states it saw."""

    def __init__(self, loss_of: Callable[[Tensor], tuple[Tensor, Tensor]]):
        super().__init__()
        self.loss_of = loss_of
        self.calls = 0
        self.loss: Optional[Tensor] = None
        self.hidden: Optional[Tensor] = None

    def forward(self, hidden: Tensor) -> Tensor:
        self.calls += 1
        self.loss, self.hidden = self.loss_of(hidden)
        return self.loss


@contextlib.contextmanager
def _output_embeddings_replaced(model, module: torch.nn.Module) -> Iterator[None]:
    """``model``'s lm_head is ``module`` inside the block and the original one again after it, also
    when the block raises. The original module object goes back, so a tied weight stays tied."""
    head = model.get_output_embeddings()
    try:
        model.set_output_embeddings(module)
        if model.get_output_embeddings() is not module:
            raise NotImplementedError(f"model: {type(model).__name__}.set_output_embeddings() did not replace "
                                      f"its lm_head")
        yield
    finally:
        model.set_output_embeddings(head)


def _check_vocab_parallel_head(model, head, hidden: Tensor, labels: Tensor) -> None:
    """A tensor-parallel lm_head (README "Tensor parallelism"): torch's ``ColwiseParallel`` makes its
    weight a DTensor sharded by vocabulary rows (``Shard(0)``; FSDP2 gathers the other mesh dimension
    in the forward), which ``fused_linear_loss`` takes as it is: it reads the shard's range and its
    process group from the placement, and sums ``d_hidden`` over that group. The hidden states are
    whole on every rank, or a DTensor sharded on the sequence (a ``SequenceParallel`` final norm) for
    sequence parallelism. Other shardings are refused here, with the model named."""
    weight = head.weight
    if not is_dtensor(weight):
        return
    from torch.distributed.tensor import Replicate, Shard

    split = [p for p in weight.placements if not isinstance(p, Replicate)]
    if len(split) != 1 or not (isinstance(split[0], Shard) and split[0].dim == 0):
        raise NotImplementedError(f"model: {type(model).__name__}'s lm_head weight is a DTensor placed "
                                  f"{tuple(weight.placements)}; the vocabulary-parallel loss takes an lm_head sharded "
                                  f"by vocabulary rows (ColwiseParallel: Shard(0)); use fastfuse.fused_loss on "
                                  f"model(...).logits otherwise")
    if not is_dtensor(hidden) and hidden.dim() == 3 and hidden.shape[1] != labels.shape[1]:
        raise RuntimeError(f"model: its vocabulary-parallel lm_head received hidden states of {hidden.shape[1]} "
                           f"positions for labels of {labels.shape[1]}: a sequence-parallel final norm must hand the "
                           f"lm_head a DTensor sharded on the sequence (SequenceParallel(use_local_output=False))")


def _check_wrappers(model):
    """The unwrapped model; refuses ``DataParallel`` over several devices, which would scatter
    the batch to replicas whose lm_head is not the one the teacher and labels go with."""
    for wrapper in _wrapper_chain(model):
        if isinstance(wrapper, torch.nn.DataParallel) and len(wrapper.device_ids or []) > 1:
            raise NotImplementedError("model: torch.nn.DataParallel over several GPUs splits the batch but not its "
                                      "teacher; use DistributedDataParallel (torchrun), or fused_loss on the logits")
    return wrapper
