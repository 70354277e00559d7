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

    python benchmarks/bench_linear_loss.py [--tiny] [--csv out.csv]    # needs CUDA (--tiny: CPU)
"""
from __future__ import annotations

import sys

import harness

harness.use_source_tree()

import torch  # noqa: E402

from fastfuse.loss.linear_loss import fused_linear_loss  # noqa: E402
from fastfuse import AlignMap, SourceTopK, fused_loss  # noqa: E402

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


def run_once(fn, d, dev="cuda"):
    """Fresh input copies (untimed), then fwd+bwd timed; (ms, peak bytes beyond the inputs' gradients,
    which every provider must produce)."""
    h = d["hidden"].clone().requires_grad_()
    W = d["weight"].clone().requires_grad_()
    ms, peak = harness.clock(lambda: fn(h, W, d).backward(), dev)
    return ms, peak - h.numel() * 2 - W.numel() * 2


def measure(fn, d, warmup=2, iters=5, dev="cuda") -> harness.Timing:
    return harness.measure(None, dev, warmup, iters, once=lambda _: run_once(fn, d, dev))


def matmul_rate(dev="cuda", n=8192) -> float:
    """bf16 matmul FLOP/s (on CPU a small host matmul)."""
    n = 512 if dev == "cpu" else n
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    return 2 * n ** 3 / (harness.ms_per_call(lambda: a @ a, dev) / 1e3)


def table(csv=None, warmup=2, iters=5, shapes=SHAPES, errors=None, dev="cuda") -> list[dict]:
    """Time, extra memory and the matmul floor per (shape, provider), harness CSV rows as they come;
    a provider that raises is reported and appended to ``errors`` (if given)."""
    rate = matmul_rate(dev)
    print(f"device: {harness.device_name(dev)}  bf16 matmul: {rate / 1e12:.1f} TFLOP/s  (S={S}, K={K}, fwd+bwd, "
          f"median of {iters})")
    with harness.Results(csv) as res:
        harness.sweep(res, "fused_linear_loss", [dict(N=n, H=h, V=V) for n, h, V in shapes], PROVIDERS,
                      inputs=lambda N, H, V: make_inputs(N, H, V, dev), provider_fn=provider_fn,
                      time_one=lambda fn, d: measure(fn, d, warmup, iters, dev),
                      floor_ms=lambda N, H, V: 6 * N * H * V / rate * 1e3, errors=errors)
    return res.rows


def main(argv=None) -> int:
    ap = harness.parser(__doc__)
    a = ap.parse_args(argv)
    harness.need_cuda(a, "bench_linear_loss.py")
    dev = harness.device(a)
    warmup, iters = harness.iterations(a)
    errors: list = []
    table(a.csv, warmup, iters, TINY if a.tiny else SHAPES[:1] if a.quick else SHAPES, errors, dev)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
