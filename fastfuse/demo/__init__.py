"""``fastfuse demo``: a real end-to-end fusion on text that ships with Python, in minutes on a CPU.

The claim it tests is FuseLLM's: fusing sources with *complementary* strengths teaches a target more
than distilling from any one of them. Two domains: prose (``pydoc_data.topics``, Python's English
documentation) and code (the standard library's modules). Two small source LMs with different real
tokenizers are each pre-trained mostly on one domain (``SOURCES``: the prose expert with Llama-2's
SentencePiece, the code expert with GPT-2's byte-level BPE; ``Preset.src_mix`` of each one's text is
from the other domain). A smaller target with a third tokenizer (MPT / GPT-NeoX BPE) is trained on a
*fusion corpus* mixing both domains that no source read, and evaluated on held-out documents of both
domains that nobody read. Every target starts from the same initialisation and sees the same batches:

* ``clm_only`` -- plain cross-entropy;
* ``label_smoothing`` -- cross-entropy with label smoothing at the fused loss's implied strength
  (``(1 - lm_weight)`` x the fused teacher's mean missing top-k mass: what a uniform tail spreads), the
  control for regularisation that needs no teacher;
* ``single <name>`` -- knowledge distillation from each source alone, with the fused target's loss,
  tail and temperature;
* ``fused`` -- ``fused_loss`` over both sources (split_corpus -> extract_topk -> align_corpus ->
  FusionDataset -> fused_loss), weighted by ``fusion`` (``DEFAULT_FUSED``);
* optional variants (other weightings, divergences, tails, lm_weight, temperature).

Held-out loss is reported per token of each model's own tokenisation (not comparable across
tokenizers) and in bits per UTF-8 byte (comparable), overall and per domain: total nats / ln 2 / bytes
predicted. Every token of a held-out document is predicted except the first one when the tokenizer adds
no BOS (its bytes are then left out of the byte count). ``run_seeds`` repeats it over seeds and reports
mean ± s.d. and wins per comparison.

Output rows (``Preset.vocab``): the tokenizers are real and full size (32000 / 50257 / 50432 ids), but
the training text uses a few thousand token types of each. On a CPU a full-size output layer is almost
all of the cost, so by default (``vocab="train"``) each model has output/embedding rows only for the
token types that occur in its *training* text (never the held-out one) plus one shared row for every
other id, which spreads its probability evenly over them (``p(v) = p(OTHER) / #others``). That is still a
normalised distribution over the full vocabulary: held-out tokens outside the kept types are scored
with it, extraction sees full-size logits, and the alignment and vocabulary maps are the real full-size
ones. ``vocab="full"`` gives every id its own row (the GPU preset). Every lm_head has a bias, initialised
to the log unigram frequencies of the model's own training text (smoothed).

Modules: ``presets`` (sources, tokenizers, sizes, the fused defaults), ``data`` (the corpus split and
model inputs), ``models`` (the models and their vocabulary rows), ``train`` (training and evaluation),
``run`` (``run_demo``: one seed), ``seeds`` (``run_seeds``: several, with the summary), ``report`` (the
table and the plot); ``alignment`` is ``fastfuse align-demo``. None imports torch or transformers at
import time: ``fastfuse --help`` stays fast.
"""
from __future__ import annotations

from fastfuse.demo.data import DemoCorpus, load_corpus, pad_batch, take, windows
from fastfuse.demo.models import FullVocabLM, ModelVocab, make_model, model_vocab, unigram_counts
from fastfuse.demo.presets import DEFAULT_FUSED, DOMAINS, PRESETS, SOURCES, TARGET, Preset
from fastfuse.demo.report import report, save_plot
from fastfuse.demo.run import StageTimer, run_demo
from fastfuse.demo.seeds import run_seeds, summarize
from fastfuse.demo.train import (evaluate, evaluate_domains, make_optimizer, pretrain_source, teacher_stats,
                                 train_target, weight_shares)

__all__ = ["DEFAULT_FUSED", "DOMAINS", "PRESETS", "SOURCES", "TARGET", "DemoCorpus", "FullVocabLM", "ModelVocab",
           "Preset", "StageTimer", "evaluate", "evaluate_domains", "load_corpus", "make_model", "make_optimizer",
           "model_vocab", "pad_batch", "pretrain_source", "report", "run_demo", "run_seeds", "save_plot", "summarize",
           "take", "teacher_stats", "train_target", "unigram_counts", "weight_shares", "windows"]
