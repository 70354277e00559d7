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
    "token_surfaces": "align.surface", "TokenSurfaces": "align.surface",
    "Alignment": "align.spans", "align_texts": "align.spans", "align_offsets": "align.spans", "align_offsets_batch": "align.spans", "align_groups": "align.spans",
    "dtw_align": "align.dtw", "dtw_align_batch": "align.dtw", "DTWAlignment": "align.dtw",
    "VocabMap": "align.vocab_map",
    "min_ce_weights": "batches.fusion_weights", "avg_ce_weights": "batches.fusion_weights", "reward_weights": "batches.fusion_weights", "fuse_weights": "batches.fusion_weights",
    "token_ce_to_sequence_ce": "batches.fusion_weights", "with_target_candidate": "batches.fusion_weights",
    "RewardScorer": "integrations.reward", "generate_responses": "integrations.reward",
    "ConstantSchedule": "batches.schedules", "LinearSchedule": "batches.schedules", "ProgressiveSchedule": "batches.schedules",
    "SourceTopK": "batch", "AlignMap": "batch", "fused_loss": "loss.logits_loss", "fused_linear_loss": "loss.linear_loss",
    "DIVERGENCES": "loss.spec", "TAILS": "loss.spec", "DivergenceSpec": "loss.spec",
    "split_document": "align.chunking", "split_corpus": "align.chunking",
    "extract_topk": "teachers.local_extract", "ShardReader": "teachers.shards", "ShardWriter": "teachers.shards",
    "open_shards": "teachers.rank_parts", "PartsReader": "teachers.rank_parts",
    "extract_served": "teachers.served", "vllm_prompts": "teachers.vllm_outputs", "write_vllm_outputs": "teachers.vllm_outputs",
    "align_corpus": "batches.corpus_align", "AlignedStore": "batches.corpus_align",
    "FusionCollator": "batches.dataset", "FusionDataset": "batches.dataset",
    "FusionTrainer": "integrations.trainer",
    "OnlineTeachers": "batches.online", "LocalTeacher": "teachers.online_teachers",
    "ServedTeacher": "teachers.online_teachers", "on_policy_batch": "integrations.on_policy",
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
