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

    python benchmarks/bench_loss.py [--quick | --tiny] [--no-compile] [--csv out.csv]   # needs CUDA (--tiny: CPU)

Each row also carries the memory-bound floor: one read of the logits and one write
of the gradient (``2 * N * V * 2`` bytes) at the measured device-to-device copy bandwidth, and
each provider's fraction of it is floor / time. ``--tiny``: the dry run's shapes on CPU (under
``TRITON_INTERPRET=1`` the kernels run in the interpreter; ``gpu_check.py --dry-run``).
"""
from __future__ import annotations

import sys

import harness

harness.use_source_tree()

import torch  # noqa: E402

from fastfuse import AlignMap, SourceTopK, fused_loss  # noqa: E402
from fastfuse.loss.torch_path import normalize_weights, torch_sparse_teacher  # noqa: E402

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


def run_once(fn, d, dev="cuda"):
    """Fresh logits copy (untimed), then fwd+bwd timed; (ms, peak extra bytes)."""
    x = d["z"].clone().requires_grad_()
    if getattr(fn, "inplace", False):
        x = _Produced.apply(x)
    return harness.clock(lambda: fn(x, d).backward(), dev)


def measure(fn, d, warmup=2, iters=5, dev="cuda") -> harness.Timing:
    return harness.measure(None, dev, warmup, iters, once=lambda _: run_once(fn, d, dev))


def copy_bandwidth(dev="cuda", nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write counted); on CPU a small host copy."""
    if dev == "cpu":
        nbytes = 1 << 24
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    ms = harness.ms_per_call(lambda: dst.copy_(src), dev)
    return 2 * nbytes / (ms / 1e3)


def table(shapes=SHAPES, providers=PROVIDERS, csv=None, warmup=2, iters=5, errors=None, dev="cuda") -> list[dict]:
    """Every provider on every ``(N, V)``: time (median, spread), peak extra memory, the copy floor;
    the rows (harness CSV) as they are measured. A provider that raises is reported and appended to
    ``errors`` (if given); the table goes on."""
    bw = copy_bandwidth(dev)
    print(f"device: {harness.device_name(dev)}  copy bandwidth: {bw / 1e12:.2f} TB/s  "
          f"(S={S}, K={K}, bf16, fwd+bwd, median of {iters})")
    with harness.Results(csv) as res:
        harness.sweep(res, "fused_loss", [dict(N=N, V=V) for N, V in shapes], providers,
                      inputs=lambda N, V: make_inputs(N, V, dev), provider_fn=provider_fn,
                      time_one=lambda fn, d: measure(fn, d, warmup, iters, dev),
                      floor_ms=lambda N, V: 2 * N * V * 2 / bw * 1e3, errors=errors)
    return res.rows


def main(argv=None) -> int:
    ap = harness.parser(__doc__)
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile provider")
    a = ap.parse_args(argv)
    harness.need_cuda(a, "bench_loss.py")
    dev = harness.device(a)
    warmup, iters = harness.iterations(a, full=(2, 5), quick=(2, 3))
    shapes = TINY if a.tiny else QUICK if a.quick else SHAPES
    provs = [p for p in PROVIDERS if not ((a.no_compile or a.tiny) and p == "torch_compile")]
    errors: list = []
    table(shapes, provs, a.csv, warmup, iters, errors, dev)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
