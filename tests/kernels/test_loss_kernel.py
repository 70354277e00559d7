"""Triton kernels (``impl="triton"``) against the float64 dense reference, forward and backward.

Without CUDA the kernels run on CPU tensors under ``TRITON_INTERPRET=1``: marked ``interpreter``,
they run in the one interpreter session (tests/_interpreter.py). Shapes are small: the interpreter
is slow.
"""
import math

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.interpreter

triton = pytest.importorskip("triton")

from fastfuse import AlignMap, SourceTopK, fused_loss  # noqa: E402
from fastfuse.loss.reference import dense_teacher, fused_loss_reference  # noqa: E402
from fastfuse.loss.torch_path import normalize_weights, torch_sparse_teacher  # noqa: E402
from fastfuse.testing import random_inputs, tolerance  # noqa: E402


def check(d, *, lm_weight=0.9, temperature=1.0, reduction="mean", inplace=False, out_scale=1.0):
    """Run the kernel and the float64 reference on the same inputs; compare loss and gradient."""
    topk, amap = SourceTopK(*d["source_topk"]), AlignMap(*d["align_map"])
    z0 = d["target_logits"]
    z64 = z0.double().requires_grad_()
    want = fused_loss_reference(z64, topk, amap, d["labels"], d["source_weights"], lm_weight,
                                temperature, reduction=reduction)
    gout = torch.rand(want.shape, dtype=torch.float64, device=z0.device) if reduction == "none" else out_scale
    (want * gout).sum().backward()
    z = z0.clone().requires_grad_()
    x = z * 1 if inplace else z
    got = fused_loss(x, topk, amap, d["labels"], d["source_weights"], lm_weight, temperature,
                     reduction=reduction, inplace_grad=inplace, impl="triton")
    assert got.dtype == torch.float32 and got.shape == want.shape
    (got * (gout.float() if torch.is_tensor(gout) else gout)).sum().backward()
    n = int((d["labels"] != -100).sum())
    tol = tolerance(z0.dtype, reduction, n, gout.abs().max().item() if torch.is_tensor(gout) else gout,
                    z0.abs().max().item())
    scale = max(1.0, want.detach().abs().max().item())
    torch.testing.assert_close(got.double(), want.detach(), rtol=tol["loss"]["rtol"],
                               atol=tol["loss"]["atol"] * scale)
    torch.testing.assert_close(z.grad.double(), z64.grad, **tol["grad"])
    assert z.grad.dtype == z0.dtype
    return got, z.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("S,K", [(1, 1), (3, 10)])
@pytest.mark.parametrize("weights", ["seq", "token"])
def test_kernel_matches_reference(dtype, S, K, weights):
    g = torch.Generator().manual_seed(hash((str(dtype), S, K, weights)) % 2**31)
    d = random_inputs(2, 5, 300, S, K, map_range=60, dtype=dtype, weights=weights,
                      device=DEVICE, generator=g)
    check(d, lm_weight=0.8, temperature=1.5)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("inplace", [False, True])
def test_kernel_reductions_and_inplace(reduction, inplace):
    d = random_inputs(2, 5, 1000, 3, 10, device=DEVICE, weights=None,
                      generator=torch.Generator().manual_seed(7))
    z_before = d["target_logits"].clone()
    check(d, reduction=reduction, inplace=inplace, out_scale=0.37)
    assert torch.equal(d["target_logits"], z_before)          # the caller's leaf is untouched


def test_kernel_inplace_consumes_buffer():
    d = random_inputs(2, 5, 300, 2, 4, device=DEVICE, generator=torch.Generator().manual_seed(8))
    topk, amap = SourceTopK(*d["source_topk"]), AlignMap(*d["align_map"])
    z = d["target_logits"].clone().requires_grad_()
    buf = z * 1
    loss = fused_loss(buf, topk, amap, d["labels"], d["source_weights"], inplace_grad=True,
                      impl="triton")
    loss.backward()
    assert torch.equal(buf.detach(), z.grad)                  # the buffer now holds the gradient


@pytest.mark.parametrize("config", [None, (1024, 4), (256, 2), (512, 4, 3, True)])
@pytest.mark.parametrize("inplace", [False, True])
def test_kernel_block_configs(config, inplace):
    # None: default (one block per row at this V); (1024, 4): V = 2500 in three blocks, the last
    # partial; (256, 2): many blocks; (512, 4, 3, True): per-lane max/sum, pipelined loops.
    import fastfuse.kernels.fused_ce as fc
    from fastfuse.kernels.launch import forced
    with forced("fused_ce", config):
        bv = fc.launch_config(2500)[0]
        assert (bv >= 2500) == (config is None)
        d = random_inputs(1, 4, 2500, 2, 10, device=DEVICE, generator=torch.Generator().manual_seed(9))
        check(d, inplace=inplace)
        d["target_logits"] = d["target_logits"].to(torch.bfloat16)
        d["labels"][0, 1] = -100
        check(d, inplace=inplace, reduction="none")


@pytest.mark.slow
def test_kernel_two_pass_edge_cases():
    from fastfuse.kernels.launch import forced
    for config in ((128, 2), (128, 2, 3, True)):
        with forced("fused_ce", config):
            test_kernel_edge_cases()
            test_kernel_reductions_and_inplace("mean", True)


@pytest.mark.slow
def test_kernel_edge_cases():
    g = torch.Generator().manual_seed(10)
    base = dict(B=2, T=5, V=300, S=3, K=10, device=DEVICE, generator=g)
    # every row ignored: loss 0, gradient 0
    d = random_inputs(**base, p_ignore=1.0)
    loss, grad = check(d)
    assert loss.item() == 0.0 and grad.abs().max().item() == 0.0
    # no position aligned: teacher = one-hot label
    d = random_inputs(**base, p_unaligned=1.0)
    check(d)
    # no source id mapped
    d = random_inputs(**base, p_unmapped=1.0)
    check(d)
    # every id padding
    d = random_inputs(**base, p_pad=1.0, p_unaligned=0.0)
    check(d)
    # heavy duplicates: 10 ids per source into 3 target ids (across sources and with labels)
    d = random_inputs(**base, map_range=3, p_ignore=0.0)
    d["labels"] = d["labels"] % 3
    check(d, lm_weight=0.5)
    # extreme logits
    d = random_inputs(**base, logit_scale=1.0)
    z = d["target_logits"]
    z[0, 0, 7] = 1e4
    z[0, 1, :] = -1e4
    z[1, 2, :] = 1e4
    z[1, 3, 5] = -1e4
    check(d)
    # -inf logprobs: zero-probability entries, a whole row of them falls back to one-hot
    d = random_inputs(**base, p_unaligned=0.0)
    lp = d["source_topk"][1]
    lp[0, :, :, 0] = -math.inf
    lp[1] = -math.inf
    check(d, temperature=0.5)
    # all weights of a sequence zero -> uniform
    d = random_inputs(**base, weights="seq")
    d["source_weights"][:, 1] = 0
    check(d)


def test_kernel_max_sources_and_topk():
    # S = 8, K = 64: the largest supported teacher (513 sparse entries per row)
    d = random_inputs(1, 3, 600, 8, 64, Ts=4, Vs=700, map_range=300, device=DEVICE,
                      generator=torch.Generator().manual_seed(16))
    check(d, lm_weight=0.5)


def test_kernel_fp16_bf16_extremes():
    for dtype in (torch.float16, torch.bfloat16):
        d = random_inputs(2, 3, 300, 2, 10, dtype=dtype, logit_scale=20.0, device=DEVICE,
                          generator=torch.Generator().manual_seed(11))
        check(d)


def test_sparse_teacher_kernel_matches_torch():
    from fastfuse.kernels.sparse_teacher import sparse_teacher as sparse_teacher_triton
    for seed, map_range in [(12, 4), (13, None)]:
        d = random_inputs(2, 6, 50, 3, 10, Ts=7, Vs=40, map_range=map_range, device=DEVICE,
                          generator=torch.Generator().manual_seed(seed))
        ids, lp = d["source_topk"]
        pos, vocab = d["align_map"]
        labels = d["labels"]
        w = normalize_weights(d["source_weights"], 3, 2, 6, labels.device).reshape(3, 12)
        t1, c1 = sparse_teacher_triton(ids, lp, pos, vocab, labels, w, 0.7, 2.0, -100)
        t2, c2 = torch_sparse_teacher(SourceTopK(ids, lp), AlignMap(pos, vocab), labels, w, 0.7, 2.0, -100)
        # kernel output has unique ids per row
        for row in t1.tolist():
            kept = [v for v in row if v >= 0]
            assert len(kept) == len(set(kept))
        dense1 = torch.zeros(12, 50, dtype=torch.float64, device=labels.device)
        dense2 = torch.zeros_like(dense1)
        dense1.scatter_add_(1, t1.long().clamp_min(0), c1.double() * (t1 >= 0))
        dense2.scatter_add_(1, t2.clamp_min(0), c2.double() * (t2 >= 0))
        torch.testing.assert_close(dense1, dense2, rtol=1e-6, atol=1e-6)
        q = dense_teacher(SourceTopK(ids, lp), AlignMap(pos, vocab), labels, 50,
                          d["source_weights"], 2.0).reshape(12, 50)
        onehot = torch.nn.functional.one_hot(labels.clamp_min(0).reshape(12), 50).double()
        want = (0.7 * onehot + 0.3 * q) * (labels.reshape(12, 1) != -100)
        torch.testing.assert_close(dense1, want, rtol=1e-6, atol=1e-6)


def test_kernel_strided_2d_and_no_grad():
    d = random_inputs(2, 4, 300, 2, 5, device=DEVICE, generator=torch.Generator().manual_seed(14))
    ids, lp = d["source_topk"]
    pos, vocab = d["align_map"]
    topk, amap = SourceTopK(ids, lp), AlignMap(pos, vocab)
    full = torch.randn(2, 5, 300, device=DEVICE)
    full[:, :4] = d["target_logits"]
    z = full.clone().requires_grad_()
    got = fused_loss(z[:, :-1], topk, amap, d["labels"], d["source_weights"], impl="triton")
    got.backward()
    z64 = d["target_logits"].double().requires_grad_()
    want = fused_loss_reference(z64, topk, amap, d["labels"], d["source_weights"])
    want.backward()
    torch.testing.assert_close(got.double(), want.detach())
    torch.testing.assert_close(z.grad[:, :-1].double(), z64.grad, rtol=0, atol=1e-6)
    assert z.grad[:, -1].abs().max() == 0
    with torch.no_grad():
        l2 = fused_loss(d["target_logits"][1], SourceTopK(ids[:, 1], lp[:, 1]),
                        AlignMap(pos[:, 1], vocab), d["labels"][1], d["source_weights"][:, 1],
                        reduction="none", impl="triton")
    assert l2.shape == (4,)
    want2 = fused_loss_reference(d["target_logits"].double(), topk, amap, d["labels"],
                                 d["source_weights"], reduction="none")
    torch.testing.assert_close(l2.double(), want2[1])


def test_auto_uses_triton_under_interpreter(monkeypatch):
    if DEVICE != "cpu":
        pytest.skip("CPU-only dispatch check")
    import fastfuse.kernels.fused_ce as fc
    calls = []
    orig = fc.ce_rows
    monkeypatch.setattr(fc, "ce_rows", lambda *a, **k: calls.append(1) or orig(*a, **k))
    d = random_inputs(1, 2, 50, 1, 2, generator=torch.Generator().manual_seed(15))
    fused_loss(d["target_logits"], SourceTopK(*d["source_topk"]), AlignMap(*d["align_map"]),
               d["labels"])
    assert calls == [1]
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    fused_loss(d["target_logits"], SourceTopK(*d["source_topk"]), AlignMap(*d["align_map"]),
               d["labels"])
    assert calls == [1]


@pytest.mark.slow
@pytest.mark.parametrize("config", ["2pass_l2", "2pass_l2_fp32", (256, 2, 3, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("inplace", [False, True])
def test_pipelined_lane_stats_config(config, dtype, inplace):
    """The default two-pass launch (per-lane running max/sum, pipelined chunk loops), run
    explicitly: odd V in three 8192-chunks (the last partial), rows whose first chunk (or a middle
    one, or the tail) is all -inf; loss and gradient against the float64 reference, the -inf rows
    against the same rows at -1e4 (same softmax, finite)."""
    import fastfuse.kernels.fused_ce as fc
    from fastfuse.kernels.launch import forced
    with forced("fused_ce", config):
        V = 2 * 8192 + 4097
        cfg = fc.launch_config(V, dtype)
        assert cfg.lane_stats and cfg.num_stages > 1 and V > 2 * cfg.block_v
        d = random_inputs(2, 3, V, 2, 8, dtype=dtype, device=DEVICE, generator=torch.Generator().manual_seed(21))
        lo = 12288                                  # targets in [12288, 16288): never -inf columns
        pos, vocab = d["align_map"]
        d["align_map"] = (pos, torch.where(vocab >= 0, lo + vocab % 4000, vocab))
        d["labels"] = torch.where(d["labels"] == -100, d["labels"], lo + d["labels"] % 4000)
        d["labels"][1, 2] = -100
        z = d["target_logits"]
        big = z.clone()
        for (b, t), cols in {(0, 0): slice(0, 8192), (0, 1): slice(0, 12000), (0, 2): slice(16384, V),
                             (1, 0): slice(0, 8191)}.items():
            z[b, t, cols] = -math.inf
            big[b, t, cols] = -1e4                  # exp underflows to 0: the same softmax
        _, g_big = check(dict(d, target_logits=big), inplace=inplace, reduction="mean")
        topk, amap = SourceTopK(*d["source_topk"]), AlignMap(*d["align_map"])
        x = z.clone().requires_grad_()
        loss = fused_loss(x * 1 if inplace else x, topk, amap, d["labels"], d["source_weights"], 0.9,
                          reduction="mean", inplace_grad=inplace, impl="triton")
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
        torch.testing.assert_close(x.grad, g_big, rtol=0, atol=0)
