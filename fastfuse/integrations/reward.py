"""Hugging Face model runners for ProFuser's inference mode: generate each source's responses
(:func:`generate_responses`) and score them with a reward model (:class:`RewardScorer`); the scores
become source weights through :func:`fastfuse.batches.fusion_weights.reward_weights`.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor

__all__ = ["RewardScorer", "generate_responses"]

def _check_texts(texts: Any, name: str) -> list[str]:
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise TypeError(f"{name} must be a list of str, got {type(texts).__name__}")
    texts = list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"{name}[{i}] must be str, got {type(t).__name__}")
    return texts


def _check_batch_size(batch_size: Any) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int):
        raise TypeError(f"batch_size must be an int, got {type(batch_size).__name__}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return batch_size


def _model_device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


class RewardScorer:
    """Score (prompt, response) pairs with a Hugging Face sequence-classification reward model.

    Wraps any ``AutoModelForSequenceClassification``-style model and its tokenizer. Calling it
    tokenises the pairs, runs the model without gradients (in eval mode, restored afterwards) and
    returns one score per pair; it does **not** generate (see :func:`generate_responses`).

    Args:
        model: a ``*ForSequenceClassification`` model; its ``config.pad_token_id`` must be set so
            that it pools the last non-padding token of each row.
        tokenizer: the model's tokenizer, with a pad token.
        label: which logit is the score. Default: the single logit when ``num_labels == 1``, the
            positive class (index 1) when ``num_labels == 2``; required otherwise.
        format: optional ``format(prompt, response) -> str``; by default the tokenizer's chat
            template (user / assistant turns) when it has one, else the pair is encoded as a text
            pair ``tokenizer(prompt, response)``.
        max_length: optional truncation length in tokens (the tokenizer's own rule otherwise).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        label: int | None = None,
        format: Callable[[str, str], str] | None = None,
        max_length: int | None = None,
    ) -> None:
        config = getattr(model, "config", None)
        if config is None or not callable(model):
            raise TypeError("model must be a Hugging Face model with a .config")
        if not callable(tokenizer):
            raise TypeError("tokenizer must be a callable Hugging Face tokenizer")
        if getattr(tokenizer, "pad_token_id", None) is None:
            raise ValueError("tokenizer has no pad token: set tokenizer.pad_token")
        if getattr(config, "pad_token_id", None) is None:
            raise ValueError("model.config.pad_token_id is not set: set it to tokenizer.pad_token_id")
        num_labels = int(getattr(config, "num_labels", 1))
        if label is None:
            if num_labels == 1:
                label = 0
            elif num_labels == 2:
                label = 1
            else:
                raise ValueError(f"label must be given for a model with num_labels={num_labels}")
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < num_labels:
            raise ValueError(f"label must be an int in [0, {num_labels}), got {label!r}")
        if format is not None and not callable(format):
            raise TypeError("format must be callable (prompt, response) -> str or None")
        if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1):
            raise ValueError(f"max_length must be a positive int or None, got {max_length!r}")
        self.model, self.tokenizer, self.label = model, tokenizer, label
        self.format, self.max_length = format, max_length

    def _encode(self, prompts: list[str], responses: list[str]) -> dict[str, Tensor]:
        kw: dict[str, Any] = dict(return_tensors="pt", padding=True, padding_side="right")
        if self.max_length is not None:
            kw.update(truncation=True, max_length=self.max_length)
        if self.format is not None:
            return self.tokenizer([self.format(p, r) for p, r in zip(prompts, responses)], **kw)
        if getattr(self.tokenizer, "chat_template", None):
            texts = [
                self.tokenizer.apply_chat_template(
                    [{"role": "user", "content": p}, {"role": "assistant", "content": r}], tokenize=False
                )
                for p, r in zip(prompts, responses)
            ]
            return self.tokenizer(texts, add_special_tokens=False, **kw)
        return self.tokenizer(prompts, responses, **kw)

    def __call__(self, prompts: Sequence[str], responses: Sequence[str], batch_size: int = 8) -> Tensor:
        """Scores ``[N]`` float32 on the CPU for ``N`` (prompt, response) pairs; higher is better."""
        prompts = _check_texts(prompts, "prompts")
        responses = _check_texts(responses, "responses")
        if len(prompts) != len(responses):
            raise ValueError(f"prompts ({len(prompts)}) and responses ({len(responses)}) differ in length")
        batch_size = _check_batch_size(batch_size)
        device = _model_device(self.model)
        was_training = getattr(self.model, "training", False)
        self.model.eval()
        out = []
        try:
            with torch.inference_mode():
                for i in range(0, len(prompts), batch_size):
                    enc = self._encode(prompts[i : i + batch_size], responses[i : i + batch_size])
                    enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
                    logits = self.model(**enc).logits  # [n, num_labels]
                    out.append(logits[:, self.label].float().cpu())
        finally:
            self.model.train(was_training)
        return torch.cat(out) if out else torch.zeros(0)


def generate_responses(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int = 256,
    batch_size: int = 8,
    **gen_kwargs: Any,
) -> list[str]:
    """Generate one response per prompt with ``model.generate`` (left padding, batched).

    Decoding is greedy (``do_sample=False``) unless ``gen_kwargs`` say otherwise; any other
    ``generate`` argument passes through. Prompts are used as given (apply a chat template
    first if the model needs one). Returns the decoded *new* tokens only, special tokens skipped,
    one string per prompt in order. The tokenizer needs a pad token.
    """
    prompts = _check_texts(prompts, "prompts")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    batch_size = _check_batch_size(batch_size)
    if not hasattr(model, "generate"):
        raise TypeError("model must have a .generate method (a Hugging Face causal LM)")
    if getattr(tokenizer, "pad_token_id", None) is None:
        raise ValueError("tokenizer has no pad token: set tokenizer.pad_token")
    gen_kwargs.setdefault("do_sample", False)
    gen_kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
    device = _model_device(model)
    was_training = getattr(model, "training", False)
    model.eval()
    responses: list[str] = []
    try:
        with torch.inference_mode():
            for i in range(0, len(prompts), batch_size):
                enc = tokenizer(prompts[i : i + batch_size], return_tensors="pt", padding=True, padding_side="left")
                ids = enc["input_ids"].to(device)
                out = model.generate(
                    input_ids=ids,
                    attention_mask=enc["attention_mask"].to(device),
                    max_new_tokens=max_new_tokens,
                    **gen_kwargs,
                )
                responses += tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
    finally:
        model.train(was_training)
    return responses
