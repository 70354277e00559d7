"""Benchmark of fused_linear_loss (hidden states + lm_head -> fusion loss, no full logits):
forward + backward time and peak extra memory, N = 8192 tokens, H = 4096, bf16, S = 2, K = 10.

Providers:
* ``fastfuse_linear`` -- ``fastfuse.fused_linear_loss`` (token chunks, gradient in the forward);
* ``naive``           -- ``hidden @ W.T`` then ``fastfuse.fused_loss`` (full [N, V] logits);
* ``liger_flce``      -- Liger-Kernel's fused linear cross-entropy (hard labels), if installed;
* ``cce``             -- Apple's Cut Cross-Entropy (hard labels), if installed.

The floor is the 3-matmul compute (6 * N * H * V FLOPs) at the measured bf16 matmul rate; "extra
memory" is the peak beyond the inputs and the bf16 gradients of hidden and weight (which every
provider returns). Liger and CCE compute the hard-label CE only (no teacher), so they bound what
the teacher costs. Targets (H100, V = 128256): <= 42 ms forward + backward, <= 1 GiB extra.
``benchmarks/gpu_linear_loss.py`` runs the GPU correctness checks, a chunk-size sweep, then this table.

    pytest benchmarks/bench_linear_loss.py --benchmark-enable     # needs CUDA
    python benchmarks/bench_linear_loss.py [--csv out.csv]
"""
from __future__ import annotations

import argparse
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastfuse.loss.linear_loss import fused_linear_loss  # noqa: E402
from fastfuse import AlignMap, SourceTopK, fused_loss  # noqa: E402

from _common import CsvRows, cuda_ms_per_call, cuda_timed, device_name, free_cuda, median_run  # noqa: E402

N, H = 8192, 4096
SHAPES = [(N, H, 128256), (N, H, 32000)]          # the target shape first
TINY = [(16, 64, 40000)]                           # gpu_check.py --dry-run: CPU, interpreter
S, K, LM_WEIGHT = 2, 10, 0.9
PROVIDERS = ["fastfuse_linear", "naive", "liger_flce", "cce"]


def make_inputs(N, H, V, device=None, seed=0):
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    g = torch.Generator(device=device).manual_seed(seed)
    T = min(N, 2048)
    B = N // T
    Vs = 32000
    hidden = torch.randn(B, T, H, device=device, dtype=torch.bfloat16, generator=g)
    weight = (torch.randn(V, H, device=device, generator=g) / H ** 0.5).to(torch.bfloat16)
    ids = torch.randint(0, Vs, (S, B, T, K), device=device, generator=g, dtype=torch.int32)
    lp = torch.log_softmax(torch.randn(S, B, T, K, device=device, generator=g), -1).half()
    pos = torch.arange(T, device=device, dtype=torch.int32).expand(S, B, T).contiguous()
    vocab = torch.randint(0, V, (S, Vs), device=device, generator=g, dtype=torch.int32)
    labels = torch.randint(0, V, (B, T), device=device, generator=g)
    w = torch.rand(S, B, device=device, generator=g)
    return dict(hidden=hidden, weight=weight, topk=SourceTopK(ids, lp), amap=AlignMap(pos, vocab), labels=labels, w=w)


def provider_fn(name):
    if name == "fastfuse_linear":
        return lambda h, W, d: fused_linear_loss(h, W, d["topk"], d["amap"], d["labels"], source_weights=d["w"],
                                                 lm_weight=LM_WEIGHT, validate=False)
    if name == "naive":
        return lambda h, W, d: fused_loss(h @ W.T, d["topk"], d["amap"], d["labels"], source_weights=d["w"],
                                          lm_weight=LM_WEIGHT, validate=False)
    if name == "liger_flce":
        try:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        except Exception:
            return None
        loss = LigerFusedLinearCrossEntropyLoss()
        return lambda h, W, d: loss(W, h.reshape(-1, h.shape[-1]), d["labels"].reshape(-1))
    if name == "cce":
        try:
            from cut_cross_entropy import linear_cross_entropy
        except Exception:
            return None
        return lambda h, W, d: linear_cross_entropy(h, W, d["labels"])
    raise ValueError(name)


def run_once(fn, d):
    h = d["hidden"].clone().requires_grad_()
    W = d["weight"].clone().requires_grad_()
    ms, peak = cuda_timed(lambda: fn(h, W, d).backward())
    # extra memory beyond inputs and their gradients (which every provider must produce)
    return ms, peak - h.numel() * 2 - W.numel() * 2


def matmul_rate(n=8192) -> float:
    if not torch.cuda.is_available():       # dry run: a small host matmul
        a = torch.randn(512, 512, dtype=torch.bfloat16)
        return 2 * 512 ** 3 / (cuda_ms_per_call(lambda: a @ a) / 1e3)
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    return 2 * n ** 3 / (cuda_ms_per_call(lambda: a @ a) / 1e3)


def table(csv=None, out=print, warmup=2, iters=5, shapes=SHAPES, errors=None):
    """Time, extra memory, floor and fraction of it per (shape, provider); CSV rows as they come,
    a provider that raises reported and appended to ``errors`` (if given)."""
    rate = matmul_rate()
    out(f"device: {device_name()}  bf16 matmul: {rate / 1e12:.0f} TFLOP/s  (S={S}, K={K}, fwd+bwd)")
    head = f"{'N':>6} {'H':>5} {'V':>7} {'provider':<16} {'ms':>9} {'extra MiB':>10} {'floor ms':>9} {'of floor':>8}"
    out(head)
    out("-" * len(head))
    rows = []
    sink = CsvRows(csv, ["operation", "provider", "N", "H", "V", "ms", "extra_mib", "floor_ms"])
    for n, h, V in shapes:
        d = make_inputs(n, h, V)
        floor = 6 * n * h * V / rate * 1e3
        for p in PROVIDERS:
            fn = provider_fn(p)
            if fn is None:
                out(f"{n:>6} {h:>5} {V:>7} {p:<16} n/a (not installed)")
                continue
            try:
                ms, extra = median_run(lambda: run_once(fn, d), warmup, iters)
            except torch.cuda.OutOfMemoryError:
                out(f"{n:>6} {h:>5} {V:>7} {p:<16} OOM")
                free_cuda()
                continue
            except Exception as e:  # keep the table going
                out(f"{n:>6} {h:>5} {V:>7} {p:<16} error: {type(e).__name__}: {str(e)[:80]}")
                if errors is not None:
                    errors.append((n, h, V, p, repr(e)))
                continue
            extra /= 2**20
            rows.append((n, h, V, p, ms, extra, floor))
            sink.add(dict(operation="fused_linear_loss", provider=p, N=n, H=h, V=V, ms=f"{ms:.3f}",
                          extra_mib=f"{extra:.1f}", floor_ms=f"{floor:.3f}"))
            out(f"{n:>6} {h:>5} {V:>7} {p:<16} {ms:>9.2f} {extra:>10.0f} {floor:>9.2f} {floor / ms:>8.1%}")
        del d
        free_cuda()
    return rows


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("n,h,V", SHAPES)
def test_bench_fused_linear_loss(benchmark, provider, n, h, V):
    fn = provider_fn(provider)
    if fn is None:
        pytest.skip(f"{provider} not installed")
    d = make_inputs(n, h, V)
    benchmark.pedantic(lambda: run_once(fn, d), rounds=3, warmup_rounds=1)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--csv", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_linear_loss.py needs CUDA")
    table(csv=args.csv)
