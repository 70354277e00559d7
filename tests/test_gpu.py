"""On a CUDA machine: the compiled Triton kernels against the float64 reference, at real vocabulary
sizes, plus a training step and an extraction on the GPU. Marked ``gpu`` and skipped without CUDA.

    python -m pytest tests -m gpu -q      # on a CUDA machine (the rest of the suite runs there too)
"""
import numpy as np
import pytest
import torch

from fastfuse.linear_loss import fused_linear_loss
from fastfuse.loss import AlignMap, SourceTopK, fused_loss
from fastfuse.reference import fused_loss_reference, random_inputs

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _inputs(V, dtype, seed, B=2, T=96, S=3, K=10, weights="token"):
    g = torch.Generator().manual_seed(seed)
    d = random_inputs(B=B, T=T, V=V, S=S, K=K, Ts=T + 7, Vs=5000, dtype=dtype, device="cuda", generator=g,
                      weights=weights, map_range=V)
    return (d["target_logits"], SourceTopK(*d["source_topk"]), AlignMap(*d["align_map"]), d["labels"],
            d["source_weights"])


def _reference(z, topk, amap, labels, w, **kw):
    x = z.detach().double().requires_grad_(True)
    loss = fused_loss_reference(x, topk, amap, labels, w, **kw)
    loss.backward()
    return loss.detach(), x.grad


# V: one block per row (<= 32768), two passes (Llama-3), not a multiple of the block, Gemma-size
@pytest.mark.parametrize("V", [1000, 32000, 128256, 262144 - 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("inplace", [False, True])
def test_fused_loss_kernel_matches_reference(V, dtype, inplace):
    z, topk, amap, labels, w = _inputs(V, dtype, seed=V % 97)
    kw = dict(lm_weight=0.7, temperature=1.3)
    ref_loss, ref_grad = _reference(z, topk, amap, labels, w, **kw)
    x = z.clone().requires_grad_(True)
    buf = x * 1 if inplace else x           # inplace_grad consumes a non-leaf buffer (a leaf would raise)
    loss = fused_loss(buf, topk, amap, labels, w, impl="triton", inplace_grad=inplace, **kw)
    loss.backward()
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(loss.double(), ref_loss, **tol)
    # gradient entries are O(1 / (N * V)): compare scaled by N so the tolerances mean something
    n = (labels != -100).sum()
    torch.testing.assert_close(x.grad.double() * n, ref_grad * n, **(tol if dtype == torch.float32 else
                                                                      dict(rtol=2e-2, atol=1e-3)))


def test_fp16_with_loss_scale_matches_torch_cross_entropy():
    """GradScaler's grad_output = 2**16 on fp16 logits at V = 128k: the gradient equals torch's
    cross-entropy under autocast (fp32 math, one rounding), instead of an underflowed 1/N softmax."""
    g = torch.Generator().manual_seed(0)
    N, V = 4096, 128256
    z = (torch.randn(N, V, generator=g) * 2).half().cuda()
    labels = torch.randint(0, V, (N,), generator=g).cuda()
    topk = SourceTopK(torch.full((1, 1, 1), -1, device="cuda"), torch.zeros(1, 1, 1, device="cuda"))
    amap = AlignMap(torch.full((1, N), -1, dtype=torch.int32, device="cuda"),
                    torch.full((1, 1), -1, dtype=torch.int32, device="cuda"))
    go = 2.0 ** 16
    x = z.clone().requires_grad_(True)
    fused_loss(x, topk, amap, labels, lm_weight=1.0, impl="triton").backward(torch.tensor(go, device="cuda"))
    y = z.clone().requires_grad_(True)
    torch.nn.functional.cross_entropy(y.float(), labels).backward(torch.tensor(go, device="cuda"))
    torch.testing.assert_close(x.grad, y.grad, rtol=4e-3, atol=1e-6)
    assert (x.grad != 0).float().mean() > 0.99


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_no_host_sync_with_validate_false(dtype):
    """Forward and backward of both losses under torch.cuda.set_sync_debug_mode("error")."""
    z, topk, amap, labels, w = _inputs(32000, dtype, seed=3)
    H = 64
    hidden = torch.randn(2, 96, H, device="cuda", dtype=dtype)
    weight = torch.randn(32000, H, device="cuda", dtype=dtype)

    def step():
        for reduction in ("mean", "none"):
            for inplace in (False, True):
                x = z.clone().requires_grad_(True)
                loss = fused_loss(x * 1, topk, amap, labels, w, reduction=reduction, inplace_grad=inplace,
                                  validate=False)
                loss.backward(torch.full_like(loss, 0.37))
            h, W = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
            loss = fused_linear_loss(h, W, topk, amap, labels, source_weights=w, reduction=reduction,
                                     validate=False, chunk_tokens=64)
            loss.backward(torch.ones_like(loss))
    step()                                   # compile the kernels first (compilation may sync)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_fused_loss_reductions_and_sequence_weights(reduction):
    z, topk, amap, labels, w = _inputs(50000, torch.float32, seed=7, weights="seq")
    ref = fused_loss_reference(z.double(), topk, amap, labels, w, reduction=reduction)
    out = fused_loss(z, topk, amap, labels, w, impl="triton", reduction=reduction)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)


def test_bad_input_is_a_clear_error_not_an_illegal_address():
    z, topk, amap, labels, w = _inputs(1000, torch.bfloat16, seed=3)
    bad = SourceTopK(topk.ids.clone(), topk.logprobs)
    bad.ids[0, 0, 0, 0] = 10 ** 6                     # beyond the source vocabulary
    with pytest.raises(ValueError, match="ids"):
        fused_loss(z, bad, amap, labels, w)
    torch.cuda.synchronize()                          # the context is still healthy
    assert torch.isfinite(fused_loss(z, topk, amap, labels, w))


@pytest.mark.parametrize("V", [32000, 128256])
def test_fused_linear_loss_matches_reference(V):
    g = torch.Generator().manual_seed(V)
    z, topk, amap, labels, w = _inputs(V, torch.bfloat16, seed=1, B=2, T=64)
    H = 256
    hidden = torch.randn(2, 64, H, generator=g).cuda().bfloat16().requires_grad_(True)
    weight = (torch.randn(V, H, generator=g) / H ** 0.5).cuda().bfloat16().requires_grad_(True)
    loss = fused_linear_loss(hidden, weight, topk, amap, labels, source_weights=w, chunk_tokens=48)
    loss.backward()
    h64 = hidden.detach().double().requires_grad_(True)
    w64 = weight.detach().double().requires_grad_(True)
    ref = fused_loss_reference(h64 @ w64.T, topk, amap, labels, w)
    ref.backward()
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=2e-2, atol=2e-2)
    for got, want in ((hidden.grad, h64.grad), (weight.grad, w64.grad)):
        rel = (got.double() - want).norm() / want.norm()
        assert rel < 2e-2, rel


def test_training_step_on_gpu_lowers_the_loss():
    from transformers import LlamaConfig, LlamaForCausalLM

    from fastfuse.integrations.hf import causal_lm_fusion_loss

    torch.manual_seed(0)
    V = 4096
    model = LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=4)).cuda()
    _, topk, amap, labels, w = _inputs(V, torch.bfloat16, seed=5, B=4, T=64)
    input_ids = torch.randint(0, V, (4, 64), device="cuda")
    batch = {"input_ids": input_ids, "labels": labels, "source_topk": topk, "align_map": amap, "source_weights": w}
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = causal_lm_fusion_loss(model, batch, labels_shifted=True)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.95 * losses[0], losses


def test_extraction_on_gpu_matches_cpu(tmp_path, real_tokenizer, corpus):
    from transformers import LlamaConfig, LlamaForCausalLM

    from fastfuse.extract import extract_topk
    from fastfuse.shards import ShardReader

    tok = real_tokenizer("llama-spm")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2))
    docs = corpus[:6]
    out = {}
    for dev in ("cpu", "cuda"):
        extract_topk(model, tok, docs, tmp_path / dev, k=8, block_size=256, device=dev, dtype=torch.float32,
                     progress=False)
        out[dev] = ShardReader(tmp_path / dev)
    assert len(out["cpu"]) == len(out["cuda"]) > 0
    for i in range(len(out["cpu"])):
        a, b = out["cpu"][i]["topk_logprobs"], out["cuda"][i]["topk_logprobs"]   # sorted, fp16 storage
        np.testing.assert_allclose(b.astype(np.float32), a.astype(np.float32), rtol=1e-2, atol=1e-2)
