"""What ``gpu_check.py`` returns: every target with its measured ratio, read from the steps' CSVs
(the harness's schema, one dict per kernel, provider and shape: :func:`harness.pivot`).

:func:`write_all` writes ``summary.md`` / ``summary.json`` into the results folder and ``RESULTS.md``
there: a copy of ``benchmarks/RESULTS.md`` whose "GPU" section (between the ``gpu_check`` markers)
holds the measured tables (shape, provider, time, % of floor, memory). Only what a CSV row says is
written; a missing CSV (a step cut or failed) reads "not measured". Files are replaced atomically.
"""
from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET

import harness

BEGIN, END = "<!-- gpu_check:begin -->", "<!-- gpu_check:end -->"
TARGET_LOSS = (16384, 128256)           # N, V of fused_loss's targets (bf16, fwd+bwd)
TARGET_LINEAR = (8192, 4096, 128256)    # N, H, V of fused_linear_loss's
TAIL_PASS = {"jsd/uniform", "skew_kl/uniform", "skew_reverse_kl/uniform", "tvd/uniform"}


def read_csv(out: str, name: str) -> list[dict]:
    """A step's CSV as dicts: the shape's fields (N, V, ...), the extras, each metric by name (time:
    ms, extra_memory: MiB); [] when the step wrote none."""
    path = os.path.join(out, name)
    return harness.pivot(harness.read(path)) if os.path.exists(path) else []


def _f(x) -> float | None:
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def _pick(rows, **kw):
    for r in rows:
        if all(str(r.get(k)) == str(v) for k, v in kw.items()):
            return r
    return None


def targets(out: str, shapes: dict) -> list[dict]:
    """``[{target, want, measured, ratio, met}]``: ``met`` None when not measured (or no target)."""
    res = []
    N, V = shapes["loss"]
    loss = read_csv(out, "bench_loss.csv")
    ff, lig = _pick(loss, provider="fastfuse", N=N, V=V), _pick(loss, provider="liger_ce", N=N, V=V)
    if ff:
        frac = _f(ff["floor_ms"]) / _f(ff["time"])
        res.append(dict(target=f"fused_loss N={N} V={V}: fastfuse of the copy floor", want=">= 85 %",
                        measured=f"{_f(ff['time']):.3f} ms, floor {_f(ff['floor_ms']):.3f} ms",
                        ratio=f"{frac:.1%}", met=frac >= 0.85))
    else:
        res.append(dict(target=f"fused_loss N={N} V={V}: fastfuse of the copy floor", want=">= 85 %",
                        measured="not measured", ratio="-", met=None))
    if ff and lig:
        r = _f(ff["time"]) / _f(lig["time"])
        res.append(dict(target=f"fused_loss N={N} V={V}: fastfuse / Liger hard-label CE", want="<= 1.00x",
                        measured=f"{_f(ff['time']):.3f} / {_f(lig['time']):.3f} ms", ratio=f"{r:.2f}x", met=r <= 1.0))
    else:
        res.append(dict(target=f"fused_loss N={N} V={V}: fastfuse / Liger hard-label CE", want="<= 1.00x",
                        measured="not measured" + ("" if ff else "") + (" (Liger not installed?)" if ff else ""),
                        ratio="-", met=None))
    for r in read_csv(out, "bench_divergences.csv"):
        if r["provider"] == "ce":
            continue
        x = _f(r["x_ce"])
        tail = r["provider"] in TAIL_PASS
        res.append(dict(target=f"divergence {r['provider']} / ce", want="stated (tail pass: 3 reads)" if tail else "<= 1.15x",
                        measured=f"{_f(r['time']):.3f} ms", ratio=f"{x:.2f}x", met=None if tail else x <= 1.15))
    n, h, v = shapes["linear"]
    lin = _pick(read_csv(out, "bench_linear_loss.csv"), provider="fastfuse_linear", N=n, H=h, V=v)
    if lin:
        ms, extra, floor = _f(lin["time"]), _f(lin.get("extra_memory")), _f(lin["floor_ms"])
        res.append(dict(target=f"fused_linear_loss N={n} H={h} V={v}: time / matmul floor", want="<= 42 ms (H100)",
                        measured=f"{ms:.2f} ms, floor {floor:.2f} ms", ratio=f"{ms / floor:.2f}x", met=ms <= 42.0))
        res.append(dict(target=f"fused_linear_loss N={n} H={h} V={v}: extra memory", want="<= 1024 MiB",
                        measured="not measured (no CUDA)" if extra is None else f"{extra:.0f} MiB",
                        ratio="-" if extra is None else f"{extra / 1024:.2f}x", met=None if extra is None else extra <= 1024))
    else:
        res.append(dict(target=f"fused_linear_loss N={n} H={h} V={v}: time / matmul floor", want="<= 42 ms (H100)",
                        measured="not measured", ratio="-", met=None))
    for w in read_csv(out, "candidates_winners.csv"):
        res.append(dict(target=f"launch candidates {w['kernel']} {w['N']} x {w['V']}: winner {w['provider']}",
                        want="stated", measured=f"{_f(w['time']):.3f} ms (today's {w['current']}: "
                                                f"{_f(w['current_ms']):.3f} ms)",
                        ratio=f"{_f(w['time']) / _f(w['current_ms']):.2f}x", met=None))
    return res


def test_counts(out: str) -> str:
    path = os.path.join(out, "gpu_tests.xml")
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return "gpu tests: no junit XML (step cut or not run)"
    suites = [root] if root.tag == "testsuite" else list(root)
    tot = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    return (f"gpu tests: {tot['tests']} run, {tot['failures']} failed, {tot['errors']} errors, "
            f"{tot['skipped']} skipped")


def _table(rows, head, cols) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(c(r) for c in cols) + " |" for r in rows]
    return lines


def _pct(r):
    ms, fl = _f(r.get("time")), _f(r.get("floor_ms"))
    return f"{fl / ms:.1%}" if ms and fl else "-"


def _ms(r):
    return f"{r['time']:.3f}"


def _mib(r):
    return f"{r['extra_memory']:.0f}" if "extra_memory" in r else "-"


def gpu_section(out: str, info: dict) -> str:
    """The RESULTS.md "GPU" section's body from this run's CSVs."""
    head = "dry run on CPU under the interpreter, tiny shapes: NOT measurements" if info["dry_run"] else "measured"
    ver = open(os.path.join(out, "versions.log")).read().strip().splitlines()[-1:] if os.path.exists(
        os.path.join(out, "versions.log")) else ["?"]
    lines = [f"Written by `bash benchmarks/gpu_check.sh` ({head}): {ver[0]}; "
             f"{info['elapsed_s']:.0f} s of a {info['deadline_s']:.0f} s deadline. Steps: "
             + ", ".join(f"{s['step']} {s['status']}" for s in info["steps"]) + ".", ""]
    lines.append("| target | want | measured | ratio | met |")
    lines.append("|---|---|---|---|---|")
    for t in targets(out, info["shapes"]):
        met = "-" if t["met"] is None else ("yes" if t["met"] else "**no**")
        lines.append(f"| {t['target']} | {t['want']} | {t['measured']} | {t['ratio']} | {met} |")
    lines += ["", test_counts(out), ""]
    loss = read_csv(out, "bench_loss.csv")
    if loss:
        lines += ["fused_loss, bf16, fwd+bwd, S = 2, K = 10:", ""]
        lines += _table(loss, ["N x V", "provider", "ms", "% of floor", "extra MiB"],
                        [lambda r: f"{r['N']} x {r['V']}", lambda r: r["provider"], _ms, _pct, _mib]) + [""]
    lin = read_csv(out, "bench_linear_loss.csv")
    if lin:
        lines += ["fused_linear_loss, bf16, fwd+bwd (floor: the three matmuls at the measured rate):", ""]
        lines += _table(lin, ["N x H x V", "provider", "ms", "% of floor", "extra MiB"],
                        [lambda r: f"{r['N']} x {r['H']} x {r['V']}", lambda r: r["provider"], _ms, _pct,
                         _mib]) + [""]
    div = read_csv(out, "bench_divergences.csv")
    if div:
        lines += ["Divergence x tail, fused_loss fwd+bwd (x ce; of the one-read + one-write copy floor):", ""]
        lines += _table(div, ["case", "N x V", "ms", "x ce", "% of floor", "extra MiB"],
                        [lambda r: r["provider"], lambda r: f"{r['N']} x {r['V']}", _ms,
                         lambda r: f"{r['x_ce']:.2f}",
                         lambda r: f"{_f(r['of_floor']):.1%}" if _f(r.get("of_floor")) else "-", _mib]) + [""]
    cand = read_csv(out, "candidates.csv")
    if cand:
        lines += ["Launch candidates (the winners are `launch_tuned.json`):", ""]
        lines += _table(cand, ["kernel", "shape", "config", "ms", "% of floor"],
                        [lambda r: r["kernel"], lambda r: f"{r['N']} x {r['V']}", lambda r: r["provider"], _ms,
                         _pct]) + [""]
    tp = read_csv(out, "gpu_tp_loss.csv")
    if tp:
        lines += ["Vocabulary-parallel loss (one-rank group):", ""]
        lines += _table(tp, ["loss divergence", "kind", "N x V", "ms"],
                        [lambda r: r["kernel"], lambda r: r["provider"], lambda r: f"{r['N']} x {r['V']}",
                         _ms]) + [""]
    return "\n".join(lines)


def _atomic(path: str, text: str):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_all(out: str, info: dict, results_md: str):
    info = dict(info, shapes=info.get("shapes") or dict(loss=TARGET_LOSS, linear=TARGET_LINEAR))
    tg = targets(out, info["shapes"])
    _atomic(os.path.join(out, "summary.json"), json.dumps(dict(info, targets=tg, tests=test_counts(out)), indent=1))
    md = [f"# gpu_check {'(DRY RUN: CPU interpreter, tiny shapes)' if info['dry_run'] else ''}", "",
          f"{info['elapsed_s']:.0f} s of a {info['deadline_s']:.0f} s deadline, results in {out}", "",
          "| step | status | s |", "|---|---|---|"]
    md += [f"| {s['step']} | {s['status']} | {s['seconds']} |" for s in info["steps"]]
    md += ["", "| target | want | measured | ratio | met |", "|---|---|---|---|---|"]
    md += [f"| {t['target']} | {t['want']} | {t['measured']} | {t['ratio']} | "
           f"{'-' if t['met'] is None else ('yes' if t['met'] else 'NO')} |" for t in tg]
    md += ["", test_counts(out), ""]
    _atomic(os.path.join(out, "summary.md"), "\n".join(md))
    if os.path.exists(results_md):
        text = open(results_md).read()
        body = gpu_section(out, info)
        if BEGIN in text and END in text:
            text = text[:text.index(BEGIN) + len(BEGIN)] + "\n" + body + "\n" + text[text.index(END):]
        else:
            text = text.rstrip("\n") + f"\n\n## GPU (written by gpu_check.sh)\n\n{BEGIN}\n{body}\n{END}\n"
        _atomic(os.path.join(out, "RESULTS.md"), text)
