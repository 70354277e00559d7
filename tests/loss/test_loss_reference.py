"""The dense reference against a naive per-token reading of the spec, gradcheck, and the chunked
sparse torch path (``impl="torch"``) against the dense reference."""
import math

import pytest
import torch

from fastfuse import AlignMap, SourceTopK, fused_loss
from fastfuse.loss.reference import fused_loss_reference
from fastfuse.testing import random_inputs


def _wrap(d):
    return SourceTopK(*d["source_topk"]), AlignMap(*d["align_map"])


def naive_loss(z, ids, lp, pos, vocab, labels, weights, lm_weight, temperature, ignore_index,
               reduction):
    """The spec read literally, one token at a time in Python floats."""
    S = ids.shape[0]
    B, T, V = z.shape
    out = [[0.0] * T for _ in range(B)]
    count = 0
    for b in range(B):
        for t in range(T):
            y = int(labels[b, t])
            if y == ignore_index:
                continue
            count += 1
            if weights is None:
                w = [1.0 / S] * S
            else:
                w = [float(weights[s, b] if weights.dim() == 2 else weights[s, b, t]) for s in range(S)]
                tot = sum(w)
                w = [x / tot for x in w] if tot > 0 else [1.0 / S] * S
            q = {}
            for s in range(S):
                j = int(pos[s, b, t])
                surv = []
                if j >= 0:
                    for k in range(ids.shape[3]):
                        i = int(ids[s, b, j, k])
                        if i == -1:
                            continue
                        v = int(vocab[s, i])
                        l = float(lp[s, b, j, k])
                        if v == -1 or l == -math.inf:
                            continue
                        surv.append((v, l / temperature))
                if not surv:
                    q[y] = q.get(y, 0.0) + w[s]
                    continue
                m = max(l for _, l in surv)
                tot = sum(math.exp(l - m) for _, l in surv)
                for v, l in surv:
                    q[v] = q.get(v, 0.0) + w[s] * math.exp(l - m) / tot
            row = [float(x) for x in z[b, t]]
            m = max(row)
            lse = m + math.log(sum(math.exp(x - m) for x in row))
            out[b][t] = (lse - lm_weight * row[y]
                         - (1 - lm_weight) * sum(p * row[v] for v, p in q.items()))
    loss = torch.tensor(out, dtype=torch.float64)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / max(count, 1)


@pytest.mark.parametrize("S,K", [(1, 1), (3, 10), (2, 4)])
@pytest.mark.parametrize("weights", [None, "seq", "token"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reference_matches_naive(S, K, weights, reduction):
    g = torch.Generator().manual_seed(S * 100 + K)
    d = random_inputs(2, 4, 37, S, K, Ts=5, Vs=30, dtype=torch.float64, map_range=20,
                      weights=weights, generator=g)
    d["source_topk"][1][0, 0, 0, 0] = -math.inf      # a zero-probability entry
    topk, amap = _wrap(d)
    for lm_weight, temperature in [(0.9, 1.0), (0.3, 2.5)]:
        got = fused_loss_reference(d["target_logits"], topk, amap, d["labels"], d["source_weights"],
                                   lm_weight, temperature, reduction=reduction)
        want = naive_loss(d["target_logits"], *d["source_topk"], *d["align_map"], d["labels"],
                          d["source_weights"], lm_weight, temperature, -100, reduction)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_reference_zero_weights_are_uniform_and_all_ignored_mean_is_zero():
    d = random_inputs(2, 3, 20, 2, 3, Ts=4, Vs=10, dtype=torch.float64, p_ignore=0.0,
                      weights="seq", generator=torch.Generator().manual_seed(1))
    topk, amap = _wrap(d)
    w = d["source_weights"].clone()
    w[:, 1] = 0.0
    got = fused_loss_reference(d["target_logits"], topk, amap, d["labels"], w, reduction="none")
    uni = fused_loss_reference(d["target_logits"], topk, amap, d["labels"], None, reduction="none")
    torch.testing.assert_close(got[1], uni[1])
    labels = torch.full_like(d["labels"], -100)
    z = d["target_logits"].clone().requires_grad_()
    loss = fused_loss_reference(z, topk, amap, labels)
    loss.backward()
    assert loss.item() == 0.0 and z.grad.abs().max().item() == 0.0


def test_reference_gradcheck():
    d = random_inputs(2, 3, 11, 2, 3, Ts=4, Vs=8, dtype=torch.float64, map_range=6,
                      weights="token", generator=torch.Generator().manual_seed(2))
    topk, amap = _wrap(d)
    z = d["target_logits"].clone().requires_grad_()
    for reduction in ("mean", "none"):
        assert torch.autograd.gradcheck(
            lambda x: fused_loss_reference(x, topk, amap, d["labels"], d["source_weights"],
                                           0.7, 1.5, reduction=reduction), (z,))


def test_reference_gradient_formula():
    """d loss_i / d z_i = softmax(z_i) - lm_weight * e_label - (1 - lm_weight) * q_i."""
    from fastfuse.loss.reference import dense_teacher
    d = random_inputs(2, 4, 50, 3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    topk, amap = _wrap(d)
    z = d["target_logits"].clone().requires_grad_()
    fused_loss_reference(z, topk, amap, d["labels"], d["source_weights"], 0.9,
                         reduction="sum").backward()
    q = dense_teacher(topk, amap, d["labels"], 50, d["source_weights"])
    lab = d["labels"].clamp_min(0)
    want = torch.softmax(z.detach(), -1) - 0.1 * q
    want -= 0.9 * torch.nn.functional.one_hot(lab, 50)
    want[d["labels"] == -100] = 0
    torch.testing.assert_close(z.grad, want)
    # q rows sum to 1 on non-ignored tokens
    torch.testing.assert_close(q.sum(-1)[d["labels"] != -100],
                               torch.ones_like(q.sum(-1)[d["labels"] != -100]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_torch_path_matches_dense_reference(dtype, inplace, reduction):
    d = random_inputs(2, 5, 300, 3, 10, map_range=40, dtype=dtype,
                      generator=torch.Generator().manual_seed(4))
    topk, amap = _wrap(d)
    z64 = d["target_logits"].double().requires_grad_()
    want = fused_loss_reference(z64, topk, amap, d["labels"], d["source_weights"], 0.8, 1.3,
                                reduction=reduction)
    (want.sum() if reduction == "none" else want * 1.7).backward()
    z = d["target_logits"].clone().requires_grad_()
    x = z * 1.0 if inplace else z      # a non-leaf buffer may be consumed
    got = fused_loss(x, topk, amap, d["labels"], d["source_weights"], 0.8, 1.3,
                     reduction=reduction, inplace_grad=inplace, impl="torch")
    (got.sum() if reduction == "none" else got * 1.7).backward()
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got.double(), want.detach(), **tol)
    gtol = dict(rtol=0, atol=1e-6) if dtype == torch.float32 else dict(rtol=0, atol=1e-2)
    torch.testing.assert_close(z.grad.double(), z64.grad, **gtol)


def test_torch_path_strided_and_2d_logits():
    d = random_inputs(2, 6, 64, 2, 4, Ts=5, Vs=50, generator=torch.Generator().manual_seed(5))
    ids, lp = d["source_topk"]
    pos, vocab = d["align_map"]
    full = torch.randn(2, 7, 64)
    full[:, :6] = d["target_logits"]
    z = full.clone().requires_grad_()
    got = fused_loss(z[:, :-1], SourceTopK(ids, lp), AlignMap(pos, vocab), d["labels"],
                     d["source_weights"], impl="torch")
    got.backward()
    z64 = d["target_logits"].double().requires_grad_()
    want = fused_loss_reference(z64, SourceTopK(ids, lp), AlignMap(pos, vocab), d["labels"],
                                d["source_weights"])
    want.backward()
    torch.testing.assert_close(got.double(), want.detach())
    torch.testing.assert_close(z.grad[:, :-1].double(), z64.grad)
    assert z.grad[:, -1].abs().max() == 0
    # [N, V] logits = B = 1
    b = 1
    got2 = fused_loss(d["target_logits"][b], SourceTopK(ids[:, b], lp[:, b]),
                      AlignMap(pos[:, b], vocab), d["labels"][b], d["source_weights"][:, b],
                      reduction="none", impl="torch")
    want2 = fused_loss_reference(d["target_logits"][b:b + 1].double(),
                                 SourceTopK(ids[:, b:b + 1], lp[:, b:b + 1]),
                                 AlignMap(pos[:, b:b + 1], vocab), d["labels"][b:b + 1],
                                 d["source_weights"][:, b:b + 1], reduction="none")
    assert got2.shape == (6,)
    torch.testing.assert_close(got2.double(), want2[0])


def test_torch_path_small_chunks_and_no_grad():
    from fastfuse.loss.torch_path import loss_and_grad_rows, normalize_weights, torch_sparse_teacher
    d = random_inputs(3, 5, 100, 2, 3, generator=torch.Generator().manual_seed(6))
    topk, amap = _wrap(d)
    w = normalize_weights(d["source_weights"], 2, 3, 5, torch.device("cpu"))
    tids, coefs = torch_sparse_teacher(topk, amap, d["labels"], w, 0.9, 1.0, -100)
    ign = (d["labels"] == -100).reshape(-1)
    l1, g1 = loss_and_grad_rows(d["target_logits"], tids, coefs, ign, None, True, chunk_elems=150)
    l2, g2 = loss_and_grad_rows(d["target_logits"], tids, coefs, ign, None, True)
    torch.testing.assert_close(l1, l2)
    torch.testing.assert_close(g1, g2)
    with torch.no_grad():
        l3 = fused_loss(d["target_logits"], topk, amap, d["labels"], d["source_weights"],
                        reduction="none", impl="torch")
    torch.testing.assert_close(l3.reshape(-1), l1)
