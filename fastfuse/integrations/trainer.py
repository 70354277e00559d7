"""Hugging Face ``Trainer`` integration: train a target model with the fusion loss.

``FusionTrainer`` takes the batches of :class:`fastfuse.FusionCollator` (``input_ids``,
``attention_mask``, ``labels`` already shifted, ``source_topk``, ``align_map``,
``source_weights``) and replaces the model's own loss by the fusion loss: by default
:func:`fastfuse.fused_linear_loss` on the final hidden states and the lm_head weight (the
``[B, T, V]`` logits never exist), or :func:`fastfuse.fused_loss` on ``model(...).logits``. The CE
and fusion terms are logged separately (``ce_loss``, ``fusion_loss``), computed without gradient
on logging steps only, so they cost nothing on the other steps.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from transformers import Trainer

from fastfuse.integrations.hf import backbone_and_head, causal_lm_fusion_loss, logit_transform, unwrap_model
from fastfuse.integrations.on_policy import OnPolicy
from fastfuse.loss.linear_loss import fused_linear_loss
from fastfuse.loss.logits_loss import fused_loss
from fastfuse.loss.spec import LOSS_OPTIONS, TRANSFORM_OPTIONS

_LOSSES = ("linear", "logits")
# the fields of a fastfuse.FusionDataset item that FusionCollator reads; Trainer's default
# remove_unused_columns=True would keep only the model's forward arguments and drop the teachers
EXAMPLE_FIELDS = ("input_ids", "topk_ids", "topk_logprobs", "pos", "ce", "prompt_lengths")
# what loss_kwargs may hold: the loss functions' keyword options the trainer does not set itself (the
# "linear" loss takes the student transform from the model's config)
_OPTIONS = {"linear": {"ignore_index", "impl", "validate", "chunk_tokens", "inplace_grad"}
            | (set(LOSS_OPTIONS) - set(TRANSFORM_OPTIONS)),
            "logits": {"ignore_index", "impl", "validate", "inplace_grad"} | set(LOSS_OPTIONS)}


def check_lm_weight(lm_weight: Any, max_steps: int) -> None:
    """A number in [0, 1], or a schedule ``step -> number`` whose values at the first and last step
    (where known) are in [0, 1]; ``ValueError``/``TypeError`` naming ``lm_weight`` otherwise."""
    probes = [lm_weight] if not callable(lm_weight) else [lm_weight(0)] + ([lm_weight(max_steps)] if max_steps > 0 else [])
    for i, w in enumerate(probes):
        where = "" if not callable(lm_weight) else f" (its value at step {0 if i == 0 else max_steps})"
        if isinstance(w, bool) or not isinstance(w, (int, float)) and not (isinstance(w, torch.Tensor) and w.numel() == 1):
            raise TypeError(f"lm_weight: expected a number in [0, 1] or a schedule step -> number, got "
                            f"{type(w).__name__}{where}")
        if not 0.0 <= float(w) <= 1.0:
            raise ValueError(f"lm_weight: expected a value in [0, 1], got {float(w)!r}{where}")


def _to_device(x: Any, device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, tuple) and hasattr(x, "_fields"):  # SourceTopK / AlignMap (NamedTuples)
        return type(x)(*(_to_device(v, device) for v in x))
    if isinstance(x, dict):
        return {k: _to_device(v, device) for k, v in x.items()}
    return x


class FusionTrainer(Trainer):
    """``Trainer`` whose loss is the fusion loss of :class:`fastfuse.FusionCollator` batches.

    Args (besides ``Trainer``'s):
        lm_weight: float, or a callable ``step -> float`` (e.g. :class:`fastfuse.LinearSchedule`).
        temperature: teacher temperature.
        loss: ``"linear"`` (default): :func:`fastfuse.fused_linear_loss` of the final hidden states
            and the lm_head weight, computed inside the model's forward through its DDP /
            accelerate wrapper (:func:`fastfuse.integrations.hf.causal_lm_fusion_loss`): the
            ``[B, T, V]`` logits never exist. Models that soft-cap or scale their logits after the
            lm_head (Gemma 2/3, Cohere, Granite) get that transform inside the loss.
            ``"logits"``: :func:`fastfuse.fused_loss` on ``model(...).logits``. Both give the same
            loss and gradients.
        loss_kwargs: more keyword arguments for the loss function (``impl``, ``validate``, the
            divergence family: ``divergence``, ``tail``, ``alpha``, ``beta``,
            ``student_temperature``, ``hinton_scale``; for ``"linear"`` also ``chunk_tokens``; for
            ``"logits"`` also ``inplace_grad``, ``logit_scale``, ``softcap`` -- the ``"linear"``
            loss takes the model's own logit transform from its config).
        teachers: a :class:`fastfuse.OnlineTeachers`: the teachers score each batch online (batches then
            need only ``input_ids`` / ``attention_mask``; ones that already carry teacher fields are
            used as they are).
        on_policy: GKD's ``lambda``, the share of training batches that are on-policy
            (:mod:`fastfuse.integrations.on_policy`): the student continues the batch's prompts, the teachers
            score its tokens, the loss is the divergence alone (``lm_weight`` 0) on those tokens.
        on_policy_kwargs: ``prompt_tokens``, ``max_new_tokens``, ``temperature``, ``eos_token_id``
            (:class:`fastfuse.integrations.on_policy.OnPolicy`).

    ``compute_loss(..., return_outputs=True)`` (what ``Trainer.evaluate`` / ``predict`` call) takes
    the ``"logits"`` path whatever ``loss`` is, so the returned outputs are the model's own, with
    real ``logits``; the loss value is the same. The loss is a mean over the batch's tokens, and
    ``Trainer`` divides it by the gradient-accumulation steps. Default ``TrainingArguments`` work:
    with ``remove_unused_columns=True`` the teacher fields (``EXAMPLE_FIELDS``) are kept.
    """

    def __init__(self, *args, lm_weight: float | Callable[[int], float] = 0.9, temperature: float = 1.0,
                 loss: str = "linear", loss_kwargs: dict | None = None, teachers=None, on_policy: float = 0.0,
                 on_policy_kwargs: dict | None = None, **kwargs):
        if loss not in _LOSSES:
            raise ValueError(f"loss: expected one of {_LOSSES}, got {loss!r}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or \
                not (0.0 < float(temperature) < float("inf")):
            raise ValueError(f"temperature: expected a finite number > 0, got {temperature!r}")
        if loss_kwargs is not None and not isinstance(loss_kwargs, dict):
            raise TypeError(f"loss_kwargs: expected a dict, got {type(loss_kwargs).__name__}")
        unknown = sorted(set(loss_kwargs or {}) - _OPTIONS[loss])
        if unknown:
            raise ValueError(f"loss_kwargs: unknown options {unknown} for loss={loss!r} "
                             f"(allowed: {sorted(_OPTIONS[loss])})")
        if teachers is None and (on_policy or on_policy_kwargs):
            raise ValueError("on_policy: needs teachers= (a fastfuse.OnlineTeachers) to score the student's tokens")
        super().__init__(*args, **kwargs)
        self.online = None if teachers is None else OnPolicy(teachers, on_policy, seed=self.args.seed,
                                                             **(on_policy_kwargs or {}))
        check_lm_weight(lm_weight, int(getattr(self.args, "max_steps", 0) or 0))
        self.lm_weight = lm_weight
        self.temperature = temperature
        self.loss = loss
        self.loss_kwargs = dict(loss_kwargs or {})
        self._term_sums = {"ce_loss": 0.0, "fusion_loss": 0.0}
        self._term_count = 0
        # Our loss is a per-batch mean, so Trainer must divide it by the gradient-accumulation steps;
        # it does not when the model accepts loss kwargs (it then expects num_items_in_batch to be used)
        self.model_accepts_loss_kwargs = False
        self.loss_is_scaled_for_ga = False

    def current_lm_weight(self) -> float:
        w = self.lm_weight(self.state.global_step) if callable(self.lm_weight) else self.lm_weight
        if not 0.0 <= float(w) <= 1.0:
            raise ValueError(f"lm_weight: expected a value in [0, 1], got {w!r} at step {self.state.global_step}")
        return float(w)

    def _set_signature_columns_if_needed(self) -> None:
        # The columns Trainer keeps when remove_unused_columns=True (its default), for a datasets.Dataset
        # and a torch Dataset alike: the model's forward arguments plus the teacher fields.
        super()._set_signature_columns_if_needed()
        # (transformers' Trainer declares the attribute as None: its type does not say it is a list once set)
        columns: list[str] = self._signature_columns or []
        self._signature_columns = list(dict.fromkeys([*columns, *EXAMPLE_FIELDS]))  # type: ignore[assignment]

    def _prepare_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        # Trainer rebuilds tuples from a generator, which NamedTuples do not accept.
        return _to_device(inputs, self.args.device)

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        on_policy = False
        if self.online is not None:     # teachers in the loop: this batch's teacher fields, or an on-policy batch
            training = self.model is not None and self.model.training and not return_outputs
            inputs, on_policy = self.online.prepare(unwrap_model(model), inputs, training)
            inputs = _to_device(inputs, self.args.device)
        missing = [k for k in ("input_ids", "labels", "source_topk", "align_map") if k not in inputs]
        if missing:
            raise ValueError(f"inputs: missing {missing}; use fastfuse.FusionCollator to build the batches")
        lm_weight = 0.0 if on_policy else self.current_lm_weight()
        log_terms = self.model is not None and self.model.training and self._should_log_terms()
        if self.loss == "linear" and not return_outputs:
            loss, hidden = causal_lm_fusion_loss(model, inputs, labels_shifted=True, return_hidden=True,
                                                 lm_weight=lm_weight, temperature=self.temperature,
                                                 **self.loss_kwargs)
            if log_terms:
                head = backbone_and_head(unwrap_model(model))[1]
                bias = getattr(head, "bias", None)
                weight = head.weight.detach().to(hidden.dtype)
                bias = None if bias is None else bias.detach().to(hidden.dtype)
                transform = logit_transform(unwrap_model(model))
                self._log_terms(lambda *a, **k: fused_linear_loss(hidden, weight, *a, **{"bias": bias, **transform, **k}),
                                inputs, self.loss_kwargs)
            return loss
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"))
        # fused_loss has no chunks: drop the option when a "linear" trainer evaluates here
        options = {k: v for k, v in self.loss_kwargs.items() if k != "chunk_tokens" or self.loss == "logits"}
        common = dict(source_weights=inputs.get("source_weights"), temperature=self.temperature, **options)
        plain = {k: v for k, v in common.items() if k != "inplace_grad"}  # never consume the logits here
        if return_outputs:
            common = plain  # the returned outputs keep their logits
        logits = outputs.logits
        if log_terms:
            self._log_terms(lambda *a, **k: fused_loss(logits.detach(), *a, **k), inputs, options)
        loss = fused_loss(logits, inputs["source_topk"], inputs["align_map"], inputs["labels"],
                          lm_weight=lm_weight, **common)
        return (loss, outputs) if return_outputs else loss

    def _log_terms(self, loss_of: Callable[..., torch.Tensor], inputs: dict[str, Any], options: dict) -> None:
        """Accumulates the CE (``lm_weight=1``) and fusion (``lm_weight=0``) terms, without gradient."""
        kwargs = dict(source_weights=inputs.get("source_weights"), temperature=self.temperature,
                      **{k: v for k, v in options.items() if k != "inplace_grad"})  # never consume the logits
        with torch.no_grad():
            for name, w in (("ce_loss", 1.0), ("fusion_loss", 0.0)):
                term = loss_of(inputs["source_topk"], inputs["align_map"], inputs["labels"], lm_weight=w, **kwargs)
                self._term_sums[name] += float(term)
        self._term_count += 1

    def _should_log_terms(self) -> bool:
        steps = self.args.logging_steps
        # the terms of the step that will be logged (global_step is incremented after the update)
        return steps > 0 and (self.state.global_step + 1) % max(int(steps), 1) == 0

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if self._term_count and "loss" in logs:
            for k, v in self._term_sums.items():
                logs[k] = v / self._term_count
            logs["lm_weight"] = self.current_lm_weight()
            self._term_sums = {k: 0.0 for k in self._term_sums}
            self._term_count = 0
        super().log(logs, *args, **kwargs)
