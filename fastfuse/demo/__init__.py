"""``fastfuse demo``: a real end-to-end fusion on an embedded corpus, in minutes on a CPU.

Corpus: the English documentation that ships with Python (``pydoc_data.topics``), split by
document into train and held-out. Two small source LMs with different real tokenizers (Llama-2
SentencePiece, GPT-2 byte-level BPE) are pre-trained on different halves of the training documents.
A smaller target with a third tokenizer (MPT / GPT-NeoX BPE) is then trained twice from the same
initialisation, on the same batches in the same order, on a *fusion corpus* (the first training
documents, a quarter of them for the CPU preset): CLM-only (plain cross-entropy), and with fastfuse
(split_corpus -> extract_topk -> align_corpus -> FusionDataset (MinCE) -> fused_loss). As in FuseLLM,
the sources have read more text than the fusion corpus; fusion is how the target gets at it.

Held-out loss is reported per token of each model's own tokenisation (not comparable across
tokenizers) and in bits per UTF-8 byte (comparable): total nats / ln 2 / bytes predicted. Every
token of a held-out document is predicted except the first one when the tokenizer adds no BOS
(its bytes are then left out of the byte count).

Output rows (``Preset.vocab``): the tokenizers are real and full size (32000 / 50257 / 50432 ids),
but the training text uses about 5000 token types of each. On a CPU a full-size output layer is
almost all of the cost (one training step of a 2-layer, 64-wide target on 16 x 128 tokens: 0.8 s with
its 50432 rows, 0.1 s with the 5383 rows of the training split's types, 2 cores), so by default (``vocab="train"``) each model has output/embedding rows only for the token types that
occur in the *training* split (never the held-out one) plus one shared row for every other id, which
spreads its probability evenly over them (``p(v) = p(OTHER) / #others``). That is still a normalised
distribution over the full vocabulary: held-out tokens outside the kept types are scored with it,
extraction sees full-size logits, and the alignment and vocabulary maps are the real full-size ones.
``vocab="full"`` gives every id its own row (the GPU preset). Every lm_head has a bias, initialised to
the log unigram frequencies of the model's own training text (smoothed).
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import random
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

SOURCES = {"llama2": "llama-spm", "gpt2": "gpt-2"}
TARGET = "mpt"


@dataclass(frozen=True)
class Preset:
    """Sizes and schedule of one demo run."""
    heldout_chars: int        # held-out documents are drawn until they hold this many characters
    max_train_chars: int      # 0 = every remaining document
    fuse_chars: int           # the fusion corpus (extract, align, target training): the first train
                              # documents up to this many characters (0 = all); sources pre-train on all
    block_size: int
    src_hidden: int
    src_layers: int
    src_steps: int
    src_batch: int
    src_lr: float
    src_dropout: float
    tgt_hidden: int
    tgt_layers: int
    tgt_steps: int
    tgt_batch: int
    tgt_lr: float
    k: int
    lm_weight: float
    temperature: float
    eval_points: int          # held-out evaluations along target training (curve), end included
    vocab: str = "train"      # "train": rows for the training split's token types + one shared row; "full"


PRESETS = {
    # the test preset: seconds, proves the pipeline runs, says nothing about quality
    "tiny": Preset(heldout_chars=2000, max_train_chars=12000, fuse_chars=0, block_size=64, src_hidden=32, src_layers=1,
                   src_steps=4, src_batch=4, src_lr=3e-3, src_dropout=0.0, tgt_hidden=32, tgt_layers=1, tgt_steps=4,
                   tgt_batch=4, tgt_lr=3e-3, k=5, lm_weight=0.5, temperature=1.0, eval_points=1),
    # the CPU default: about two minutes on 2 idle cores. The sources are data-limited (each reads
    # ~55k tokens; longer training overfits), the target reads a quarter of the training text.
    "small": Preset(heldout_chars=16000, max_train_chars=0, fuse_chars=110000, block_size=128, src_hidden=128,
                    src_layers=2, src_steps=250, src_batch=16, src_lr=4e-3, src_dropout=0.1, tgt_hidden=64,
                    tgt_layers=2, tgt_steps=160, tgt_batch=16, tgt_lr=4e-3, k=10, lm_weight=0.5, temperature=2.0,
                    eval_points=4),
    # a GPU: full-size output layers, wider and deeper models, more held-out text (not yet measured)
    "large": Preset(heldout_chars=40000, max_train_chars=0, fuse_chars=110000, block_size=256, src_hidden=256,
                    src_layers=4, src_steps=600, src_batch=32, src_lr=1e-3, src_dropout=0.1, tgt_hidden=128,
                    tgt_layers=2, tgt_steps=300, tgt_batch=32, tgt_lr=1e-3, k=10, lm_weight=0.5, temperature=2.0,
                    eval_points=6, vocab="full"),
}


# ----------------------------------------------------------------------------------------------
# corpus


def load_corpus(seed: int, heldout_chars: int, max_train_chars: int = 0) -> tuple[list[str], list[str]]:
    """(train, held-out) documents of ``pydoc_data.topics``, split by document, deterministically.

    Documents are shuffled with ``seed``; held-out takes documents of at most 20000 characters
    until it holds ``heldout_chars``; train the rest (if ``max_train_chars`` > 0, only documents
    of at most a quarter of it, until it is reached)."""
    from pydoc_data.topics import topics

    # some topics share one text ("Exceptions", "exceptions"): deduplicate, or it lands on both sides
    docs = list(dict.fromkeys(topics[k] for k in sorted(topics) if topics[k].strip()))
    random.Random(seed).shuffle(docs)
    held, train, n = [], [], 0
    for d in docs:
        if n < heldout_chars and len(d) <= 20000:
            held.append(d)
            n += len(d)
        else:
            train.append(d)
    if max_train_chars > 0:  # whole documents of at most a quarter of the cap, until it is reached
        out, n = [], 0
        for d in train:
            if n < max_train_chars and len(d) <= max_train_chars // 4:
                out.append(d)
                n += len(d)
        train = out
    return train, held


def halves(docs: list[str]) -> tuple[list[str], list[str]]:
    """Two disjoint sets of documents with about the same number of characters (greedy)."""
    a, b, na, nb = [], [], 0, 0
    for d in sorted(docs, key=len, reverse=True):
        if na <= nb:
            a.append(d)
            na += len(d)
        else:
            b.append(d)
            nb += len(d)
    return a, b


def windows(tokenizer, docs: list[str], block_size: int) -> tuple[list[list[int]], int]:
    """Each document cut into model inputs of <= ``block_size`` tokens; returns (inputs, bytes predicted).

    Input ``t`` predicts input ``t+1``. With a BOS prefix every text token is predicted; without
    one, a document's first token is context only, and each later window starts with the last
    token of the previous one (context again), so no other token is skipped."""
    from fastfuse.corpus import special_tokens

    prefix, _ = special_tokens(tokenizer)
    cap = block_size - len(prefix)
    inputs, nbytes = [], 0
    for doc in docs:
        enc = tokenizer(doc, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        ids, offs = enc["input_ids"], enc["offset_mapping"]
        if not ids:
            continue
        nbytes += len(doc.encode("utf-8"))
        if not prefix:
            nbytes -= len(doc[: offs[0][1]].encode("utf-8"))  # the first token is never predicted
        a = 0
        while True:
            b = min(a + cap, len(ids))
            inputs.append(list(prefix) + ids[a:b])
            if b == len(ids):
                break
            a = b if prefix else b - 1
    return inputs, nbytes


def _pad(inputs: list[list[int]], pad_id: int):
    """[B, T] input ids, attention mask and shifted labels (-100 where nothing is predicted)."""
    import torch

    T = max(len(x) for x in inputs)
    ids = torch.full((len(inputs), T), pad_id, dtype=torch.long)
    att = torch.zeros((len(inputs), T), dtype=torch.long)
    labels = torch.full((len(inputs), T), -100, dtype=torch.long)
    for i, x in enumerate(inputs):
        x = torch.as_tensor(x)
        ids[i, : len(x)] = x
        att[i, : len(x)] = 1
        labels[i, : len(x) - 1] = x[1:]
    return ids, att, labels


# ----------------------------------------------------------------------------------------------
# models


class ModelVocab:
    """The token ids a demo model has rows for (``Preset.vocab``).

    ``ModelVocab(size)`` keeps every id of a ``size``-token tokenizer (rows = ids). With ``kept``
    (real ids), the model has one row per kept id, in increasing id order, plus a last shared row
    ``other`` that stands for all ``size - len(kept)`` remaining ids alike: the model's probability of
    each of them is ``p(other) / n_other``. ``rows(ids)`` maps real ids to rows (negative ids such as
    -100 are kept); ``full_logits`` turns row logits into logits over every real id."""

    def __init__(self, size: int, kept=None):
        import torch

        self.size = int(size)
        if kept is None:
            self.kept, self.other, self.n_other, self.num_rows = None, None, 0, self.size
            return
        kept = torch.as_tensor(sorted(set(int(t) for t in kept)), dtype=torch.long)
        if len(kept) == 0 or kept[0] < 0 or kept[-1] >= self.size:
            raise ValueError(f"kept: expected ids in [0, {self.size}), got {len(kept)} ids")
        self.kept = kept
        self.other = len(kept)
        self.num_rows = len(kept) + 1
        self.n_other = self.size - len(kept)
        self.log_n_other = math.log(max(self.n_other, 1))
        self._row = torch.full((self.size,), self.other, dtype=torch.long)
        self._row[kept] = torch.arange(len(kept))

    def rows(self, ids):
        """Rows of real ids (any int tensor; negative entries are returned unchanged)."""
        import torch

        if self.kept is None:
            return ids
        row = self._row.to(ids.device)
        out = row[ids.clamp_min(0).long()].to(ids.dtype)
        return torch.where(ids >= 0, out, ids)

    def full_logits(self, z):
        """``[..., num_rows]`` row logits -> ``[..., size]`` logits over every real id (same softmax)."""
        if self.kept is None:
            return z
        out = (z[..., self.other:] - self.log_n_other).expand(*z.shape[:-1], self.size).clone()
        out[..., self.kept.to(z.device)] = z[..., :self.other]
        return out

    def token_nats(self, label_rows):
        """float64 nats to add to the row CE of each label row: ``log n_other`` for the shared row, else 0
        (the shared row's probability is split evenly over the ids it stands for)."""
        import torch

        if self.kept is None:
            return torch.zeros(label_rows.shape, dtype=torch.float64)
        return (label_rows == self.other).to(torch.float64) * self.log_n_other


def model_vocab(tokenizer, kind: str, train_inputs: list[list[int]]) -> ModelVocab:
    """``ModelVocab`` of ``tokenizer`` for ``Preset.vocab``: every id ("full"), or the ids that occur in
    ``train_inputs`` plus the special tokens ("train")."""
    if kind == "full":
        return ModelVocab(len(tokenizer))
    if kind != "train":
        raise ValueError(f"vocab: expected 'train' or 'full', got {kind!r}")
    kept = {t for x in train_inputs for t in x}
    kept.update(t for t in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) if t is not None)
    return ModelVocab(len(tokenizer), kept)


class FullVocabLM:
    """A demo model seen from outside as a causal LM over its tokenizer's full vocabulary (what
    ``extract_topk`` reads): real ids in, ``[B, L, len(tokenizer)]`` logits out."""

    def __init__(self, model, vocab: ModelVocab):
        from types import SimpleNamespace

        self.model, self.vocab = model, vocab
        self.config = SimpleNamespace(vocab_size=vocab.size, _name_or_path=type(model).__name__)

    def to(self, *args, **kwargs):
        self.model.to(*args, **kwargs)
        return self

    def eval(self):
        self.model.eval()
        return self

    def __call__(self, input_ids, attention_mask=None, **kwargs):
        from types import SimpleNamespace

        z = self.model(input_ids=self.vocab.rows(input_ids), attention_mask=attention_mask).logits
        return SimpleNamespace(logits=self.vocab.full_logits(z.float()))


def unigram_counts(inputs: list[list[int]], size: int):
    """Float counts ``[size]`` of the predicted tokens of ``inputs`` (every token but each input's first)."""
    import torch

    ids = [t for x in inputs for t in x[1:]]
    return torch.bincount(torch.as_tensor(ids, dtype=torch.long), minlength=size).float()


def make_model(tokenizer, vocab: ModelVocab, hidden: int, layers: int, block_size: int, seed: int,
               counts=None, dropout: float = 0.0, alpha: float = 0.1):
    """A GPT-2-style causal LM with ``vocab.num_rows`` tied embedding rows and an lm_head bias set to
    the log unigram distribution of ``counts`` (``[len(tokenizer)]`` token counts of the model's
    training text, add-``alpha`` smoothed over the full vocabulary; uniform when ``None``)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab.num_rows, bos_token_id=None, eos_token_id=None, n_embd=hidden, n_layer=layers,
                     n_head=max(1, hidden // 32), n_positions=block_size, resid_pdrop=dropout, embd_pdrop=dropout,
                     attn_pdrop=dropout, tie_word_embeddings=True)
    model = GPT2LMHeadModel(cfg)
    head = torch.nn.Linear(hidden, vocab.num_rows, bias=True)
    head.weight = model.transformer.wte.weight          # still tied
    c = torch.zeros(vocab.size) if counts is None else torch.as_tensor(counts, dtype=torch.float32)
    p = (c + alpha) / (c.sum() + alpha * vocab.size)
    if vocab.kept is not None:                          # the shared row holds the mass of every other id
        p = torch.cat([p[vocab.kept], (1 - p[vocab.kept].sum()).clamp_min(1e-12).reshape(1)])
    with torch.no_grad():
        head.bias.copy_(p.log() - p.log().mean())
    model.lm_head = head
    return model


def _optimizer(model, lr: float, steps: int):
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
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    g = torch.Generator().manual_seed(seed)
    opt, sched = _optimizer(model, preset.src_lr, steps)
    model.to(device).train()
    losses = []
    for _ in tqdm(range(steps), desc=f"pretrain {name}", disable=not progress, dynamic_ncols=True):
        pick = torch.randint(len(inputs), (preset.src_batch,), generator=g).tolist()
        ids, att, labels = _pad([inputs[i] for i in pick], pad)
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
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    total, count, tot_unseen, n_unseen = 0.0, 0, 0.0, 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for i in range(0, len(inputs), batch):
            ids, att, labels = _pad(inputs[i:i + batch], pad)
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


def train_target(model, vocab: ModelVocab, dataset, collate, steps: int, preset: Preset, seed: int, device,
                 fused: bool, eval_fn, progress: bool) -> dict:
    """Train the target ``steps`` steps on batches drawn with ``seed``: with ``fused_loss`` when
    ``fused``, else plain cross-entropy on the same labels. Returns the curves (the last held-out
    evaluation, of the trained model, in ``curve["final"]``)."""
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    from fastfuse.loss import AlignMap, SourceTopK, fused_loss

    g = torch.Generator().manual_seed(seed)
    opt, sched = _optimizer(model, preset.tgt_lr, steps)
    model.to(device).train()
    every = max(1, steps // max(1, preset.eval_points))
    curve = {"step": [], "train_ce": [], "eval_step": [], "eval_loss": [], "final": None}
    for step in tqdm(range(1, steps + 1), desc="train target " + ("fused" if fused else "CLM-only"),
                     disable=not progress, dynamic_ncols=True):
        pick = torch.randint(len(dataset), (preset.tgt_batch,), generator=g).tolist()
        b = collate([dataset[i] for i in pick])
        # real target ids -> the model's rows (identity for vocab="full")
        ids, labels = vocab.rows(b["input_ids"]).to(device), vocab.rows(b["labels"]).to(device)
        logits = model(input_ids=ids, attention_mask=b["attention_mask"].to(device)).logits
        ce = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())
        if fused:
            topk = SourceTopK(*(t.to(device) for t in b["source_topk"]))
            amap = AlignMap(b["align_map"].pos.to(device), vocab.rows(b["align_map"].vocab).to(device))
            loss = fused_loss(logits, topk, amap, labels, source_weights=b["source_weights"].to(device),
                              lm_weight=preset.lm_weight, temperature=preset.temperature)
        else:
            loss = ce
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        curve["step"].append(step)
        curve["train_ce"].append(ce.item())
        if step % every == 0 or step == steps:
            if not curve["eval_step"] or curve["eval_step"][-1] != step:
                ev = eval_fn(model)
                curve["eval_step"].append(step)
                curve["eval_loss"].append(ev["loss"])
                curve["final"] = ev
    model.eval()
    return curve


def teacher_stats(dataset, collate, names: list[str], batch: int = 64) -> dict:
    """How good the aligned teachers are on the fusion corpus, per source: ``gold_in_topk`` (the
    target's next token is among the source's top-k mapped to target ids, over 1-to-1 aligned
    positions), ``topk_mass`` (mean probability the source puts on its own top-k there), and
    ``picks`` (sequences for which MinCE picks each source)."""
    import torch

    hit = torch.zeros(len(names))
    mass = torch.zeros(len(names), dtype=torch.float64)
    n = torch.zeros(len(names))
    picks = torch.zeros(len(names), dtype=torch.long)
    for a in range(0, len(dataset), batch):
        b = collate([dataset[i] for i in range(a, min(len(dataset), a + batch))])
        labels = b["labels"]
        picks += torch.bincount(b["source_ce"].argmin(0), minlength=len(names))
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
    return {"picks": {k: int(picks[i]) for i, k in enumerate(names)},
            "gold_in_topk": {k: float(hit[i] / n[i].clamp_min(1)) for i, k in enumerate(names)},
            "topk_mass": {k: float(mass[i] / n[i].clamp_min(1)) for i, k in enumerate(names)}}


# ----------------------------------------------------------------------------------------------
# the run


def run_demo(size: str = "small", device: str = "cpu", seed: int = 0, workdir: str | None = None,
             threads: int = 0, progress: bool = True, plot: str | None = None, overrides: dict | None = None,
             log=print) -> dict:
    """Run the whole demo; returns the figures (what ``--json`` writes)."""
    import torch

    from fastfuse.chunking import split_corpus
    from fastfuse.corpus_align import align_corpus
    from fastfuse.data import FusionDataset
    from fastfuse.extract import extract_topk
    from fastfuse.vocabfiles import load_tokenizer

    if size not in PRESETS:
        raise ValueError(f"size: expected one of {sorted(PRESETS)}, got {size!r}")
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
    times: dict[str, float] = {}
    t_all = time.perf_counter()

    def stage(name):
        class _T:
            def __enter__(self):
                self.t = time.perf_counter()

            def __exit__(self, *exc):
                times[name] = times.get(name, 0.0) + time.perf_counter() - self.t
        return _T()

    with stage("load"):
        train, held = load_corpus(seed, preset.heldout_chars, preset.max_train_chars)
        toks = {n: load_tokenizer(f) for n, f in SOURCES.items()}
        tgt_tok = load_tokenizer(TARGET)
        half = dict(zip(SOURCES, halves(train)))
        fuse_docs, n = [], 0
        for d in train:
            if preset.fuse_chars and n >= preset.fuse_chars:
                break
            fuse_docs.append(d)
            n += len(d)
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
            # a re-run in the same workdir with the same source settings reuses the pre-trained source
            key = json.dumps([name, seed, "corpus-v2", "model-v3", {k: v for k, v in asdict(preset).items()
                                                                   if k.startswith("src_") or k in (
                                                                       "heldout_chars", "max_train_chars",
                                                                       "block_size", "vocab")}], sort_keys=True)
            src_keys[name] = key
            ckpt = work / "sources" / f"{name}.pt"
            saved = torch.load(ckpt, map_location="cpu") if ckpt.exists() else None
            if saved is not None and saved["key"] == key:
                model.load_state_dict(saved["state"])
                model.to(dev).eval()
                losses = saved["losses"]
            else:
                losses = pretrain_source(model, tok, vocabs[name], inputs, preset, preset.src_steps, seed + 11 + i,
                                         dev, name, progress)
                ckpt.parent.mkdir(parents=True, exist_ok=True)
                torch.save({"key": key, "state": model.state_dict(), "losses": losses}, str(ckpt) + ".tmp")
                os.replace(str(ckpt) + ".tmp", ckpt)
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
    pad_id = tgt_tok.pad_token_id if tgt_tok.pad_token_id is not None else 0
    collate = dataset.collator(pad_token_id=pad_id, pin_memory=False)
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
    for mode in ("clm_only", "fused"):
        model = copy.deepcopy(init)
        eval_before = times.get("eval", 0.0)
        with stage(f"train target {mode}"):
            curves[mode] = train_target(model, tvocab, dataset, collate, preset.tgt_steps, preset, seed + 200, dev,
                                        mode == "fused", eval_target, progress)
        times[f"train target {mode}"] -= times["eval"] - eval_before  # the curve's evaluations count as "eval"
        results[mode] = curves[mode].pop("final")
        curves[mode]["eval_step"].insert(0, 0)
        curves[mode]["eval_loss"].insert(0, ev0["loss"])
    times["total"] = time.perf_counter() - t_all

    figures.update({
        "size": size, "device": str(dev), "seed": seed, "preset": asdict(preset),
        "clm_only_eval_loss": results["clm_only"]["loss"], "fused_eval_loss": results["fused"]["loss"],
        "clm_only_eval_bpb": results["clm_only"]["bpb"], "fused_eval_bpb": results["fused"]["bpb"],
        "target": {"tokenizer": TARGET, "vocab": len(tgt_tok), "rows": tvocab.num_rows, "init_eval_loss": ev0["loss"],
                   "init_eval_bpb": ev0["bpb"], "clm_only": results["clm_only"], "fused": results["fused"]},
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
    for mode, color in (("clm_only", "tab:blue"), ("fused", "tab:orange")):
        c = curves[mode]
        ax.plot(c["step"], c["train_ce"], color=color, alpha=0.4, label=f"{mode}: train CE (batch)")
        ax.plot(c["eval_step"], c["eval_loss"], "o-", color=color, label=f"{mode}: held-out CE")
    ax.set_xlabel("target training step")
    ax.set_ylabel("cross-entropy per target token (nats)")
    ax.set_title("fastfuse demo: CLM-only vs fused target")
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


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
    w = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["", "  ".join(c.ljust(w[i]) for i, c in enumerate(rows[0])), "  ".join("-" * x for x in w)]
    lines += ["  ".join(c.ljust(w[i]) if i < 3 else c.rjust(w[i]) for i, c in enumerate(r)) for r in rows[1:]]
    lines.append("(CE per token is in each model's own tokenisation: compare bits/byte across tokenizers)")
    d = f["fused_eval_loss"] - f["clm_only_eval_loss"]
    db = f["fused_eval_bpb"] - f["clm_only_eval_bpb"]
    lines.append(f"fused - CLM-only on held-out: {d:+.4f} nats/token, {db:+.4f} bits/byte "
                 f"({100 * db / f['clm_only_eval_bpb']:+.1f}%; {'fused is better' if d < 0 else 'fused is NOT better'}; "
                 f"MinCE, top-{p['k']}, lm_weight {p['lm_weight']}, temperature {p['temperature']}, same init, "
                 "same batches)")
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
