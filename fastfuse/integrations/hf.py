"""Hugging Face causal LMs: the fusion loss through the final hidden states and the lm_head,
without running the lm_head over the whole sequence (:func:`fastfuse.fused_linear_loss`)."""
from __future__ import annotations

from typing import Any, Mapping

from torch import Tensor

from fastfuse.linear_loss import fused_linear_loss


def backbone_and_head(model) -> tuple[Any, Any]:
    """(the model without its lm_head, the lm_head) of a Hugging Face causal LM."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    prefix = getattr(model, "base_model_prefix", None)
    backbone = getattr(model, prefix, None) if prefix else None
    if head is None or backbone is None or not hasattr(head, "weight"):
        raise TypeError(f"model: expected a Hugging Face causal LM with an lm_head and a base model, got "
                        f"{type(model).__name__}")
    return backbone, head


def causal_lm_fusion_loss(model, batch: Mapping[str, Any], **loss_kwargs) -> Tensor:
    """The fusion loss of ``model`` on a :class:`fastfuse.FusionCollator` batch.

    ``batch`` holds ``input_ids``, ``attention_mask`` (optional), ``labels`` **already shifted**
    (``labels[:, t]`` is the token after position ``t``, as FusionCollator builds them — not
    Hugging Face's unshifted convention), ``source_topk``, ``align_map`` and ``source_weights``
    (optional). The backbone's last hidden states go through :func:`fastfuse.fused_linear_loss`
    with the lm_head's weight and bias (tied embeddings are the same tensor). Models that rescale
    or soft-cap their logits after the lm_head (e.g. Gemma 2) are not supported here.
    ``loss_kwargs`` go to ``fused_linear_loss`` (``lm_weight``, ``temperature``, ``reduction``, ...).
    """
    missing = [k for k in ("input_ids", "labels", "source_topk", "align_map") if k not in batch]
    if missing:
        raise ValueError(f"batch: missing {missing}; build batches with fastfuse.FusionCollator")
    backbone, head = backbone_and_head(model)
    out = backbone(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
    hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
    loss_kwargs.setdefault("source_weights", batch.get("source_weights"))
    return fused_linear_loss(hidden, head.weight, batch["source_topk"], batch["align_map"], batch["labels"],
                             bias=getattr(head, "bias", None), **loss_kwargs)
