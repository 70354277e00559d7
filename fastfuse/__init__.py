"""fastfuse: fast knowledge fusion of LLMs with different tokenizers.

The whole public API, by stage (data flows top to bottom; DESIGN.md §3):

    # alignment (C++ core, numpy in and out; no torch needed)
    token_surfaces(tok)                       bytes each token id stands for, special-token mask
    align_texts(tgt_tok, src_tok, texts)      exact alignment by byte offsets -> [Alignment(match, pos)]
    align_offsets(tgt_ends, src_ends)         the same from byte end offsets; align_offsets_batch
    dtw_align(src_tokens, tgt_tokens)         MinED / DTW alignment of token strings (FuseLLM's)
    VocabMap.build(src_tok, tgt_tok, mode)    source id -> target id ("exact" | "mined"), save/load

    # fusion weights and schedules (torch)
    min_ce_weights, avg_ce_weights, reward_weights, fuse_weights, ProgressiveSchedule,
    ConstantSchedule, LinearSchedule, RewardScorer, generate_responses

    # offline pipeline (DESIGN.md §3): chunk -> extract -> align -> batches
    split_corpus(texts, tokenizers, block_size)        cut documents so every tokenizer fits
    extract_topk(model, tok, texts, out_dir, k=10)     source top-k shards (resumable); ShardReader
        rank=r, world_size=n                           one rank's share; open_shards(dir) reads any layout
    extract_served(url, name, tok, texts, out_dir)     the same from an OpenAI-compatible server
    vllm_prompts(...), write_vllm_outputs(outs, ...)   the same from vLLM's offline LLM.generate
    align_corpus(texts, tgt_tok, {name: (tok, dir)}, out_dir)   AlignMap rows + vocab maps + coverage
    FusionDataset(align_dir), dataset.collator(pad_id) -> batches for fused_loss; FusionCollator

    FusionTrainer(model, args, train_dataset, data_collator, lm_weight=0.9, loss="linear")   HF Trainer

    # online and on-policy fusion: teachers in the loop, no shards
    OnlineTeachers({name: LocalTeacher(model, tok) | ServedTeacher(url, name, tok)}, target_tok)
        teachers(input_ids, attention_mask) -> the FusionCollator batch of that text
    on_policy_batch(student, teachers, input_ids, attention_mask, prompt_tokens, max_new_tokens)
    FusionTrainer(..., teachers=online_teachers, on_policy=lambda_)   GKD-style on-policy share

    # the loss (Triton on GPU, torch on CPU)
    SourceTopK(ids, logprobs), AlignMap(pos, vocab)
    fused_loss(target_logits, source_topk, align_map, labels, source_weights=None, lm_weight=0.9, ...)
    fused_linear_loss(hidden, lm_head_weight, source_topk, align_map, labels, bias=None, ...)  no full logits
        both: divergence= one of DIVERGENCES, tail= one of TAILS, alpha/beta, logit_scale, softcap,
        student_temperature, hinton_scale (README "Divergences")
        process_group=tp_group (or DTensor shards)     either loss on a vocabulary shard (tensor parallelism)
    fastfuse.integrations.hf.causal_lm_fusion_loss(model, batch)   through an HF model (or its DDP wrapper)

Names are imported lazily, so ``import fastfuse`` stays cheap and the alignment tools work without torch.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "token_surfaces": "surface", "TokenSurfaces": "surface",
    "Alignment": "align", "align_texts": "align", "align_offsets": "align", "align_offsets_batch": "align", "align_groups": "align",
    "dtw_align": "dtw", "dtw_align_batch": "dtw", "DTWAlignment": "dtw",
    "VocabMap": "vocab",
    "min_ce_weights": "fusion", "avg_ce_weights": "fusion", "reward_weights": "fusion", "fuse_weights": "fusion",
    "token_ce_to_sequence_ce": "fusion", "with_target_candidate": "fusion",
    "RewardScorer": "integrations.reward", "generate_responses": "integrations.reward",
    "ConstantSchedule": "schedules", "LinearSchedule": "schedules", "ProgressiveSchedule": "schedules",
    "SourceTopK": "loss", "AlignMap": "loss", "fused_loss": "loss", "fused_linear_loss": "linear_loss",
    "DIVERGENCES": "divergences", "TAILS": "divergences", "DivergenceSpec": "divergences",
    "split_document": "chunking", "split_corpus": "chunking",
    "extract_topk": "extract", "ShardReader": "shards", "ShardWriter": "shards",
    "open_shards": "shard_parts", "PartsReader": "shard_parts",
    "extract_served": "served", "vllm_prompts": "vllm_outputs", "write_vllm_outputs": "vllm_outputs",
    "align_corpus": "corpus_align", "AlignedStore": "corpus_align",
    "FusionCollator": "data", "FusionDataset": "data",
    "FusionTrainer": "integrations.trainer",
    "OnlineTeachers": "online", "LocalTeacher": "online_teachers", "ServedTeacher": "online_teachers",
    "on_policy_batch": "online_policy",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fastfuse' has no attribute {name!r}")
    try:
        value = getattr(importlib.import_module(f"fastfuse.{module}"), name)
    except ModuleNotFoundError as e:    # an optional dependency: say which extra installs it
        from fastfuse.extras import missing_extra

        hint = missing_extra(e)
        if hint is None:
            raise
        raise ModuleNotFoundError(f"fastfuse.{name} needs {hint}", name=e.name) from e
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
