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
its 50432 rows, 0.1 s with the 5383 rows of the training split's types, 2 cores), so by default
(``vocab="train"``) each model has output/embedding rows only for the token types that occur in the
*training* split (never the held-out one) plus one shared row for every other id, which
spreads its probability evenly over them (``p(v) = p(OTHER) / #others``). That is still a normalised
distribution over the full vocabulary: held-out tokens outside the kept types are scored with it,
extraction sees full-size logits, and the alignment and vocabulary maps are the real full-size ones.
``vocab="full"`` gives every id its own row (the GPU preset). Every lm_head has a bias, initialised to
the log unigram frequencies of the model's own training text (smoothed).

Modules: ``presets`` (tokenizers, sizes and schedules), ``data`` (the corpus split and model
inputs), ``models`` (the models and their vocabulary rows), ``train`` (training and evaluation),
``run`` (``run_demo``), ``report`` (the table and the plot); ``alignment`` is ``fastfuse align-demo``.
None imports torch or transformers at import time: ``fastfuse --help`` stays fast.
"""
from __future__ import annotations

from fastfuse.demo.data import fusion_docs, halves, load_corpus, pad_batch, windows
from fastfuse.demo.models import FullVocabLM, ModelVocab, make_model, model_vocab, unigram_counts
from fastfuse.demo.presets import PRESETS, SOURCES, TARGET, Preset
from fastfuse.demo.report import report, save_plot
from fastfuse.demo.run import StageTimer, run_demo
from fastfuse.demo.train import evaluate, make_optimizer, pretrain_source, teacher_stats, train_target

__all__ = ["PRESETS", "SOURCES", "TARGET", "FullVocabLM", "ModelVocab", "Preset", "StageTimer", "evaluate",
           "fusion_docs", "halves", "load_corpus", "make_model", "make_optimizer", "model_vocab", "pad_batch",
           "pretrain_source", "report", "run_demo", "save_plot", "teacher_stats", "train_target", "unigram_counts",
           "windows"]
