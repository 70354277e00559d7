"""The demo's models and schedules: the sources (tokenizer and expertise), the target tokenizer, and the
presets (``--size``)."""
from __future__ import annotations

from dataclasses import dataclass

DOMAINS = ("prose", "code")
# source name -> (tokenizer, the domain it is pre-trained mostly on). The names sort differently from
# this order on purpose: every per-source figure is looked up by name (tests/test_demo.py checks it).
SOURCES = {"prose": ("llama-spm", "prose"), "code": ("gpt-2", "code")}
TARGET = "mpt"


@dataclass(frozen=True)
class Preset:
    """Sizes and schedule of one demo run. Character counts are per domain (held-out, fusion corpus) or
    per source (``src_chars``); the four sets never share a document."""
    heldout_chars: int        # held-out documents per domain, until they hold this many characters
    fuse_chars: int           # the fusion corpus (extract, align, target training) per domain
    src_chars: int            # each source's pre-training text
    src_mix: float            # the share of a source's text from the *other* domain
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
    "tiny": Preset(heldout_chars=1500, fuse_chars=3000, src_chars=8000, src_mix=0.1, block_size=64, src_hidden=32,
                   src_layers=1, src_steps=4, src_batch=4, src_lr=3e-3, src_dropout=0.0, tgt_hidden=32, tgt_layers=1,
                   tgt_steps=4, tgt_batch=4, tgt_lr=3e-3, k=5, lm_weight=0.5, temperature=1.0, eval_points=1),
    # the CPU default: minutes on 2 idle cores. Each source reads its own 200k characters, 90% from
    # its domain; the target reads a fusion corpus of 55k characters of each domain that no source read.
    "small": Preset(heldout_chars=10000, fuse_chars=55000, src_chars=200000, src_mix=0.1, block_size=128,
                    src_hidden=128, src_layers=2, src_steps=250, src_batch=16, src_lr=4e-3, src_dropout=0.1,
                    tgt_hidden=64, tgt_layers=2, tgt_steps=160, tgt_batch=16, tgt_lr=4e-3, k=10, lm_weight=0.3,
                    temperature=2.0, eval_points=4),
    # a GPU: full-size output layers, wider and deeper models, more text (not yet measured)
    "large": Preset(heldout_chars=20000, fuse_chars=55000, src_chars=380000, src_mix=0.1, block_size=256,
                    src_hidden=256, src_layers=4, src_steps=600, src_batch=32, src_lr=1e-3, src_dropout=0.1,
                    tgt_hidden=128, tgt_layers=2, tgt_steps=300, tgt_batch=32, tgt_lr=1e-3, k=10, lm_weight=0.3,
                    temperature=2.0, eval_points=6, vocab="full"),
}

# The fused target's settings (``fastfuse demo``'s defaults): the collator's weighting and
# ``fused_loss``'s divergence options; ``lm_weight`` and ``temperature`` come from the preset unless given
# (small: 0.3 and 2, measured over 5 seeds with every control at the same settings: benchmarks/RESULTS.md).
DEFAULT_FUSED = {"fusion": "token", "divergence": "ce", "tail": "uniform"}
# ``online``: the teachers score each batch while the target trains (no shards); ``on_policy``: that
# share of the batches are the target's own continuations, scored online (``train_target``); ``init``:
# "fused" starts a variant from the trained fused target instead of the shared initialisation (a second
# stage of training: the setting on-policy distillation is meant for, a student that already writes text)
TRAIN_KEYS = ("fusion", "lm_weight", "temperature", "sources", "label_smoothing", "online", "on_policy", "init")


def split_settings(settings: dict) -> tuple[dict, dict]:
    """A target's flat settings -> (the training keys of :data:`TRAIN_KEYS`, ``fused_loss``'s divergence options)."""
    return ({k: v for k, v in settings.items() if k in TRAIN_KEYS},
            {k: v for k, v in settings.items() if k not in TRAIN_KEYS})
