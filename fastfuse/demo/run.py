"""``run_demo``: the whole demo stage by stage (corpus, sources, extract, align, two targets), timing
each stage and caching the pre-trained sources in the workdir."""
from __future__ import annotations

import copy
import hashlib
import json
import os
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path

import numpy as np

from fastfuse.corpus import pad_token_id
from fastfuse.demo.data import fusion_docs, halves, load_corpus, windows
from fastfuse.demo.models import FullVocabLM, make_model, model_vocab, unigram_counts
from fastfuse.demo.presets import PRESETS, SOURCES, TARGET, Preset
from fastfuse.demo.report import report, save_plot
from fastfuse.demo.train import evaluate, pretrain_source, teacher_stats, train_target


class StageTimer:
    """Seconds per named stage: ``with timer("eval"): ...`` adds to ``timer.seconds["eval"]``."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t


def source_key(name: str, seed: int, preset: Preset) -> str:
    """Everything a pre-trained source depends on: a cached source is reused only under the same key."""
    return json.dumps([name, seed, "corpus-v2", "model-v3", {k: v for k, v in asdict(preset).items()
                                                             if k.startswith("src_") or k in (
                                                                 "heldout_chars", "max_train_chars",
                                                                 "block_size", "vocab")}], sort_keys=True)


def load_or_pretrain(model, ckpt: Path, key: str, device, pretrain) -> list[float]:
    """The source's per-step losses: ``model``'s weights and losses from ``ckpt`` when it was saved under
    ``key``, else ``pretrain()``'s (the trained model is then saved there)."""
    import torch

    saved = torch.load(ckpt, map_location="cpu") if ckpt.exists() else None
    if saved is not None and saved["key"] == key:
        model.load_state_dict(saved["state"])
        model.to(device).eval()
        return saved["losses"]
    losses = pretrain()
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"key": key, "state": model.state_dict(), "losses": losses}, str(ckpt) + ".tmp")
    os.replace(str(ckpt) + ".tmp", ckpt)   # an interrupted run never leaves a half-written checkpoint
    return losses


def run_demo(size: str = "small", device: str = "cpu", seed: int = 0, workdir: str | None = None,
             threads: int = 0, progress: bool = True, plot: str | None = None, overrides: dict | None = None,
             log=print, loss: dict | None = None, baselines: bool = False, variants: dict | None = None) -> dict:
    """Run the whole demo; returns the figures (what ``--json`` writes).

    ``loss``: the fused target's divergence options (``divergence``, ``tail``, ``alpha``, ``beta``,
    ``student_temperature``... of ``fused_loss``). ``baselines``: also distil a target from each
    source alone (the same loss, S = 1: FuseLLM's knowledge-distillation baseline), reported as
    ``single_source_eval_bpb``. ``variants``: more fused targets, name -> loss options (same data,
    init and batches), reported under ``"variants"``."""
    import torch

    from fastfuse.divergences import make_spec

    from fastfuse.chunking import split_corpus
    from fastfuse.corpus_align import align_corpus
    from fastfuse.data import FusionDataset
    from fastfuse.extract import extract_topk
    from fastfuse.vocabfiles import load_tokenizer

    if size not in PRESETS:
        raise ValueError(f"size: expected one of {sorted(PRESETS)}, got {size!r}")
    loss = dict(loss or {})
    for options in [loss, *(variants or {}).values()]:
        make_spec(**options)        # bad options fail here, before minutes of work
    preset = replace(PRESETS[size], **(overrides or {}))
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: CUDA was asked for but torch sees no CUDA device")
    if threads > 0:
        torch.set_num_threads(threads)
    elif dev.type == "cpu":
        torch.set_num_threads(max(1, os.cpu_count() or 1))
    torch.manual_seed(seed)
    work = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="fastfuse-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    stage = StageTimer()
    times = stage.seconds
    t_all = time.perf_counter()

    with stage("load"):
        train, held = load_corpus(seed, preset.heldout_chars, preset.max_train_chars)
        toks = {n: load_tokenizer(f) for n, f in SOURCES.items()}
        tgt_tok = load_tokenizer(TARGET)
        half = dict(zip(SOURCES, halves(train)))
        fuse_docs = fusion_docs(train, preset.fuse_chars)
        # each model's rows: the token types of the whole training split (never of the held-out one)
        vocabs = {n: model_vocab(t, preset.vocab, windows(t, train, preset.block_size)[0])
                  for n, t in [*toks.items(), ("target", tgt_tok)]}
    log(f"corpus: {len(train)} train documents ({sum(map(len, train))} chars; source halves "
        f"{', '.join(f'{n}: {len(d)} docs' for n, d in half.items())}; fusion corpus {len(fuse_docs)} docs, "
        f"{sum(map(len, fuse_docs))} chars), {len(held)} held-out ({sum(map(len, held))} chars); model rows "
        f"{', '.join(f'{n}: {v.num_rows}' for n, v in vocabs.items())}; workdir {work}")

    sources, src_keys, figures = {}, {}, {"sources": {}}
    for i, (name, tok) in enumerate(toks.items()):
        with stage(f"pretrain {name}"):
            inputs, _ = windows(tok, half[name], preset.block_size)
            model = make_model(tok, vocabs[name], preset.src_hidden, preset.src_layers, preset.block_size, seed + 1 + i,
                               counts=unigram_counts(inputs, len(tok)), dropout=preset.src_dropout)
            src_keys[name] = source_key(name, seed, preset)
            # a re-run in the same workdir with the same source settings reuses the pre-trained source
            losses = load_or_pretrain(model, work / "sources" / f"{name}.pt", src_keys[name], dev,
                                      partial(pretrain_source, model, tok, vocabs[name], inputs, preset,
                                              preset.src_steps, seed + 11 + i, dev, name, progress))
        with stage("eval"):
            ev = evaluate(model, tok, vocabs[name], held, preset.block_size, dev)
        sources[name] = model if vocabs[name].kept is None else FullVocabLM(model, vocabs[name])
        figures["sources"][name] = {"tokenizer": SOURCES[name], "vocab": len(tok), "rows": vocabs[name].num_rows,
                                    "train_documents": len(half[name]), "eval_loss": ev["loss"], "eval_bpb": ev["bpb"],
                                    "final_train_loss": losses[-1]}

    with stage("split"):
        chunks = [c for _, c in split_corpus(fuse_docs, [tgt_tok, *toks.values()], preset.block_size)]
    topk_dirs = {}
    for name, tok in toks.items():
        # one directory per (source, fusion corpus): a re-run with other settings never resumes stale shards
        tag = hashlib.sha1(json.dumps([src_keys[name], preset.fuse_chars]).encode()).hexdigest()[:10]
        topk_dirs[name] = work / "topk" / f"{name}-{tag}"
        with stage(f"extract {name}"):
            # full-size logits per batch: keep a CPU batch near 200 MB
            extract_topk(sources[name], tok, chunks, topk_dirs[name], k=preset.k, block_size=preset.block_size,
                         token_budget=preset.block_size * (32 if dev.type == "cuda" else 8), source_name=name,
                         device=dev, dtype=torch.float32, progress=progress)
    with stage("align"):
        coverage = align_corpus(chunks, tgt_tok, {n: (t, topk_dirs[n]) for n, t in toks.items()}, work / "align",
                                progress=progress)
    dataset = FusionDataset(work / "align")
    collate = dataset.collator(pad_token_id=pad_token_id(tgt_tok), pin_memory=False)
    with stage("align"):
        teachers = teacher_stats(dataset, collate, list(toks))
    tgt_ids = [dataset.store.target_ids(i) for i in range(len(dataset))]
    seen = torch.zeros(len(tgt_tok), dtype=torch.bool)  # token types of the target's own training text
    seen[torch.as_tensor(np.concatenate(tgt_ids), dtype=torch.long)] = True
    tvocab = vocabs["target"]

    def eval_target(m):
        with stage("eval"):
            return evaluate(m, tgt_tok, tvocab, held, preset.block_size, dev, seen=seen)

    init = make_model(tgt_tok, tvocab, preset.tgt_hidden, preset.tgt_layers, preset.block_size, seed + 100,
                      counts=unigram_counts([list(x) for x in tgt_ids], len(tgt_tok)))
    ev0 = eval_target(init)
    curves, results = {}, {}
    modes = {"clm_only": None, "fused": {"loss": loss}}
    if baselines:
        modes.update({f"single {name}": {"sources": [i], "loss": loss} for i, name in enumerate(toks)})
    modes.update({f"variant {name}": {"loss": dict(options)} for name, options in (variants or {}).items()})
    for mode, fusion in modes.items():
        model = copy.deepcopy(init)
        eval_before = times.get("eval", 0.0)
        with stage(f"train target {mode}"):
            curves[mode] = train_target(model, tvocab, dataset, collate, preset.tgt_steps, preset, seed + 200, dev,
                                        fusion, eval_target, progress, desc=mode)
        times[f"train target {mode}"] -= times["eval"] - eval_before  # the curve's evaluations count as "eval"
        results[mode] = curves[mode].pop("final")
        curves[mode]["eval_step"].insert(0, 0)
        curves[mode]["eval_loss"].insert(0, ev0["loss"])
    times["total"] = time.perf_counter() - t_all

    figures.update({
        "size": size, "device": str(dev), "seed": seed, "preset": asdict(preset),
        "clm_only_eval_loss": results["clm_only"]["loss"], "fused_eval_loss": results["fused"]["loss"],
        "clm_only_eval_bpb": results["clm_only"]["bpb"], "fused_eval_bpb": results["fused"]["bpb"],
        "loss": {k: v for k, v in make_spec(**loss)._asdict().items()},
        "single_source_eval_bpb": {n: results[f"single {n}"]["bpb"] for n in toks} if baselines else None,
        "variants": {n: {"loss": variants[n], "eval_loss": results[f"variant {n}"]["loss"],
                         "eval_bpb": results[f"variant {n}"]["bpb"]} for n in (variants or {})},
        "target": {"tokenizer": TARGET, "vocab": len(tgt_tok), "rows": tvocab.num_rows, "init_eval_loss": ev0["loss"],
                   "init_eval_bpb": ev0["bpb"], **{m: r for m, r in results.items() if not m.startswith("variant ")}},
        "heldout": {"documents": len(held), "bytes_target": results["fused"]["bytes"],
                    "tokens_target": results["fused"]["tokens"], "unseen_rate": results["fused"]["unseen_rate"]},
        "train": {"documents": len(train), "fusion_documents": len(fuse_docs), "sequences": len(dataset)},
        "minCE_picks": teachers.pop("picks"), "teachers": teachers, "coverage": coverage, "curves": curves,
        "seconds": {k: round(v, 2) for k, v in times.items()}, "workdir": str(work),
    })
    figures["fused_beats_clm_only"] = figures["fused_eval_loss"] < figures["clm_only_eval_loss"]
    figures["plot"] = save_plot(curves, plot or str(work / "curves.png"), log)
    log(report(figures))
    return figures
