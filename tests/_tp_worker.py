"""torchrun entry for tests/loss/test_vocab_parallel.py: every case of one world size in one process group
(process start-up dominates), each rank checking its vocabulary-parallel results against the
one-process float64 loss, and writing ``OUT/rank-R.json``: ``{case: "ok" | error text}``.

    python -m torch.distributed.run --standalone --nproc_per_node W tests/_tp_worker.py {cases|errors} OUT
    python -m torch.distributed.run --standalone --nproc_per_node W tests/_tp_worker.py example TP OUT.pt

Every rank builds the same inputs from the same seed; the vocabulary ``V = 37`` is split unevenly.
Ends with ``os._exit`` (gloo's threads can abort a clean interpreter exit, see tests/_ddp_worker.py).
"""
import contextlib
import datetime
import json
import math
import os
import sys
import traceback

import torch
import torch.distributed as dist

import fastfuse
from fastfuse.testing import LINEAR_REL_TOL, random_inputs

V, H, B, T, S, K, TS, VS = 37, 8, 2, 6, 2, 4, 7, 24
TOL = dict(rtol=1e-10, atol=1e-12)
SPECS = {
    "ce": {},
    "reverse_kl-uniform": dict(divergence="reverse_kl", tail="uniform"),
    "jsd-uniform": dict(divergence="jsd", tail="uniform", beta=0.3),            # the tail pass: two rounds
    "tvd-bucket": dict(divergence="tvd", tail="bucket"),
    "softcap-temperature": dict(softcap=4.0, logit_scale=0.8, student_temperature=1.5, hinton_scale=True),
}
# (sizes, explicit vocab_start per rank or None = contiguous in rank order)
SPLITS = {2: {"ranked": ((19, 18), None), "explicit": ((19, 18), (18, 0))},
          3: {"ranked": ((13, 12, 12), None), "explicit": ((13, 12, 12), (24, 0, 12))}}


def inputs(seed, edges, dtype=torch.float64, weights="token"):
    """Inputs with labels and teacher ids on every shard's first and last id, duplicate target ids
    (many source ids map to one edge id), unmapped ids and ignored rows; log-probabilities that
    leave the teacher a tail mass."""
    g = torch.Generator().manual_seed(seed)
    d = random_inputs(B, T, V, S, K, TS, VS, dtype=dtype, p_unmapped=0.2, p_ignore=0.2, weights=weights, generator=g)
    ids, lp = d["source_topk"]
    pos, vocab = d["align_map"]
    e = torch.tensor(edges, dtype=vocab.dtype)
    vocab[:, : 2 * len(edges)] = e.repeat(2)[None]          # duplicates: two source ids per edge id
    vocab[0, 2 * len(edges)] = -1
    labels = d["labels"].reshape(-1)
    labels[1: 1 + len(edges)] = torch.tensor(edges)
    lp = lp - math.log(1.25)                                # kept mass 0.8: a tail for "uniform"/"bucket"
    topk, amap = fastfuse.SourceTopK(ids, lp), fastfuse.AlignMap(pos, vocab)
    return d["target_logits"], topk, amap, labels.reshape(B, T), d["source_weights"]


def close(name, got, want):
    if got.dtype != torch.float64:      # low precision: a relative error of the whole tensor
        err = ((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30)).item()
        assert err <= LINEAR_REL_TOL[got.dtype], f"{name}: relative error {err:.2e} ({got.dtype})"
        return
    torch.testing.assert_close(got, want, **TOL, msg=lambda m: f"{name}: {m}")


def run_logits(pg, rank, sizes, starts, spec, reduction, seed, two_d=False, inplace=False, dtype=torch.float64):
    explicit = starts is not None
    starts = starts or tuple(sum(sizes[:r]) for r in range(len(sizes)))
    a, n = starts[rank], sizes[rank]
    edges = sorted({s + o for s, m in zip(starts, sizes) for o in (0, m - 1)})
    z, topk, amap, labels, w = inputs(seed, edges)
    go = torch.rand(B, T, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64) + 0.5
    if two_d:       # [N, V] logits, [N] labels, [S, N] per-token weights
        z, labels, w = z.reshape(B * T, V), labels.reshape(-1), w.reshape(S, B * T)
        topk = fastfuse.SourceTopK(topk.ids.reshape(S, B * TS, K), topk.logprobs.reshape(S, B * TS, K))
        amap = fastfuse.AlignMap(torch.where(amap.pos >= 0, amap.pos + torch.arange(B)[None, :, None] * TS, -1)
                                 .int().reshape(S, B * T), amap.vocab)
        go = go.reshape(-1)
    z, go = z.to(dtype), go.to(dtype)
    ref_in = z.clone().requires_grad_()
    ref = fastfuse.fused_loss(ref_in, topk, amap, labels, w, 0.7, 1.3, reduction=reduction, **spec)
    (ref * go if reduction == "none" else ref * 0.5).sum().backward()
    shard = z[..., a:a + n].clone().requires_grad_()
    x = shard * 1.0 if inplace else shard               # in place: the gradient overwrites a non-leaf
    got = fastfuse.fused_loss(x, topk, amap, labels, w, 0.7, 1.3, reduction=reduction, process_group=pg,
                              vocab_start=a if explicit else None, inplace_grad=inplace, **spec)
    (got * go if reduction == "none" else got * 0.5).sum().backward()
    close("loss", got.detach(), ref.detach())
    close("d_logits", shard.grad, ref_in.grad[..., a:a + n])


def run_linear(pg, rank, sizes, starts, spec, reduction, seed, bias=True, seq=None, chunk=5, dtype=torch.float64):
    explicit = starts is not None
    starts = starts or tuple(sum(sizes[:r]) for r in range(len(sizes)))
    a, n = starts[rank], sizes[rank]
    edges = sorted({s + o for s, m in zip(starts, sizes) for o in (0, m - 1)})
    _, topk, amap, labels, w = inputs(seed, edges)
    g = torch.Generator().manual_seed(seed + 2)
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    W = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.7
    b = torch.randn(V, generator=g, dtype=torch.float64) if bias else None
    go = torch.rand(B, T, generator=g, dtype=torch.float64) + 0.5
    hidden, W, b, go = (None if x is None else x.to(dtype) for x in (hidden, W, b, go))
    leaves = [x.clone().requires_grad_() for x in (hidden, W, b) if x is not None]
    ref = fastfuse.fused_linear_loss(leaves[0], leaves[1], topk, amap, labels, leaves[2] if bias else None, w, 0.7, 1.3,
                                     reduction=reduction, **spec)
    (ref * go if reduction == "none" else ref * 0.5).sum().backward()
    h_part = hidden
    if seq is not None:     # this rank's share of the sequence (dim 1)
        t0 = sum(seq[:rank])
        h_part = hidden[:, t0:t0 + seq[rank]]
    mine = [h_part.clone().requires_grad_(), W[a:a + n].clone().requires_grad_()]
    if bias:
        mine.append(b[a:a + n].clone().requires_grad_())
    got = fastfuse.fused_linear_loss(mine[0], mine[1], topk, amap, labels, mine[2] if bias else None, w, 0.7, 1.3,
                                     reduction=reduction, process_group=pg, vocab_start=a if explicit else None,
                                     chunk_tokens=chunk, sequence_parallel=seq is not None, **spec)
    (got * go if reduction == "none" else got * 0.5).sum().backward()
    close("loss", got.detach(), ref.detach())
    d_hidden = leaves[0].grad if seq is None else leaves[0].grad[:, sum(seq[:rank]):sum(seq[:rank + 1])]
    close("d_hidden", mine[0].grad, d_hidden)
    close("d_weight", mine[1].grad, leaves[1].grad[a:a + n])
    if bias:
        close("d_bias", mine[2].grad, leaves[2].grad[a:a + n])


def run_dtensor(pg, rank, world, spec, reduction, seed):
    """DTensor logits (Shard(2)), weight and bias (Shard(0)) and hidden (Shard(1): sequence parallel):
    torch's own uneven split, read from the placements."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    z, topk, amap, labels, w = inputs(seed, [0, 12, 13, 25, 26, 36])
    ref_in = z.clone().requires_grad_()
    ref = fastfuse.fused_loss(ref_in, topk, amap, labels, w, reduction=reduction, **spec)
    ref.sum().backward()
    zd = distribute_tensor(z, mesh, [Shard(2)]).requires_grad_()
    got = fastfuse.fused_loss(zd, topk, amap, labels, w, reduction=reduction, **spec)
    got.sum().backward()
    close("loss", got.detach(), ref.detach())
    close("d_logits", zd.grad.full_tensor(), ref_in.grad)
    msg = error_of(lambda: fastfuse.fused_loss(zd * 1.0, topk, amap, labels, w, inplace_grad=True))
    assert msg.startswith("ValueError: inplace_grad=True: a DTensor's local shard is a view"), msg
    g = torch.Generator().manual_seed(seed + 3)
    hidden, W, b = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((B, T, H), (V, H), (V,)))
    leaves = [x.clone().requires_grad_() for x in (hidden, W, b)]
    ref = fastfuse.fused_linear_loss(leaves[0], leaves[1], topk, amap, labels, leaves[2], w, reduction=reduction,
                                     **spec)
    ref.sum().backward()
    for hp in (Replicate(), Shard(1)):
        mine = [distribute_tensor(x, mesh, [p]).requires_grad_() for x, p in ((hidden, hp), (W, Shard(0)),
                                                                               (b, Shard(0)))]
        got = fastfuse.fused_linear_loss(mine[0], mine[1], topk, amap, labels, mine[2], w, reduction=reduction,
                                         chunk_tokens=4, **spec)
        got.sum().backward()
        close(f"loss ({hp})", got.detach(), ref.detach())
        for name, mi, le in zip(("d_hidden", "d_weight", "d_bias"), mine, leaves):
            close(f"{name} ({hp})", mi.grad.full_tensor(), le.grad)


@contextlib.contextmanager
def small_pieces():
    """Several collective rounds per fused_loss call and several stage slices per round, at these sizes."""
    import fastfuse.loss.chunk_loop as cl
    import fastfuse.loss.parallel.stages as vpr

    old = cl.CHUNK_BYTES, vpr.SLICE_ELEMS
    cl.CHUNK_BYTES, vpr.SLICE_ELEMS = 3 * 19 * 8, 40        # 3-4 rows per round or chunk, 2-3 rows per slice
    try:
        yield
    finally:
        cl.CHUNK_BYTES, vpr.SLICE_ELEMS = old


def in_small_pieces(fn, *args, **kw):
    with small_pieces():
        fn(*args, **kw)


def cases(world):
    """name -> callable(pg, rank)"""
    out = {}
    for split, (sizes, starts) in SPLITS[world].items():
        for sname, spec in SPECS.items():
            for red in ("mean", "sum", "none"):
                seed = len(out) + 17 * world
                out[f"logits/{split}/{sname}/{red}"] = (lambda pg, r, a=(sizes, starts, spec, red, seed):
                                                        run_logits(pg, r, *a))
                out[f"linear/{split}/{sname}/{red}"] = (lambda pg, r, a=(sizes, starts, spec, red, seed):
                                                        run_linear(pg, r, *a))
    sizes, starts = SPLITS[world]["ranked"]
    seq = (3, 2, 1)[:world] if world == 3 else (4, 2)
    for red in ("mean", "none"):
        for fn in (run_logits, run_linear):
            name = f"{fn.__name__[4:]}/small-rounds-and-slices/{red}"
            out[name] = lambda pg, r, fn=fn, red=red: in_small_pieces(fn, pg, r, sizes, None, SPECS["jsd-uniform"],
                                                                       red, 10)
    out["logits/2d-inputs"] = lambda pg, r: run_logits(pg, r, sizes, None, {}, "none", 5, two_d=True)
    out["logits/inplace_grad"] = lambda pg, r: run_logits(pg, r, sizes, None, SPECS["jsd-uniform"], "mean", 6,
                                                          inplace=True)
    out["linear/no-bias-one-chunk"] = lambda pg, r: run_linear(pg, r, sizes, None, {}, "mean", 7, bias=False,
                                                               chunk=None)
    for red in ("mean", "none"):
        out[f"linear/sequence-parallel/{red}"] = (lambda pg, r, red=red:
                                                  run_linear(pg, r, sizes, None, SPECS["jsd-uniform"], red, 8, seq=seq))
    out["logits/float16-deferred"] = lambda pg, r: run_logits(pg, r, sizes, None, SPECS["tvd-bucket"], "none", 13,
                                                              dtype=torch.float16)
    out["logits/float32"] = lambda pg, r: run_logits(pg, r, sizes, None, {}, "mean", 14, dtype=torch.float32)
    out["linear/bfloat16-recomputed"] = lambda pg, r: run_linear(pg, r, sizes, None, SPECS["ce"], "none", 15,
                                                                 dtype=torch.bfloat16)
    out["linear/float32"] = lambda pg, r: run_linear(pg, r, sizes, None, SPECS["reverse_kl-uniform"], "sum", 16,
                                                     dtype=torch.float32)
    out["dtensor"] = lambda pg, r: run_dtensor(pg, r, world, SPECS["tvd-bucket"], "mean", 9)
    return out


def error_of(fn) -> str:
    """``"TypeName: message"`` of what ``fn()`` raises, or ``"no error"``."""
    try:
        fn()
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return "no error"


def error_cases(world):
    """name -> callable(pg, rank) returning the error text this rank saw (the test checks every rank's)."""
    sizes, _ = SPLITS[world]["ranked"]
    last = world - 1

    def logits_call(pg, r, t=T, dtype=torch.float64, labels_of=None, vocab_start=None, k=K, spec=None, **kw):
        a = sum(sizes[:r])
        z, topk, amap, labels, w = inputs(3, [0, V - 1])
        if labels_of is not None:
            labels = labels_of(labels)
        if k != K:
            topk = fastfuse.SourceTopK(topk.ids[..., :k], topk.logprobs[..., :k])
        z = z[:, :t, a:a + sizes[r]].to(dtype).requires_grad_()
        labels, amap = labels[:, :t], fastfuse.AlignMap(amap.pos[:, :, :t], amap.vocab)
        w = w[:, :, :t]
        return lambda: fastfuse.fused_loss(z, topk, amap, labels, w, process_group=pg, vocab_start=vocab_start,
                                           **(spec or {}), **kw).backward()

    def linear_call(pg, r, h=H, weight_grad=True, seq=None):
        _, topk, amap, labels, w = inputs(4, [0, V - 1])
        hidden = torch.randn(B, T if seq is None else seq[r], h, dtype=torch.float64, requires_grad=True)
        W = torch.randn(sizes[r], h, dtype=torch.float64, requires_grad=weight_grad)
        return lambda: fastfuse.fused_linear_loss(hidden, W, topk, amap, labels, None, w, process_group=pg,
                                                  sequence_parallel=seq is not None).backward()

    def starts(bad):
        return lambda pg, r: error_of(logits_call(pg, r, vocab_start=bad(r)))

    def rowwise_head(pg, r):
        """causal_lm_fusion_loss refuses an lm_head split on the hidden dimension, naming the model."""
        import runpy

        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.parallel import RowwiseParallel, parallelize_module

        from fastfuse.integrations.hf import causal_lm_fusion_loss

        ex = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples", "ddp_step.py"))
        net, b = ex["model"](), ex["batch"](torch.device("cpu"))
        parallelize_module(net, init_device_mesh("cpu", (world,)), {"lm_head": RowwiseParallel()})
        return error_of(lambda: causal_lm_fusion_loss(net, {"input_ids": b["input_ids"], "labels": b["labels"]},
                                                      fastfuse.SourceTopK(b["ids"], b["logprobs"]),
                                                      fastfuse.AlignMap(b["pos"], b["vocab"]), labels_shifted=True))

    ranked = [sum(sizes[:r]) for r in range(world)]
    return {
        "hf-rowwise-head": rowwise_head,
        "tokens": lambda pg, r: error_of(logits_call(pg, r, t=T - 1 if r == last else T)),
        "hidden-size": lambda pg, r: error_of(linear_call(pg, r, h=H + 1 if r == last else H)),
        "dtype": lambda pg, r: error_of(logits_call(pg, r, dtype=torch.float32 if r == last else torch.float64)),
        "top-k": lambda pg, r: error_of(logits_call(pg, r, k=K - 1 if r == last else K)),
        "loss-arguments": lambda pg, r: error_of(logits_call(pg, r, lm_weight=0.5 if r == last else 0.9)),
        "divergence": lambda pg, r: error_of(logits_call(pg, r, spec=dict(divergence="jsd", tail="uniform")
                                                         if r == last else None)),
        "grad-flags": lambda pg, r: error_of(linear_call(pg, r, weight_grad=r != last)),
        "labels-content": lambda pg, r: error_of(logits_call(
            pg, r, labels_of=(lambda y: torch.where(y == -100, y, (y + 1) % V)) if r == last else None)),
        "labels-range": lambda pg, r: error_of(logits_call(pg, r, labels_of=lambda y: torch.where(torch.arange(y.numel()).reshape(y.shape) == 0, V, y))),
        "one-rank-invalid": lambda pg, r: error_of(logits_call(
            pg, r, labels_of=(lambda y: y.double()) if r == last else None)),
        "vocab_start-out-of-range": starts(lambda r: 100 if r == last else ranked[r]),
        "vocab_start-overlap": starts(lambda r: 0),
        "vocab_start-negative": starts(lambda r: -1 if r == last else ranked[r]),
        "vocab_start-on-some-ranks": starts(lambda r: None if r == last else ranked[r]),
        "sequence-shares": lambda pg, r: error_of(linear_call(pg, r, seq=[T // world - 1] * world)),
        "recovers": lambda pg, r: error_of(logits_call(pg, r)),       # the group still works after all that
    }


def world_one_group(pg, rank):
    """A one-rank group: the whole vocabulary on this rank, the results of the one-process loss."""
    run_logits(ONE[rank], 0, (V,), None, SPECS["jsd-uniform"], "mean", 11)
    run_linear(ONE[rank], 0, (V,), None, SPECS["ce"], "none", 12)


ONE = {}


def main(mode, out_dir):
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))   # a bug fails, never hangs CI
    rank, world = dist.get_rank(), dist.get_world_size()
    pg = dist.new_group(list(range(world)))
    results = {}
    ONE.update({r: dist.new_group([r]) for r in range(world)})     # every rank creates every group
    todo = error_cases(world) if mode == "errors" else dict(cases(world), **{"world-1-group": world_one_group})
    for name, fn in todo.items():
        try:
            res = fn(pg, rank)
            results[name] = "ok" if res is None else res
        except Exception:
            results[name] = traceback.format_exc(limit=4)
    with open(os.path.join(out_dir, f"rank-{rank}.json"), "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    if sys.argv[1] == "example":        # examples/tp_step.py with --tp sys.argv[2]
        import runpy
        example = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples",
                                              "tp_step.py"))
        example["main"](sys.argv[3], tp=int(sys.argv[2]))
    else:
        main(sys.argv[1], sys.argv[2])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
