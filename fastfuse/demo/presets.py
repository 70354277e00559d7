"""The demo's models and schedules: the source and target tokenizers, and the presets (``--size``)."""
from __future__ import annotations

from dataclasses import dataclass

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
