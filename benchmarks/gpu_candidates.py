"""Times every candidate launch configuration of the row kernels and writes the winners.

    python benchmarks/gpu_candidates.py [--csv candidates.csv] [--table launch_tuned.json] [--tiny] [--iters 5]

Candidates (each exact under the interpreter, ``tests/kernels/test_candidates.py``; compiled without spills,
``tests/kernels/test_kernels_compile.py``), all timed as ``fused_loss`` forward + backward, bf16, S = 2, K = 10:

* ``fused_ce``   -- ``fused_ce.CANDIDATES`` at N = 16384, V = 128256 (two passes) and V = 32000 (one block);
* ``rescale``    -- ``fused_ce.RESCALES`` at N = 16384, V = 128256, ``backward(0.5)`` (a factor to apply)
                    and ``backward()`` (a factor of 1: the per-row early return);
* ``divergence`` -- ``divergence.LAUNCHES`` on ce/bucket, reverse_kl/renormalize and jsd/uniform (tail pass).

Every configuration is first run once at N = 16 in ``--warm-jobs`` processes, which compiles them all
in parallel into Triton's on-disk cache. Rows go to ``--csv`` as they are measured (the harness's
columns; ``kernel`` names the case, ``provider`` the configuration), the winner per case and shape is
printed and written to ``candidates_winners.csv`` beside it, and ``--table`` gets the
winners as ``kernels/launch_tuned.json`` reads them (commit that file: ``launch.py`` then prefers it).
"""
from __future__ import annotations

import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import harness  # noqa: E402

harness.use_source_tree()      # fastfuse installed, or the source tree linked as a package

import torch  # noqa: E402

from bench_loss import LM_WEIGHT, copy_bandwidth, make_inputs  # noqa: E402
from fastfuse.kernels import divergence, fused_ce  # noqa: E402
from fastfuse.kernels.launch import forced  # noqa: E402
from fastfuse.loss.logits_loss import fused_loss  # noqa: E402

DIV_CASES = {"ce/bucket": dict(divergence="ce", tail="bucket"),
             "reverse_kl/renormalize": dict(divergence="reverse_kl", tail="renormalize"),
             "jsd/uniform": dict(divergence="jsd", tail="uniform", beta=0.5)}


def jobs(tiny: bool):
    """``(kernel, label, N, V, config, case)`` of every measurement, in order; the label names the
    case (the CSV's kernel column: one winner per label and shape)."""
    big, small = ((16, 40000), (32, 1000)) if tiny else ((16384, 128256), (16384, 32000))
    out = [("fused_ce", "fused_ce", *big, c, None) for c in fused_ce.CANDIDATES["two_pass"]]
    out += [("fused_ce", "fused_ce", *small, c, None) for c in fused_ce.CANDIDATES["one_block"]]
    for go in ("0.5", "1"):
        out += [("rescale", f"rescale grad_output {go}", *big, c, go) for c in fused_ce.RESCALES]
    dv = (8, 5000) if tiny else big
    for case in DIV_CASES:
        out += [("divergence", f"divergence {case}", *dv, c, case) for c in divergence.LAUNCHES]
    return out


def current(kernel: str, V: int) -> str:
    if kernel == "fused_ce":
        return fused_ce.LAUNCH_TABLE[("one_block" if V <= fused_ce.SINGLE_BLOCK_MAX_V else "two_pass", "bf16", 9)]
    return "grid2d" if kernel == "rescale" else "generic"


def step_fn(kernel, config, case, d):
    """A forward + backward of ``fused_loss`` on a fresh copy of ``d``'s logits under ``config``."""
    kw = DIV_CASES[case] if kernel == "divergence" else {}
    go = float(case) if kernel == "rescale" else None
    x = d["z"].clone().requires_grad_()

    def step():
        x.grad = None           # no accumulation into an old gradient inside the timed region
        with forced(kernel, config):
            loss = fused_loss(x, d["topk"], d["amap"], d["labels"], d["w"], LM_WEIGHT, validate=False, **kw)
            loss.backward(None if go is None else torch.tensor(go, device=x.device))
    return step


def _warm(job):
    kernel, _, _, V, config, case = job
    # B = 2, T = 32: the same integer specialisation (not 1, T divisible by 16) as B = 8, T = 2048
    step_fn(kernel, config, case, make_inputs(64, V, T=32))()
    return config


def warm(todo, n_jobs: int):
    import multiprocessing as mp
    t = time.perf_counter()
    with mp.get_context("spawn").Pool(n_jobs) as pool:
        pool.map(_warm, todo, chunksize=1)
    print(f"(compiled {len(todo)} launches in {n_jobs} processes: {time.perf_counter() - t:.1f} s)", flush=True)


def main(argv=None) -> int:
    ap = harness.parser(__doc__)
    ap.add_argument("--table", default=None, help="write the winners here (launch_tuned.json's format)")
    ap.add_argument("--warm-jobs", type=int, default=8)
    a = ap.parse_args(argv)
    harness.need_cuda(a, "gpu_candidates.py")
    dev = harness.device(a)
    warmup, iters = harness.iterations(a, full=(1, 5), quick=(1, 3))
    todo = jobs(a.tiny)
    if a.warm_jobs > 1:         # (the dry run: the first two, to prove the parallel path)
        warm(todo[:2] if a.tiny else todo, 2 if a.tiny else a.warm_jobs)
    bw = copy_bandwidth(dev)
    print(f"device: {harness.device_name(dev)}  copy bandwidth {bw / 1e12:.2f} TB/s; fused_loss fwd+bwd, bf16, "
          f"median of {iters}")
    best: dict = {}
    div_total: dict = {}
    data_key, d = None, None
    with harness.Results(a.csv) as res:
        for kernel, label, N, V, config, case in todo:
            if data_key != (N, V):
                d, data_key = None, (N, V)
                harness.free_memory()
                d = make_inputs(N, V, dev)
            # the warm-up compiles (without --warm-jobs) or loads the launch (--tiny, the interpreter: none)
            t = harness.measure(step_fn(kernel, config, case, d), dev, warmup, iters)
            floor = 2 * N * V * 2 / bw * 1e3
            cur = config == current(kernel, V)
            res.time(label, config, dict(N=N, V=V), t, floor_ms=round(floor, 6), current=cur)
            b = best.setdefault((label, N, V), dict(kernel=label, N=N, V=V, winner=config, ms=t.ms))
            if t.ms < b["ms"]:
                b.update(winner=config, ms=t.ms)
            if cur:
                b.update(current=config, current_ms=t.ms)
            if kernel == "divergence":
                div_total[config] = div_total.get(config, 0.0) + t.ms
    winners = list(best.values())
    path = a.csv and os.path.join(os.path.dirname(os.path.abspath(a.csv)), "candidates_winners.csv")
    print("\nwinners:")
    with harness.Results(path) as out:
        for w in winners:
            out.add(w["kernel"], w["winner"], "time", "ms", dict(N=w["N"], V=w["V"]), w["ms"],
                    current=w["current"], current_ms=round(w["current_ms"], 6))
    if a.table:
        write_table(a.table, winners, div_total, a.tiny)
    return 0


def write_table(path: str, winners: list[dict], div_total: dict, dry: bool):
    """The winners as ``launch_tuned.json`` entries: the fused_ce two-pass / one-block shapes by V
    class (bf16, measured), the rescale at a factor to apply, the divergence launch with the least
    total time over its cases."""
    arch = str(torch.cuda.get_device_capability()[0]) if torch.cuda.is_available() else "9"
    table = {"measured_on": harness.device_name(), "dry_run": dry, "fused_ce": {}, "divergence": {}, "rescale": {}}
    for w in winners:
        if w["kernel"] == "fused_ce":
            V = w["V"]
            vclass = "one_block" if V <= fused_ce.SINGLE_BLOCK_MAX_V else "two_pass"
            table["fused_ce"][f"{vclass}/bf16/{arch}"] = w["winner"]
        elif w["kernel"] == "rescale grad_output 0.5":
            table["rescale"][arch] = w["winner"]
    if div_total:
        table["divergence"][arch] = min(sorted(div_total), key=div_total.get)
    with open(path + ".tmp", "w") as f:
        json.dump(table, f, indent=1)
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    sys.exit(main())
