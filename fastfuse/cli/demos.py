"""``fastfuse demo`` (the main job: CLM-only vs fused target) and ``fastfuse align-demo``."""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from fastfuse.loss.spec import DIVERGENCES, LOSS_OPTIONS, REGISTRY, TAILS      # torch-free: --help stays fast
from fastfuse.extras import require

FUSIONS = ("min_ce", "avg_ce", "min_ce_norm", "avg_ce_norm", "equal", "token")   # fastfuse.batches.dataset.FUSIONS (torch)

PRESET_NAMES = ("tiny", "small", "large")     # fastfuse.demo.PRESETS (not imported: --help stays torch-free)
OVERRIDES = ("src_steps", "tgt_steps", "lm_weight", "temperature")



def demo_overrides(args: argparse.Namespace) -> dict:
    """The preset fields the command line sets."""
    return {f: getattr(args, f) for f in OVERRIDES if getattr(args, f, None) is not None}


def fused_settings(args: argparse.Namespace) -> dict:
    """The fused target's settings the command line sets (the rest: ``fastfuse.demo.DEFAULT_FUSED``)."""
    return {k: getattr(args, k) for k in ("fusion", *LOSS_OPTIONS) if getattr(args, k, None) is not None}


def demo_variants(args: argparse.Namespace) -> dict:
    """The extra fused targets ``--online`` / ``--on-policy`` ask for (over the fused target's settings)."""
    variants: dict = {}
    if args.online:
        variants["online"] = {"online": True}
    if args.on_policy is not None:
        if not 0.0 < args.on_policy <= 1.0:
            raise ValueError(f"--on-policy: expected a share in (0, 1], got {args.on_policy}")
        variants[f"on-policy {args.on_policy:g}"] = {"on_policy": args.on_policy}
    return variants


def _demo(args: argparse.Namespace) -> dict:
    from fastfuse.demo import run_seeds

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.seeds < 1:
        raise ValueError(f"--seeds: expected a number >= 1, got {args.seeds}")
    device = args.device or "cpu"
    size = args.size or ("large" if device.startswith("cuda") else "small")
    require("torch", "transformers")
    if not args.quiet:  # before torch loads: the first seconds are never silent
        print(f"fastfuse demo: the '{size}' preset on {device}, seed {args.seed} ({args.seeds} seed(s)); loading torch "
              "and the tokenizers (the first run downloads their vocabulary files once)", flush=True)
    out = run_seeds(list(range(args.seed, args.seed + args.seeds)), workdir=args.workdir, plot=args.plot, size=size,
                    device=device, threads=args.threads, progress=not args.quiet, overrides=demo_overrides(args),
                    fused=fused_settings(args), variants=demo_variants(args))
    figures = out["per_seed"][0] if args.seeds == 1 else out
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
        print(f"json: {args.json}")
    return figures


def add_demo(subparsers) -> None:
    p = subparsers.add_parser(
        "demo", help="end-to-end fusion on text that ships with Python: a prose and a code expert, the fused target "
                     "and its controls",
        description="A real end-to-end fusion on an embedded corpus, in minutes on a CPU: two sources pre-trained "
                    "on different domains (prose, code), a target trained CLM-only, with label smoothing, distilled "
                    "from each source alone, and fused; held-out bits/byte overall and per domain.")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--size", choices=PRESET_NAMES, default=None,
                   help="preset: tiny (seconds, for tests), small (CPU default), large (CUDA default)")
    p.add_argument("--seed", type=int, default=0, help="seeds the models and draws the documents (default 0; the first "
                                                       "of --seeds)")
    p.add_argument("--seeds", type=int, default=1, help="run this many seeds (--seed, --seed + 1, ...) and report "
                                                        "mean ± s.d. and wins per comparison")
    p.add_argument("--workdir", default=None, help="where shards and alignments go (default: a new temp dir)")
    p.add_argument("--json", default=None, metavar="PATH", help="write the figures as JSON (every seed's and the "
                                                                 "summary with --seeds > 1)")
    p.add_argument("--plot", default=None, metavar="PATH", help="PNG of the training curves (one seed) or of every "
                                                                 "target's margin per seed (default: under WORKDIR)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: all cores)")
    p.add_argument("--src-steps", type=int, default=None, help="override the preset's source pre-training steps")
    p.add_argument("--tgt-steps", type=int, default=None, help="override the preset's target training steps")
    p.add_argument("--lm-weight", type=float, default=None, help="override the preset's lm_weight")
    p.add_argument("--temperature", type=float, default=None, help="override the preset's teacher temperature")
    p.add_argument("--fusion", default=None, choices=FUSIONS,
                   help="how the fused target weights the sources (default: fastfuse.demo.DEFAULT_FUSED's)")
    p.add_argument("--divergence", default=None, choices=DIVERGENCES, help="the fused target's divergence")
    p.add_argument("--tail", default=None, choices=TAILS, help="what the teacher's missing top-k mass means")
    for mix in ("alpha", "beta"):
        users = " / ".join(d.name for d in REGISTRY if d.mix == mix)
        p.add_argument(f"--{mix}", type=float, default=None, help=f"{users} mixing weight in (0, 1)")
    p.add_argument("--student-temperature", type=float, default=None, help="the student's temperature in the "
                                                                            "divergence term")
    p.add_argument("--online", action="store_true", help="add a fused target whose teachers score each batch "
                                                           "while it trains (no shards): it should match the fused one")
    p.add_argument("--on-policy", type=float, default=None, metavar="LAMBDA",
                   help="add a fused target that trains this share of its batches (GKD's lambda, in (0, 1]) on its "
                        "own continuations, scored by the teachers online")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_demo)


def _print_alignment(result: dict) -> None:
    print(f"\nTarget {result['target']} (vocab {result['target_vocab']}), corpus: {result['docs']} pydoc topics, "
          f"{result['target_tokens']} target tokens, vocab map mode '{result['vocab_mode']}'\n")
    head = f"{'source':<11}{'vocab':>8}{'tokens':>9}{'1-to-1':>9}{'+vocab':>9}{'exact voc':>11}{'mapped voc':>12}" \
           f"{'align s':>9}{'Mtok/s':>8}{'vocab s':>9}"
    print(head)
    print("-" * len(head))
    for r in result["sources"]:
        print(f"{r['source']:<11}{r['source_vocab']:>8}{r['source_tokens']:>9}{r['aligned_1to1']:>9.1%}"
              f"{r['aligned_and_vocab_mapped']:>9.1%}{r['vocab_exact_rate']:>11.1%}{r['vocab_mapped_rate']:>12.1%}"
              f"{r['seconds_align']:>9.3f}{r['align_tokens_per_s'] / 1e6:>8.1f}{r['seconds_vocab_map']:>9.2f}")
    print("\n1-to-1: target positions whose next token has a source token with the same bytes;"
          "\n+vocab: ... and that source token maps to the target's token through the vocab map.")


def _align_demo(args: argparse.Namespace) -> dict:
    from fastfuse.demo.alignment import measure_alignment

    result = measure_alignment(args.target, args.sources, mode=args.mode, max_docs=args.docs,
                               num_threads=args.threads, progress=not args.quiet)
    if not args.quiet:
        _print_alignment(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


def add_align_demo(subparsers) -> None:
    from fastfuse.demo.alignment import DEFAULT_SOURCES, DEFAULT_TARGET

    p = subparsers.add_parser("align-demo", help="align real tokenizers on Python's own documentation and print coverage",
                              description="Align the real tokenizers of several model families to a target "
                                          "tokenizer on Python's own documentation (pydoc_data) and print, per "
                                          "source, the share of 1-to-1 aligned positions, the vocabulary map "
                                          "rates and the timings. No model is involved.")
    p.add_argument("--target", default=DEFAULT_TARGET, help=f"target tokenizer (default {DEFAULT_TARGET})")
    p.add_argument("--sources", nargs="+", default=list(DEFAULT_SOURCES), help="source tokenizers")
    p.add_argument("--mode", choices=["exact", "mined"], default="exact", help="vocabulary map mode")
    p.add_argument("--docs", type=int, default=None, help="use only the first N documents")
    p.add_argument("--threads", type=int, default=0, help="threads (0 = all cores)")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    p.add_argument("--quiet", action="store_true", help="no progress bar, no table")
    p.set_defaults(func=_align_demo)
