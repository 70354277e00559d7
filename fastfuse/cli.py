"""The ``fastfuse`` command line."""
from __future__ import annotations

import argparse
import json
import sys
import time

DEFAULT_TARGET = "llama-bpe"
DEFAULT_SOURCES = ["llama-spm", "gpt-2", "mpt", "qwen2"]


def _corpus(max_docs: int | None) -> list[str]:
    from pydoc_data.topics import topics

    texts = [topics[k] for k in sorted(topics)]
    return texts[:max_docs] if max_docs else texts


def align_demo(args: argparse.Namespace) -> dict:
    """Align real tokenizers of several model families on real text and print coverage statistics."""
    import numpy as np
    from tqdm import tqdm

    from fastfuse.align import TokenizerOffsets, align_offsets_batch
    from fastfuse.vocab import VocabMap
    from fastfuse.vocabfiles import load_tokenizer

    texts = _corpus(args.docs)
    t0 = time.perf_counter()
    tgt_tok = load_tokenizer(args.target)
    tgt = TokenizerOffsets(tgt_tok, "target")
    tgt_enc = tgt.encode(texts)
    t_tok = time.perf_counter() - t0
    n_tgt = sum(len(ids) for ids, _ in tgt_enc)
    rows = []
    for name in tqdm(args.sources, desc="sources", disable=args.quiet):
        t0 = time.perf_counter()
        src_tok = load_tokenizer(name)
        src = TokenizerOffsets(src_tok, name)
        src_enc = src.encode(texts)
        t_load = time.perf_counter() - t0
        t0 = time.perf_counter()
        als = align_offsets_batch([e for _, e in tgt_enc], [e for _, e in src_enc], num_threads=args.threads)
        t_align = time.perf_counter() - t0
        t0 = time.perf_counter()
        vmap = VocabMap.build(src_tok, tgt_tok, mode=args.mode, num_threads=args.threads)
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
    result = {"target": args.target, "target_vocab": len(tgt.surfaces), "docs": len(texts),
              "target_tokens": n_tgt, "seconds_tokenize_target": t_tok, "vocab_mode": args.mode, "sources": rows}
    if not args.quiet:
        print(f"\nTarget {args.target} (vocab {len(tgt.surfaces)}), corpus: {len(texts)} pydoc topics, "
              f"{n_tgt} target tokens, vocab map mode '{args.mode}'\n")
        head = f"{'source':<11}{'vocab':>8}{'tokens':>9}{'1-to-1':>9}{'+vocab':>9}{'exact voc':>11}{'mapped voc':>12}" \
               f"{'align s':>9}{'Mtok/s':>8}{'vocab s':>9}"
        print(head)
        print("-" * len(head))
        for r in rows:
            print(f"{r['source']:<11}{r['source_vocab']:>8}{r['source_tokens']:>9}{r['aligned_1to1']:>9.1%}"
                  f"{r['aligned_and_vocab_mapped']:>9.1%}{r['vocab_exact_rate']:>11.1%}{r['vocab_mapped_rate']:>12.1%}"
                  f"{r['seconds_align']:>9.3f}{r['align_tokens_per_s'] / 1e6:>8.1f}{r['seconds_vocab_map']:>9.2f}")
        print("\n1-to-1: target positions whose next token has a source token with the same bytes;"
              "\n+vocab: ... and that source token maps to the target's token through the vocab map.")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastfuse", description="Fast knowledge fusion of LLMs with different tokenizers.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("align-demo", help="align real tokenizers on Python's own documentation and print coverage")
    p.add_argument("--target", default=DEFAULT_TARGET, help=f"target tokenizer (default {DEFAULT_TARGET})")
    p.add_argument("--sources", nargs="+", default=DEFAULT_SOURCES, help="source tokenizers")
    p.add_argument("--mode", choices=["exact", "mined"], default="exact", help="vocabulary map mode")
    p.add_argument("--docs", type=int, default=None, help="use only the first N documents")
    p.add_argument("--threads", type=int, default=0, help="threads (0 = all cores)")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=align_demo)
    from fastfuse.extract import add_extract_command
    from fastfuse.pipeline_cli import add_pipeline_commands

    from fastfuse.demo import add_demo_command

    add_pipeline_commands(sub)
    add_extract_command(sub)
    add_demo_command(sub)
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except ValueError as e:
        print(f"fastfuse: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
