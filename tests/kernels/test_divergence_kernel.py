"""The generic divergence row kernel and the tail-mass sparse teacher (``impl="triton"``; on CPU under
``TRITON_INTERPRET=1``) against the dense float64 reference: every divergence x tail, student
transforms, several chunks per row, dtypes, in-place gradients, reductions, the linear loss.
Marked ``interpreter`` (tests/_interpreter.py)."""
import itertools

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.interpreter

triton = pytest.importorskip("triton")

from fastfuse import AlignMap, SourceTopK, fused_linear_loss, fused_loss  # noqa: E402
from fastfuse.loss import reference as ref  # noqa: E402
from fastfuse.loss import torch_path as tp  # noqa: E402
from fastfuse.loss.spec import DIVERGENCES, REGISTRY, TAILS, lookup, make_spec  # noqa: E402
from fastfuse.testing import random_inputs, tolerance  # noqa: E402

MIX = 0.3          # every mixing argument at a value other than its default
STUDENT = dict(logit_scale=0.8, softcap=6.0, student_temperature=2.0, hinton_scale=True)


@pytest.fixture
def small_chunks():
    """16-element chunks: every row takes several trips through each loop (one warp: fast to interpret)."""
    from fastfuse.kernels.launch import forced
    with forced("divergence", dict(block_v=16, num_warps=1, num_stages=1)):
        yield


def test_kernel_codes_are_the_registrys():
    """The kernel names each ``DIV`` code after its divergence and each ``TAIL`` code after its tail
    (``spec.REGISTRY``'s ``code``, ``spec.TAILS``' positions): the codes the launcher passes."""
    from fastfuse.kernels import divergence as kd

    assert sorted(d.code for d in REGISTRY) == list(range(len(REGISTRY)))
    assert [getattr(kd, d.name.upper()).value for d in REGISTRY] == [d.code for d in REGISTRY]
    assert [getattr(kd, t.upper()).value for t in TAILS] == [make_spec(tail=t).tail_code for t in TAILS]
    assert [make_spec(**d.options()).div_code for d in REGISTRY] == [d.code for d in REGISTRY]


def inputs(seed, dtype=torch.float32, **kw):
    g = torch.Generator().manual_seed(seed)
    opts = dict(B=2, T=4, V=45, S=3, K=8, Ts=6, Vs=60, map_range=30, missing_mass=0.6, p_neginf=0.1)
    opts.update(kw)
    d = random_inputs(dtype=dtype, device=DEVICE, generator=g, **opts)
    return d, SourceTopK(*d["source_topk"]), AlignMap(*d["align_map"])


def check(d, topk, amap, reduction="sum", lm_weight=0.6, temperature=1.3, inplace=False, **kw):
    z0 = d["target_logits"]
    z64 = z0.detach().double().clone().requires_grad_()
    want = ref.fused_loss_reference(z64, SourceTopK(topk.ids, topk.logprobs.double()), amap, d["labels"],
                                    d["source_weights"], lm_weight, temperature, reduction=reduction, **kw)
    gout = torch.rand(want.shape, dtype=torch.float64, device=z0.device) + 0.5 if reduction == "none" else 1.0
    (want * gout).sum().backward()
    z = z0.detach().clone().requires_grad_()
    got = fused_loss(z * 1 if inplace else z, topk, amap, d["labels"], d["source_weights"], lm_weight, temperature,
                     reduction=reduction, impl="triton", inplace_grad=inplace, **kw)
    (got * (gout.float() if torch.is_tensor(gout) else gout)).sum().backward()
    n = int((d["labels"] != -100).sum())
    gmax = gout.abs().max().item() if torch.is_tensor(gout) else gout
    tol = tolerance(z0.dtype, reduction, n, gmax * 4, z0.abs().max().item())   # k = tau^2 = 4 at most
    scale = max(1.0, want.detach().abs().max().item())
    torch.testing.assert_close(got.double(), want.detach(), rtol=tol["loss"]["rtol"] * 4,
                               atol=tol["loss"]["atol"] * scale * 4)
    torch.testing.assert_close(z.grad.double(), z64.grad, **tol["grad"])
    assert z.grad.dtype == z0.dtype


@pytest.mark.slow
@pytest.mark.parametrize("divergence,tail", list(itertools.product(DIVERGENCES, TAILS)))
@pytest.mark.parametrize("student", [False, True])
def test_every_combination(divergence, tail, student, small_chunks):
    seed = DIVERGENCES.index(divergence) * 7 + TAILS.index(tail) * 2 + student
    d, topk, amap = inputs(seed)
    check(d, topk, amap, tail=tail, **lookup(divergence).options(MIX), **(STUDENT if student else {}))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("divergence,tail", [("reverse_kl", "uniform"), ("tvd", "uniform"), ("jsd", "bucket")])
def test_half_precision(dtype, divergence, tail, small_chunks):
    d, topk, amap = inputs(60 + len(divergence), dtype=dtype)
    check(d, topk, amap, reduction="mean", divergence=divergence, tail=tail, softcap=8.0)


@pytest.mark.parametrize("reduction,inplace", [("none", False), ("mean", True), ("none", True)])
def test_reductions_and_inplace(reduction, inplace):
    d, topk, amap = inputs(70, V=300)                 # the default launch: one 4096-element chunk
    check(d, topk, amap, reduction=reduction, inplace=inplace, divergence="skew_reverse_kl", tail="uniform",
          student_temperature=0.5)


@pytest.mark.slow
def test_many_sources_and_fallbacks(small_chunks):
    d, topk, amap = inputs(71, S=8, K=64, V=150, Vs=200, map_range=90, p_unaligned=0.4, p_pad=0.3)
    check(d, topk, amap, divergence="reverse_kl", tail="bucket")
    d, topk, amap = inputs(72, missing_mass=0.0, p_unaligned=0.5, p_unmapped=0.0, p_pad=0.0, p_neginf=0.0)
    check(d, topk, amap, divergence="reverse_kl", tail="uniform")       # rows without a tail: restricted


@pytest.mark.slow
def test_tail_teacher_kernel_matches_torch():
    """The sparse-teacher kernel's tail mass and merged probabilities against ``torch_path.teacher_rows``."""
    from fastfuse.kernels.sparse_teacher import sparse_teacher
    d, topk, amap = inputs(73, S=4, K=16)
    S, B, T = amap.pos.shape
    V = d["target_logits"].shape[-1]
    w = tp.normalize_weights(d["source_weights"], S, B, T, DEVICE).reshape(S, B * T)
    for temperature in (1.0, 0.6):
        R = torch.zeros(B * T, device=DEVICE)
        tids, q = sparse_teacher(topk.ids, topk.logprobs, amap.pos, amap.vocab, d["labels"], w, 0.0, temperature,
                                 -100, V, tail=R)
        t_ref, q_ref, R_ref = tp.teacher_rows(topk, amap, d["labels"], w, temperature, -100, V, True)
        dense = torch.zeros(B * T, V + 1, device=DEVICE)
        dense_ref = torch.zeros_like(dense)
        dense.scatter_add_(1, torch.where(tids >= 0, tids.long(), V), q)
        dense_ref.scatter_add_(1, torch.where(t_ref >= 0, t_ref, V), q_ref)
        torch.testing.assert_close(dense[:, :V], dense_ref[:, :V], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(R, R_ref, rtol=1e-5, atol=1e-6)
        assert R.max() > 0.1
        kept = tids[tids >= 0]
        for row in tids:                                    # ids stay unique per row
            ids = row[row >= 0]
            assert ids.numel() == ids.unique().numel()
        assert kept.numel() > 0


def test_linear_loss_under_the_kernel(small_chunks):
    d, topk, amap = inputs(74)
    g = torch.Generator().manual_seed(75)
    H = 6
    h = torch.randn(2, 4, H, generator=g).to(DEVICE).requires_grad_()
    W = torch.randn(45, H, generator=g).to(DEVICE).requires_grad_()
    kw = dict(divergence="jsd", tail="uniform", beta=0.7, softcap=5.0)
    got = fused_linear_loss(h, W, topk, amap, d["labels"], None, d["source_weights"], impl="triton", chunk_tokens=3,
                            **kw)
    got.backward()
    h2, W2 = (x.detach().double().clone().requires_grad_() for x in (h, W))
    want = ref.fused_loss_reference(h2 @ W2.T, SourceTopK(topk.ids, topk.logprobs.double()), amap, d["labels"],
                                    d["source_weights"], **kw)
    want.backward()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h.grad.double(), h2.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(W.grad.double(), W2.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_strided_logits_view(small_chunks):
    """``logits[:, :-1]`` (row stride != V) read and written without a copy."""
    d, topk, amap = inputs(76, T=5)
    full = (torch.randn(2, 6, 45, generator=torch.Generator().manual_seed(77)) * 3).to(DEVICE).requires_grad_()
    kw = dict(divergence="tvd", tail="bucket", logit_scale=1.5)
    args = (topk, amap, d["labels"], d["source_weights"])
    fused_loss(full[:, :-1], *args, impl="triton", **kw).backward()
    f64 = full.detach().double().requires_grad_()
    ref.fused_loss_reference(f64[:, :-1], SourceTopK(topk.ids, topk.logprobs.double()), amap, d["labels"],
                             d["source_weights"], **kw).backward()
    torch.testing.assert_close(full.grad.double(), f64.grad, rtol=5e-5, atol=1e-6)
    assert (full.grad[:, -1] == 0).all()


@pytest.mark.parametrize("z_values,kw", [
    ({4: float("-inf")}, dict(divergence="reverse_kl")),                     # p = 0 on a teacher id
    ({4: float("-inf")}, dict(divergence="reverse_kl", tail="uniform")),
    ({3: 40.0}, dict(divergence="forward_kl", tail="bucket")),               # a confident student: the
    ({3: 25.0, 4: 22.0}, dict(divergence="ce", tail="bucket", softcap=50.0)),  # fp64 pass for the bucket
])
def test_edge_rows(z_values, kw, small_chunks):
    """One token, one source keeping ids 3 and 4 (q 0.6 / 0.3: R = 0.1), label 3 (cf. test_divergences)."""
    V = 20
    z0 = torch.zeros(1, 1, V)
    for i, v in z_values.items():
        z0[0, 0, i] = v
    topk = SourceTopK(torch.tensor([[[[3, 4]]]], device=DEVICE),
                      torch.tensor([[[[0.6, 0.3]]]], device=DEVICE).log())
    amap = AlignMap(torch.zeros(1, 1, 1, dtype=torch.int32, device=DEVICE),
                    torch.arange(V, dtype=torch.int32, device=DEVICE)[None])
    labels = torch.tensor([[3]], device=DEVICE)
    z = z0.clone().to(DEVICE).requires_grad_()
    got = fused_loss(z, topk, amap, labels, lm_weight=0.2, impl="triton", **kw)
    got.backward()
    z64 = z0.clone().double().to(DEVICE).requires_grad_()
    want = ref.fused_loss_reference(z64, SourceTopK(topk.ids, topk.logprobs.double()), amap, labels, lm_weight=0.2,
                                    **kw)
    want.backward()
    assert torch.isfinite(got) and torch.isfinite(want)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(z.grad.double(), z64.grad, rtol=1e-5, atol=1e-6)
