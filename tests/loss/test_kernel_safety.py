"""Issue #10: what ``fused_loss`` / ``fused_linear_loss`` must never do, on both implementations.

* out-of-range ids with ``validate=False`` never reach memory outside their own row (other rows'
  loss and gradient unchanged); ids >= 2**31 are never truncated;
* fp16 with a loss scale (GradScaler's ``grad_output = 2**16``) gives torch's cross-entropy gradient
  (no underflow of ``scale * softmax`` before ``grad_output`` is applied);
* ``inplace_grad`` marks the logits dirty (autograd's version-counter error on misuse);
* a second backward through the same loss raises one clear error in both losses;
* no host read (``bool``/``item``...) of a tensor in forward (``validate=False``) or backward;
* rows starting with a ``-inf`` block, ``-inf`` logits where a coefficient is 0: no NaN.

Triton runs under ``TRITON_INTERPRET=1`` on CPU: marked ``interpreter`` (tests/_interpreter.py).
"""
import contextlib
import math

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.interpreter
triton = pytest.importorskip("triton")

from fastfuse.loss.checks import SECOND_BACKWARD  # noqa: E402
from fastfuse.loss.linear_loss import fused_linear_loss  # noqa: E402
from fastfuse import AlignMap, SourceTopK, fused_loss  # noqa: E402
from fastfuse.testing import random_inputs  # noqa: E402

IMPLS = ["triton", "torch"]


def _inputs(seed, B=2, T=4, V=300, S=2, K=6, Ts=5, Vs=40, **kw):
    d = random_inputs(B, T, V, S, K, Ts=Ts, Vs=Vs, device=DEVICE, p_ignore=0.0,
                      generator=torch.Generator().manual_seed(seed), **kw)
    return dict(z=d["target_logits"], ids=d["source_topk"][0], lp=d["source_topk"][1], pos=d["align_map"][0],
                vocab=d["align_map"][1], labels=d["labels"], w=d["source_weights"])


def _run(d, impl, reduction="none", go=None, inplace=False, **kw):
    """(loss, gradient of the logits) of fused_loss; ``go`` defaults to ones."""
    z = d["z"].clone().requires_grad_(True)
    x = z * 1 if inplace else z
    loss = fused_loss(x, SourceTopK(d["ids"], d["lp"]), AlignMap(d["pos"], d["vocab"]), d["labels"], d["w"],
                      reduction=reduction, impl=impl, validate=False, inplace_grad=inplace, **kw)
    loss.backward(torch.ones_like(loss) if go is None else go)
    return loss.detach(), z.grad


def _with(d, key, idx, value):
    d = dict(d)
    d[key] = d[key].clone()
    d[key][idx] = value
    return d


# --- 1. out-of-range ids with validate=False ---------------------------------------------------

@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("bad", [300, 305, 1000, -7, 2 ** 40])
def test_bad_label_touches_only_its_row(impl, bad):
    d = _inputs(1)
    d["labels"] = d["labels"].long()
    l0, g0 = _run(_with(d, "labels", (0, 1), -100), impl)
    l1, g1 = _run(_with(d, "labels", (0, 1), bad), impl)
    keep = torch.ones(2, 4, dtype=torch.bool)
    keep[0, 1] = False
    torch.testing.assert_close(l1[keep], l0[keep], rtol=0, atol=0)
    torch.testing.assert_close(g1[keep], g0[keep], rtol=0, atol=0)
    assert torch.isfinite(l1).all() and torch.isfinite(g1).all()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("key,idx,bad", [("labels", (1, 2), 302), ("vocab", (0, 5), 301)])
def test_bad_ids_leave_the_rest_of_the_buffer_untouched(impl, key, idx, bad):
    """logits = full[..., :V] of a padded buffer, gradient in place: an id V + 1 would be the
    padding column of the same row (and rows are computed in order under the interpreter, so the
    padding is the one place a stray store stays visible)."""
    d = _inputs(14)
    d = _with(d, key, idx, bad)
    d["pos"] = torch.zeros_like(d["pos"])
    d["ids"][:, :, 0, 0] = 5
    full = torch.randn(2, 4, 310, device=DEVICE)
    full[..., :300] = d["z"]
    leaf = full.clone().requires_grad_(True)
    buf = leaf * 1
    loss = fused_loss(buf[..., :300], SourceTopK(d["ids"], d["lp"]), AlignMap(d["pos"], d["vocab"]), d["labels"],
                      d["w"], impl=impl, inplace_grad=True, validate=False, lm_weight=0.5)
    loss.backward()
    torch.testing.assert_close(buf.detach()[..., 300:], full[..., 300:], rtol=0, atol=0)
    assert leaf.grad[..., 300:].abs().max() == 0 and torch.isfinite(leaf.grad).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_label_beyond_int32_is_not_truncated(impl):
    d = _inputs(2)
    d["labels"] = d["labels"].long()
    l_bad, _ = _run(_with(d, "labels", (0, 0), 2 ** 40), impl)     # truncated to int32 it would be 0
    l_zero, _ = _run(_with(d, "labels", (0, 0), 0), impl)
    assert l_bad[0, 0] != l_zero[0, 0]
    with pytest.raises(ValueError, match="labels"):
        fused_loss(d["z"], SourceTopK(d["ids"], d["lp"]), AlignMap(d["pos"], d["vocab"]),
                   _with(d, "labels", (0, 0), 2 ** 40)["labels"], impl=impl)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("key,idx,bad,ok", [
    ("vocab", (0, 3), 300, -1), ("vocab", (0, 3), 555, -1), ("vocab", (1, 39), 10 ** 6, -1),
    ("ids", (0, 0, 1, 2), 40, -1), ("ids", (0, 0, 2, 0), 45, -1), ("ids", (1, 1, 4, 5), 10 ** 6, -1),
    ("pos", (0, 0, 1), 5, -1), ("pos", (0, 0, 2), 7, -1), ("pos", (1, 1, 3), 10 ** 6, -1),
])
def test_bad_teacher_ids_are_dropped_not_followed(impl, key, idx, bad, ok):
    """A vocab entry >= V, a source id >= Vs or a position >= Ts acts like -1 (nothing read there)."""
    d = _inputs(3)
    if key == "ids":       # make sure the bad entry is reachable: every position aligned to row idx[2]
        d["pos"] = torch.full_like(d["pos"], idx[2])
    l0, g0 = _run(_with(d, key, idx, ok), impl, lm_weight=0.2)
    l1, g1 = _run(_with(d, key, idx, bad), impl, lm_weight=0.2)
    torch.testing.assert_close(l1, l0, rtol=0, atol=0)
    torch.testing.assert_close(g1, g0, rtol=0, atol=0)


# --- 2. fp16 with a loss scale -----------------------------------------------------------------

def _torch_ce(z, labels, go):
    """torch's cross-entropy as autocast runs it on fp16 logits: in fp32, gradient cast back to fp16."""
    x = z.clone().requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(x.float().reshape(-1, x.shape[-1]), labels.reshape(-1))
    loss.backward(torch.tensor(go, dtype=loss.dtype))
    return x.grad


def _exact_ce_grad(z, labels, go):
    p = torch.softmax(z.double(), -1)
    p.scatter_add_(-1, labels[..., None], -torch.ones_like(p[..., :1]))
    return p * (go / labels.numel())


# smallest shapes where the old code (scale folded into the fp16 gradient before grad_output) fails:
# scale * softmax ~ 1 / (N * V) ~ 5e-7 is subnormal in fp16 (steps of 6e-8) and often flushed to 0
@pytest.mark.slow
@pytest.mark.parametrize("impl,config", [("triton", None), ("triton", (1024, 4)), ("torch", None)])
def test_fp16_loss_scale_matches_torch_cross_entropy(impl, config):
    from fastfuse.kernels.launch import forced
    with forced("fused_ce", config):
        g = torch.Generator().manual_seed(4)
        B, T, V = 2, 256, 4096
        z = (torch.randn(B, T, V, generator=g) * 2).half().to(DEVICE)
        labels = torch.randint(0, V, (B, T), generator=g).to(DEVICE)
        d = dict(z=z, ids=torch.full((1, B, 1, 1), -1, device=DEVICE), lp=torch.zeros(1, B, 1, 1, device=DEVICE),
                 pos=torch.full((1, B, T), -1, dtype=torch.int32, device=DEVICE),
                 vocab=torch.full((1, 1), -1, dtype=torch.int32, device=DEVICE), labels=labels, w=None)
        go = 2.0 ** 16
        _, got = _run(d, impl, reduction="mean", go=torch.tensor(go), lm_weight=1.0)
        want = _torch_ce(z, labels, go)
        exact = _exact_ce_grad(z, labels, go)
        assert got.dtype == torch.float16
        # fp16 tolerance: a few ulps of each entry (torch's own error vs the exact gradient is of that size)
        tol = dict(rtol=4e-3, atol=1e-6)
        torch.testing.assert_close(want.double(), exact, **tol)
        torch.testing.assert_close(got.double(), exact, **tol)
        torch.testing.assert_close(got, want, **tol)


@pytest.mark.slow
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fp16_linear_loss_scale_matches_torch(impl, reduction):
    g = torch.Generator().manual_seed(5)
    N, H, V = 512, 16, 4096
    h = torch.randn(N, H, generator=g).half().to(DEVICE)
    W = (torch.randn(V, H, generator=g) * 0.5).half().to(DEVICE)
    labels = torch.randint(0, V, (N,), generator=g).to(DEVICE)
    topk = SourceTopK(torch.full((1, 1, 1), -1, device=DEVICE), torch.zeros(1, 1, 1, device=DEVICE))
    amap = AlignMap(torch.full((1, N), -1, dtype=torch.int32, device=DEVICE),
                    torch.full((1, 1), -1, dtype=torch.int32, device=DEVICE))
    go = 2.0 ** 16 if reduction == "mean" else 2.0 ** 16 / N
    hh, WW = h.clone().requires_grad_(True), W.clone().requires_grad_(True)
    loss = fused_linear_loss(hh, WW, topk, amap, labels, lm_weight=1.0, impl=impl, reduction=reduction,
                             chunk_tokens=200)
    loss.backward(torch.full_like(loss, go))
    h64, W64 = h.double().requires_grad_(True), W.double().requires_grad_(True)
    ref = torch.nn.functional.cross_entropy(h64 @ W64.T, labels, reduction=reduction)
    ref.backward(torch.full_like(ref, go))
    for got, want in ((hh.grad, h64.grad), (WW.grad, W64.grad)):
        rel = ((got.double() - want).norm() / want.norm()).item()
        assert rel < 3e-3, rel


# --- 3. inplace_grad marks the logits dirty ----------------------------------------------------

@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_inplace_grad_on_saved_logits_raises(impl, dtype):
    d = _inputs(6)
    x = d["z"].to(dtype).requires_grad_(True)
    logits = torch.tanh(x)              # tanh saves its output: the logits (as a softcap's tanh does)
    loss = fused_loss(logits, SourceTopK(d["ids"], d["lp"]), AlignMap(d["pos"], d["vocab"]), d["labels"], d["w"],
                      impl=impl, inplace_grad=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("impl", IMPLS)
def test_inplace_grad_on_strided_view_leaves_the_rest(impl):
    d = _inputs(7)
    full = torch.randn(2, 5, 300, device=DEVICE)
    full[:, :4] = d["z"]
    leaf = full.clone().requires_grad_(True)
    buf = leaf * 1
    loss = fused_loss(buf[:, :-1], SourceTopK(d["ids"], d["lp"]), AlignMap(d["pos"], d["vocab"]), d["labels"],
                      d["w"], impl=impl, inplace_grad=True)
    loss.backward()
    _, want = _run(d, impl, reduction="mean")
    torch.testing.assert_close(leaf.grad[:, :-1], want)
    assert leaf.grad[:, -1].abs().max() == 0
    torch.testing.assert_close(buf.detach()[:, -1], full[:, -1], rtol=0, atol=0)   # the rest untouched


# --- 4. second backward --------------------------------------------------------------------------

@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("linear", [False, True])
def test_second_backward_raises_in_both_losses(impl, dtype, reduction, linear):
    d = _inputs(8)
    topk, amap = SourceTopK(d["ids"], d["lp"]), AlignMap(d["pos"], d["vocab"])
    if linear:
        h = torch.randn(2, 4, 8, device=DEVICE).to(dtype).requires_grad_(True)
        W = torch.randn(300, 8, device=DEVICE).to(dtype).requires_grad_(True)
        loss = fused_linear_loss(h, W, topk, amap, d["labels"], impl=impl, reduction=reduction)
    else:
        x = d["z"].to(dtype).requires_grad_(True)
        loss = fused_loss(x, topk, amap, d["labels"], impl=impl, reduction=reduction)
    go = torch.full_like(loss, 0.5)
    loss.backward(go, retain_graph=True)
    with pytest.raises(RuntimeError) as e:
        loss.backward(go)
    assert str(e.value) == SECOND_BACKWARD.format("fused_linear_loss" if linear else "fused_loss")


# --- 5. no host syncs ------------------------------------------------------------------------------

@contextlib.contextmanager
def _no_host_reads():
    """Any Python-level read of a tensor's value (what a host sync looks like in code) raises."""
    names = ("__bool__", "item", "tolist", "__float__", "__int__", "__index__")
    saved = {n: getattr(torch.Tensor, n) for n in names}

    def refuse(self, *a, **k):
        raise AssertionError("host read of a tensor value")
    for n in names:
        setattr(torch.Tensor, n, refuse)
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)


@pytest.mark.slow
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_no_host_reads_in_forward_or_backward(impl, dtype, reduction):
    d = _inputs(9)
    topk, amap = SourceTopK(d["ids"], d["lp"]), AlignMap(d["pos"], d["vocab"])
    x = d["z"].to(dtype).requires_grad_(True)
    h = torch.randn(2, 4, 8, device=DEVICE).to(dtype).requires_grad_(True)
    W = torch.randn(300, 8, device=DEVICE).to(dtype).requires_grad_(True)
    for fn in (lambda: fused_loss(x, topk, amap, d["labels"], impl=impl, reduction=reduction, validate=False),
               lambda: fused_linear_loss(h, W, topk, amap, d["labels"], impl=impl, reduction=reduction,
                                         validate=False)):
        for go in (1.0, 0.37):
            with _no_host_reads():
                loss = fn()
                loss.backward(torch.full_like(loss, go))
    assert torch.isfinite(x.grad).all() and torch.isfinite(W.grad).all()


# --- 6./7. -inf logits ---------------------------------------------------------------------------

def _targets_in(d, lo, hi):
    """Teacher ids and labels mapped into [lo, hi), so -inf columns outside are never gathered."""
    d["vocab"] = torch.where(d["vocab"] >= 0, lo + d["vocab"] % (hi - lo), d["vocab"])
    d["labels"] = lo + d["labels"] % (hi - lo)
    return d


@pytest.mark.parametrize("impl,config", [("triton", None), ("triton", (128, 2)), ("triton", (128, 2, 3, True)),
                                         ("torch", None)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_minus_inf_blocks_give_no_nan(impl, config, dtype):
    from fastfuse.kernels.launch import forced
    with forced("fused_ce", config):
        d = _targets_in(_inputs(10, B=1, T=4, V=1000), 128, 512)
        d["z"] = d["z"].to(dtype)
        big = d["z"].clone()
        for t, cols in ((0, slice(0, 128)), (1, slice(512, 640)), (2, slice(896, 1000)), (3, slice(0, 256))):
            d["z"][0, t, cols] = -math.inf
            big[0, t, cols] = -1e4           # same softmax (exp underflows to 0), finite everywhere
        l1, g1 = _run(d, impl, reduction="none")
        l0, g0 = _run(dict(d, z=big), impl, reduction="none")
        assert torch.isfinite(l1).all() and torch.isfinite(g1).all()
        torch.testing.assert_close(l1, l0)
        torch.testing.assert_close(g1, g0)


@pytest.mark.parametrize("impl", IMPLS)
def test_minus_inf_at_the_label_is_an_inf_loss(impl):
    d = _inputs(11)
    d["z"][0, 0, d["labels"][0, 0]] = -math.inf
    loss, grad = _run(d, impl, lm_weight=1.0)
    assert loss[0, 0] == math.inf and torch.isfinite(loss.flatten()[1:]).all()
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_minus_inf_where_the_coefficient_is_zero(impl):
    # column 0 at -inf is never a target; label coefficient 0 (lm_weight = 0, all aligned) at -inf
    d = _inputs(12, p_unaligned=0.0, p_pad=0.0, p_unmapped=0.0)
    d["labels"] = d["labels"].clamp_min(1)
    d["vocab"] = d["vocab"].clamp_min(1)
    d["z"][..., 0] = -math.inf
    for lm_weight in (1.0, 0.0):
        loss, grad = _run(d, impl, lm_weight=lm_weight)
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all(), lm_weight
    d["vocab"] = torch.where(d["vocab"] == d["labels"][0, 1], 2, d["vocab"])
    d["z"][0, 1, d["labels"][0, 1]] = -math.inf
    loss, grad = _run(d, impl, lm_weight=0.0)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_linear_loss_minus_inf_bias(impl):
    g = torch.Generator().manual_seed(13)
    d = _inputs(13, V=60, p_unaligned=0.0)
    d["labels"] = d["labels"].clamp_min(1)
    d["vocab"] = d["vocab"].clamp_min(-1)
    d["vocab"] = torch.where(d["vocab"] == 0, 1, d["vocab"])
    h = torch.randn(2, 4, 8, generator=g).to(DEVICE)
    W = torch.randn(60, 8, generator=g).to(DEVICE)
    out = []
    for b0 in (-math.inf, -1e4):
        bias = torch.zeros(60, device=DEVICE)
        bias[0] = b0
        hh, WW = h.clone().requires_grad_(True), W.clone().requires_grad_(True)
        loss = fused_linear_loss(hh, WW, SourceTopK(d["ids"], d["lp"]), AlignMap(d["pos"], d["vocab"]), d["labels"],
                                 bias=bias, lm_weight=1.0, impl=impl)
        loss.backward()
        out.append((loss.detach(), hh.grad, WW.grad))
    for a, b in zip(*out):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b)
