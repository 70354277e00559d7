"""The demo's models: GPT-2-style causal LMs whose output rows cover only the token types of the
training split (``ModelVocab``), seen from outside as LMs over the full vocabulary (``FullVocabLM``),
with an lm_head bias initialised to the unigram distribution of their training text."""
from __future__ import annotations

import math


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

    def ids(self, rows, generator=None):
        """Real ids of model rows (the inverse of :meth:`rows`): a kept row is its id; the shared row is
        one of the ids it stands for, drawn uniformly (with ``generator``) -- a sample of the model's own
        distribution, which spreads that row's probability evenly over them."""
        import torch

        if self.kept is None or self.n_other == 0:
            return rows
        if not hasattr(self, "_others"):
            spare = torch.ones(self.size, dtype=torch.bool)
            spare[self.kept] = False
            self._others = spare.nonzero().flatten()
        kept = self.kept.to(rows.device)[rows.clamp(0, self.other - 1)]
        pick = torch.randint(len(self._others), rows.shape, generator=generator)
        return torch.where(rows == self.other, self._others[pick].to(rows.device), kept)

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
    ``extract_topk`` and the online teachers read, and what on-policy fusion samples from): real ids in,
    ``[B, L, len(tokenizer)]`` logits out; ``generate`` samples real ids."""

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

    def train(self, mode: bool = True):
        self.model.train(mode)
        return self

    @property
    def training(self) -> bool:
        return self.model.training

    def parameters(self):
        return self.model.parameters()

    def requires_grad_(self, flag: bool = True):
        self.model.requires_grad_(flag)
        return self

    def generate(self, input_ids, attention_mask=None, pad_token_id=None, eos_token_id=None, **kwargs):
        """Hugging Face ``generate`` over real ids: the wrapped model samples rows, and each sampled
        shared row becomes one of the ids it stands for (:meth:`ModelVocab.ids`), so the result is a
        sample of the full-vocabulary distribution. That holds for plain sampling only (temperature 1, no
        top-k / top-p): anything else reshapes the shared row's mass, and is refused when the model has
        one. ``kwargs`` go to the model's ``generate``."""
        import torch

        if self.vocab.n_other:
            plain = (kwargs.get("do_sample") is True and kwargs.get("temperature", 1.0) == 1.0
                     and kwargs.get("top_k", 0) in (0, None) and kwargs.get("top_p", 1.0) in (1.0, None))
            if not plain:
                raise ValueError("generate: a model with a shared row samples its full-vocabulary distribution only "
                                 "with do_sample=True, temperature 1 and no top_k / top_p, got "
                                 f"{ {k: kwargs.get(k) for k in ('do_sample', 'temperature', 'top_k', 'top_p')} }")

        def row(name, t):
            if t is None:
                return None
            if not isinstance(t, int):
                raise ValueError(f"{name}: expected one token id (int) or None, got {t!r}")
            r = int(self.vocab.rows(torch.tensor([t]))[0])
            if self.vocab.n_other and r == self.vocab.other:
                raise ValueError(f"{name}: id {t} has no row of its own (it shares the model's last row)")
            return r

        out = self.model.generate(input_ids=self.vocab.rows(input_ids), attention_mask=attention_mask,
                                  pad_token_id=row("pad_token_id", pad_token_id),
                                  eos_token_id=row("eos_token_id", eos_token_id), **kwargs)
        P = input_ids.shape[1]
        return torch.cat([input_ids.to(out.device), self.vocab.ids(out[:, P:])], dim=1)

    def state_dict(self) -> dict:
        """The wrapped model's weights and the kept ids (what ``extract_topk`` fingerprints)."""
        import torch

        kept = torch.as_tensor([] if self.vocab.kept is None else list(self.vocab.kept), dtype=torch.long)
        return {**self.model.state_dict(), "vocab.kept": kept}

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
