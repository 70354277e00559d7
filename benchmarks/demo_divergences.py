"""The demo's fused target under every divergence x tail, on the same data, init and batches.

    python benchmarks/demo_divergences.py [--seed 0] [--size small] [--workdir DIR] [--json PATH]

One ``fastfuse demo`` run (sources, extraction, alignment, the controls and the default fused target) plus
one more fused target per (divergence, tail) through ``run_demo(variants=...)``, each with the demo's
default weighting, lm_weight and temperature; prints a markdown table of held-out bits/byte, each with its
difference to CLM-only. About a minute per variant on the 2-core CPU machine (small preset).
"""
from __future__ import annotations

import argparse
import itertools
import json

from fastfuse.demo import run_demo
from fastfuse.loss.spec import DIVERGENCES, TAILS, lookup


def variants() -> dict:
    return {f"{d}/{t}": dict(tail=t, **lookup(d).options()) for d, t in itertools.product(DIVERGENCES, TAILS)}


def table(f: dict) -> str:
    clm = f["bpb"]["clm_only"]
    bpb = {k: f["bpb"][f"variant {k}"] for k in variants()}
    lines = ["| divergence | " + " | ".join(TAILS) + " |", "|---|" + "---|" * len(TAILS)]
    for d in DIVERGENCES:
        cells = [f"{bpb[f'{d}/{t}']:.4f} ({bpb[f'{d}/{t}'] - clm:+.4f})" for t in TAILS]
        mix = lookup(d).mix
        lines.append(f"| {d}{f' ({mix} {lookup(d).mix_default})' if mix else ''} | "
                     + " | ".join(cells) + " |")
    lines.append(f"\nCLM-only: {clm:.4f} bits/byte, label smoothing {f['bpb']['label_smoothing']:.4f} (seed {f['seed']}, "
                 f"{f['size']} preset, {f['fused_settings']['fusion']}, lm_weight {f['fused_settings']['lm_weight']}, "
                 f"temperature {f['fused_settings']['temperature']})")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", default="small")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    f = run_demo(size=args.size, device=args.device, seed=args.seed, workdir=args.workdir, progress=False,
                 variants=variants())
    print(table(f))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(f, fh, indent=2)
    return f


if __name__ == "__main__":
    main()
