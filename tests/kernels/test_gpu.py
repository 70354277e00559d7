"""On a CUDA machine: the compiled Triton kernels against the float64 reference at real vocabulary
sizes and edge cases, the properties only a GPU shows (N*V > 2**31 offsets, no host sync, fp16
with a loss scale, bitwise determinism, strided in-place views), fused_linear_loss at small shapes
and at the benchmark shape, plus a training step and an extraction. Marked ``gpu``, skipped
without CUDA. The GPU benchmark scripts (``benchmarks/gpu_*.py``, ``benchmarks/gpu_check.sh``) run
these tests instead of keeping copies; tolerances come from :func:`fastfuse.testing.tolerance`.

    python -m pytest tests -m gpu -q      # on a CUDA machine (the rest of the suite runs there too)
"""
import os

import numpy as np
import pytest
import torch

from fastfuse.loss.linear_loss import default_chunk_tokens, fused_linear_loss
from fastfuse import AlignMap, SourceTopK, fused_loss
from fastfuse.loss.reference import fused_loss_reference
from fastfuse.loss.spec import DIVERGENCES, TAILS, lookup
from fastfuse.testing import LINEAR_REL_TOL, random_inputs, tolerance

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16


def _inputs(V, dtype, seed, B=2, T=96, S=3, K=10, weights="token"):
    g = torch.Generator().manual_seed(seed)
    d = random_inputs(B=B, T=T, V=V, S=S, K=K, Ts=T + 7, Vs=5000, dtype=dtype, device="cuda", generator=g,
                      weights=weights, map_range=V)
    return (d["target_logits"], SourceTopK(*d["source_topk"]), AlignMap(*d["align_map"]), d["labels"],
            d["source_weights"])


def check_loss(d, *, reduction="mean", inplace=False, lm_weight=0.9, temperature=1.0, **divergence):
    """impl="triton" against the float64 reference on ``random_inputs`` ``d``: loss and gradient,
    with a grad_output of 0.5 (random per token for "none") and tolerances scaled accordingly."""
    topk, amap = SourceTopK(*d["source_topk"]), AlignMap(*d["align_map"])
    z0 = d["target_logits"]
    z64 = z0.double().requires_grad_()
    want = fused_loss_reference(z64, SourceTopK(topk.ids, topk.logprobs.double()), amap, d["labels"],
                                d["source_weights"], lm_weight, temperature, reduction=reduction, **divergence)
    go = (torch.rand(want.shape, dtype=torch.float64, device=z0.device) if reduction == "none"
          else torch.tensor(0.5, dtype=torch.float64, device=z0.device))
    want.backward(go)
    x = z0.clone().requires_grad_()
    got = fused_loss(x * 1 if inplace else x, topk, amap, d["labels"], d["source_weights"], lm_weight, temperature,
                     reduction=reduction, inplace_grad=inplace, impl="triton", **divergence)
    got.backward(go.float())
    n = int((d["labels"] != -100).sum())
    k = divergence.get("student_temperature", 1.0) ** 2      # hinton_scale's factor, at most
    tol = tolerance(z0.dtype, reduction, n, go.abs().max().item() * k, z0.abs().max().item())
    scale = max(1.0, want.detach().abs().max().item())
    torch.testing.assert_close(got.double(), want.detach(), rtol=tol["loss"]["rtol"], atol=tol["loss"]["atol"] * scale)
    torch.testing.assert_close(x.grad.double(), z64.grad, **tol["grad"])


# V: one block per row (<= 32768), two passes (Llama-3), not a multiple of the block, Gemma-size
@pytest.mark.parametrize("V", [1000, 32000, 128256, 262144 - 5])
@pytest.mark.parametrize("dtype", [F32, BF16, F16])
@pytest.mark.parametrize("inplace", [False, True])
def test_fused_loss_kernel_matches_reference(V, dtype, inplace):
    g = torch.Generator().manual_seed(V % 97)
    d = random_inputs(B=2, T=96, V=V, S=3, K=10, Ts=103, Vs=5000, dtype=dtype, device="cuda", generator=g)
    check_loss(d, inplace=inplace, lm_weight=0.7, temperature=1.3)


LOSS_CASES = [(f"{str(dt)[6:]} S={S} K={K} w={w}", dict(B=2, T=7, V=1000, S=S, K=K, dtype=dt, weights=w,
                                                        map_range=200), {})
              for dt in (F32, BF16, F16) for S, K in ((1, 1), (3, 10), (8, 64)) for w in ("seq", "token")] + [
    ("bf16 V=128256 inplace none", dict(B=2, T=16, V=128256, S=2, K=10, Vs=32000, dtype=BF16),
     dict(inplace=True, reduction="none")),
    ("fp32 V=262144 S=4 K=16 sum", dict(B=1, T=8, V=262144, S=4, K=16, Vs=50000), dict(reduction="sum")),
    ("fp32 V=32003 duplicates", dict(B=2, T=9, V=32003, S=3, K=10, map_range=4), dict(lm_weight=0.5)),
    ("fp32 all ignored", dict(B=2, T=5, V=3000, S=3, K=10, p_ignore=1.0), {}),
    ("fp32 no position aligned", dict(B=2, T=5, V=3000, S=3, K=10, p_unaligned=1.0), {}),
    ("fp32 no id mapped", dict(B=2, T=5, V=3000, S=3, K=10, p_unmapped=1.0), {}),
    ("bf16 temperature 2 inplace", dict(B=2, T=5, V=5000, S=2, K=10, dtype=BF16), dict(temperature=2.0, inplace=True)),
    ("fp16 seq weights none", dict(B=2, T=9, V=50000, S=3, K=10, dtype=F16, weights="seq"), dict(reduction="none")),
]


@pytest.mark.parametrize("name,kw,opts", LOSS_CASES, ids=[c[0] for c in LOSS_CASES])
def test_fused_loss_cases(name, kw, opts):
    check_loss(random_inputs(**kw, device="cuda", generator=torch.Generator().manual_seed(len(name))), **opts)


DIV_MIX = 0.3      # every mixing argument at a value other than its default


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("shape", ["bf16 V=128256 softcap T=2", "fp32 V=1000 inplace none"])
def test_divergence_family_matches_reference(divergence, tail, shape):
    """The generic row kernel (and the tail-mass teacher) on the GPU, every divergence x tail."""
    big = shape.startswith("bf16")
    kw = dict(B=2, T=16, V=128256, Vs=32000, dtype=BF16) if big else dict(B=2, T=24, V=1000, map_range=300)
    d = random_inputs(S=3, K=10, missing_mass=0.6, p_neginf=0.05, device="cuda",
                      generator=torch.Generator().manual_seed(len(divergence) * 3 + len(tail)), **kw)
    opts = dict(softcap=30.0, student_temperature=2.0, hinton_scale=True) if big else \
        dict(inplace=True, reduction="none")
    check_loss(d, lm_weight=0.6, temperature=1.3, tail=tail, **lookup(divergence).options(DIV_MIX),
               **opts)


def test_extreme_and_minus_inf_logits():
    d = random_inputs(2, 5, 40000, 3, 10, device="cuda", generator=torch.Generator().manual_seed(1))
    z = d["target_logits"]
    z[0, 0, 7] = 1e4
    z[0, 1] = -1e4
    z[1, 2] = 1e4
    check_loss(d)
    z = torch.randn(3, 128256, device="cuda")
    labels = torch.full((3,), 50000, device="cuda")
    big = z.clone()
    for r, cols in ((0, slice(0, 4096)), (1, slice(60000, 70000)), (2, slice(-1000, None))):
        z[r, cols] = -float("inf")      # a leading -inf block (two-pass path), one inside, one at the end
        big[r, cols] = -1e4             # the same softmax, finite
    ref = fused_loss(big, *_teacherless(3), labels, lm_weight=1.0, reduction="none")
    torch.testing.assert_close(fused_loss(z, *_teacherless(3), labels, lm_weight=1.0, reduction="none"), ref)


def _teacherless(N):
    """(topk, amap) of one source aligned nowhere, for N tokens: with lm_weight=1 plain cross-entropy."""
    topk = SourceTopK(torch.full((1, 1, 1), -1, device="cuda"), torch.zeros(1, 1, 1, device="cuda"))
    amap = AlignMap(torch.full((1, N), -1, dtype=torch.int32, device="cuda"),
                    torch.full((1, 1), -1, dtype=torch.int32, device="cuda"))
    return topk, amap


def test_more_than_2_31_logits_use_int64_offsets():
    """N * V > 2**31: rows past the int32 range match the reference (and so do the first ones)."""
    T, V = 17000, 128256                                   # 2.18e9 logits (4.4 GB bf16), in place
    d = random_inputs(B=1, T=T, V=1000, S=2, K=10, Ts=T, Vs=3000, device="cuda",
                      generator=torch.Generator().manual_seed(2))
    topk, amap = SourceTopK(*d["source_topk"]), AlignMap(*d["align_map"])
    z = (torch.randn(1, T, V, device="cuda", generator=torch.Generator("cuda").manual_seed(2)) * 2).bfloat16()
    rows = torch.tensor([0, 1, T - 2, T - 1], device="cuda")
    keep = z[:, rows].double().requires_grad_()
    sub = AlignMap(amap.pos[:, :, rows], amap.vocab)
    want = fused_loss_reference(keep, topk, sub, d["labels"][:, rows], d["source_weights"][:, :, rows],
                                reduction="none")
    want.sum().backward()
    x = torch.zeros(1, device="cuda", requires_grad=True)
    buf = z + x                                            # a non-leaf buffer to consume
    del z
    got = fused_loss(buf, topk, amap, d["labels"], d["source_weights"], reduction="none", inplace_grad=True)
    got.sum().backward()
    tol = tolerance(BF16, "sum")
    torch.testing.assert_close(got[:, rows].double(), want.detach(), rtol=tol["loss"]["rtol"], atol=0.05)
    torch.testing.assert_close(buf[:, rows].detach().double(), keep.grad, **tol["grad"])


def test_inplace_on_strided_view_leaves_the_rest_untouched():
    d = random_inputs(2, 64, 32000, 2, 10, dtype=BF16, device="cuda", generator=torch.Generator().manual_seed(3))
    full = torch.randn(2, 65, 32000 + 8, device="cuda").bfloat16()
    full[:, :64, :32000] = d["target_logits"]
    leaf = full.clone().requires_grad_(True)
    buf = leaf * 1
    loss = fused_loss(buf[:, :-1, :32000], SourceTopK(*d["source_topk"]), AlignMap(*d["align_map"]), d["labels"],
                      d["source_weights"], inplace_grad=True)
    loss.backward()
    assert torch.equal(buf.detach()[:, -1], full[:, -1]) and torch.equal(buf.detach()[..., 32000:], full[..., 32000:])
    z64 = d["target_logits"].double().requires_grad_()
    fused_loss_reference(z64, SourceTopK(*d["source_topk"]), AlignMap(*d["align_map"]), d["labels"],
                         d["source_weights"]).backward()
    n = int((d["labels"] != -100).sum())
    torch.testing.assert_close(leaf.grad[:, :64, :32000].double(), z64.grad, **tolerance(BF16, "mean", n)["grad"])
    assert leaf.grad[:, -1].abs().max() == 0 and leaf.grad[..., 32000:].abs().max() == 0


def test_fp16_with_loss_scale_matches_torch_cross_entropy():
    """GradScaler's grad_output = 2**16 on fp16 logits at V = 128k: the gradient equals torch's
    cross-entropy under autocast (fp32 math, one rounding), instead of an underflowed 1/N softmax."""
    N, V = 4096, 128256
    gen = torch.Generator("cuda").manual_seed(0)
    z = (torch.randn(N, V, device="cuda", generator=gen) * 2).half()
    labels = torch.randint(0, V, (N,), device="cuda", generator=gen)
    go = torch.tensor(2.0 ** 16, device="cuda")
    topk, amap = _teacherless(N)
    x = z.clone().requires_grad_(True)
    fused_loss(x, topk, amap, labels, lm_weight=1.0, impl="triton").backward(go)
    y = z.clone().requires_grad_(True)
    torch.nn.functional.cross_entropy(y.float(), labels).backward(go)
    torch.testing.assert_close(x.grad, y.grad, rtol=4e-3, atol=1e-6)
    assert (x.grad != 0).float().mean() > 0.99
    h = torch.randn(N, 256, device="cuda", generator=gen).half().requires_grad_(True)
    W = (torch.randn(V, 256, device="cuda", generator=gen) / 16).half().requires_grad_(True)
    fused_linear_loss(h, W, topk, amap, labels, lm_weight=1.0).backward(go)
    h2, W2 = h.detach().clone().requires_grad_(True), W.detach().clone().requires_grad_(True)
    torch.nn.functional.cross_entropy((h2 @ W2.T).float(), labels).backward(go)
    for a, b in ((h.grad, h2.grad), (W.grad, W2.grad)):
        assert ((a.double() - b.double()).norm() / b.double().norm()).item() < LINEAR_REL_TOL[F16]


def test_bitwise_deterministic():
    d = random_inputs(4, 512, 128256, 2, 10, dtype=BF16, device="cuda", generator=torch.Generator().manual_seed(4))
    topk, amap = SourceTopK(*d["source_topk"]), AlignMap(*d["align_map"])
    h = torch.randn(2048, 512, device="cuda").bfloat16()
    W = (torch.randn(32000, 512, device="cuda") / 20).bfloat16()
    lab = torch.where(d["labels"] >= 0, d["labels"] % 32000, -100).reshape(-1)
    out = []
    for _ in range(2):
        x = d["target_logits"].clone().requires_grad_(True)
        loss = fused_loss(x, topk, amap, d["labels"], d["source_weights"])
        loss.backward()
        hh, WW = h.clone().requires_grad_(True), W.clone().requires_grad_(True)
        lin = fused_linear_loss(hh, WW, *_teacherless(2048), lab, lm_weight=1.0, chunk_tokens=512)
        lin.backward()
        out.append((loss.detach(), x.grad, lin.detach(), hh.grad, WW.grad))
    for a, b in zip(*out):
        assert torch.equal(a, b)


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


def test_bad_input_is_a_clear_error_not_an_illegal_address():
    z, topk, amap, labels, w = _inputs(1000, torch.bfloat16, seed=3)
    bad = SourceTopK(topk.ids.clone(), topk.logprobs)
    bad.ids[0, 0, 0, 0] = 10 ** 6                     # beyond the source vocabulary
    with pytest.raises(ValueError, match="ids"):
        fused_loss(z, bad, amap, labels, w)
    torch.cuda.synchronize()                          # the context is still healthy
    assert torch.isfinite(fused_loss(z, topk, amap, labels, w))


LINEAR_CASES = [(f"{str(dt)[6:]} V={V} chunk={c} {r} bias={b}", dict(dtype=dt, V=V, chunk=c, reduction=r, bias=b))
                for dt in (F32, BF16, F16) for V, c in ((1000, None), (1000, 37), (32000, 50), (128256, 64))
                for r, b in (("mean", True), ("sum", False), ("none", True))]


@pytest.mark.parametrize("name,kw", LINEAR_CASES, ids=[c[0] for c in LINEAR_CASES])
def test_fused_linear_loss_matches_reference(name, kw):
    B, T, H, V, dtype = 3, 40, 64, kw["V"], kw["dtype"]
    g = torch.Generator().manual_seed(len(name))
    d = random_inputs(B=B, T=T, V=V, S=2, K=10, Ts=T + 3, Vs=min(V, 5000), generator=g, device="cuda")
    topk, amap = SourceTopK(*d["source_topk"]), AlignMap(*d["align_map"])
    leaves = [torch.randn(B, T, H, generator=g), torch.randn(V, H, generator=g) * 3 / H ** 0.5]
    if kw["bias"]:
        leaves.append(torch.randn(V, generator=g) * 0.5)
    ours = [t.to("cuda", dtype).requires_grad_() for t in leaves]
    ref = [o.detach().double().requires_grad_() for o in ours]
    want = fused_loss_reference(ref[0] @ ref[1].T + (ref[2] if kw["bias"] else 0), topk, amap, d["labels"],
                                d["source_weights"], 0.8, 1.5, reduction=kw["reduction"])
    go = torch.rand(want.shape, dtype=torch.float64, device="cuda") if kw["reduction"] == "none" else \
        torch.tensor(0.5, dtype=torch.float64, device="cuda")
    want.backward(go)
    got = fused_linear_loss(ours[0], ours[1], topk, amap, d["labels"], bias=ours[2] if kw["bias"] else None,
                            source_weights=d["source_weights"], lm_weight=0.8, temperature=1.5,
                            reduction=kw["reduction"], chunk_tokens=kw["chunk"])
    got.backward(go.float())
    for a, b in [(got, want)] + [(o.grad, r.grad) for o, r in zip(ours, ref)]:
        err = ((a.detach().double() - b.detach()).norm() / b.detach().norm().clamp_min(1e-30)).item()
        assert err <= LINEAR_REL_TOL[dtype], (name, err)


def test_fused_linear_loss_at_benchmark_shape():
    """N=8192, H=4096, V=128256 bf16: errors against an fp32 run within 1.5x of the naive bf16 path
    (full logits + fused_loss) + 1e-3, and at most 1 GiB of extra memory."""
    N, H, V = 8192, 4096, 128256
    gen = torch.Generator("cuda").manual_seed(5)
    d = random_inputs(B=4, T=N // 4, V=V, S=2, K=10, Ts=N // 4, Vs=32000, device="cuda",
                      generator=torch.Generator().manual_seed(5), p_ignore=0.01)
    topk, amap, labels, w = SourceTopK(*d["source_topk"]), AlignMap(*d["align_map"]), d["labels"], d["source_weights"]
    del d
    hidden = torch.randn(4, N // 4, H, device="cuda", generator=gen).bfloat16()
    weight = (torch.randn(V, H, device="cuda", generator=gen) / H ** 0.5).bfloat16()
    h32, W32 = hidden.float().requires_grad_(), weight.float().requires_grad_()
    ref = fused_loss(h32 @ W32.T, topk, amap, labels, w, inplace_grad=True)
    ref.backward()
    ref = (ref.detach(), h32.grad, W32.grad)
    del h32, W32
    torch.cuda.empty_cache()
    errs = {}
    for name in ("naive", "linear"):
        h, W = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        if name == "linear":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            loss = fused_linear_loss(h, W, topk, amap, labels, source_weights=w)
        else:
            loss = fused_loss(h @ W.T, topk, amap, labels, w)
        loss.backward()
        if name == "linear":
            extra = (torch.cuda.max_memory_allocated() - base - 2 * (h.numel() + W.numel())) / 2 ** 30
            assert extra <= 1.0, f"extra memory {extra:.2f} GiB (chunk {default_chunk_tokens(N, V, 2)})"
        errs[name] = [((a.double() - b.double()).norm() / b.double().norm()).item()
                      for a, b in zip((loss.detach(), h.grad, W.grad), ref)]
        del h, W, loss
        torch.cuda.empty_cache()
    assert all(f <= 1.5 * n + 1e-3 for f, n in zip(errs["linear"], errs["naive"])), errs


def test_training_step_on_gpu_lowers_the_loss():
    pytest.importorskip("transformers")
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


def test_extraction_on_gpu_matches_cpu(tmp_path, request, corpus):
    pytest.importorskip("transformers")
    from fastfuse.tokenizer_files import SDIST_VERSION, cache_dir
    if os.environ.get("FASTFUSE_OFFLINE") and not (cache_dir() / f"llama-cpp-vocab-{SDIST_VERSION}" / ".complete").exists():
        pytest.skip("FASTFUSE_OFFLINE is set (gpu_check.py) and no vocabulary files are cached: no download attempt")
    try:                                     # a fresh GPU machine may have no vocabulary files (no network)
        real_tokenizer = request.getfixturevalue("real_tokenizer")
    except Exception as e:  # pragma: no cover - depends on the machine
        pytest.skip(f"no tokenizer files: {e}")
    from transformers import LlamaConfig, LlamaForCausalLM

    from fastfuse.teachers.local_extract import extract_topk
    from fastfuse.teachers.shards import ShardReader

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
