"""``fastfuse chunk``, ``fastfuse extract`` and ``fastfuse align``: the offline pipeline's commands."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from fastfuse.cli.errors import CommandError
from fastfuse.cli.ranks import add_rank_flags, rank_and_world, rank_device
from fastfuse.teachers.local_extract import DEFAULT_BLOCK_SIZE, DEFAULT_K, DEFAULT_SHARD_SIZE, DEFAULT_TOKEN_BUDGET


def load_tokenizer_flag(flag: str, value: str):
    """``load_any_tokenizer(value)`` with its error stated in terms of ``flag``."""
    from fastfuse.tokenizer_files import load_any_tokenizer

    try:
        return load_any_tokenizer(value)
    except ValueError as e:
        raise CommandError(f"{flag}: {str(e).removeprefix('name_or_path: ')}") from e


def input_files(values: list[str]) -> list[Path]:
    for f in values:
        if not Path(f).is_file():
            raise CommandError(f"--input: {f!r} is not a file")
    return [Path(f) for f in values]


def output_file(value: str) -> Path:
    """``--out`` for a file: its directory must exist and it must not be a directory."""
    out = Path(value)
    if out.is_dir():
        raise CommandError(f"--out: {value!r} is a directory, expected a file path")
    if not out.parent.is_dir():
        raise CommandError(f"--out: the directory {str(out.parent)!r} does not exist")
    return out


def output_dir(value: str) -> Path:
    """``--out`` for a directory (created if missing): it must not be a file."""
    out = Path(value)
    if out.exists() and not out.is_dir():
        raise CommandError(f"--out: {value!r} is a file, expected a directory")
    return out


def _chunk(args: argparse.Namespace) -> dict:
    from fastfuse.align.spans import TokenizerOffsets
    from fastfuse.align.chunking import split_document
    from fastfuse.corpus import iter_corpus
    from fastfuse.storage import atomic_write

    out = output_file(args.out)
    files = input_files(args.input)
    toks = [TokenizerOffsets(load_tokenizer_flag("--tokenizers", t), f"--tokenizers {t}") for t in args.tokenizers]
    lines, n_docs = [], 0
    for d, text in enumerate(iter_corpus(files, args.text_field)):
        n_docs += 1
        for c in split_document(text, toks, args.block_size):
            lines.append(json.dumps({"text": c, "doc": d}, ensure_ascii=False))
    if not lines:
        raise CommandError(f"--input: the corpus is empty ({n_docs} documents, no text)")
    atomic_write(out, [("\n".join(lines) + "\n").encode("utf-8")])
    result = {"documents": n_docs, "chunks": len(lines), "out": args.out}
    if not args.quiet:
        print(f"{n_docs} documents -> {len(lines)} chunks of <= {args.block_size} tokens for every tokenizer: {args.out}")
    return result


def _extract(args: argparse.Namespace) -> dict:
    if args.server is not None:
        return _extract_served(args)
    from transformers import AutoModelForCausalLM

    from fastfuse.teachers.local_extract import extract_topk

    if args.model is None:
        raise CommandError("--model: required (or --server URL with --served-model NAME)")
    if not Path(args.model).is_dir():
        raise CommandError(f"--model: {args.model!r} is not a local model directory")
    tokenizer = load_tokenizer_flag("--tokenizer", args.tokenizer or args.model)
    files = input_files(args.input)
    output_dir(args.out)
    rank, world = rank_and_world(args)
    model = AutoModelForCausalLM.from_pretrained(args.model)
    stats = extract_topk(model, tokenizer, files, args.out, k=args.k, block_size=args.block_size,
                         token_budget=args.token_budget or DEFAULT_TOKEN_BUDGET, shard_size=args.shard_size,
                         source_name=args.source_name, device=rank_device(args), dtype=args.dtype,
                         progress=not args.quiet, text_field=args.text_field, rank=rank, world_size=world)
    if not args.quiet:
        print(f"{stats['sequences']} sequences, {stats['total_tokens']} tokens in {stats['out_dir']} "
              f"({stats['tokens']} extracted now at {stats['tokens_per_s']:.0f} tok/s; "
              f"{stats.get('bytes_per_token', float('nan')):.1f} bytes/token)")
    return stats


# library argument -> flag, for the served path's errors
_SERVED_FLAGS = {"server_url": "--server", "served_model": "--served-model", "api_key": "--api-key-env", "k": "--k",
                 "concurrency": "--concurrency", "token_budget": "--token-budget",
                 "prompts_per_request": "--prompts-per-request", "timeout": "--timeout", "prompt_format": "--prompt-format",
                 "max_retries": "--max-retries", "rank": "--rank", "world_size": "--world-size"}


def _extract_served(args: argparse.Namespace) -> dict:
    import os

    from fastfuse.teachers.served import extract_served

    if args.model is not None:
        raise CommandError("--model: not used with --server (the server holds the model)")
    if not args.served_model:
        raise CommandError("--served-model: required with --server (the model name the server serves)")
    if not args.tokenizer:
        raise CommandError("--tokenizer: required with --server (the served model's tokenizer, name or local path)")
    api_key = None
    if args.api_key_env is not None:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            raise CommandError(f"--api-key-env: the environment variable {args.api_key_env!r} is not set or empty")
    from fastfuse.teachers.completion_client import check_timeout

    try:
        check_timeout(args.timeout)
    except ValueError as e:
        raise CommandError(f"--timeout: {str(e).removeprefix('timeout: ')}") from None
    rank, world = rank_and_world(args)
    tokenizer = load_tokenizer_flag("--tokenizer", args.tokenizer)
    files = input_files(args.input)
    output_dir(args.out)
    try:
        stats = extract_served(args.server, args.served_model, tokenizer, files, args.out, k=args.k,
                               block_size=args.block_size, token_budget=args.token_budget,
                               prompts_per_request=args.prompts_per_request, shard_size=args.shard_size,
                               concurrency=args.concurrency, api_key=api_key, timeout=args.timeout,
                               max_retries=args.max_retries,
                               prompt_format=args.prompt_format, source_name=args.source_name,
                               progress=not args.quiet, text_field=args.text_field, rank=rank, world_size=world)
    except (ValueError, ConnectionError) as e:  # ConnectionError: fastfuse.teachers.served.ServerError
        name, _, rest = str(e).partition(": ")
        if name in _SERVED_FLAGS:
            raise CommandError(f"{_SERVED_FLAGS[name]}: {rest}") from e
        raise
    if not args.quiet:
        print(f"{stats['sequences']} sequences, {stats['total_tokens']} tokens in {stats['out_dir']} "
              f"({stats['tokens']} extracted now at {stats['tokens_per_s']:.0f} tok/s from {args.served_model}; "
              f"{stats.get('bytes_per_token', float('nan')):.1f} bytes/token; "
              f"{stats['rows_without_teacher']} positions the server did not report)")
    return stats


def parse_source(spec: str) -> tuple[str, str, str]:
    """``NAME=TOKENIZER:SHARD_DIR`` -> (name, tokenizer, shard_dir)."""
    try:
        name, rest = spec.split("=", 1)
        tok, shard_dir = rest.rsplit(":", 1)
    except ValueError:
        raise CommandError(f"--source: expected NAME=TOKENIZER:SHARD_DIR, got {spec!r}") from None
    return name, tok, shard_dir


def _align(args: argparse.Namespace) -> dict:
    from fastfuse.batches.corpus_align import align_corpus, check_source_name

    output_dir(args.out)
    if args.workers < 1:
        raise CommandError(f"--workers: expected a positive integer, got {args.workers}")
    sources = {}
    for spec in args.source:
        name, tok, shard_dir = parse_source(spec)
        if name in sources:
            raise CommandError(f"--source: the name {name!r} is given twice")
        try:
            check_source_name(name)
        except ValueError as e:
            raise CommandError(f"--source: {str(e).removeprefix('sources: ')}") from e
        sources[name] = (load_tokenizer_flag("--source", tok), shard_dir)
    cov = align_corpus(input_files(args.input), load_tokenizer_flag("--target", args.target), sources, args.out,
                       vocab_mode=args.mode, num_threads=args.threads, progress=not args.quiet,
                       workers=args.workers)
    if not args.quiet:
        print(f"{'source':<14}{'1-to-1':>9}{'one-hot':>9}{'mapped mass':>13}{'exact vocab':>13}")
        for name, c in cov.items():
            print(f"{name:<14}{c['aligned_1to1']:>9.1%}{c['one_hot_fallback']:>9.1%}{c['vocab_mapped_mass']:>13.1%}"
                  f"{c['vocab_exact_rate']:>13.1%}")
    return cov


def add_chunk(subparsers) -> None:
    p = subparsers.add_parser("chunk", help="split documents so that every tokenizer's tokenisation fits a block",
                              description="Cut each document of a corpus into chunks at places where every "
                                          "given tokenizer (the target's and each source's) has a token boundary, "
                                          "so that each chunk is at most --block-size tokens for all of them and "
                                          "every model reads the same text. Writes one JSON line per chunk "
                                          "({\"text\": ..., \"doc\": N}).")
    p.add_argument("--tokenizers", nargs="+", required=True, help="target and source tokenizers (names or paths)")
    p.add_argument("--input", nargs="+", required=True, metavar="FILE", help=".jsonl or text files")
    p.add_argument("--block-size", type=int, required=True,
                   help="max tokens of a chunk under every tokenizer (the training sequence length)")
    p.add_argument("--out", required=True, help="output .jsonl (one chunk per line, field 'text')")
    p.add_argument("--text-field", default="text", help="the JSON field holding a document's text (default text)")
    p.add_argument("--quiet", action="store_true", help="print nothing on success")
    p.set_defaults(func=_chunk)


def add_extract(subparsers) -> None:
    p = subparsers.add_parser("extract", help="run a source LM over a corpus and store its top-k next-token log-probs",
                              description="Run a source causal LM over a corpus and write top-k shards "
                                          "(resumes an interrupted run in the same --out directory).")
    p.add_argument("--model", default=None, help="local Hugging Face model directory (not with --server)")
    p.add_argument("--tokenizer", default=None,
                   help="fastfuse.tokenizer_files name or local tokenizer path (default: the model directory)")
    p.add_argument("--input", nargs="+", required=True, metavar="FILE",
                   help="corpus files: .jsonl (one JSON object with a text field per line) or text (one document each)")
    p.add_argument("--out", required=True, help="output directory (one per source)")
    p.add_argument("--k", type=int, default=DEFAULT_K,
                   help=f"log-probs kept per position: the teacher's top-k tokens (default {DEFAULT_K})")
    p.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE,
                   help=f"max tokens per sequence; longer lines are cut (run fastfuse chunk first; "
                        f"default {DEFAULT_BLOCK_SIZE})")
    p.add_argument("--token-budget", type=int, default=None,
                   help=f"max padded tokens per batch (default {DEFAULT_TOKEN_BUDGET}); with --server, max prompt "
                        "tokens per request (default --block-size)")
    p.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE,
                   help=f"sequences per shard file, the unit of resumption (default {DEFAULT_SHARD_SIZE})")
    p.add_argument("--source-name", default=None,
                   help="a name recorded in the shards' meta.json (default: the model directory's or served name)")
    p.add_argument("--text-field", default="text", help="the JSON field holding a line's text (default text)")
    p.add_argument("--device", default=None, help="torch device (default cuda if available, else cpu)")
    p.add_argument("--dtype", default=None, help="torch dtype (default bfloat16 on GPU, float32 on CPU)")
    add_rank_flags(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar, no summary line")
    g = p.add_argument_group("served teachers", "a source model behind an OpenAI-compatible /v1/completions "
                             "endpoint (vLLM, llama-cpp-python, ...) instead of --model")
    g.add_argument("--server", default=None, metavar="URL", help="the server's base URL, e.g. http://127.0.0.1:8000")
    g.add_argument("--served-model", default=None, metavar="NAME", help="the model name the server serves")
    g.add_argument("--api-key-env", default=None, metavar="VAR", help="environment variable holding the API key")
    g.add_argument("--concurrency", type=int, default=8, help="requests in flight (default 8)")
    g.add_argument("--prompts-per-request", type=int, default=1, help="sequences per request (default 1)")
    g.add_argument("--timeout", type=float, default=120.0,
                   help="seconds one request may take in all (connect, send, read) before a retry (default 120)")
    g.add_argument("--max-retries", type=int, default=5,
                   help="retries of a request after 429/5xx/timeouts, with exponential backoff (default 5)")
    g.add_argument("--prompt-format", choices=["auto", "ids", "text"], default="auto",
                   help="send token ids, or text where the server takes no ids (default: ids if accepted)")
    p.set_defaults(func=_extract)


def add_align(subparsers) -> None:
    p = subparsers.add_parser("align", help="align extracted sources to the target tokenisation (corpus scale)",
                              description="Tokenise the chunked corpus with the target tokenizer, align each "
                                          "source's positions to it by byte spans, map each source vocabulary to "
                                          "the target's, and print the coverage; the output directory is what "
                                          "fastfuse.FusionDataset reads. A finished run with the same inputs is "
                                          "skipped.")
    p.add_argument("--target", required=True, help="target tokenizer (name or path)")
    p.add_argument("--source", action="append", required=True, metavar="NAME=TOKENIZER:SHARD_DIR",
                   help="a source: its name, tokenizer and `fastfuse extract` output directory (repeat)")
    p.add_argument("--input", nargs="+", required=True, metavar="FILE", help="the chunked corpus (.jsonl)")
    p.add_argument("--out", required=True, help="output directory (what fastfuse.FusionDataset reads)")
    p.add_argument("--mode", choices=["exact", "mined"], default="exact", help="vocabulary map mode")
    p.add_argument("--threads", type=int, default=0, help="threads of the in-process alignment (0: all cores)")
    p.add_argument("--workers", type=int, default=1,
                   help="processes that tokenise and align chunks of documents (same output for any number)")
    p.add_argument("--quiet", action="store_true", help="no progress bar, no coverage table")
    p.set_defaults(func=_align)
