"""The two types every layer shares: a batch's source top-k and its alignment to the target.

Plain named tuples of tensors, kept apart from the loss so that building a batch never loads it.
"""
from __future__ import annotations

from typing import NamedTuple

from torch import Tensor

__all__ = ["SourceTopK", "AlignMap"]


class SourceTopK(NamedTuple):
    """Top-k next-token distributions of ``S`` source models, in source positions.

    ids: int32/int64 ``[S, B, Ts, K]`` source-vocabulary ids, -1 = padding.
    logprobs: float ``[S, B, Ts, K]`` log-probs of the kept top-k. With the default
        ``tail="renormalize"`` only their differences matter (logits work too: the teacher is
        ``softmax(logprobs / temperature)`` over the kept, mappable entries); with
        ``tail="uniform"``/``"bucket"`` they must be log-probabilities, since what they leave of 1
        is the teacher's missing mass (``validate`` refuses kept masses above 1, but cannot tell
        logits whose exponentials happen to sum below 1). ``-inf`` marks an entry with zero
        probability.
    """
    ids: Tensor
    logprobs: Tensor


class AlignMap(NamedTuple):
    """Alignment of each source to the target tokenisation and vocabulary.

    pos: int32 ``[S, B, T]``: source position aligned to target position ``t``, or -1.
    vocab: int32 ``[S, Vs_max]``: source id -> target id, or -1 (no counterpart).
    """
    pos: Tensor
    vocab: Tensor
