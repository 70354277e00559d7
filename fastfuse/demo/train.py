"""The demo's training and evaluation: sources pre-trained with plain CLM, the target trained
CLM-only or with ``fused_loss``, held-out loss (per token and in bits per byte), and how good the
aligned teachers are."""
from __future__ import annotations

import math
from typing import Any

from fastfuse.corpus import pad_token_id
from fastfuse.demo.data import pad_batch, windows
from fastfuse.demo.models import ModelVocab
from fastfuse.demo.presets import Preset, split_settings


def make_optimizer(model, lr: float, steps: int):
    """AdamW with a linear warm-up over the first tenth of ``steps``, then a cosine decay to a tenth of ``lr``."""
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))))
    return opt, sched


def pretrain_source(model, tokenizer, vocab: ModelVocab, inputs: list[list[int]], preset: Preset, steps: int, seed: int,
                    device, name: str, progress: bool) -> list[float]:
    """Plain CLM training of a source on its own inputs (``windows`` of its documents); returns the
    loss per step."""
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    if not inputs:
        raise ValueError(f"source {name}: no training text (too few training documents for two halves)")
    pad = pad_token_id(tokenizer)
    g = torch.Generator().manual_seed(seed)
    opt, sched = make_optimizer(model, preset.src_lr, steps)
    model.to(device).train()
    losses = []
    for _ in tqdm(range(steps), desc=f"pretrain {name}", disable=not progress, dynamic_ncols=True):
        pick = torch.randint(len(inputs), (preset.src_batch,), generator=g).tolist()
        ids, att, labels = pad_batch([inputs[i] for i in pick], pad)
        ids, att, labels = vocab.rows(ids).to(device), att.to(device), vocab.rows(labels).to(device)
        logits = model(input_ids=ids, attention_mask=att).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    model.eval()
    return losses


def evaluate(model, tokenizer, vocab: ModelVocab, docs: list[str], block_size: int, device, seen=None,
             batch: int = 16) -> dict:
    """Held-out loss: per-token CE (nats) of the model's own tokenisation over its full vocabulary, and
    bits per UTF-8 byte. With ``seen`` (bool ``[len(tokenizer)]``) also the mean CE over the tokens
    whose id is / is not ``seen`` (``loss_seen``, ``loss_unseen``, ``unseen_rate``)."""
    import torch
    import torch.nn.functional as F

    inputs, nbytes = windows(tokenizer, docs, block_size)
    pad = pad_token_id(tokenizer)
    total, count, tot_unseen, n_unseen = 0.0, 0, 0.0, 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for i in range(0, len(inputs), batch):
            ids, att, labels = pad_batch(inputs[i:i + batch], pad)
            rows = vocab.rows(labels)
            logits = model(input_ids=vocab.rows(ids).to(device), attention_mask=att.to(device)).logits.float()
            ce = F.cross_entropy(logits.flatten(0, 1), rows.flatten().to(device), reduction="none").cpu().double()
            ce = ce + vocab.token_nats(rows.flatten())
            mask = labels.flatten() != -100
            total += float(ce[mask].sum())
            count += int(mask.sum())
            if seen is not None:
                un = mask & ~seen[labels.flatten().clamp_min(0)]
                tot_unseen += float(ce[un].sum())
                n_unseen += int(un.sum())
    model.train(was_training)
    out = {"loss": total / count, "bpb": total / math.log(2) / nbytes, "tokens": count, "bytes": nbytes}
    if seen is not None:
        out.update(unseen_rate=n_unseen / count, loss_unseen=tot_unseen / max(n_unseen, 1),
                   loss_seen=(total - tot_unseen) / max(count - n_unseen, 1))
    return out


def evaluate_domains(model, tokenizer, vocab: ModelVocab, heldout: dict, block_size: int, device, seen=None) -> dict:
    """:func:`evaluate` on each domain's held-out documents (``heldout``: domain -> documents), plus the
    whole held-out set: the figures of ``evaluate`` over every domain at the top level (per token and per
    byte, summed over the domains) and each domain's under ``"domains"``."""
    parts = {d: evaluate(model, tokenizer, vocab, docs, block_size, device, seen=seen) for d, docs in heldout.items()}
    tokens = sum(p["tokens"] for p in parts.values())
    nbytes = sum(p["bytes"] for p in parts.values())
    nats = sum(p["loss"] * p["tokens"] for p in parts.values())
    out = {"loss": nats / tokens, "bpb": nats / math.log(2) / nbytes, "tokens": tokens, "bytes": nbytes,
           "domains": parts}
    if seen is not None:
        unseen = sum(p["unseen_rate"] * p["tokens"] for p in parts.values())
        nats_unseen = sum(p["loss_unseen"] * p["unseen_rate"] * p["tokens"] for p in parts.values())
        out.update(unseen_rate=unseen / tokens, loss_unseen=nats_unseen / max(unseen, 1e-12),
                   loss_seen=(nats - nats_unseen) / max(tokens - unseen, 1e-12))
    return out


def train_target(model, vocab: ModelVocab, dataset, collate_for, steps: int, preset: Preset, seed: int, device,
                 mode: dict | None, eval_fn, progress: bool, desc: str = "", teachers_for=None,
                 eos_id: int | None = None) -> dict:
    """Train the target ``steps`` steps on batches drawn with ``seed`` (the same batches for every mode).

    ``mode`` None: plain cross-entropy on the labels. ``{"label_smoothing": eps}``: cross-entropy with
    label smoothing (the control for the uniform tail's regularisation). Otherwise ``fused_loss`` with the
    flat settings ``mode``: ``fusion`` (the collator's weighting: ``collate_for(fusion)`` is its collator),
    ``sources`` (source *names*; absent = all; one name is knowledge distillation from that source
    alone), ``lm_weight`` and ``temperature`` (default: the preset's) and every other key a divergence
    option of ``fused_loss`` (divergence, tail...). ``online``: each batch's teacher fields come from
    ``teachers_for(fusion)`` (an :class:`fastfuse.OnlineTeachers`) scoring its target ids, not from the
    shards. ``on_policy`` (GKD's lambda): that share of the steps (a seeded draw) trains on the target's own
    continuations of each sequence's first half (:func:`fastfuse.integrations.on_policy.on_policy_batch`,
    sampled at temperature 1 up to ``eos_id``), scored online, with the divergence alone (``lm_weight`` 0) on the sampled
    tokens. Returns the curves (the last held-out evaluation, of the trained model, in ``curve["final"]``;
    the on-policy steps in ``curve["on_policy_steps"]``, their ``train_ce`` None: there is no gold text)."""
    import random

    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    from fastfuse.batch import AlignMap, SourceTopK
    from fastfuse.demo.models import FullVocabLM
    from fastfuse.integrations.on_policy import on_policy_batch
    from fastfuse.loss.logits_loss import fused_loss

    train, loss_options = split_settings(mode or {})
    fused = bool(mode) and "label_smoothing" not in train
    fusion = train.get("fusion", "equal")
    collate = collate_for(fusion)
    names = train.get("sources")
    g = torch.Generator().manual_seed(seed)
    draw = random.Random(seed + 1)      # which steps are on-policy; the batches' draw ``g`` is every mode's
    on_policy = float(train.get("on_policy") or 0.0)
    teachers = None
    if on_policy or train.get("online"):
        if teachers_for is None:
            raise ValueError("teachers_for: online and on-policy targets need the online teachers")
        teachers = teachers_for(fusion)
    student = FullVocabLM(model, vocab)
    dev = torch.device(device)
    rng_devices = [torch.cuda.current_device() if dev.index is None else dev.index] if dev.type == "cuda" else []
    opt, sched = make_optimizer(model, preset.tgt_lr, steps)
    model.to(device).train()
    every = max(1, steps // max(1, preset.eval_points))
    curve: dict[str, Any] = {"step": [], "train_ce": [], "eval_step": [], "eval_loss": [], "final": None,
                             "on_policy_steps": []}
    for step in tqdm(range(1, steps + 1), desc="train target " + desc, disable=not progress, dynamic_ncols=True):
        pick = torch.randint(len(dataset), (preset.tgt_batch,), generator=g).tolist()
        b = collate([dataset[i] for i in pick])
        lm_weight = train.get("lm_weight", preset.lm_weight)
        order = dataset.sources             # the batch's source index s -> name
        on_step = teachers is not None and bool(on_policy) and draw.random() < on_policy
        if teachers is not None and on_step:     # (on_step implies teachers; said again for mypy)
            with torch.random.fork_rng(devices=rng_devices):   # sampling never moves the global RNG
                torch.manual_seed(seed * 100_003 + step)
                b = on_policy_batch(student, teachers, b["input_ids"], b["attention_mask"],
                                    max_new_tokens=preset.block_size // 2, temperature=1.0, eos_token_id=eos_id)
            order, lm_weight = teachers.sources, 0.0
            curve["on_policy_steps"].append(step)
        elif teachers is not None:          # online: the same batch, its teachers scored now
            b, order = teachers(b["input_ids"], b["attention_mask"]), teachers.sources
        pick_src = None if names is None else [order.index(n) for n in names]
        # real target ids -> the model's rows (identity for vocab="full")
        ids, labels = vocab.rows(b["input_ids"]).to(device), vocab.rows(b["labels"]).to(device)
        logits = model(input_ids=ids, attention_mask=b["attention_mask"].to(device)).logits
        ce = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())
        if fused:
            topk, amap, w = b["source_topk"], b["align_map"], b["source_weights"]
            if pick_src is not None:        # a subset of the sources, by name (their weights renormalise)
                topk = SourceTopK(topk.ids[pick_src], topk.logprobs[pick_src])
                amap = AlignMap(amap.pos[pick_src], amap.vocab[pick_src])
                w = w[pick_src]
            topk = SourceTopK(*(t.to(device) for t in topk))
            amap = AlignMap(amap.pos.to(device), vocab.rows(amap.vocab).to(device))
            loss = fused_loss(logits, topk, amap, labels, source_weights=w.to(device), lm_weight=lm_weight,
                              temperature=train.get("temperature", preset.temperature), **loss_options)
        elif mode:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(),
                                   label_smoothing=train["label_smoothing"])
        else:
            loss = ce
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        curve["step"].append(step)
        curve["train_ce"].append(None if on_step else ce.item())
        if step % every == 0 or step == steps:
            if not curve["eval_step"] or curve["eval_step"][-1] != step:
                ev = eval_fn(model)
                curve["eval_step"].append(step)
                curve["eval_loss"].append(ev["loss"])
                curve["final"] = ev
    model.eval()
    return curve


def teacher_stats(dataset, collate, batch: int = 64) -> dict:
    """How good the aligned teachers are on the fusion corpus, per source (by name): ``gold_in_topk``
    (the target's next token is among the source's top-k mapped to target ids, over 1-to-1 aligned
    positions) and ``topk_mass`` (mean probability the source puts on its own top-k there)."""
    import torch

    names = dataset.sources
    hit = torch.zeros(len(names))
    mass = torch.zeros(len(names), dtype=torch.float64)
    n = torch.zeros(len(names))
    for a in range(0, len(dataset), batch):
        b = collate([dataset[i] for i in range(a, min(len(dataset), a + batch))])
        labels = b["labels"]
        for s in range(len(names)):
            pos = b["align_map"].pos[s].long()
            m = (pos >= 0) & (labels != -100)
            idx = pos.clamp_min(0)[..., None].expand(-1, -1, b["source_topk"].ids.shape[-1])
            ids = b["source_topk"].ids[s].long().gather(1, idx)
            lps = b["source_topk"].logprobs[s].float().gather(1, idx)
            mapped = torch.where(ids >= 0, b["align_map"].vocab[s].long()[ids.clamp_min(0)], -1)
            hit[s] += float(((mapped == labels[..., None]).any(-1) & m).sum())
            mass[s] += float(lps.exp().sum(-1)[m].double().sum())
            n[s] += float(m.sum())
    return {"gold_in_topk": {k: float(hit[i] / n[i].clamp_min(1)) for i, k in enumerate(names)},
            "topk_mass": {k: float(mass[i] / n[i].clamp_min(1)) for i, k in enumerate(names)}}


def weight_shares(dataset, collate, domains: list[str], temperature: float, batch: int = 64) -> dict:
    """Under ``collate``'s weighting: the mean weight of each source (by name) per domain of the fusion
    corpus (``domains[i]`` is sequence i's), over predicted target tokens -- for MinCE the share of
    sequences it picks -- and ``tail_mass``: the fused teacher's mean missing top-k mass at ``temperature``
    (what the uniform tail spreads; it sets the label-smoothing control's strength)."""
    import torch

    from fastfuse.loss.torch_path import teacher_tail_mass

    names = dataset.sources
    tot = {d: torch.zeros(len(names), dtype=torch.float64) for d in set(domains)}
    cnt = dict.fromkeys(tot, 0.0)
    tail, n_tail = 0.0, 0
    for a in range(0, len(dataset), batch):
        rows = list(range(a, min(len(dataset), a + batch)))
        b = collate([dataset[i] for i in rows])
        valid = b["labels"] != -100                                           # [B, T]
        w = b["source_weights"].double()
        w = w if w.dim() == 3 else w[..., None].expand(-1, -1, valid.shape[1])
        for j, i in enumerate(rows):
            tot[domains[i]] += w[:, j][:, valid[j]].sum(-1)
            cnt[domains[i]] += float(valid[j].sum())
        r = teacher_tail_mass(b["source_topk"], b["align_map"], b["labels"], b["source_weights"], temperature)
        tail += float(r[valid].sum())
        n_tail += int(valid.sum())
    return {"by_domain": {d: {k: float(tot[d][s] / max(cnt[d], 1)) for s, k in enumerate(names)} for d in sorted(tot)},
            "tail_mass": tail / max(n_tail, 1)}
