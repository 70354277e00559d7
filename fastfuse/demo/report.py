"""The demo's output: the table the command prints (``report``) and the PNG of the training curves
(``save_plot``)."""
from __future__ import annotations

from pathlib import Path

from fastfuse.loss.spec import LOSS_OPTIONS


def pyplot(log=print):
    """``matplotlib.pyplot`` on the file-only Agg backend, or ``None`` (and a message) without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("plot: matplotlib is not installed (pip install matplotlib); no plot written")
        return None
    return plt


def save_plot(curves: dict, path: str, log=print) -> str | None:
    """PNG of both targets' training CE and held-out loss; ``None`` (and a message) without matplotlib."""
    plt = pyplot(log)
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:gray"]
    for i, (mode, c) in enumerate(curves.items()):
        if i >= len(colors):            # variants beyond eight: the table has them, the plot stays readable
            break
        color = colors[i]
        train_ce = [float("nan") if x is None else x for x in c["train_ce"]]      # None: an on-policy step
        ax.plot(c["step"], train_ce, color=color, alpha=0.3, lw=0.8)
        ax.plot(c["eval_step"], c["eval_loss"], "o-", color=color, label=f"{mode_name(mode)}: held-out CE")
    ax.set_xlabel("target training step")
    ax.set_ylabel("CE per target token (nats; faint: train batches)")
    ax.set_title("fastfuse demo: the fused target and its controls")
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def settings_name(s: dict) -> str:
    """A fused target's settings in a few words: weighting, divergence/tail, lm_weight, temperature."""
    loss = s["divergence"] + ("" if s.get("tail", "renormalize") == "renormalize" else f"/{s['tail']} tail")
    for k in LOSS_OPTIONS:
        if k not in ("divergence", "tail") and s.get(k) is not None:
            loss += f" {k} {s[k]}"
    how = ", online teachers" if s.get("online") else ""
    if s.get("on_policy"):
        how += f", on-policy share {s['on_policy']} (its batches: the target's continuations, lm_weight 0)"
    if s.get("init") == "fused":
        how += ", a 2nd stage from the trained fused target"
    return f"{s['fusion']}, {loss}, lm_weight {s['lm_weight']}, T {s['temperature']}{how}"


MODE_NAMES = {"clm_only": "CLM-only", "label_smoothing": "CLM + label smoothing", "fused": "fused"}


def mode_name(mode: str) -> str:
    if mode.startswith("single "):
        return f"KD from {mode[7:]} only"
    if mode.startswith("variant "):
        return f"fused, {mode[8:]}"
    return MODE_NAMES.get(mode, mode)


def report(f: dict) -> str:
    """The table one seed prints: every model's held-out bits/byte, overall and per domain."""
    domains = list(f["heldout"])
    head = ("model", "tokenizer", "held-out CE/token", "bits/byte", *(f"{d} b/B" for d in domains))
    rows = [head]
    for name, s in f["sources"].items():
        ev = s["eval"]
        rows.append((f"source {name} ({s['domain']} expert)", s["tokenizer"], f"{ev['loss']:.4f}", f"{ev['bpb']:.4f}",
                     *(f"{ev['domains'][d]['bpb']:.4f}" for d in domains)))
    t = f["target"]
    rows.append(("target at init", t["tokenizer"], f"{t['init']['loss']:.4f}", f"{t['init']['bpb']:.4f}",
                 *(f"{t['init']['domains'][d]['bpb']:.4f}" for d in domains)))
    for mode, r in f["targets"].items():
        rows.append((f"target {mode_name(mode)}", t["tokenizer"], f"{r['loss']:.4f}", f"{r['bpb']:.4f}",
                     *(f"{r['domains'][d]['bpb']:.4f}" for d in domains)))
    w = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["", "  ".join(c.ljust(w[i]) for i, c in enumerate(head)), "  ".join("-" * x for x in w)]
    lines += ["  ".join(c.ljust(w[i]) if i < 2 else c.rjust(w[i]) for i, c in enumerate(r)) for r in rows[1:]]
    lines.append("(CE per token is in each model's own tokenisation: compare bits/byte across tokenizers; every "
                 "target: same init, same batches)")
    bpb = f["bpb"]
    lines.append(f"fused: {settings_name(f['fused_settings'])}; label smoothing eps {f['label_smoothing']:.4f} "
                 "= (1 - lm_weight) x the fused teacher's mean missing top-k mass")
    singles = {m: v for m, v in bpb.items() if m.startswith("single ")}
    best = min(singles, key=lambda m: singles[m])
    for ctrl in ("clm_only", "label_smoothing", best):
        d = bpb["fused"] - bpb[ctrl]
        lines.append(f"fused - {mode_name(ctrl)}: {d:+.4f} bits/byte ({'fused is better' if d < 0 else 'fused is NOT better'})")
    for mode in (m for m in bpb if m.startswith("variant ")):
        lines.append(f"{mode_name(mode)} - fused: {bpb[mode] - bpb['fused']:+.4f} bits/byte "
                     f"({settings_name(f['variant_settings'][mode[8:]])})")
    lines.append("")
    lines.append("mean source weight per domain of the fusion corpus (MinCE: share of sequences picked):")
    for fusion, sh in f["weights"].items():
        lines.append(f"  {fusion}: " + "; ".join(f"{d}: " + ", ".join(f"{n} {v:.2f}" for n, v in ws.items())
                                                for d, ws in sh["by_domain"].items()))
    te = f["teachers"]
    lines.append("teachers on the fusion corpus (1-to-1 aligned positions): gold target token in the mapped top-"
                 f"{f['preset']['k']}: " + ", ".join(f"{n} {v:.1%}" for n, v in te["gold_in_topk"].items())
                 + "; mass of the top-k: " + ", ".join(f"{n} {v:.1%}" for n, v in te["topk_mass"].items()))
    lines.append("alignment coverage (per source):")
    for name, cov in f["coverage"].items():
        lines.append("  " + name + ": " + ", ".join(f"{k} {v:.3f}" if k != "positions" else f"{k} {int(v)}"
                                                    for k, v in sorted(cov.items())))
    lines.append("time per stage (s): " + ", ".join(f"{k} {v:.1f}" for k, v in f["seconds"].items()))
    if f.get("plot"):
        lines.append(f"plot: {f['plot']}")
    return "\n".join(lines)
