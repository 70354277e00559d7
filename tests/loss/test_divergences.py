"""The divergence family (divergence x tail x student transform) on the torch path against the dense
float64 reference written from the definitions, gradients included; finite differences of the fast
path itself (gradcheck); the default staying bit for bit the original FuseLLM loss; argument errors."""
import itertools
import math

import pytest
import torch

from fastfuse import AlignMap, SourceTopK, fused_linear_loss, fused_loss
from fastfuse.loss import reference as ref
from fastfuse.loss import torch_path as tp
from fastfuse.loss.torch_rows import torch_divergence_rows
from fastfuse.loss.spec import DIVERGENCES, LOSS_OPTIONS, REGISTRY, TAILS, TRANSFORM_OPTIONS, lookup, make_spec
from fastfuse.testing import random_inputs

TRANSFORMS = {
    "plain": {},
    "student": dict(logit_scale=0.8, softcap=6.0, student_temperature=2.0, hinton_scale=True),
    "tempered": dict(student_temperature=0.7),
}
MIX = 0.3          # every mixing argument at a value other than its default


def inputs(seed, dtype=torch.float64, **kw):
    g = torch.Generator().manual_seed(seed)
    opts = dict(B=2, T=6, V=48, S=3, K=8, Ts=7, Vs=60, map_range=30, missing_mass=0.6, p_neginf=0.1)
    opts.update(kw)
    d = random_inputs(dtype=dtype, generator=g, **opts)
    return d, SourceTopK(*d["source_topk"]), AlignMap(*d["align_map"])


def compare(d, topk, amap, reduction="sum", lm_weight=0.6, temperature=1.3, impl="torch", tol=1e-10, **kw):
    z0 = d["target_logits"]
    z64 = z0.detach().double().clone().requires_grad_()
    topk64 = SourceTopK(topk.ids, topk.logprobs.double())
    want = ref.fused_loss_reference(z64, topk64, amap, d["labels"], d["source_weights"], lm_weight, temperature,
                                    reduction=reduction, **kw)
    gout = torch.rand(want.shape, dtype=torch.float64) + 0.5 if reduction == "none" else 1.0
    (want * gout).sum().backward()
    z = z0.clone().requires_grad_()
    got = fused_loss(z, topk, amap, d["labels"], d["source_weights"], lm_weight, temperature, reduction=reduction,
                     impl=impl, **kw)
    (got * (gout.to(got.dtype) if torch.is_tensor(gout) else gout)).sum().backward()
    assert torch.isfinite(want).all(), kw
    torch.testing.assert_close(got.double(), want.detach(), rtol=tol, atol=tol * max(1.0, want.abs().max().item()))
    torch.testing.assert_close(z.grad.double(), z64.grad, rtol=tol, atol=tol)
    return got


@pytest.mark.parametrize("divergence,tail", list(itertools.product(DIVERGENCES, TAILS)))
@pytest.mark.parametrize("transform", list(TRANSFORMS))
def test_every_combination_matches_dense_reference(divergence, tail, transform):
    seed = DIVERGENCES.index(divergence) * 10 + TAILS.index(tail) * 3 + list(TRANSFORMS).index(transform)
    d, topk, amap = inputs(seed)
    compare(d, topk, amap, tail=tail, **lookup(divergence).options(MIX), **TRANSFORMS[transform])


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("divergence,tail", [("reverse_kl", "bucket"), ("jsd", "uniform"), ("tvd", "renormalize")])
def test_reductions_and_float32(divergence, tail, reduction):
    d, topk, amap = inputs(100 + len(reduction), dtype=torch.float32)
    compare(d, topk, amap, reduction=reduction, tol=2e-5, divergence=divergence, tail=tail)


def test_many_sources_wide_topk_and_fallbacks():
    """S = 8, K = 64, many unaligned positions and padded entries: one-hot fallbacks everywhere."""
    d, topk, amap = inputs(7, S=8, K=64, V=200, Vs=300, map_range=120, p_unaligned=0.4, p_pad=0.3)
    for divergence, tail in [("reverse_kl", "uniform"), ("skew_kl", "bucket"), ("forward_kl", "uniform")]:
        compare(d, topk, amap, divergence=divergence, tail=tail)


def test_rows_whose_teacher_has_no_tail():
    """Every source falling back (one-hot, R = 0) or keeping all its mass: reverse KL over the support."""
    d, topk, amap = inputs(8, missing_mass=0.0, p_unaligned=0.5, p_unmapped=0.0, p_pad=0.0, p_neginf=0.0)
    for tail in TAILS:
        compare(d, topk, amap, divergence="reverse_kl", tail=tail)
        compare(d, topk, amap, divergence="jsd", tail=tail, beta=0.9)


def test_forward_kl_is_ce_minus_teacher_entropy():
    d, topk, amap = inputs(9)
    kw = dict(reduction="none", lm_weight=0.0)
    z = d["target_logits"].clone().requires_grad_()
    ce = fused_loss(z, topk, amap, d["labels"], d["source_weights"], divergence="ce", tail="bucket", **kw)
    g_ce, = torch.autograd.grad(ce.sum(), z)
    fkl = fused_loss(z, topk, amap, d["labels"], d["source_weights"], divergence="forward_kl", tail="bucket", **kw)
    g_fkl, = torch.autograd.grad(fkl.sum(), z)
    torch.testing.assert_close(g_ce, g_fkl)
    assert (fkl <= ce + 1e-12).all() and (fkl >= -1e-12).all() and (ce - fkl).abs().max() > 0.1


def test_default_is_the_original_loss_bit_for_bit(monkeypatch):
    """The default spec runs the original merged-coefficient rows; naming the defaults changes nothing."""
    d, topk, amap = inputs(11, dtype=torch.float32, missing_mass=0.0, p_neginf=0.0)
    calls = []
    real = tp.loss_and_grad_rows
    monkeypatch.setattr(tp, "loss_and_grad_rows", lambda *a, **k: calls.append(1) or real(*a, **k))
    args = (topk, amap, d["labels"], d["source_weights"])
    # the torch rows named explicitly: under TRITON_INTERPRET=1 'auto' would pick the kernels
    z1 = d["target_logits"].clone().requires_grad_()
    a = fused_loss(z1, *args, reduction="none", impl="torch")
    a.sum().backward()
    z2 = d["target_logits"].clone().requires_grad_()
    b = fused_loss(z2, *args, reduction="none", impl="torch", divergence="ce", tail="renormalize", logit_scale=1.0,
                   student_temperature=1.0, hinton_scale=False)
    b.sum().backward()
    assert len(calls) == 2 and torch.equal(a, b) and torch.equal(z1.grad, z2.grad)
    # and the generic rows compute the same loss by another formula (not bitwise)
    c = fused_loss(d["target_logits"], *args, reduction="none", divergence="ce", student_temperature=1.0 + 1e-12)
    torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)


class _Rows(torch.autograd.Function):
    """The fast torch path as a function of the logits alone (teacher fixed), for gradcheck."""

    @staticmethod
    def forward(ctx, z, target, labels, spec, lm_weight):
        ignored = labels == -100
        loss, grad = torch_divergence_rows(z, *target, labels, ignored, spec, lm_weight, None, True)
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, go):
        (grad,) = ctx.saved_tensors
        B, T, _ = grad.shape
        return grad * go.reshape(B, T, 1), None, None, None, None


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_gradcheck_of_the_fast_path(divergence):
    """Finite differences of the torch rows' own loss against their hand-derived gradient."""
    d, topk, amap = inputs(20 + DIVERGENCES.index(divergence), B=1, T=3, V=11, S=2, K=4, Vs=15, map_range=8)
    labels = d["labels"]
    w = tp.normalize_weights(d["source_weights"], 2, 1, 3, "cpu", torch.float64).reshape(2, 3)
    for tail, transform in [("renormalize", "student"), ("uniform", "plain"), ("bucket", "tempered")]:
        spec = make_spec(tail=tail, **lookup(divergence).options(MIX), **TRANSFORMS[transform])
        target = tp.teacher_rows(topk, amap, labels, w, 1.0, -100, 11, spec.uses_tail_mass, torch.float64)
        z = d["target_logits"].clone().requires_grad_()
        assert torch.autograd.gradcheck(lambda x: _Rows.apply(x, target, labels.reshape(-1), spec, 0.3), (z,),
                                        eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("divergence,tail", [("ce", "renormalize"), ("reverse_kl", "uniform"), ("jsd", "uniform"),
                                             ("skew_reverse_kl", "bucket")])
def test_linear_loss_runs_the_same_rows(divergence, tail):
    d, topk, amap = inputs(30)
    g = torch.Generator().manual_seed(31)
    H = 7
    h = torch.randn(2, 6, H, dtype=torch.float64, generator=g).requires_grad_()
    W = torch.randn(48, H, dtype=torch.float64, generator=g).requires_grad_()
    bias = torch.randn(48, dtype=torch.float64, generator=g).requires_grad_()
    kw = dict(divergence=divergence, tail=tail, softcap=5.0, student_temperature=1.5)
    got = fused_linear_loss(h, W, topk, amap, d["labels"], bias, d["source_weights"], chunk_tokens=5, **kw)
    got.backward()
    h2, W2, b2 = (x.detach().clone().requires_grad_() for x in (h, W, bias))
    want = ref.fused_loss_reference(h2 @ W2.T + b2, topk, amap, d["labels"], d["source_weights"], **kw)
    want.backward()
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    for a, b in ((h, h2), (W, W2), (bias, b2)):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-10)


def test_uniform_tail_spreads_the_missing_mass():
    """A direct check of the "uniform" semantics: a teacher keeping half its mass on one id."""
    V = 5
    z = torch.zeros(1, 1, V, dtype=torch.float64)
    topk = SourceTopK(torch.tensor([[[[0]]]]), torch.tensor([[[[math.log(0.5)]]]], dtype=torch.float64))
    amap = AlignMap(torch.zeros(1, 1, 1, dtype=torch.int32), torch.tensor([[2]], dtype=torch.int32))
    labels = torch.tensor([[2]])
    got = fused_loss(z, topk, amap, labels, lm_weight=0.0, divergence="forward_kl", tail="uniform")
    q = torch.tensor([0.125, 0.125, 0.5, 0.125, 0.125], dtype=torch.float64)
    torch.testing.assert_close(got, (q * (q / 0.2).log()).sum())
    got = fused_loss(z, topk, amap, labels, lm_weight=0.0, divergence="tvd", tail="bucket")
    torch.testing.assert_close(got, torch.tensor(0.3, dtype=torch.float64))     # 1/2 (|.2 - .5| + |.8 - .5|)
    got = fused_loss(z, topk, amap, labels, lm_weight=0.0, divergence="reverse_kl")    # p restricted to {2}: 0
    torch.testing.assert_close(got, torch.tensor(0.0, dtype=torch.float64))


@pytest.mark.parametrize("kwargs,match", [
    (dict(divergence="kl"), "divergence must be one of"),
    (dict(tail="drop"), "tail must be one of"),
    (dict(divergence="jsd", beta=1.0), r"beta must be in \(0, 1\)"),
    (dict(divergence="jsd", alpha=0.5), "alpha is not a parameter of divergence='jsd'"),
    (dict(divergence="skew_kl", alpha=0.0), r"alpha must be in \(0, 1\)"),
    (dict(divergence="ce", beta=0.5), "beta is not a parameter"),
    (dict(softcap=0.0), "softcap must be a finite number > 0"),
    (dict(logit_scale=-1.0), "logit_scale must be a finite number > 0"),
    (dict(student_temperature=float("inf")), "student_temperature must be a finite number > 0"),
])
def test_argument_errors(kwargs, match):
    d, topk, amap = inputs(40, dtype=torch.float32)
    with pytest.raises(ValueError, match=match):
        fused_loss(d["target_logits"], topk, amap, d["labels"], **kwargs)


def test_tail_modes_need_log_probabilities():
    d, topk, amap = inputs(41, dtype=torch.float32, missing_mass=0.0, p_neginf=0.0, p_pad=0.0)
    logits = SourceTopK(topk.ids, topk.logprobs + 2.0)          # logits, not log-softmax values
    with pytest.raises(ValueError, match="must be log-probabilities with tail='uniform' or 'bucket'"):
        fused_loss(d["target_logits"], logits, amap, d["labels"], tail="bucket")
    fused_loss(d["target_logits"], logits, amap, d["labels"], divergence="jsd")     # renormalize: fine
    with pytest.raises(TypeError, match="hinton_scale must be a bool"):
        fused_loss(d["target_logits"], topk, amap, d["labels"], hinton_scale=1)


def _one_row(z_values, V=20):
    """One token, one source keeping ids 3 and 4 (q 0.6 / 0.3 of its mass: R = 0.1), label 3."""
    z = torch.zeros(1, 1, V, dtype=torch.float64)
    for i, v in z_values.items():
        z[0, 0, i] = v
    topk = SourceTopK(torch.tensor([[[[3, 4]]]]), torch.tensor([[[[0.6, 0.3]]]], dtype=torch.float64).log())
    amap = AlignMap(torch.zeros(1, 1, 1, dtype=torch.int32), torch.arange(V, dtype=torch.int32)[None])
    return z, topk, amap, torch.tensor([[3]])


@pytest.mark.parametrize("z_values,kw", [
    ({4: float("-inf")}, dict(divergence="reverse_kl")),                     # p = 0 on a teacher id
    ({4: float("-inf")}, dict(divergence="reverse_kl", tail="uniform")),
    ({4: float("-inf"), 7: 2.0}, dict(divergence="skew_reverse_kl", tail="uniform")),
    ({3: 40.0}, dict(divergence="forward_kl", tail="bucket")),               # a confident student:
    ({3: 25.0, 4: 22.0}, dict(divergence="ce", tail="bucket")),              # 1 - sum_A p cancels in fp32
    ({3: 30.0}, dict(divergence="jsd", tail="bucket", student_temperature=0.5)),
])
def test_edge_rows_match_the_reference(z_values, kw):
    z0, topk, amap, labels = _one_row(z_values)
    for dtype in (torch.float64, torch.float32):
        z = z0.detach().clone().to(dtype).requires_grad_()
        got = fused_loss(z, topk, amap, labels, lm_weight=0.2, **kw)
        got.backward()
        z64 = z0.clone().requires_grad_()
        want = ref.fused_loss_reference(z64, topk, amap, labels, lm_weight=0.2, **kw)
        want.backward()
        assert torch.isfinite(want) and torch.isfinite(got), (got, want)
        tol = 1e-9 if dtype == torch.float64 else 1e-5
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
        torch.testing.assert_close(z.grad.double(), z64.grad, rtol=tol, atol=tol)


def test_minus_inf_logit_in_a_gives_infinite_not_nan():
    """CE with the teacher on an id the student rules out: +inf, as the definition says (not NaN)."""
    z0, topk, amap, labels = _one_row({4: float("-inf")})
    for tail in TAILS:
        got = fused_loss(z0, topk, amap, labels, lm_weight=0.2, divergence="forward_kl", tail=tail)
        want = ref.fused_loss_reference(z0, topk, amap, labels, lm_weight=0.2, divergence="forward_kl", tail=tail)
        assert got.item() == want.item() == float("inf"), tail


def test_the_registry_agrees_with_make_spec():
    """Each record's mixing argument is a loss option with its default; the tail pass is exactly the
    ``"uniform"`` tail of a divergence without a closed form; unknown names are a clear error."""
    for d in REGISTRY:
        assert make_spec(d.name).entry is d and make_spec(d.name).mix == d.mix_default
        assert make_spec(**d.options()) == make_spec(d.name)
        assert (d.mix is None) == (d.mix_default == 0.0) and (d.mix is None or d.mix in LOSS_OPTIONS)
        assert d.closed_form in (None, "cross_entropy", "reverse_kl")
        assert [make_spec(d.name, t).needs_tail_pass for t in TAILS] == [t == "uniform" and d.closed_form is None
                                                                         for t in TAILS]
    assert len(DIVERGENCES) == len(REGISTRY) and set(TRANSFORM_OPTIONS) < set(LOSS_OPTIONS)
    with pytest.raises(ValueError, match="divergence must be one of"):
        lookup("kl")
