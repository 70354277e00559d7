"""``fastfuse chunk`` and ``fastfuse align``: the corpus-side commands of the offline pipeline."""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path


def _cli_chunk(args: argparse.Namespace) -> dict:
    from fastfuse.align import TokenizerOffsets
    from fastfuse.chunking import split_document
    from fastfuse.extract import iter_corpus, load_any_tokenizer
    from fastfuse.shards import _atomic_write

    toks = [TokenizerOffsets(load_any_tokenizer(t), f"--tokenizers {t}") for t in args.tokenizers]
    lines, n_docs = [], 0
    for d, text in enumerate(iter_corpus([Path(p) for p in args.input], args.text_field)):
        n_docs += 1
        for c in split_document(text, toks, args.block_size):
            lines.append(json.dumps({"text": c, "doc": d}, ensure_ascii=False))
    _atomic_write(Path(args.out), [("\n".join(lines) + "\n").encode("utf-8")])
    result = {"documents": n_docs, "chunks": len(lines), "out": args.out}
    if not args.quiet:
        print(f"{n_docs} documents -> {len(lines)} chunks of <= {args.block_size} tokens for every tokenizer: {args.out}")
    return result


def _parse_source(spec: str) -> tuple[str, str, str]:
    try:
        name, rest = spec.split("=", 1)
        tok, shard_dir = rest.rsplit(":", 1)
    except ValueError:
        raise ValueError(f"--source: expected NAME=TOKENIZER:SHARD_DIR, got {spec!r}") from None
    return name, tok, shard_dir


def _cli_align(args: argparse.Namespace) -> dict:
    from fastfuse.corpus_align import align_corpus
    from fastfuse.extract import load_any_tokenizer

    sources = {}
    for spec in args.source:
        name, tok, shard_dir = _parse_source(spec)
        sources[name] = (load_any_tokenizer(tok), shard_dir)
    cov = align_corpus([Path(p) for p in args.input], load_any_tokenizer(args.target), sources, args.out,
                       vocab_mode=args.mode, num_threads=args.threads, progress=not args.quiet)
    if not args.quiet:
        print(f"{'source':<14}{'1-to-1':>9}{'one-hot':>9}{'mapped mass':>13}{'exact vocab':>13}")
        for name, c in cov.items():
            print(f"{name:<14}{c['aligned_1to1']:>9.1%}{c['one_hot_fallback']:>9.1%}{c['vocab_mapped_mass']:>13.1%}"
                  f"{c['vocab_exact_rate']:>13.1%}")
    return cov


def add_pipeline_commands(subparsers) -> None:
    p = subparsers.add_parser("chunk", help="split documents so that every tokenizer's tokenisation fits a block")
    p.add_argument("--tokenizers", nargs="+", required=True, help="target and source tokenizers (names or paths)")
    p.add_argument("--input", nargs="+", required=True, metavar="FILE", help=".jsonl or text files")
    p.add_argument("--block-size", type=int, required=True)
    p.add_argument("--out", required=True, help="output .jsonl (one chunk per line, field 'text')")
    p.add_argument("--text-field", default="text")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cli_chunk)

    p = subparsers.add_parser("align", help="align extracted sources to the target tokenisation (corpus scale)")
    p.add_argument("--target", required=True, help="target tokenizer (name or path)")
    p.add_argument("--source", action="append", required=True, metavar="NAME=TOKENIZER:SHARD_DIR",
                   help="a source: its name, tokenizer and `fastfuse extract` output directory (repeat)")
    p.add_argument("--input", nargs="+", required=True, metavar="FILE", help="the chunked corpus (.jsonl)")
    p.add_argument("--out", required=True)
    p.add_argument("--mode", choices=["exact", "mined"], default="exact", help="vocabulary map mode")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cli_align)
