"""Times every candidate launch configuration of the row kernels and writes the winners.

    python benchmarks/gpu_candidates.py [--csv candidates.csv] [--table launch_tuned.json] [--tiny]

Candidates (each exact under the interpreter, ``tests/kernels/test_candidates.py``; compiled without spills,
``tests/kernels/test_kernels_compile.py``), all timed as ``fused_loss`` forward + backward, bf16, S = 2, K = 10:

* ``fused_ce``   -- ``fused_ce.CANDIDATES`` at N = 16384, V = 128256 (two passes) and V = 32000 (one block);
* ``rescale``    -- ``fused_ce.RESCALES`` at N = 16384, V = 128256, ``backward(0.5)`` (a factor to apply)
                    and ``backward()`` (a factor of 1: the per-row early return);
* ``divergence`` -- ``divergence.LAUNCHES`` on ce/bucket, reverse_kl/renormalize and jsd/uniform (tail pass).

Every configuration is first run once at N = 16 in ``--warm-jobs`` processes, which compiles them all
in parallel into Triton's on-disk cache. Rows go to ``--csv`` as they are measured, the winner per
shape is printed and written to ``candidates_winners.csv`` beside it, and ``--table`` gets the
winners as ``kernels/launch_tuned.json`` reads them (commit that file: ``launch.py`` then prefers it).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import gpu_loss  # noqa: E402,F401  (sets fastfuse up: installed, or the source tree linked as a package)

import torch  # noqa: E402

from _common import CsvRows, cuda_timed, device_name, free_cuda  # noqa: E402
from bench_loss import LM_WEIGHT, copy_bandwidth, make_inputs  # noqa: E402
from fastfuse.kernels import divergence, fused_ce  # noqa: E402
from fastfuse.kernels.launch import forced  # noqa: E402
from fastfuse.loss.logits_loss import fused_loss  # noqa: E402

DIV_CASES = {"ce/bucket": dict(divergence="ce", tail="bucket"),
             "reverse_kl/renormalize": dict(divergence="reverse_kl", tail="renormalize"),
             "jsd/uniform": dict(divergence="jsd", tail="uniform", beta=0.5)}


def jobs(tiny: bool):
    """``(kernel, shape label, N, V, config, case)`` of every measurement, in order."""
    big, small = ((16, 40000), (32, 1000)) if tiny else ((16384, 128256), (16384, 32000))
    out = [("fused_ce", f"{big[0]} x {big[1]}", *big, c, None) for c in fused_ce.CANDIDATES["two_pass"]]
    out += [("fused_ce", f"{small[0]} x {small[1]}", *small, c, None) for c in fused_ce.CANDIDATES["one_block"]]
    for go in ("0.5", "1"):
        out += [("rescale", f"{big[0]} x {big[1]} grad_output {go}", *big, c, go) for c in fused_ce.RESCALES]
    dv = (8, 5000) if tiny else big
    for case in DIV_CASES:
        out += [("divergence", f"{dv[0]} x {dv[1]} {case}", *dv, c, case) for c in divergence.LAUNCHES]
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
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--csv", default=None)
    ap.add_argument("--table", default=None, help="write the winners here (launch_tuned.json's format)")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warm-jobs", type=int, default=8)
    ap.add_argument("--tiny", action="store_true", help="CPU dry run (TRITON_INTERPRET=1): tiny shapes")
    a = ap.parse_args(argv)
    if not (a.tiny or torch.cuda.is_available()):
        sys.exit("gpu_candidates.py needs CUDA (or --tiny under TRITON_INTERPRET=1)")
    iters = 1 if a.tiny else a.iters
    todo = jobs(a.tiny)
    if a.warm_jobs > 1:         # (the dry run: the first two, to prove the parallel path)
        warm(todo[:2] if a.tiny else todo, 2 if a.tiny else a.warm_jobs)
    bw = copy_bandwidth()
    print(f"device: {device_name()}  copy bandwidth {bw / 1e12:.2f} TB/s; fused_loss fwd+bwd, bf16, median of {iters}")
    sink = CsvRows(a.csv, ["kernel", "shape", "config", "ms", "floor_ms", "current"])
    best: dict = {}
    div_total: dict = {}
    data_key, d = None, None
    for kernel, shape, N, V, config, case in todo:
        if data_key != (N, V):
            d, data_key = None, (N, V)
            free_cuda()
            d = make_inputs(N, V)
        step = step_fn(kernel, config, case, d)
        step()                                      # warm-up (and, without --warm-jobs, the compile)
        ms = sorted(cuda_timed(step)[0] for _ in range(iters))[iters // 2]
        floor = 2 * N * V * 2 / bw * 1e3
        cur = config == current(kernel, V)
        sink.add(dict(kernel=kernel, shape=shape, config=config, ms=f"{ms:.4f}", floor_ms=f"{floor:.4f}", current=cur))
        print(f"{kernel:<11} {shape:<34} {config:<22} {ms:9.3f} ms  {floor / ms:6.1%} of floor"
              f"{'  (today)' if cur else ''}", flush=True)
        b = best.setdefault((kernel, shape), dict(kernel=kernel, shape=shape, winner=config, ms=ms))
        if ms < b["ms"]:
            b.update(winner=config, ms=ms)
        if cur:
            b.update(current=config, current_ms=ms)
        if kernel == "divergence":
            div_total[config] = div_total.get(config, 0.0) + ms
    winners = list(best.values())
    print("\nwinners:")
    for w in winners:
        print(f"  {w['kernel']:<11} {w['shape']:<34} {w['winner']:<22} {w['ms']:.3f} ms "
              f"(today's {w['current']}: {w['current_ms']:.3f} ms)")
    if a.csv:
        out = CsvRows(os.path.join(os.path.dirname(os.path.abspath(a.csv)), "candidates_winners.csv"),
                      ["kernel", "shape", "winner", "ms", "current", "current_ms"])
        for w in winners:
            out.add(w)
    if a.table:
        write_table(a.table, winners, div_total, a.tiny)
    return 0


def write_table(path: str, winners: list[dict], div_total: dict, dry: bool):
    """The winners as ``launch_tuned.json`` entries: the fused_ce two-pass / one-block shapes by V
    class (bf16, measured), the rescale at a factor to apply, the divergence launch with the least
    total time over its cases."""
    arch = str(torch.cuda.get_device_capability()[0]) if torch.cuda.is_available() else "9"
    table = {"measured_on": device_name(), "dry_run": dry, "fused_ce": {}, "divergence": {}, "rescale": {}}
    for w in winners:
        if w["kernel"] == "fused_ce":
            V = int(w["shape"].split(" x ")[1])
            vclass = "one_block" if V <= fused_ce.SINGLE_BLOCK_MAX_V else "two_pass"
            table["fused_ce"][f"{vclass}/bf16/{arch}"] = w["winner"]
        elif w["kernel"] == "rescale" and w["shape"].endswith("grad_output 0.5"):
            table["rescale"][arch] = w["winner"]
    if div_total:
        table["divergence"][arch] = min(sorted(div_total), key=div_total.get)
    with open(path + ".tmp", "w") as f:
        json.dump(table, f, indent=1)
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    sys.exit(main())
