"""Benchmark of the fused knowledge-fusion loss: forward + backward time and peak extra memory.

Providers, all computing ``lm_weight * CE(z, y) + (1 - lm_weight) * CE(z, q)`` from bf16 logits
``[N, V]`` (except Liger: hard-label CE only, a lower bound for any fused loss):

* ``fastfuse``          -- ``fastfuse.fused_loss`` (Triton), gradient in a new buffer;
* ``fastfuse_inplace``  -- same, ``inplace_grad=True`` (gradient written into the logits);
* ``fastfuse_2pass``    -- ``fastfuse`` forced onto the default two-pass path (``"2pass_l2"``:
  8192-element chunks, one 32-warp CTA per SM), to compare with the single-block path that
  V = 32000 takes by default;
* ``fastfuse_2pass_v1`` -- ``fastfuse`` forced onto the previous two-pass configuration
  (``"2pass_v1"``: 4096-element chunks, 16 warps, 3 CTAs per SM), to compare with ``fastfuse``;
* ``dense``             -- FuseLLM-style: dense fp32 teacher ``[N, V]`` built with scatter_add,
  ``log_softmax`` over fp32 logits, autograd;
* ``torch_sparse``      -- eager torch with the sparse teacher: fp32 ``logsumexp`` + gather;
* ``torch_compile``     -- the same function under ``torch.compile``;
* ``liger_ce``          -- Liger-Kernel's fused CrossEntropy (hard labels), if installed.

Every provider gets the same (precomputed) sparse teacher where it needs one, so the table
compares the loss itself; fastfuse's time includes its own teacher kernel from the raw top-k.

    pytest benchmarks/bench_loss.py --benchmark-enable      # pytest-benchmark (needs CUDA)
    python benchmarks/bench_loss.py [--quick] [--no-compile] [--csv out.csv]

The ``__main__`` table also prints the memory-bound floor: one read of the logits and one write
of the gradient (``2 * N * V * 2`` bytes) at the measured device-to-device copy bandwidth, and
each provider's fraction of it (floor / time).
"""
from __future__ import annotations

import argparse
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastfuse import AlignMap, SourceTopK, fused_loss  # noqa: E402
from fastfuse.loss.torch_path import normalize_weights, torch_sparse_teacher  # noqa: E402

from _common import CsvRows, cuda_ms_per_call, cuda_timed, device_name, free_cuda, median_run  # noqa: E402

LM_WEIGHT = 0.9
SHAPES = [(8192, 32000), (8192, 128256), (16384, 32000), (16384, 128256)]
QUICK = [(16384, 128256), (16384, 32000)]          # the target shape first
TINY = [(16, 40000), (32, 1000)]                   # gpu_check.py --dry-run: CPU, interpreter
S, K = 2, 10


def make_inputs(N: int, V: int, device=None, dtype=torch.bfloat16, seed: int = 0, T: int = None):
    """Logits ``[B, T, V]`` with B*T = N (T = min(N, 2048) unless given) and S=2, K=10 top-k
    teachers (source vocab 32000)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    g = torch.Generator(device=device).manual_seed(seed)
    T = T or min(N, 2048)
    B = N // T
    Vs = 32000
    z = torch.randn(B, T, V, device=device, dtype=dtype, generator=g) * 2
    ids = torch.randint(0, Vs, (S, B, T, K), device=device, generator=g, dtype=torch.int32)
    lp = torch.log_softmax(torch.randn(S, B, T, K, device=device, generator=g), -1).half()
    pos = torch.arange(T, device=device, dtype=torch.int32).expand(S, B, T).contiguous()
    pos = torch.where(torch.rand(S, B, T, device=device, generator=g) < 0.1, -1, pos).to(torch.int32)
    vocab = torch.randint(0, V, (S, Vs), device=device, generator=g, dtype=torch.int32)
    labels = torch.randint(0, V, (B, T), device=device, generator=g)
    labels[:, :16] = -100
    w = torch.rand(S, B, device=device, generator=g)
    topk, amap = SourceTopK(ids, lp), AlignMap(pos, vocab)
    wn = normalize_weights(w, S, B, T, torch.device(device)).reshape(S, N)
    tids, coefs = torch_sparse_teacher(topk, amap, labels, wn, LM_WEIGHT, 1.0, -100)
    return dict(z=z, topk=topk, amap=amap, labels=labels, w=w, tids=tids, coefs=coefs)


def _sparse_torch(z2, labels, tids, coefs):
    zf = z2.float()
    lse = torch.logsumexp(zf, -1)
    zt = zf.gather(1, tids.clamp_min(0))
    loss = lse - (coefs * zt).sum(1)
    valid = labels != -100
    return torch.where(valid, loss, 0).sum() / valid.sum().clamp_min(1)


_compiled = None


def provider_fn(name: str):
    """A function ``(x [B, T, V] requiring grad, inputs) -> scalar loss``; None if unavailable."""
    global _compiled
    if name in ("fastfuse", "fastfuse_inplace"):
        inplace = name == "fastfuse_inplace"

        def f(x, d):
            return fused_loss(x, d["topk"], d["amap"], d["labels"], d["w"], LM_WEIGHT,
                              inplace_grad=inplace, validate=False)
        f.inplace = inplace
        return f
    if name in ("fastfuse_2pass", "fastfuse_2pass_v1"):  # a named two-pass entry of fused_ce.CONFIGS
        from fastfuse.kernels.launch import forced
        config = "2pass_v1" if name == "fastfuse_2pass_v1" else "2pass_l2"

        def f(x, d):
            with forced("fused_ce", config):
                return fused_loss(x, d["topk"], d["amap"], d["labels"], d["w"], LM_WEIGHT, validate=False)
        return f
    if name == "dense":
        def f(x, d):
            N, V = x.shape[0] * x.shape[1], x.shape[2]
            tids, coefs = d["tids"], d["coefs"]
            q = torch.zeros(N, V, device=x.device, dtype=torch.float32)
            q.scatter_add_(1, tids.clamp_min(0), coefs)           # lm part + teacher, fp32 dense
            logp = torch.log_softmax(x.reshape(N, V).float(), -1)
            valid = d["labels"].reshape(N) != -100
            loss = -(q * logp).sum(-1)
            return torch.where(valid, loss, 0).sum() / valid.sum().clamp_min(1)
        return f
    if name == "torch_sparse":
        return lambda x, d: _sparse_torch(x.reshape(-1, x.shape[-1]), d["labels"].reshape(-1),
                                          d["tids"], d["coefs"])
    if name == "torch_compile":
        if _compiled is None:
            _compiled = torch.compile(_sparse_torch, dynamic=False)
        return lambda x, d: _compiled(x.reshape(-1, x.shape[-1]), d["labels"].reshape(-1),
                                      d["tids"], d["coefs"])
    if name == "liger_ce":
        try:
            from liger_kernel.transformers import LigerCrossEntropyLoss
        except Exception:
            return None
        ce = LigerCrossEntropyLoss()
        return lambda x, d: ce(x.reshape(-1, x.shape[-1]), d["labels"].reshape(-1))
    raise ValueError(name)


# Liger before torch.compile: its compile is the slowest step of a cut-short GPU window
PROVIDERS = ["fastfuse", "fastfuse_inplace", "liger_ce", "fastfuse_2pass", "fastfuse_2pass_v1", "dense", "torch_sparse",
             "torch_compile"]


class _Produced(torch.autograd.Function):
    """The logits as the output of an op, like an lm_head's: ``inplace_grad`` may overwrite those,
    not a leaf that requires grad (autograd refuses in-place writes to a leaf). Its backward passes
    nothing on, so it costs nothing in the timed region."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return None


def run_once(fn, d):
    """Fresh logits copy (untimed), then fwd+bwd between CUDA events; (ms, peak extra bytes)."""
    x = d["z"].clone().requires_grad_()
    if getattr(fn, "inplace", False):
        x = _Produced.apply(x)
    return cuda_timed(lambda: fn(x, d).backward())


def measure(fn, d, warmup=2, iters=5):
    return median_run(lambda: run_once(fn, d), warmup, iters)


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write counted)."""
    if not torch.cuda.is_available():       # dry run: a host copy, small
        nbytes = 1 << 24
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device="cuda" if torch.cuda.is_available() else "cpu")
    dst = torch.empty_like(src)
    ms = cuda_ms_per_call(lambda: dst.copy_(src))
    return 2 * nbytes / (ms / 1e3)


def table(shapes=SHAPES, providers=PROVIDERS, csv=None, warmup=2, iters=5, out=print, errors=None):
    """Print one table: time, peak extra memory, floor and fraction of it per (shape, provider).
    A provider that raises is reported and appended to ``errors`` (if given); the table goes on."""
    bw = copy_bandwidth()
    out(f"device: {device_name()}  copy bandwidth: {bw / 1e12:.2f} TB/s  "
        f"(S={S}, K={K}, bf16, fwd+bwd)")
    head = f"{'N':>6} {'V':>7} {'provider':<17} {'ms':>9} {'extra MiB':>10} {'floor ms':>9} {'of floor':>8}"
    out(head)
    out("-" * len(head))
    rows = []
    sink = CsvRows(csv, ["operation", "provider", "N", "V", "ms", "extra_mib", "floor_ms"])
    for N, V in shapes:
        d = make_inputs(N, V)
        floor_ms = 2 * N * V * 2 / bw * 1e3
        for p in providers:
            fn = provider_fn(p)
            if fn is None:
                out(f"{N:>6} {V:>7} {p:<17} {'n/a (not installed)':>30}")
                continue
            try:
                ms, peak = measure(fn, d, warmup, iters)
            except torch.cuda.OutOfMemoryError:
                out(f"{N:>6} {V:>7} {p:<17} {'OOM':>9}")
                free_cuda()
                continue
            except Exception as e:  # keep the table going
                out(f"{N:>6} {V:>7} {p:<17} error: {type(e).__name__}: {str(e)[:80]}")
                if errors is not None:
                    errors.append((N, V, p, repr(e)))
                continue
            rows.append((N, V, p, ms, peak / 2**20, floor_ms))
            sink.add(dict(operation="fused_loss", provider=p, N=N, V=V, ms=f"{ms:.4f}",
                          extra_mib=f"{peak / 2**20:.1f}", floor_ms=f"{floor_ms:.4f}"))
            out(f"{N:>6} {V:>7} {p:<17} {ms:>9.3f} {peak / 2**20:>10.0f} {floor_ms:>9.3f} "
                f"{floor_ms / ms:>8.1%}")
        del d
        free_cuda()
    return rows


# ------------------------------------------------------------------ pytest-benchmark
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("N,V", SHAPES)
def test_bench_fused_loss(benchmark, provider, N, V):
    fn = provider_fn(provider)
    if fn is None:
        pytest.skip(f"{provider} not installed")
    d = make_inputs(N, V)
    ms, peak = measure(fn, d, warmup=2, iters=1)
    benchmark.extra_info.update(peak_extra_mib=peak / 2**20, N=N, V=V)

    def setup():
        x = d["z"].clone().requires_grad_()
        return (_Produced.apply(x) if getattr(fn, "inplace", False) else x,), {}

    def step(x):
        fn(x, d).backward()
        torch.cuda.synchronize()

    benchmark.pedantic(step, setup=setup, rounds=5, warmup_rounds=1)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="only N=16384 shapes (the target first), fewer iterations")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile provider")
    ap.add_argument("--csv", default=None)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA device")
    shapes = QUICK if a.quick else SHAPES
    provs = [p for p in PROVIDERS if not (a.no_compile and p == "torch_compile")]
    table(shapes, provs, a.csv, iters=3 if a.quick else 5)
