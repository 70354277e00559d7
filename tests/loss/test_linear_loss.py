"""fused_linear_loss vs the float64 dense reference of fused_loss(hidden @ W.T + b): loss and the
gradients of hidden, weight and bias; chunk sizes (some not dividing N, some spanning sequences),
reductions, ignored tokens, per-token/per-sequence weights, fp32/bf16/fp16; bad input.

The tests that use the ``auto_impl`` fixture run twice: on the torch row path here, and with the
Triton row kernel (``impl="auto"`` picks it under ``TRITON_INTERPRET=1``) in the interpreter session
(marked ``interpreter``, tests/_interpreter.py).
"""
import os

import pytest
import torch

from fastfuse.loss.linear_loss import default_chunk_tokens, fused_linear_loss
from fastfuse import AlignMap, SourceTopK, fused_loss
from fastfuse.loss.reference import fused_loss_reference
from fastfuse.testing import random_inputs

from _interpreter import kernels_interpreted


@pytest.fixture(params=["torch", pytest.param("triton", marks=[pytest.mark.interpreter, pytest.mark.slow])])
def auto_impl(request):
    """The row path ``impl="auto"`` takes on these CPU tensors: torch here, the Triton kernel when interpreted."""
    if (request.param == "triton") != kernels_interpreted():
        pytest.skip(f"impl='auto' takes the {'torch' if request.param == 'triton' else 'triton'} path in this process")
    return request.param


def make(seed, B=2, T=7, H=12, V=53, S=2, K=4, weights="token", bias=True, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    d = random_inputs(B=B, T=T, V=V, S=S, K=K, Ts=9, Vs=40, weights=weights, generator=g, map_range=V // 2)
    hidden = torch.randn(B, T, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) * 2 / H ** 0.5).to(dtype)
    b = (torch.randn(V, generator=g) * 0.5).to(dtype) if bias else None
    return hidden, weight, b, SourceTopK(*d["source_topk"]), AlignMap(*d["align_map"]), d["labels"], d["source_weights"]


def reference(hidden, weight, bias, topk, amap, labels, w, reduction, lm_weight=0.7, temperature=1.3):
    """float64 fused_loss semantics of hidden @ W.T + b, with leaves for the gradients."""
    h = hidden.double().detach().requires_grad_(True)
    W = weight.double().detach().requires_grad_(True)
    b = bias.double().detach().requires_grad_(True) if bias is not None else None
    logits = h @ W.T + (b if b is not None else 0)
    loss = fused_loss_reference(logits, topk, amap, labels, w, lm_weight, temperature, reduction=reduction)
    return loss, h, W, b


def run(hidden, weight, bias, topk, amap, labels, w, reduction, go, **kw):
    h = hidden.clone().requires_grad_(True)
    W = weight.clone().requires_grad_(True)
    b = bias.clone().requires_grad_(True) if bias is not None else None
    loss = fused_linear_loss(h, W, topk, amap, labels, bias=b, source_weights=w, lm_weight=0.7, temperature=1.3,
                             reduction=reduction, **kw)
    loss.backward(go.to(loss.dtype))
    return loss.detach(), h.grad, W.grad, (b.grad if b is not None else None)


def grad_out(ref, reduction, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(ref.shape, generator=g, dtype=torch.float64) if reduction == "none" else \
        torch.tensor(0.37, dtype=torch.float64)


@pytest.mark.usefixtures("auto_impl")
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("chunk_tokens", [None, 1, 5, 14, 64])   # 5 divides neither N = 14 nor T = 7
@pytest.mark.parametrize("weights", ["token", "seq", None])
def test_matches_reference_fp32(reduction, chunk_tokens, weights):
    seed = hash((reduction, chunk_tokens, weights)) % 1000
    args = make(seed, weights=weights)
    ref, rh, rW, rb = reference(*args, reduction)
    go = grad_out(ref, reduction, seed)
    loss, dh, dW, db = run(*args, reduction, go, chunk_tokens=chunk_tokens)
    ref.backward(go)
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-5)
    for name, ours, theirs in (("hidden", dh, rh.grad), ("weight", dW, rW.grad), ("bias", db, rb.grad)):
        torch.testing.assert_close(ours.double(), theirs, rtol=1e-4, atol=1e-5, msg=lambda m: f"d_{name}: {m}")


@pytest.mark.usefixtures("auto_impl")
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float16, 3e-3)])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_low_precision(dtype, tol, reduction):
    """Against the float64 reference on the same (rounded) inputs, and against fused_loss on the
    rounded logits (what the kernel is specified to equal)."""
    args = make(7, B=3, T=11, H=32, V=97, dtype=dtype)
    ref, rh, rW, rb = reference(*args, reduction)
    go = grad_out(ref, reduction)
    loss, dh, dW, db = run(*args, reduction, go, chunk_tokens=8)
    ref.backward(go)
    assert ((loss.double() - ref.detach()).norm() / ref.detach().norm()) < tol
    for name, ours, theirs in (("hidden", dh, rh.grad), ("weight", dW, rW.grad), ("bias", db, rb.grad)):
        assert ours.dtype == dtype
        err = float((ours.double() - theirs).norm() / theirs.norm())
        assert err < tol, (name, err)
    # the same as fused_loss on the logits computed in the input dtype (up to d_weight's rounding per chunk)
    hidden, weight, bias, topk, amap, labels, w = args
    z = torch.addmm(bias, hidden.flatten(0, 1), weight.T).view(*labels.shape, -1).requires_grad_(True)
    full = fused_loss(z, topk, amap, labels, source_weights=w, lm_weight=0.7, temperature=1.3, reduction=reduction)
    torch.testing.assert_close(loss, full.detach(), rtol=1e-4, atol=1e-4)


@pytest.mark.usefixtures("auto_impl")
def test_chunks_span_sequences_and_partial_grads():
    """B > chunk and chunks crossing sequence boundaries; only some inputs require grad."""
    args = make(4, B=9, T=3, weights="token")
    hidden, weight, bias, topk, amap, labels, w = args
    ref, rh, rW, rb = reference(*args, "sum")
    ref.backward()
    W = weight.clone().requires_grad_(True)
    loss = fused_linear_loss(hidden, W, topk, amap, labels, bias=bias, source_weights=w, lm_weight=0.7,
                             temperature=1.3, reduction="sum", chunk_tokens=4)
    loss.backward()
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(W.grad.double(), rW.grad, rtol=1e-4, atol=1e-5)
    h = hidden.clone().requires_grad_(True)
    loss = fused_linear_loss(h, weight, topk, amap, labels, source_weights=w, lm_weight=0.7, temperature=1.3,
                             reduction="mean", chunk_tokens=10)
    ref2, rh2, *_ = reference(hidden, weight, None, topk, amap, labels, w, "mean")
    ref2.backward()
    loss.backward()
    torch.testing.assert_close(h.grad.double(), rh2.grad, rtol=1e-4, atol=1e-5)


def test_loss_without_gradients():
    hidden, weight, bias, topk, amap, labels, w = make(11)
    for reduction in ("mean", "sum", "none"):
        with torch.no_grad():
            loss = fused_linear_loss(hidden, weight, topk, amap, labels, bias=bias, source_weights=w, lm_weight=0.7,
                                     temperature=1.3, reduction=reduction, chunk_tokens=3)
        ref, *_ = reference(hidden, weight, bias, topk, amap, labels, w, reduction)
        torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-5)


def test_two_dimensional_hidden():
    hidden, weight, bias, topk, amap, labels, w = make(3, B=1, weights="token")
    W = weight.clone().requires_grad_(True)
    loss = fused_linear_loss(hidden[0], W, SourceTopK(topk.ids[:, 0], topk.logprobs[:, 0]),
                             AlignMap(amap.pos[:, 0], amap.vocab), labels[0], bias=bias, source_weights=w[:, 0],
                             lm_weight=0.7, temperature=1.3, reduction="none", chunk_tokens=2)
    ref, _, rW, _ = reference(hidden, weight, bias, topk, amap, labels, w, "none")
    assert loss.shape == (7,)
    torch.testing.assert_close(loss.double(), ref.detach()[0], rtol=1e-5, atol=1e-5)
    loss.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(W.grad.double(), rW.grad, rtol=1e-4, atol=1e-5)


def test_all_ignored_gives_zero():
    hidden, weight, bias, topk, amap, labels, w = make(5)
    labels = torch.full_like(labels, -100)
    h = hidden.clone().requires_grad_(True)
    W = weight.clone().requires_grad_(True)
    loss = fused_linear_loss(h, W, topk, amap, labels, bias=bias, source_weights=w, chunk_tokens=4)
    loss.backward()
    assert float(loss.detach()) == 0.0
    assert float(h.grad.abs().sum()) == 0.0 and float(W.grad.abs().sum()) == 0.0


def test_twice_in_one_graph_and_accumulation():
    """Two calls whose losses are summed and scaled (grad_output != 1) accumulate like autograd."""
    args = make(8, weights="seq")
    hidden, weight, bias, topk, amap, labels, w = args
    W = weight.clone().requires_grad_(True)
    kw = dict(bias=bias, source_weights=w, lm_weight=0.7, temperature=1.3, chunk_tokens=3)
    loss = 0.5 * fused_linear_loss(hidden, W, topk, amap, labels, **kw) + \
        2.0 * fused_linear_loss(hidden, W, topk, amap, labels, reduction="sum", **kw)
    loss.backward()
    r1, _, rW1, _ = reference(*args, "mean")
    r2, _, rW2, _ = reference(*args, "sum")
    (0.5 * r1).backward()
    (2.0 * r2).backward()
    torch.testing.assert_close(W.grad.double(), rW1.grad + rW2.grad, rtol=1e-4, atol=1e-5)


def test_second_backward_raises_and_impl_choice():
    hidden, weight, bias, topk, amap, labels, w = make(12)
    W = weight.clone().requires_grad_(True)
    loss = fused_linear_loss(hidden, W, topk, amap, labels, bias=bias, source_weights=w)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward through the same loss twice"):
        loss.backward()
    ref = fused_linear_loss(hidden, weight, topk, amap, labels, bias=bias, source_weights=w, impl="torch")
    torch.testing.assert_close(loss.detach(), ref)
    if os.environ.get("TRITON_INTERPRET") != "1":     # (not when run under the interpreter)
        with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
            fused_linear_loss(hidden, weight, topk, amap, labels, impl="triton")


def test_default_chunk_tokens():
    assert default_chunk_tokens(8192, 128256, 2) == 2048     # 501 MiB of bf16 logits, 4 chunks
    assert default_chunk_tokens(8192, 32000, 2) == 8192      # 500 MiB: one chunk
    assert default_chunk_tokens(8192, 128256, 4) == 1024
    assert default_chunk_tokens(3000, 128256, 2) == 1500     # balanced: 2 x 1500, not 2048 + 952
    assert default_chunk_tokens(7, 50, 4) == 7
    assert default_chunk_tokens(10, 1 << 40, 4) == 1


def test_chunk_buffer_is_bounded(monkeypatch):
    """The CPU path allocates logits for one chunk only, never [N, V]."""
    shapes = []
    real_empty = torch.empty

    def spy(*size, **kw):
        t = real_empty(*size, **kw)
        shapes.append(tuple(t.shape))
        return t

    monkeypatch.setattr(torch, "empty", spy)
    hidden, weight, bias, topk, amap, labels, w = make(2, B=4, T=10, V=300)
    h = hidden.clone().requires_grad_(True)
    fused_linear_loss(h, weight, topk, amap, labels, bias=bias, source_weights=w, chunk_tokens=6).backward()
    assert (6, 300) in shapes and not any(s[-1:] == (300,) and s[0] > 6 for s in shapes if len(s) == 2)


def test_bad_input():
    hidden, weight, bias, topk, amap, labels, w = make(1)
    cases = [
        (ValueError, "hidden must be \\[B, T, H\\]", dict(hidden=hidden[0, 0])),
        (ValueError, "hidden must be \\[B, T, H\\]", dict(hidden=hidden[None])),
        (TypeError, "hidden must be float32", dict(hidden=hidden.long())),
        (TypeError, "hidden must be a torch.Tensor", dict(hidden=hidden.tolist())),
        (ValueError, "weight must be \\[V, H=12\\]", dict(weight=weight[:, :5])),
        (ValueError, "weight must be \\[V, H=12\\]", dict(weight=weight[0])),
        (TypeError, "weight dtype torch.float16 differs from hidden dtype", dict(weight=weight.half())),
        (TypeError, "weight must be float32", dict(weight=weight.int())),
        (TypeError, "weight dtype torch.float64 differs from hidden dtype", dict(weight=weight.double())),
        (ValueError, "impl='triton' takes float32/bfloat16/float16 hidden; float64 runs on the torch path",
         dict(hidden=hidden.double(), weight=weight.double(), bias=None, impl="triton")),
        (ValueError, "weight is on meta, hidden on cpu", dict(weight=weight.to("meta"))),
        (ValueError, "bias must be \\[V=53\\]", dict(bias=bias[:3])),
        (TypeError, "bias dtype", dict(bias=bias.half())),
        (ValueError, "bias is on meta", dict(bias=bias.to("meta"))),
        (ValueError, "labels must have shape \\(2, 7\\)", dict(labels=labels[:, :3])),
        (TypeError, "labels must be int64", dict(labels=labels.float())),
        (ValueError, "labels must be ignore_index=-100 or in \\[0, V=53\\)", dict(labels=labels.clamp_min(0) + 53)),
        (ValueError, "align_map.pos must have shape", dict(align_map=AlignMap(amap.pos[:, :, :3], amap.vocab))),
        (ValueError, "align_map.vocab must be -1 or a target id", dict(align_map=AlignMap(amap.pos, amap.vocab + 60))),
        (ValueError, "align_map.pos is on meta", dict(align_map=AlignMap(amap.pos.to("meta"), amap.vocab))),
        (TypeError, "source_topk.ids must be int32", dict(source_topk=SourceTopK(topk.ids.float(), topk.logprobs))),
        (ValueError, "source_weights must have shape", dict(source_weights=w[:, :1, :2])),
        (ValueError, "source_weights must be finite and >= 0", dict(source_weights=-w)),
        (ValueError, "chunk_tokens", dict(chunk_tokens=0)),
        (ValueError, "reduction must be", dict(reduction="avg")),
        (ValueError, "impl must be", dict(impl="cuda")),
        (ValueError, "lm_weight must be in", dict(lm_weight=1.5)),
    ]
    base = dict(hidden=hidden, weight=weight, source_topk=topk, align_map=amap, labels=labels, bias=bias,
                source_weights=w)
    for exc, msg, change in cases:
        with pytest.raises(exc, match=msg):
            fused_linear_loss(**{**base, **change})


def test_same_errors_as_fused_loss():
    """The teacher-side checks raise what fused_loss(hidden @ W.T) raises ('hidden' for 'target_logits')."""
    hidden, weight, bias, topk, amap, labels, w = make(2)
    ids, lp = topk
    pos, vocab = amap
    cases = [
        dict(labels=labels[:1]), dict(labels=labels.float()), dict(labels=labels + 1000),
        dict(source_topk=SourceTopK(ids[:, :1], lp[:, :1])), dict(source_topk=SourceTopK(ids[None], lp[None])),
        dict(source_topk=SourceTopK(ids, lp[..., :2])), dict(source_topk=SourceTopK(ids - 5, lp)),
        dict(source_topk=SourceTopK(ids, lp.long())), dict(source_topk=SourceTopK(ids, lp.masked_fill(ids >= 0, float("nan")))),
        dict(source_topk=(ids, lp)), dict(align_map=AlignMap(pos + 100, vocab)), dict(align_map=AlignMap(pos, vocab[:1])),
        dict(align_map=AlignMap(pos.float(), vocab)), dict(align_map=AlignMap(pos, vocab.to("meta"))),
        dict(source_weights=w[:1]), dict(source_weights=w.long()), dict(source_weights=w * float("inf")),
        dict(lm_weight=-0.1), dict(temperature=0.0), dict(ignore_index=1.5), dict(reduction="max"),
    ]
    base = dict(source_topk=topk, align_map=amap, labels=labels, source_weights=w)
    logits = hidden @ weight.T
    for change in cases:
        kw = {**base, **change}
        with pytest.raises(Exception) as theirs:
            fused_loss(logits, **kw)
        with pytest.raises(type(theirs.value)) as ours:
            fused_linear_loss(hidden, weight, **kw)
        assert str(ours.value) == str(theirs.value).replace("target_logits", "hidden"), change


@pytest.mark.interpreter
def test_uses_triton_when_interpreted(monkeypatch):
    """Under TRITON_INTERPRET=1 impl='auto' takes the Triton row kernel."""
    if not kernels_interpreted():
        pytest.skip("the kernels are not interpreted in this process: CPU tensors take the torch path")
    import fastfuse.kernels.fused_ce as fc

    calls = []
    real = fc.ce_rows
    monkeypatch.setattr(fc, "ce_rows", lambda *a, **k: calls.append(1) or real(*a, **k))
    hidden, weight, bias, topk, amap, labels, w = make(9)
    loss = fused_linear_loss(hidden, weight.requires_grad_(True), topk, amap, labels, bias=bias, chunk_tokens=5)
    loss.backward()
    assert len(calls) == 3
