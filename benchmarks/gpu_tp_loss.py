"""GPU benchmark of the vocabulary-parallel loss: what the tensor-parallel path costs next to the
one-GPU loss, forward + backward, bf16, S = 2 sources, K = 10.

    python benchmarks/gpu_tp_loss.py [--quick] [--csv out.csv]              # one GPU: a one-rank NCCL group
    torchrun --nproc_per_node 8 benchmarks/gpu_tp_loss.py [--quick]         # the real split, V / 8 per GPU

Rows (median ms over ranks' maxima; ``fused_linear_loss`` at N = 8192, H = 4096, V = 128256 and
``fused_loss`` on ``[N, V]`` logits):

* ``single``       -- the one-GPU loss on the whole vocabulary (Triton row kernels);
* ``single-torch`` -- the same with ``impl="torch"`` (the torch row path);
* ``tp``           -- ``process_group=WORLD`` with this rank's ``V / W`` shard: the staged torch rows,
  the agreement exchange and the collectives (real NCCL calls, also for one rank).

On one GPU, ``tp - single-torch`` is the cost of the staged layout and its (one-rank) collectives,
``tp - single`` what tensor parallelism costs against the Triton kernels (the TP path does not use
them: its stages need a collective between the passes over a row). With W GPUs, ``tp`` runs on
``V / W`` per rank; the ``single*`` rows still run the whole vocabulary on each GPU. The bytes one
rank sends per call are printed: per chunk of n rows ``n * (k + S*K + 2) * 4`` (all-gather; k = 2
statistics for these divergences), ``+ n * 2 * 4`` more for the tail-pass divergences, and the
``d_hidden`` all-reduce ``N * H * 2``. First the TP loss and gradients are checked against the
one-GPU ones (bf16 tolerance); exit status 1 when they differ.
"""
from __future__ import annotations

import os
import socket
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import harness  # noqa: E402

harness.use_source_tree()      # fastfuse installed, or the source tree linked as a package

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from bench_linear_loss import make_inputs  # noqa: E402  (the same inputs as the one-GPU table)

from fastfuse.loss.linear_loss import default_chunk_tokens, fused_linear_loss  # noqa: E402
from fastfuse.loss.logits_loss import fused_loss  # noqa: E402
from fastfuse.testing import LINEAR_REL_TOL  # noqa: E402

S, K, LM_WEIGHT = 2, 10, 0.9


def init(cpu: bool = False):
    """(rank, world, device): torchrun's group, or a one-rank NCCL group on a free local port
    (``cpu``: a one-rank gloo group, the dry run)."""
    backend = "gloo" if cpu else "nccl"
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    else:
        dist.init_process_group(backend)
    if cpu:
        return dist.get_rank(), dist.get_world_size(), torch.device("cpu")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


def shard_range(V, rank, world):
    """torch.tensor_split's contiguous split: (start, size) of ``rank``'s share."""
    sizes = [len(r) for r in torch.arange(V).tensor_split(world)]
    return sum(sizes[:rank]), sizes[rank]


def run(kind, d, a, n, divergence):
    """One forward + backward of ``kind``; returns (loss, d_hidden or d_logits part, d_weight part)."""
    kw = dict(source_weights=d["w"], lm_weight=LM_WEIGHT, validate=False, **divergence)
    tp = kind == "tp"
    if tp:
        kw["process_group"] = dist.group.WORLD
    else:
        kw["impl"] = "torch" if kind == "single-torch" else "auto"
    if "logits" in d:
        z = (d["logits"][..., a:a + n] if tp else d["logits"]).clone().requires_grad_()
        loss = fused_loss(z, d["topk"], d["amap"], d["labels"], **kw)
        loss.backward()
        return loss, (z.grad if tp else z.grad[..., a:a + n]), None
    h = d["hidden"].clone().requires_grad_()
    W = (d["weight"][a:a + n] if tp else d["weight"]).clone().requires_grad_()
    loss = fused_linear_loss(h, W, d["topk"], d["amap"], d["labels"], **kw)
    loss.backward()
    return loss, h.grad, (W.grad if tp else W.grad[a:a + n])


def rel(x, y):
    return ((x.float() - y.float()).norm() / y.float().norm().clamp_min(1e-30)).item()


def check(d, a, n, divergence) -> bool:
    """The TP loss and gradients against the one-GPU ones (Triton rows), bf16 tolerance."""
    want, got = run("single", d, a, n, divergence), run("tp", d, a, n, divergence)
    errs = [rel(g, w) for g, w in zip(got, want) if w is not None]
    return max(errs) <= LINEAR_REL_TOL[torch.bfloat16], errs


def timed(kind, d, a, n, divergence, warmup, iters) -> harness.Timing:
    """The slowest rank's milliseconds per iteration after ``warmup`` untimed ones: median and spread."""
    out = []
    for i in range(warmup + iters):
        dist.barrier()
        ms, _ = harness.clock(lambda: run(kind, d, a, n, divergence), d["labels"].device)
        t = torch.tensor([ms], device=d["labels"].device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        if i >= warmup:
            out.append(t.item())
    return harness.timing_of([(ms, 0) for ms in out])


def sent_bytes(N, H, T, V_r, tail_pass, linear):
    """What one rank sends per call (the agreement vector aside): the packed row statistics of every
    row (``k = 2`` columns here, ``E + 1 = S*K + 2`` sparse logits, float32), the tail sums, and
    ``d_hidden``. The row count is the same whatever the chunks; ``rounds`` is how many all-gathers."""
    if linear:
        rounds = -(-N // default_chunk_tokens(N, V_r, 2))
    else:
        rounds = (N // T) * -(-T // default_chunk_tokens(N, V_r, 2))
    per_row = (2 + S * K + 2) * 4 + (2 * 4 if tail_pass else 0)
    return N * per_row + (N * H * 2 if linear else 0), rounds


def main(argv=None) -> int:
    ap = harness.parser(__doc__)
    a = ap.parse_args(argv)
    harness.need_cuda(a, "gpu_tp_loss.py")
    rank, world, device = init(cpu=a.tiny)
    N, H, V = (4096, 4096, 128256) if a.quick else (8192, 4096, 128256)
    if a.tiny:
        N, H, V = 8, 16, 2000
    warmup, iters = harness.iterations(a, full=(1, 5), quick=(1, 3))     # --tiny: (0, 1), nothing compiles
    start, n = shard_range(V, rank, world)
    say = print if rank == 0 else (lambda *x: None)
    res = harness.Results(a.csv if rank == 0 else None, echo=say)
    say(f"device: {harness.device_name(str(device))}  world {world}  N={N} H={H} V={V} (V_r={n} on rank {rank}) bf16, "
        f"S={S} K={K}, fwd+bwd")
    ok = True
    divergences = {"ce": {}, "jsd-uniform": dict(divergence="jsd", tail="uniform")}
    for op in ("linear", "logits"):
        d = make_inputs(N, H, V, device)
        if op == "logits":
            d["logits"] = (d.pop("hidden").reshape(N, H) @ d.pop("weight").T).reshape(d["labels"].shape + (V,))
        for dname, div in divergences.items():
            good, errs = check(d, start, n, div)
            ok &= good
            say(f"\n{op} {dname}: TP vs one GPU relative errors {', '.join(f'{e:.1e}' for e in errs)} "
                f"({'ok' if good else 'FAILED'})")
            kernel = f"{'fused_linear_loss' if op == 'linear' else 'fused_loss'} {dname}"
            for kind in ("single", "single-torch", "tp"):
                res.time(kernel, kind, dict(N=N, V=V), timed(kind, d, start, n, div, warmup, iters), world=world)
            sent, rounds = sent_bytes(N, H, d["labels"].shape[1], -(-V // world), dname == "jsd-uniform",
                                      op == "linear")
            say(f"  tp: each rank sends {sent / 2**20:.1f} MiB per call ({rounds} collective rounds of row "
                f"statistics{' x 2' if dname == 'jsd-uniform' else ''}{', then the d_hidden all-reduce' if op == 'linear' else ''})")
            harness.free_memory()
    res.close()
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
