"""The demo's fused target against its controls over several seeds, with other fusion settings as variants
(the measurement behind the demo's and the library's defaults; benchmarks/RESULTS.md "Fusion quality").

    python benchmarks/demo_fusion.py --seeds 0 1 2 3 4 --out results/fusion [--threads 1] [--variants lm_weight]
    python benchmarks/demo_fusion.py --summarize results/fusion

Each seed is one ``run_demo`` (sources, extraction, alignment, then every target from the same init on the same
batches: CLM-only, label smoothing, KD from each source alone, fused, and the variants below), written to
``OUT/seed-N.json`` as it finishes, so seeds can run in several processes and a cut run keeps what it measured.
``--lm-weight`` / ``--fusion`` change the fused target *and* its controls (single-teacher KD uses the fused
loss; label smoothing its implied strength). ``--summarize`` reads every ``seed-N.json`` there and prints the
table over seeds (mean ± s.d., wins); ``OUT/summary.json`` and ``OUT/seeds.png`` are written either way.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from fastfuse.demo import run_demo, summarize
from fastfuse.demo.seeds import save_summary_plot, summary_report

# each set changes one thing of the fused target (settings over its own); its controls stay
VARIANT_SETS = {
    "lm_weight": {                       # benchmarks/demo_fusion_summary.json (the demo's default, lm_weight 0.3)
        "lm_weight 0.5 (the former default)": {"lm_weight": 0.5},
        "lm_weight 0.2": {"lm_weight": 0.2},
    },
    "weightings": {                      # benchmarks/demo_fusion_weightings_summary.json (--lm-weight 0.5 --fusion min_ce)
        "token choice": {"fusion": "token"},
        "MinCE per target token": {"fusion": "min_ce_norm"},
        "equal weights": {"fusion": "equal"},
        "renormalized top-k (FuseLLM's tail)": {"tail": "renormalize"},
    },
    "second_stage": {                    # benchmarks/demo_on_policy_stage2_summary.json: on-policy where it is meant
        # to help, on a target that already writes text -- each starts from the trained fused target and
        # trains tgt_steps more; the on-policy one is read against the same stage off-policy
        "2nd stage": {"init": "fused"},
        "on-policy 0.5, 2nd stage": {"init": "fused", "on_policy": 0.5},
    },
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2, 3, 4])
    ap.add_argument("--out", default="results/fusion", help="folder of the per-seed JSON files")
    ap.add_argument("--size", default="small")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--variants", choices=sorted(VARIANT_SETS), default="lm_weight")
    ap.add_argument("--lm-weight", type=float, default=None, help="the fused target's and its controls' (default: the preset's)")
    ap.add_argument("--fusion", default=None, help="the fused target's weighting (default: the demo's)")
    ap.add_argument("--summarize", default=None, metavar="DIR", help="only summarise the seed-N.json files in DIR")
    args = ap.parse_args(argv)
    out = Path(args.summarize or args.out)
    if not args.summarize:
        out.mkdir(parents=True, exist_ok=True)
        for seed in args.seeds:
            fused = {k: v for k, v in (("lm_weight", args.lm_weight), ("fusion", args.fusion)) if v is not None}
            f = run_demo(size=args.size, seed=seed, workdir=str(out / f"work-{seed}"), threads=args.threads,
                         progress=False, fused=fused, variants=VARIANT_SETS[args.variants])
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
