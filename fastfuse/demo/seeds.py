"""The demo over several seeds: ``run_seeds`` runs :func:`run_demo` per seed and ``summarize`` turns the
per-seed figures into mean +- s.d. per target and, for every fused target, its margin over each
control with the number of seeds it wins; ``summary_report`` is the table, ``save_summary_plot`` the
picture (each seed's margin as a dot)."""
from __future__ import annotations

import math
from typing import Any
from pathlib import Path

from fastfuse.demo.report import mode_name, pyplot, settings_name
from fastfuse.demo.run import run_demo

CONTROLS = ("clm_only", "label_smoothing", "best_single")
CONTROL_NAMES = {"clm_only": "CLM-only", "label_smoothing": "label smoothing", "best_single": "best single teacher",
                 "fused": "fused", "off_policy": "same, off-policy"}


def mean_sd(xs: list[float]) -> dict:
    """Mean and sample standard deviation (``sd`` None for a single value)."""
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else None
    return {"mean": m, "sd": sd, "n": len(xs)}


def control_bpb(f: dict, control: str) -> float:
    """A seed's bits/byte of a control; ``best_single`` is that seed's best single-source KD target."""
    if control == "best_single":
        return min(v for m, v in f["bpb"].items() if m.startswith("single "))
    return f["bpb"][control]           # "fused" too: a variant's margin over the fused target


def off_policy_twin(f: dict, mode: str) -> str | None:
    """The variant trained like on-policy variant ``mode`` but for its on-policy share (an ``init="fused"``
    second stage's control: the same stage off-policy), or None (a first-stage variant's is ``fused``)."""
    variants = f.get("variant_settings", {})
    settings = variants.get(mode[len("variant "):], {})
    if not (settings.get("on_policy") and settings.get("init")):
        return None
    want = {k: v for k, v in settings.items() if k not in ("on_policy", "online")}
    for name, other in variants.items():
        if not other.get("on_policy") and {k: v for k, v in other.items() if k != "online"} == want:
            return f"variant {name}"
    return None


def summarize(per_seed: list[dict]) -> dict:
    """Mean +- s.d. of every target's held-out bits/byte (overall and per domain) over the seeds, and for
    the fused target and each variant: its margin over each control (negative = fused better; mean +- s.d.
    over seeds), the seeds it wins, and the margin relative to the spread (mean / s.d.); a variant also
    against the fused target."""
    modes = list(per_seed[0]["bpb"])
    domains = list(per_seed[0]["heldout"])
    out: dict[str, Any] = {"seeds": [f["seed"] for f in per_seed], "bpb": {}, "bpb_by_domain": {}, "margins": {},
           "per_seed_vs_clm": {m: [f["bpb"][m] - f["bpb"]["clm_only"] for f in per_seed] for m in modes}}
    for m in modes:
        out["bpb"][m] = mean_sd([f["bpb"][m] for f in per_seed])
        out["bpb_by_domain"][m] = {d: mean_sd([f["bpb_by_domain"][m][d] for f in per_seed]) for d in domains}
    for m in modes:
        if not (m == "fused" or m.startswith("variant ")):
            continue
        out["margins"][m] = {}
        twin = off_policy_twin(per_seed[0], m) if m != "fused" else None
        for c in CONTROLS + (("fused",) if m != "fused" else ()) + (("off_policy",) if twin else ()):
            # a variant is also read against the fused target, an on-policy second stage against its off-policy twin
            diffs = [f["bpb"][m] - (f["bpb"][twin] if c == "off_policy" else control_bpb(f, c)) for f in per_seed]
            stats = mean_sd(diffs)
            stats["wins"] = sum(d < 0 for d in diffs)
            stats["per_seed"] = diffs
            out["margins"][m][c] = stats
    return out


def _fmt(s: dict, digits: int = 4) -> str:
    return f"{s['mean']:.{digits}f}" + (f" ± {s['sd']:.{digits}f}" if s["sd"] is not None else "")


def summary_report(summary: dict, per_seed: list[dict]) -> str:
    """The several-seed table: bits/byte per target (mean ± s.d.) overall and per domain, then the fused
    targets' margins over each control with their wins."""
    domains = list(per_seed[0]["heldout"])
    n = len(summary["seeds"])
    lines = ["", f"over {n} seeds ({', '.join(map(str, summary['seeds']))}): held-out bits/byte, mean ± s.d.", ""]
    head = ("target", "all", *domains)
    rows = [head] + [(mode_name(m), _fmt(s), *(_fmt(summary["bpb_by_domain"][m][d]) for d in domains))
                     for m, s in summary["bpb"].items()]
    w = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines += ["  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(r)) for r in rows]
    lines.append("")
    for m, margins in summary["margins"].items():
        settings = per_seed[0]["fused_settings"] if m == "fused" else per_seed[0]["variant_settings"][m[8:]]
        lines.append(f"{mode_name(m)} ({settings_name(settings)}):")
        for c, s in margins.items():
            ratio = "" if not s["sd"] else f", mean/s.d. {s['mean'] / s['sd']:+.1f}"
            lines.append(f"  vs {CONTROL_NAMES[c]:<20} {_fmt(s)} bits/byte, wins {s['wins']}/{s['n']} seeds{ratio}")
    return "\n".join(lines)


def save_summary_plot(summary: dict, path: str, log=print) -> str | None:
    """PNG, one dot per seed and the mean ± s.d.: top, each target's held-out bits/byte minus CLM-only's;
    bottom, each fused target's margin over label smoothing and over the best single teacher (the paired
    comparisons the claim rests on)."""
    plt = pyplot(log)
    if plt is None:
        return None
    modes = [m for m in summary["bpb"] if m != "clm_only"]
    pairs = [(m, c) for m in summary["margins"] for c in ("label_smoothing", "best_single", "off_policy")
             if c in summary["margins"][m]]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 0.42 * (len(modes) + len(pairs)) + 2.6),
                                      height_ratios=[len(modes), len(pairs)])

    def dots(ax, rows, labels):
        for i, diffs in enumerate(rows):
            ax.scatter(diffs, [i] * len(diffs), color="tab:gray", s=14, zorder=2)
            s = mean_sd(diffs)
            ax.errorbar(s["mean"], i, xerr=s["sd"] or 0, fmt="o", color="tab:blue", capsize=4, zorder=3)
        ax.axvline(0, color="black", lw=0.8)
        ax.set_yticks(range(len(labels)), labels)
        ax.invert_yaxis()

    dots(top, [summary["per_seed_vs_clm"][m] for m in modes], [mode_name(m) for m in modes])
    top.set_xlabel("bits/byte minus CLM-only's (left is better)")
    dots(bottom, [summary["margins"][m][c]["per_seed"] for m, c in pairs],
         [f"{mode_name(m)} − {CONTROL_NAMES[c]}" for m, c in pairs])
    bottom.set_xlabel("fused minus control, bits/byte (left of 0: fused better)")
    fig.suptitle(f"fastfuse demo over {len(summary['seeds'])} seeds (dots: seeds; bars: mean ± s.d.)")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def run_seeds(seeds: list[int], workdir: str | None = None, plot: str | None = None, log=print, **kwargs) -> dict:
    """:func:`run_demo` for each seed (``workdir/seed-N``), then the summary over seeds; returns
    ``{"seeds", "per_seed", "summary", "plot"}``. ``kwargs`` go to ``run_demo``."""
    if not seeds:
        raise ValueError("seeds: expected at least one seed")
    per_seed = []
    for seed in seeds:
        wd = str(Path(workdir) / f"seed-{seed}") if workdir else None
        log(f"=== seed {seed} ===")
        per_seed.append(run_demo(seed=seed, workdir=wd, log=log, plot=None if plot is None or len(seeds) > 1 else plot,
                                 **kwargs))
    summary = summarize(per_seed)
    out = {"seeds": list(seeds), "per_seed": per_seed, "summary": summary, "plot": None}
    if len(seeds) > 1:
        log(summary_report(summary, per_seed))
        target = plot or str(Path(workdir or per_seed[0]["workdir"]) / "seeds.png")
        out["plot"] = save_summary_plot(summary, target, log)
        if out["plot"]:
            log(f"plot: {out['plot']}")
    return out
