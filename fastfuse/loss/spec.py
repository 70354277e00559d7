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

__all__ = ["Divergence", "REGISTRY", "DIVERGENCES", "TAILS", "LOSS_OPTIONS", "TRANSFORM_OPTIONS", "lookup",
           "DivergenceSpec", "make_spec", "DEFAULT_SPEC"]


class Divergence(NamedTuple):
    """What the code around a divergence's formulas needs to know about it, in one record (the
    formulas themselves -- ``torch_rows.terms``, the kernel's ``DIV`` branches,
    ``reference.divergence_dense`` -- are listed in docs/DESIGN.md "Adding a divergence").

    ``code``: the divergence kernel's ``DIV`` (``kernels/divergence.py`` names it ``name.upper()``;
    tests/kernels/test_divergence_kernel.py checks). ``mix``: the :func:`make_spec` argument that
    mixes it (``"alpha"``/``"beta"``) and ``mix_default`` its default; None: no parameter.
    ``closed_form``: the closed form its off-teacher terms have, which decides how the ``"uniform"``
    tail is summed -- ``"cross_entropy"`` (``F = -q log p + f(q)``, ``G = -q``: from ``sum u``; the
    ``"bucket"`` term in log space), ``"reverse_kl"`` (``F = p log(p / q)``: from ``sum p u``), or
    None: one more pass over the row (:attr:`DivergenceSpec.needs_tail_pass`)."""
    name: str
    code: int
    mix: Optional[str] = None
    mix_default: float = 0.0
    closed_form: Optional[str] = None

    def options(self, mix: Optional[float] = None) -> dict:
        """The :func:`make_spec` keywords that select this divergence, its mixing argument (if it
        has one) at ``mix`` (None: its default)."""
        if self.mix is None:
            return {"divergence": self.name}
        return {"divergence": self.name, self.mix: self.mix_default if mix is None else mix}


# every divergence, once; the kernel codes are explicit (not positions)
REGISTRY = (
    Divergence("ce", 0, closed_form="cross_entropy"),
    Divergence("forward_kl", 1, closed_form="cross_entropy"),
    Divergence("reverse_kl", 2, closed_form="reverse_kl"),
    Divergence("jsd", 3, "beta", 0.5),                  # TRL's default beta
    Divergence("skew_kl", 4, "alpha", 0.1),             # DSKD's default alpha
    Divergence("skew_reverse_kl", 5, "alpha", 0.1),
    Divergence("tvd", 6),
)
_BY_NAME = {d.name: d for d in REGISTRY}
DIVERGENCES = tuple(_BY_NAME)
# kernel codes are the positions in this tuple (kernels/divergence.py names them name.upper())
TAILS = ("renormalize", "uniform", "bucket")
# the loss keywords every entry point takes (make_spec's parameters; tests/test_structure.py checks)
LOSS_OPTIONS = ("divergence", "tail", "alpha", "beta", "logit_scale", "softcap", "student_temperature", "hinton_scale")
# the loss options that transform the student's logits (a model's config may fix them: integrations.hf)
TRANSFORM_OPTIONS = ("logit_scale", "softcap")


def lookup(divergence: str) -> Divergence:
    """The registry's record of ``divergence``; ``ValueError`` naming the argument otherwise."""
    if not isinstance(divergence, str) or divergence not in _BY_NAME:
        raise ValueError(f"divergence must be one of {', '.join(map(repr, DIVERGENCES))}, got {divergence!r}")
    return _BY_NAME[divergence]


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
    def entry(self) -> Divergence:
        """The divergence's :data:`REGISTRY` record."""
        return _BY_NAME[self.divergence]

    @property
    def div_code(self) -> int:
        return self.entry.code

    @property
    def tail_code(self) -> int:
        return TAILS.index(self.tail)

    @property
    def div_weight(self) -> float:
        """``k``: the divergence term's multiplier (``student_temperature ** 2`` with ``hinton_scale``)."""
        return self.student_temperature ** 2 if self.hinton_scale else 1.0

    @property
    def needs_tail_pass(self) -> bool:
        """The ``"uniform"`` tail of a divergence without a closed form off ``A`` (its
        :attr:`Divergence.closed_form` is None): its row sums need ``lse`` first, so one more pass
        over the row."""
        return self.tail == "uniform" and self.entry.closed_form is None

    @property
    def uses_tail_mass(self) -> bool:
        """The teacher keeps its missing mass (``"uniform"``/``"bucket"``): the logprobs must be
        log-probabilities, not logits."""
        return self.tail != "renormalize"


DEFAULT_SPEC = DivergenceSpec()


def _positive(name: str, value) -> float:
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
    entry = lookup(divergence)
    if not isinstance(tail, str) or tail not in TAILS:
        raise ValueError(f"tail must be one of {', '.join(map(repr, TAILS))}, got {tail!r}")
    mix = 0.0
    wanted = entry.mix
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
        mix = entry.mix_default
    if not isinstance(hinton_scale, bool):
        raise TypeError(f"hinton_scale must be a bool, got {type(hinton_scale).__name__}")
    return DivergenceSpec(divergence, tail, mix, _positive("logit_scale", logit_scale),
                          0.0 if softcap is None else _positive("softcap", softcap),
                          _positive("student_temperature", student_temperature), hinton_scale)
