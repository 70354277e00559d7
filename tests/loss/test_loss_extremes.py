"""The loss at the edges of float range: the bucket tail's off-teacher student mass in log space
(finite wherever the float64 log-space loss is, e.g. float32 logits with max |z| ~ 1e4) on the torch
path and in the Triton kernel (on CPU under TRITON_INTERPRET=1), against a float64 dense reference
written in log space; and a row of all -inf logits refused by ``validate=True``. Marked ``interpreter``
(tests/_interpreter.py)."""
import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.interpreter

triton = pytest.importorskip("triton")

from fastfuse import AlignMap, SourceTopK, fused_loss  # noqa: E402
from fastfuse.loss import reference as ref  # noqa: E402
from fastfuse.loss import torch_path as tp  # noqa: E402
from fastfuse.loss.spec import DIVERGENCES, REGISTRY, TAILS  # noqa: E402
from fastfuse.testing import random_inputs  # noqa: E402


def log_space_reference(z64, topk, amap, d, lm_weight, divergence):
    """The row losses of ``ce`` / ``forward_kl`` with the bucket tail, straight from the README's
    formulas in float64 with the bucket's student mass as a log-sum-exp (never 1 - sum or a sum of
    underflowed probabilities): ``lm * CE(z, y) + (1 - lm) * D``."""
    V = z64.shape[-1]
    q = ref.dense_teacher(topk, amap, d["labels"], V, d["source_weights"], 1.0, -100, torch.float64, tail=True)
    R = tp.teacher_tail_mass(topk, amap, d["labels"], d["source_weights"], 1.0, V, torch.float64)
    logp = torch.log_softmax(z64, -1)
    inA = q > 0
    log_po = torch.logsumexp(logp.masked_fill(inA, float("-inf")), -1)
    D = -torch.where(inA, q * logp, torch.zeros_like(q)).sum(-1) - torch.where(R > 0, R * log_po, torch.zeros_like(R))
    if divergence == "forward_kl":
        D = D + torch.where(inA, q * torch.where(inA, q, torch.ones_like(q)).log(), torch.zeros_like(q)).sum(-1) + \
            torch.where(R > 0, R * torch.where(R > 0, R, torch.ones_like(R)).log(), torch.zeros_like(R))
    ignored = d["labels"] == -100
    lab = d["labels"].clamp_min(0)
    gold = -logp.gather(-1, lab[..., None]).squeeze(-1)
    return torch.where(ignored, torch.zeros_like(D), lm_weight * gold + (1 - lm_weight) * D)


def extreme_inputs(seed, scale):
    g = torch.Generator().manual_seed(seed)
    d = random_inputs(B=2, T=4, V=45, S=3, K=8, Ts=6, Vs=60, map_range=30, missing_mass=0.6, p_neginf=0.0,
                      generator=g, device=DEVICE)
    z = d["target_logits"].float()
    z = z / z.abs().max() * scale                   # max |z| = scale exactly
    return d, z, SourceTopK(*d["source_topk"]), AlignMap(*d["align_map"])


@pytest.fixture
def small_chunks():
    """16-element chunks in the divergence kernel: several per row."""
    from fastfuse.kernels.launch import forced
    with forced("divergence", dict(block_v=16, num_warps=1, num_stages=1)):
        yield


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("divergence", [d.name for d in REGISTRY if d.closed_form == "cross_entropy"])
@pytest.mark.parametrize("scale", [2.8e3, 9.4e3, 3e4])
def test_bucket_mass_in_log_space(impl, divergence, scale, small_chunks):
    d, z, topk, amap = extreme_inputs(int(scale) % 97, scale)
    z64 = z.double().requires_grad_()
    want = log_space_reference(z64, SourceTopK(topk.ids, topk.logprobs.double()), amap, d, 0.5, divergence)
    assert torch.isfinite(want).all()
    want.sum().backward()
    zz = z.clone().requires_grad_()
    got = fused_loss(zz, topk, amap, d["labels"], d["source_weights"], 0.5, reduction="none",
                     divergence=divergence, tail="bucket", impl=impl)
    got.sum().backward()
    assert torch.isfinite(got).all(), got
    # float32 logits of size ~1e4 carry an absolute error of ~1e-3 each: the loss inherits it
    torch.testing.assert_close(got.double(), want.detach(), rtol=1e-5, atol=scale * 1e-6)
    torch.testing.assert_close(zz.grad.double(), z64.grad, rtol=1e-3, atol=1e-4)
    if impl == "torch":                         # the float64 torch path agrees to float64 precision
        z2 = z.double().requires_grad_()
        got64 = fused_loss(z2, topk, amap, d["labels"], d["source_weights"], 0.5, reduction="none",
                           divergence=divergence, tail="bucket", impl="torch")
        got64.sum().backward()
        torch.testing.assert_close(got64, want.detach(), rtol=1e-10, atol=1e-9)
        torch.testing.assert_close(z2.grad, z64.grad, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_a_row_of_all_minus_inf_logits_is_refused(impl):
    g = torch.Generator().manual_seed(3)
    d = random_inputs(B=2, T=3, V=40, S=2, K=4, Ts=5, Vs=50, generator=g, device=DEVICE)
    topk, amap = SourceTopK(*d["source_topk"]), AlignMap(*d["align_map"])
    z = d["target_logits"].float().clone()
    labels = d["labels"].clone()
    labels[1, 2] = 7
    z[1, 2] = float("-inf")
    for divergence in DIVERGENCES:
        for tail in TAILS:
            with pytest.raises(ValueError, match=r"target_logits: row \(1, 2\) .*all -inf"):
                fused_loss(z, topk, amap, labels, d["source_weights"], divergence=divergence, tail=tail, impl=impl)
    with pytest.raises(ValueError, match=r"target_logits: row 5 has logits that are all -inf"):   # [N, V]
        fused_loss(z.reshape(6, -1), SourceTopK(topk.ids.reshape(2, -1, 4), topk.logprobs.reshape(2, -1, 4)),
                   AlignMap(amap.pos.reshape(2, 6), amap.vocab),
                   labels.reshape(6), None, impl=impl)
    # ignored, the row is fine; with validate=False the documented NaN comes back for that row only
    ign = labels.clone()
    ign[1, 2] = -100
    assert torch.isfinite(fused_loss(z, topk, amap, ign, d["source_weights"], impl=impl))
    got = fused_loss(z, topk, amap, labels, d["source_weights"], reduction="none", impl=impl, validate=False)
    assert torch.isnan(got[1, 2]) and torch.isfinite(got.flatten()[:-1]).all()
