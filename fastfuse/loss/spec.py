"""Which divergence the fusion loss measures, what the teacher's missing mass means, and how the
student's logits are transformed first: one validated, hashable :class:`DivergenceSpec`.

The loss of a row is ``lm_weight * CE(z', y) + (1 - lm_weight) * k * D(p, q)``:

* ``z' = softcap * tanh(logit_scale * z / softcap)`` (without softcap ``logit_scale * z``) -- the
  student's own logit transform (Gemma 2/3's final soft-capping, Cohere's logit scale);
* ``p = softmax(z' / student_temperature)``; the gold cross-entropy uses the untempered ``z'``;
* ``q`` the fused teacher, ``D`` one of :data:`DIVERGENCES`, ``k = student_temperature ** 2`` with
  ``hinton_scale`` (Hinton's gradient-magnitude correction), else 1;
* ``tail`` (one of :data:`TAILS`) says where the teacher's missing mass goes (README "Divergences").

The formulas of every combination are in ``fastfuse.loss.reference.fused_loss_reference`` (dense,
float64, autograd) and README; the fast row math in ``fastfuse.loss.torch_rows`` and
``fastfuse.kernels.divergence``.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

__all__ = ["DIVERGENCES", "TAILS", "LOSS_OPTIONS", "DivergenceSpec", "make_spec", "DEFAULT_SPEC"]

# kernel codes are the positions in these tuples
DIVERGENCES = ("ce", "forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd")
TAILS = ("renormalize", "uniform", "bucket")
# the loss keywords every entry point takes (make_spec's parameters; tests/test_structure.py checks)
LOSS_OPTIONS = ("divergence", "tail", "alpha", "beta", "logit_scale", "softcap", "student_temperature", "hinton_scale")
# divergences with a mixing parameter: which one, and the name of the argument
_MIX = {"jsd": "beta", "skew_kl": "alpha", "skew_reverse_kl": "alpha"}


class DivergenceSpec(NamedTuple):
    """A validated loss configuration (see the module docstring). ``mix`` is ``beta`` for
    ``"jsd"``, ``alpha`` for the skew divergences and 0 otherwise; ``softcap`` 0 means none."""
    divergence: str = "ce"
    tail: str = "renormalize"
    mix: float = 0.0
    logit_scale: float = 1.0
    softcap: float = 0.0
    student_temperature: float = 1.0
    hinton_scale: bool = False

    @property
    def is_default(self) -> bool:
        """FuseLLM's loss exactly (the original row kernel runs it, bit for bit)."""
        return self == DEFAULT_SPEC

    @property
    def div_code(self) -> int:
        return DIVERGENCES.index(self.divergence)

    @property
    def tail_code(self) -> int:
        return TAILS.index(self.tail)

    @property
    def div_weight(self) -> float:
        """``k``: the divergence term's multiplier (``student_temperature ** 2`` with ``hinton_scale``)."""
        return self.student_temperature ** 2 if self.hinton_scale else 1.0

    @property
    def needs_tail_pass(self) -> bool:
        """The ``"uniform"`` tail of a divergence whose off-``A`` terms are not linear in ``p`` or
        ``log p``: its row sums need ``lse`` first, so one more pass over the row."""
        return self.tail == "uniform" and self.divergence in ("jsd", "skew_kl", "skew_reverse_kl", "tvd")

    @property
    def uses_tail_mass(self) -> bool:
        """The teacher keeps its missing mass (``"uniform"``/``"bucket"``): the logprobs must be
        log-probabilities, not logits."""
        return self.tail != "renormalize"


DEFAULT_SPEC = DivergenceSpec()


def _positive(name: str, value, allow_none: bool = False) -> Optional[float]:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return value


def make_spec(divergence: str = "ce", tail: str = "renormalize", alpha: Optional[float] = None,
              beta: Optional[float] = None, logit_scale: float = 1.0, softcap: Optional[float] = None,
              student_temperature: float = 1.0, hinton_scale: bool = False) -> DivergenceSpec:
    """Validate the loss keywords of ``fused_loss`` / ``fused_linear_loss`` into a spec;
    ``ValueError`` / ``TypeError`` naming the argument otherwise."""
    if not isinstance(divergence, str) or divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {', '.join(map(repr, DIVERGENCES))}, got {divergence!r}")
    if not isinstance(tail, str) or tail not in TAILS:
        raise ValueError(f"tail must be one of {', '.join(map(repr, TAILS))}, got {tail!r}")
    mix = 0.0
    wanted = _MIX.get(divergence)
    for name, value in (("alpha", alpha), ("beta", beta)):
        if value is None:
            continue
        if name != wanted:
            raise ValueError(f"{name} is not a parameter of divergence={divergence!r}"
                             + (f" (it takes {wanted})" if wanted else ""))
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a number in (0, 1), got {type(value).__name__}")
        if not 0.0 < float(value) < 1.0:
            hint = (" (beta -> 0 / 1 are divergence='forward_kl' / 'reverse_kl')" if name == "beta" else
                    " (alpha = 0 is the plain KL, 1 is 0)")
            raise ValueError(f"{name} must be in (0, 1), got {value}{hint}")
        mix = float(value)
    if wanted and mix == 0.0:
        mix = 0.5 if wanted == "beta" else 0.1      # TRL's default beta; DSKD's default alpha
    if not isinstance(hinton_scale, bool):
        raise TypeError(f"hinton_scale must be a bool, got {type(hinton_scale).__name__}")
    return DivergenceSpec(divergence, tail, mix, _positive("logit_scale", logit_scale),
                          _positive("softcap", softcap, allow_none=True) or 0.0,
                          _positive("student_temperature", student_temperature), hinton_scale)
