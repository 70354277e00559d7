"""``fastfuse align-demo``'s measurement: real tokenizers of several model families aligned on
Python's own documentation, with coverage and timings (printing is the command line's job)."""
from __future__ import annotations

import time

DEFAULT_TARGET = "llama-bpe"
DEFAULT_SOURCES = ("llama-spm", "gpt-2", "mpt", "qwen2")


def measure_alignment(target: str = DEFAULT_TARGET, sources=DEFAULT_SOURCES, mode: str = "exact",
                      max_docs: int | None = None, num_threads: int = 0, progress: bool = True) -> dict:
    """Align each source tokenizer to ``target`` on the pydoc corpus; returns the figures per source
    (1-to-1 aligned positions, aligned and vocabulary-mapped, vocabulary map rates, seconds)."""
    from tqdm import tqdm

    from fastfuse.align.spans import TokenizerOffsets, align_offsets_batch
    from fastfuse.corpus import python_docs
    from fastfuse.align.vocab_map import VocabMap
    from fastfuse.tokenizer_files import load_tokenizer

    texts = python_docs(max_docs)
    t0 = time.perf_counter()
    tgt_tok = load_tokenizer(target)
    tgt = TokenizerOffsets(tgt_tok, "target")
    tgt_enc = tgt.encode(texts)
    t_tok = time.perf_counter() - t0
    n_tgt = sum(len(ids) for ids, _ in tgt_enc)
    rows = []
    for name in tqdm(list(sources), desc="sources", disable=not progress):
        t0 = time.perf_counter()
        src_tok = load_tokenizer(name)
        src = TokenizerOffsets(src_tok, name)
        src_enc = src.encode(texts)
        t_load = time.perf_counter() - t0
        t0 = time.perf_counter()
        als = align_offsets_batch([e for _, e in tgt_enc], [e for _, e in src_enc], num_threads=num_threads)
        t_align = time.perf_counter() - t0
        t0 = time.perf_counter()
        vmap = VocabMap.build(src_tok, tgt_tok, mode=mode, num_threads=num_threads)
        t_vocab = time.perf_counter() - t0
        positions = aligned = mapped = 0
        for al, (tid, _), (sid, _) in zip(als, tgt_enc, src_enc):
            pos = al.pos[:-1]
            positions += len(pos)
            ok = pos >= 0
            aligned += int(ok.sum())
            # the source's own next token, mapped into the target vocabulary, is the target's next token
            nxt_src = sid[pos[ok] + 1]
            mapped += int((vmap.ids[nxt_src] == tid[1:][ok]).sum())
        rows.append({
            "source": name,
            "source_vocab": len(src.surfaces),
            "source_tokens": int(sum(len(i) for i, _ in src_enc)),
            "aligned_1to1": aligned / max(positions, 1),
            "aligned_and_vocab_mapped": mapped / max(positions, 1),
            "vocab_exact_rate": float(vmap.exact_rate),
            "vocab_mapped_rate": float((vmap.ids >= 0).mean()),
            "seconds_tokenize": t_load,
            "seconds_align": t_align,
            "align_tokens_per_s": n_tgt / max(t_align, 1e-9),
            "seconds_vocab_map": t_vocab,
        })
    return {"target": target, "target_vocab": len(tgt.surfaces), "docs": len(texts), "target_tokens": n_tgt,
            "seconds_tokenize_target": t_tok, "vocab_mode": mode, "sources": rows}
