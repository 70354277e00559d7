"""``run_demo``: one seed of the demo stage by stage (corpus, sources, extract, align, the targets: the
controls and the fused target), timing each stage and caching the pre-trained sources in the workdir."""
from __future__ import annotations

import copy
import hashlib
import json
import os
import tempfile
import time
from typing import Any
from contextlib import contextmanager
from dataclasses import asdict, replace
from functools import lru_cache, partial
from pathlib import Path

import numpy as np

from fastfuse.corpus import pad_token_id
from fastfuse.demo.data import load_corpus, windows
from fastfuse.demo.models import FullVocabLM, make_model, model_vocab, unigram_counts
from fastfuse.demo.presets import DEFAULT_FUSED, PRESETS, SOURCES, TARGET, Preset, split_settings
from fastfuse.demo.report import report, save_plot
from fastfuse.demo.train import (evaluate_domains, pretrain_source, teacher_stats, train_target,
                                 weight_shares)


class StageTimer:
    """Seconds per named stage: ``with timer("eval"): ...`` adds to ``timer.seconds["eval"]``."""

    def __init__(self) -> None:
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
    return json.dumps([name, SOURCES[name], seed, "corpus-v3", "model-v3",
                       {k: v for k, v in asdict(preset).items()
                        if k.startswith("src_") or k in ("heldout_chars", "fuse_chars", "block_size", "vocab")}],
                      sort_keys=True)


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


def check_settings(settings: dict, what: str) -> dict:
    """``settings`` (a fused target's: ``fusion``, ``lm_weight``, ``temperature`` and ``fused_loss``'s
    divergence options) validated, with the defaults of :data:`DEFAULT_FUSED` filled in."""
    from fastfuse.batches.dataset import FUSIONS
    from fastfuse.loss.spec import make_spec

    merged = {**DEFAULT_FUSED, **settings}
    train, loss = split_settings(merged)
    if train["fusion"] not in FUSIONS:
        raise ValueError(f"{what}: fusion must be one of {', '.join(map(repr, FUSIONS))}, got {train['fusion']!r}")
    if not isinstance(train.get("online", False), bool):
        raise ValueError(f"{what}: online must be True or False, got {train['online']!r}")
    lam = train.get("on_policy", 0.0)
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not 0.0 <= lam <= 1.0:
        raise ValueError(f"{what}: on_policy must be a fraction in [0, 1] (GKD's lambda), got {lam!r}")
    if train.get("init") not in (None, "fused"):
        raise ValueError(f"{what}: init must be 'fused' (start from the trained fused target) or absent, "
                         f"got {train['init']!r}")
    make_spec(**loss)       # bad options fail here, before minutes of work
    return merged


def run_demo(size: str = "small", device: str = "cpu", seed: int = 0, workdir: str | None = None,
             threads: int = 0, progress: bool = True, plot: str | None = None, overrides: dict | None = None,
             log=print, fused: dict | None = None, variants: dict | None = None) -> dict:
    """Run one seed of the demo; returns the figures (what ``--json`` writes for a seed).

    Targets, all from the same initialisation on the same batches: ``clm_only``; ``label_smoothing``
    (cross-entropy with label smoothing at the fused loss's implied strength, ``(1 - lm_weight)`` times the
    fused teacher's mean missing top-k mass); ``single <name>`` (knowledge distillation from each source
    alone, with the fused target's loss, tail and temperature); ``fused``. ``fused``: the fused target's
    settings over :data:`DEFAULT_FUSED` (``fusion`` -- the collator's weighting --, ``lm_weight``,
    ``temperature``, and ``fused_loss``'s ``divergence``, ``tail``, ``alpha``, ``beta``,
    ``student_temperature``; ``online``, ``on_policy``: :func:`fastfuse.demo.train.train_target`).
    ``variants``: more fused targets, name -> settings (over ``fused``'s), reported as ``variant <name>``
    (``--online`` and ``--on-policy`` add theirs); one with ``init="fused"`` starts from the trained fused
    target and trains ``tgt_steps`` more (on other batches), so it compares with another such variant, not
    with ``fused``."""
    import torch

    from fastfuse.align.chunking import split_corpus
    from fastfuse.batches.corpus_align import align_corpus
    from fastfuse.batches.dataset import FusionDataset
    from fastfuse.batches.online import OnlineTeachers
    from fastfuse.teachers.local_extract import extract_topk
    from fastfuse.teachers.online_teachers import LocalTeacher
    from fastfuse.tokenizer_files import load_tokenizer

    if size not in PRESETS:
        raise ValueError(f"size: expected one of {sorted(PRESETS)}, got {size!r}")
    preset = replace(PRESETS[size], **(overrides or {}))
    fused = check_settings({"lm_weight": preset.lm_weight, "temperature": preset.temperature, **(fused or {})}, "fused")
    if "init" in fused:
        raise ValueError("fused: init is a variant's setting (start from the trained fused target), not the fused target's")
    variants = {n: check_settings({**fused, **v}, f"variants[{n!r}]") for n, v in (variants or {}).items()}
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
        log("loading the tokenizers (the first run fetches their vocabulary files from the package index once)")
        corpus = load_corpus(seed, preset)
        toks = {n: load_tokenizer(tok) for n, (tok, _) in SOURCES.items()}
        tgt_tok = load_tokenizer(TARGET)
        fuse_docs, fuse_domains = corpus.fusion_docs()
        train = corpus.train
        # each model's rows: the token types of the whole training text (never of the held-out one)
        vocabs = {n: model_vocab(t, preset.vocab, windows(t, train, preset.block_size)[0])
                  for n, t in [*toks.items(), ("target", tgt_tok)]}
    chars = lambda docs: sum(map(len, docs))  # noqa: E731
    log(f"corpus: held-out {', '.join(f'{d} {len(v)} docs ({chars(v)} chars)' for d, v in corpus.heldout.items())}; "
        f"fusion corpus {', '.join(f'{d} {len(v)} docs ({chars(v)} chars)' for d, v in corpus.fusion.items())}; "
        f"sources {', '.join(f'{n} {len(v)} docs ({chars(v)} chars)' for n, v in corpus.sources.items())}; "
        f"model rows {', '.join(f'{n}: {v.num_rows}' for n, v in vocabs.items())}; workdir {work}")

    sources, src_keys = {}, {}
    figures: dict[str, Any] = {"sources": {}}
    for i, (name, tok) in enumerate(toks.items()):
        with stage(f"pretrain {name}"):
            inputs, _ = windows(tok, corpus.sources[name], preset.block_size)
            model = make_model(tok, vocabs[name], preset.src_hidden, preset.src_layers, preset.block_size, seed + 1 + i,
                               counts=unigram_counts(inputs, len(tok)), dropout=preset.src_dropout)
            src_keys[name] = source_key(name, seed, preset)
            # a re-run in the same workdir with the same source settings reuses the pre-trained source
            losses = load_or_pretrain(model, work / "sources" / f"{name}.pt", src_keys[name], dev,
                                      partial(pretrain_source, model, tok, vocabs[name], inputs, preset,
                                              preset.src_steps, seed + 11 + i, dev, name, progress))
        with stage("eval"):
            ev = evaluate_domains(model, tok, vocabs[name], corpus.heldout, preset.block_size, dev)
        sources[name] = model if vocabs[name].kept is None else FullVocabLM(model, vocabs[name])
        figures["sources"][name] = {"tokenizer": SOURCES[name][0], "domain": SOURCES[name][1], "vocab": len(tok),
                                    "rows": vocabs[name].num_rows, "train_chars": chars(corpus.sources[name]),
                                    "eval": ev, "final_train_loss": losses[-1]}

    with stage("split"):
        pieces = split_corpus(fuse_docs, [tgt_tok, *toks.values()], preset.block_size)
        chunks, seq_domains = [c for _, c in pieces], [fuse_domains[d] for d, _ in pieces]
    topk_dirs = {}
    for name, tok in toks.items():
        # one directory per (source, fusion corpus): a re-run with other settings never resumes stale shards
        tag = hashlib.sha1(json.dumps([src_keys[name], preset.k]).encode()).hexdigest()[:10]
        topk_dirs[name] = work / "topk" / f"{name}-{tag}"
        with stage(f"extract {name}"):
            # full-size logits per batch: keep a CPU batch near 200 MB
            extract_topk(sources[name], tok, chunks, topk_dirs[name], k=preset.k, block_size=preset.block_size,
                         token_budget=preset.block_size * (32 if dev.type == "cuda" else 8), source_name=name,
                         device=dev, dtype=torch.float32, progress=progress)
    with stage("align"):
        coverage = align_corpus(chunks, tgt_tok, {n: (t, topk_dirs[n]) for n, t in toks.items()}, work / "align",
                                progress=progress)
    dataset = FusionDataset(work / "align", sources=list(SOURCES))   # batch index s = SOURCES' order, by name

    @lru_cache(maxsize=None)
    def collate_for(fusion: str):
        return dataset.collator(pad_token_id=pad_token_id(tgt_tok), pin_memory=False, fusion=fusion)

    @lru_cache(maxsize=None)
    def teachers_for(fusion: str):
        """The sources as online teachers (online and on-policy targets): the same models, k and batch
        budget as extraction; a text longer than a source's positions gets no teacher from it."""
        teachers = {n: LocalTeacher(sources[n], toks[n], k=preset.k, device=dev, dtype=torch.float32,
                                    max_length=preset.block_size,
                                    token_budget=preset.block_size * (32 if dev.type == "cuda" else 8))
                    for n in SOURCES}
        return OnlineTeachers(teachers, tgt_tok, fusion=fusion, pad_token_id=pad_token_id(tgt_tok), pin_memory=False,
                              vocab_cache_dir=work / "vocab")

    fused_modes = {"fused": fused, **{f"variant {n}": v for n, v in variants.items()}}
    with stage("teachers"):
        teachers = teacher_stats(dataset, collate_for("equal"))
        weights: dict[str, Any] = {s["fusion"]: None for s in fused_modes.values()}
        for fusion in weights:
            weights[fusion] = weight_shares(dataset, collate_for(fusion), seq_domains, fused["temperature"])
    eps = (1 - fused["lm_weight"]) * weights[fused["fusion"]]["tail_mass"]
    tgt_ids = [dataset.store.target_ids(i) for i in range(len(dataset))]
    seen = torch.zeros(len(tgt_tok), dtype=torch.bool)  # token types of the target's own training text
    seen[torch.as_tensor(np.concatenate(tgt_ids), dtype=torch.long)] = True
    tvocab = vocabs["target"]

    def eval_target(m):
        with stage("eval"):
            return evaluate_domains(m, tgt_tok, tvocab, corpus.heldout, preset.block_size, dev, seen=seen)

    init = make_model(tgt_tok, tvocab, preset.tgt_hidden, preset.tgt_layers, preset.block_size, seed + 100,
                      counts=unigram_counts([list(x) for x in tgt_ids], len(tgt_tok)))
    ev0 = eval_target(init)
    single = {f"single {n}": {**fused, "sources": [n]} for n in SOURCES}
    modes = {"clm_only": None, "label_smoothing": {"label_smoothing": eps}, **single, **fused_modes}
    curves, results = {}, {}
    fused_model = None      # the trained fused target, for the variants that start from it
    for mode, settings in modes.items():
        warm = bool(settings) and settings.get("init") == "fused"      # fused is trained before every variant
        model = copy.deepcopy(fused_model if warm else init)
        eval_before = times.get("eval", 0.0)
        with stage(f"train target {mode}"):
            # a second stage draws other batches than the first (seed + 300)
            curves[mode] = train_target(model, tvocab, dataset, collate_for, preset.tgt_steps, preset,
                                        seed + (300 if warm else 200), dev, settings, eval_target, progress, desc=mode,
                                        teachers_for=teachers_for, eos_id=tgt_tok.eos_token_id)
        times[f"train target {mode}"] -= times["eval"] - eval_before  # the curve's evaluations count as "eval"
        results[mode] = curves[mode].pop("final")
        curves[mode]["eval_step"].insert(0, 0)
        curves[mode]["eval_loss"].insert(0, results["fused"]["loss"] if warm else ev0["loss"])
        if warm:            # the curve continues the fused target's
            for key in ("step", "eval_step", "on_policy_steps"):
                curves[mode][key] = [s + preset.tgt_steps for s in curves[mode][key]]
        if mode == "fused":
            fused_model = model
    times["total"] = time.perf_counter() - t_all

    figures.update({
        "size": size, "device": str(dev), "seed": seed, "preset": asdict(preset),
        "fused_settings": fused, "variant_settings": variants, "label_smoothing": eps,
        "bpb": {m: r["bpb"] for m, r in results.items()},
        "bpb_by_domain": {m: {d: r["domains"][d]["bpb"] for d in r["domains"]} for m, r in results.items()},
        "targets": results,
        "target": {"tokenizer": TARGET, "vocab": len(tgt_tok), "rows": tvocab.num_rows, "init": ev0},
        "heldout": {d: {"documents": len(v), "chars": chars(v)} for d, v in corpus.heldout.items()},
        "train": {"fusion_documents": {d: len(v) for d, v in corpus.fusion.items()}, "sequences": len(dataset),
                  "sequence_domains": {d: seq_domains.count(d) for d in sorted(set(seq_domains))}},
        "weights": weights, "teachers": teachers, "coverage": coverage, "curves": curves,
        "seconds": {k: round(v, 2) for k, v in times.items()}, "workdir": str(work),
    })
    figures["plot"] = save_plot(curves, plot or str(work / "curves.png"), log)
    log(report(figures))
    return figures
