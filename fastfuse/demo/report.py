"""The demo's output: the table the command prints (``report``) and the PNG of the training curves
(``save_plot``)."""
from __future__ import annotations

from pathlib import Path


def save_plot(curves: dict, path: str, log=print) -> str | None:
    """PNG of both targets' training CE and held-out loss; ``None`` (and a message) without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("plot: matplotlib is not installed (pip install matplotlib); no plot written")
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:gray"]
    for i, (mode, c) in enumerate(curves.items()):
        if i >= len(colors):            # variants beyond eight: the table has them, the plot stays readable
            break
        color = colors[i]
        ax.plot(c["step"], c["train_ce"], color=color, alpha=0.4, label=f"{mode}: train CE (batch)")
        ax.plot(c["eval_step"], c["eval_loss"], "o-", color=color, label=f"{mode}: held-out CE")
    ax.set_xlabel("target training step")
    ax.set_ylabel("cross-entropy per target token (nats)")
    ax.set_title("fastfuse demo: CLM-only vs fused target" + (" (and baselines)" if len(curves) > 2 else ""))
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def _loss_name(spec: dict | None) -> str:
    if not spec:
        return "CE"
    name = spec["divergence"] + ("" if spec["tail"] == "renormalize" else f"/{spec['tail']} tail")
    return name + (f" ({'beta' if spec['divergence'] == 'jsd' else 'alpha'} {spec['mix']})" if spec["mix"] else "")


def report(f: dict) -> str:
    """The table the command prints."""
    p, t = f["preset"], f["target"]
    rows = [("model", "tokenizer", "trained on", "held-out CE/token", "bits/byte")]
    for name, s in f["sources"].items():
        rows.append((f"source {name}", s["tokenizer"], f"half: {s['train_documents']} docs, {p['src_steps']} steps",
                     f"{s['eval_loss']:.4f}", f"{s['eval_bpb']:.4f}"))
    fusion = f"fusion corpus: {f['train']['fusion_documents']} docs"
    rows.append(("target at init", t["tokenizer"], "(unigram of its text)", f"{t['init_eval_loss']:.4f}",
                 f"{t['init_eval_bpb']:.4f}"))
    for mode in ("clm_only", "fused"):
        rows.append((f"target {mode.replace('_', '-')}", t["tokenizer"], f"{fusion}, {p['tgt_steps']} steps",
                     f"{f[mode + '_eval_loss']:.4f}", f"{f[mode + '_eval_bpb']:.4f}"))
    for name, bpb in (f.get("single_source_eval_bpb") or {}).items():
        rows.append((f"target KD from {name} only", t["tokenizer"], f"{fusion}, {p['tgt_steps']} steps",
                     f"{t['single ' + name]['loss']:.4f}", f"{bpb:.4f}"))
    for name, v in (f.get("variants") or {}).items():
        rows.append((f"target fused, {name}", t["tokenizer"], f"{fusion}, {p['tgt_steps']} steps",
                     f"{v['eval_loss']:.4f}", f"{v['eval_bpb']:.4f}"))
    w = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["", "  ".join(c.ljust(w[i]) for i, c in enumerate(rows[0])), "  ".join("-" * x for x in w)]
    lines += ["  ".join(c.ljust(w[i]) if i < 3 else c.rjust(w[i]) for i, c in enumerate(r)) for r in rows[1:]]
    lines.append("(CE per token is in each model's own tokenisation: compare bits/byte across tokenizers)")
    d = f["fused_eval_loss"] - f["clm_only_eval_loss"]
    db = f["fused_eval_bpb"] - f["clm_only_eval_bpb"]
    lines.append(f"fused - CLM-only on held-out: {d:+.4f} nats/token, {db:+.4f} bits/byte "
                 f"({100 * db / f['clm_only_eval_bpb']:+.1f}%; {'fused is better' if d < 0 else 'fused is NOT better'}; "
                 f"MinCE, top-{p['k']}, lm_weight {p['lm_weight']}, temperature {p['temperature']}, "
                 f"{_loss_name(f.get('loss'))}, same init, same batches)")
    singles = f.get("single_source_eval_bpb")
    if singles:
        name, bpb = min(singles.items(), key=lambda kv: kv[1])
        lines.append(f"fused - best single-source KD ({name}): {f['fused_eval_bpb'] - bpb:+.4f} bits/byte "
                     f"({'fusion beats' if f['fused_eval_bpb'] < bpb else 'fusion does NOT beat'} the best single teacher)")
    c, u = t["clm_only"], t["fused"]
    if "unseen_rate" in c:
        lines.append(f"  on the {100 * (1 - c['unseen_rate']):.1f}% of held-out tokens whose type occurs in the fusion "
                     f"corpus: {u['loss_seen'] - c['loss_seen']:+.4f} nats/token; on the other "
                     f"{100 * c['unseen_rate']:.1f}% (types absent from the fusion corpus): "
                     f"{u['loss_unseen'] - c['loss_unseen']:+.4f}")
    best = min(s["eval_bpb"] for s in f["sources"].values())
    te = f.get("teachers", {})
    if te:
        lines.append("teachers on the fusion corpus (1-to-1 aligned positions): gold target token in the mapped top-"
                     f"{p['k']}: " + ", ".join(f"{n} {v:.1%}" for n, v in te["gold_in_topk"].items())
                     + "; mass of the top-k: " + ", ".join(f"{n} {v:.1%}" for n, v in te["topk_mass"].items()))
    if d > -0.02:
        lines.append(f"note: no clear gain (under 0.02 nats/token). Fusion helps when the sources know more than the "
                     f"target can learn from its own text: here the best source reaches {best:.3f} bits/byte against "
                     f"{f['clm_only_eval_bpb']:.3f} for the CLM-only target, with the gold token in its mapped top-"
                     f"{p['k']} as above. Weaker sources (fewer --src-steps), a target that reads as much text as "
                     "the sources, or lm_weight near 1 shrink the gain.")
    lines.append("")
    lines.append("alignment coverage (per source):")
    for name, cov in f["coverage"].items():
        lines.append("  " + name + ": " + ", ".join(f"{k} {v:.3f}" if k != "positions" else f"{k} {int(v)}"
                                                    for k, v in sorted(cov.items())))
    lines.append("  MinCE picks per sequence: " + ", ".join(f"{n} {v}" for n, v in f["minCE_picks"].items()))
    lines.append("")
    lines.append("time per stage (s): " + ", ".join(f"{k} {v:.1f}" for k, v in f["seconds"].items()))
    if f.get("plot"):
        lines.append(f"plot: {f['plot']}")
    return "\n".join(lines)
