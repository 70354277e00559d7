"""fused_linear_loss vs the dense float64 reference of fused_loss(hidden @ W.T + b): loss and
gradients of hidden, weight and bias, chunked, all reductions; bad input."""
import pytest
import torch

from fastfuse.linear_loss import fused_linear_loss
from fastfuse.loss import AlignMap, SourceTopK
from fastfuse.reference import fused_loss_reference, random_inputs


def make(seed, B=2, T=7, H=12, V=53, S=2, K=4, weights="token", bias=True, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    d = random_inputs(B=B, T=T, V=V, S=S, K=K, Ts=9, Vs=40, weights=weights, generator=g, map_range=V // 2)
    hidden = torch.randn(B, T, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) / H ** 0.5).to(dtype)
    b = (torch.randn(V, generator=g) * 0.1).to(dtype) if bias else None
    return hidden, weight, b, SourceTopK(*d["source_topk"]), AlignMap(*d["align_map"]), d["labels"], d["source_weights"]


def reference(hidden, weight, bias, topk, amap, labels, w, reduction, lm_weight=0.7, temperature=1.3):
    h = hidden.double().detach().requires_grad_(True)
    W = weight.double().detach().requires_grad_(True)
    b = bias.double().detach().requires_grad_(True) if bias is not None else None
    logits = h @ W.T + (b if b is not None else 0)
    loss = fused_loss_reference(logits, topk, amap, labels, w, lm_weight, temperature, reduction=reduction)
    return loss, h, W, b


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("chunk_tokens", [None, 1, 4, 5])  # 5 does not divide B*T = 14
@pytest.mark.parametrize("weights", ["token", "seq", None])
def test_matches_reference(reduction, chunk_tokens, weights):
    seed = hash((reduction, chunk_tokens, weights)) % 1000
    hidden, weight, bias, topk, amap, labels, w = make(seed, weights=weights)
    h = hidden.clone().requires_grad_(True)
    W = weight.clone().requires_grad_(True)
    b = bias.clone().requires_grad_(True)
    loss = fused_linear_loss(h, W, topk, amap, labels, bias=b, source_weights=w, lm_weight=0.7, temperature=1.3,
                             reduction=reduction, chunk_tokens=chunk_tokens)
    ref, rh, rW, rb = reference(hidden, weight, bias, topk, amap, labels, w, reduction)
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-5)
    go = torch.randn_like(ref) if reduction == "none" else torch.tensor(0.37, dtype=torch.float64)
    loss.backward(go.to(loss.dtype))
    ref.backward(go)
    for ours, theirs in ((h.grad, rh.grad), (W.grad, rW.grad), (b.grad, rb.grad)):
        torch.testing.assert_close(ours.double(), theirs, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 3e-2), (torch.float16, 5e-3)])
def test_low_precision(dtype, tol):
    hidden, weight, bias, topk, amap, labels, w = make(7, dtype=dtype, bias=False)
    h = hidden.clone().requires_grad_(True)
    W = weight.clone().requires_grad_(True)
    loss = fused_linear_loss(h, W, topk, amap, labels, source_weights=w, lm_weight=0.7, temperature=1.3, chunk_tokens=3)
    loss.backward()
    ref, rh, rW, _ = reference(hidden, weight, None, topk, amap, labels, w, "mean")
    ref.backward()
    assert abs(float(loss.detach()) - float(ref.detach())) <= tol * abs(float(ref.detach()))
    for ours, theirs in ((h.grad, rh.grad), (W.grad, rW.grad)):
        err = (ours.double() - theirs).norm() / theirs.norm()
        assert err < tol, err


def test_loss_without_gradients():
    hidden, weight, bias, topk, amap, labels, w = make(11)
    for reduction in ("mean", "sum"):
        with torch.no_grad():
            loss = fused_linear_loss(hidden, weight, topk, amap, labels, bias=bias, source_weights=w, lm_weight=0.7,
                                     temperature=1.3, reduction=reduction, chunk_tokens=3)
        ref, *_ = reference(hidden, weight, bias, topk, amap, labels, w, reduction)
        torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-5)


def test_two_dimensional_hidden_and_no_bias():
    hidden, weight, _, topk, amap, labels, w = make(3, B=1, weights="seq", bias=False)
    loss2 = fused_linear_loss(hidden[0], weight, SourceTopK(topk.ids[:, 0], topk.logprobs[:, 0]),
                              AlignMap(amap.pos[:, 0], amap.vocab), labels[0], source_weights=w[:, 0],
                              lm_weight=0.7, temperature=1.3)
    ref, *_ = reference(hidden, weight, None, topk, amap, labels, w, "mean")
    torch.testing.assert_close(loss2.double(), ref.detach(), rtol=1e-5, atol=1e-5)


def test_all_ignored_gives_zero():
    hidden, weight, bias, topk, amap, labels, w = make(5)
    labels = torch.full_like(labels, -100)
    h = hidden.clone().requires_grad_(True)
    loss = fused_linear_loss(h, weight, topk, amap, labels, bias=bias, source_weights=w)
    loss.backward()
    assert float(loss.detach()) == 0.0 and float(h.grad.abs().sum()) == 0.0


def test_bad_input():
    hidden, weight, bias, topk, amap, labels, w = make(1)
    with pytest.raises(ValueError, match="weight must be \\[V, H=12\\]"):
        fused_linear_loss(hidden, weight[:, :5], topk, amap, labels)
    with pytest.raises(TypeError, match="weight dtype"):
        fused_linear_loss(hidden, weight.double().float().half(), topk, amap, labels)
    with pytest.raises(ValueError, match="bias must be a \\[V=53\\]"):
        fused_linear_loss(hidden, weight, topk, amap, labels, bias=bias[:3])
    with pytest.raises(ValueError, match="labels must be a tensor of shape"):
        fused_linear_loss(hidden, weight, topk, amap, labels[:, :3])
    with pytest.raises(TypeError, match="hidden must be float32"):
        fused_linear_loss(hidden.long(), weight, topk, amap, labels)
    with pytest.raises(ValueError, match="chunk_tokens"):
        fused_linear_loss(hidden, weight, topk, amap, labels, chunk_tokens=0)
    bad = AlignMap(amap.pos, torch.full_like(amap.vocab, 999))
    with pytest.raises(ValueError, match="align_map.vocab must be -1 or a target id"):
        fused_linear_loss(hidden, weight, topk, bad, labels)


@pytest.mark.skipif(__import__("os").environ.get("TRITON_INTERPRET") == "1", reason="already under the interpreter")
def test_triton_kernel_path_under_interpreter():
    """The same comparisons with fused_loss's Triton kernel (TRITON_INTERPRET=1, fresh process)."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
                        "-k", "matches_reference and (token or seq) and (None or 5)"],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert " passed" in r.stdout
