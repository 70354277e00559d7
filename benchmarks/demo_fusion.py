"""The demo's fused target against its controls over several seeds, with other fusion settings as variants
(the measurement behind the demo's and the library's defaults; benchmarks/RESULTS.md "Fusion quality").

    python benchmarks/demo_fusion.py --seeds 0 1 2 3 4 --out results/fusion [--threads 1]
    python benchmarks/demo_fusion.py --summarize results/fusion

Each seed is one ``run_demo`` (sources, extraction, alignment, then every target from the same init on the same
batches: CLM-only, label smoothing, KD from each source alone, fused, and the variants below), written to
``OUT/seed-N.json`` as it finishes, so seeds can run in several processes and a cut run keeps what it measured.
``--summarize`` reads every ``seed-N.json`` there and prints the table over seeds (mean ± s.d., wins).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from fastfuse.demo import run_demo, summarize
from fastfuse.demo.seeds import save_summary_plot, summary_report

# every variant keeps the demo's default loss and changes one thing (settings over DEFAULT_FUSED)
VARIANTS = {
    "token choice": {"fusion": "token"},
    "MinCE per target token": {"fusion": "min_ce_norm"},
    "equal weights": {"fusion": "equal"},
    "renormalized top-k (FuseLLM's tail)": {"tail": "renormalize"},
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2, 3, 4])
    ap.add_argument("--out", default="results/fusion", help="folder of the per-seed JSON files")
    ap.add_argument("--size", default="small")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--summarize", default=None, metavar="DIR", help="only summarise the seed-N.json files in DIR")
    args = ap.parse_args(argv)
    out = Path(args.summarize or args.out)
    if not args.summarize:
        out.mkdir(parents=True, exist_ok=True)
        for seed in args.seeds:
            f = run_demo(size=args.size, seed=seed, workdir=str(out / f"work-{seed}"), threads=args.threads,
                         progress=False, variants=VARIANTS)
            tmp = out / f"seed-{seed}.json.tmp"
            tmp.write_text(json.dumps(f, indent=1))
            tmp.replace(out / f"seed-{seed}.json")
    per_seed = sorted((json.loads(p.read_text()) for p in out.glob("seed-*.json")), key=lambda f: f["seed"])
    summary = summarize(per_seed)
    print(summary_report(summary, per_seed))
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    save_summary_plot(summary, str(out / "seeds.png"))
    return summary


if __name__ == "__main__":
    main()
