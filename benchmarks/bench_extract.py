"""Top-k extraction benchmark: overhead over a bare forward pass on the same batches, and bytes/token.

    python benchmarks/bench_extract.py [--tokenizer llama-spm] [--hidden 64] [--layers 2] [--docs 24]
                                       [--block-size 512] [--token-budget 4096] [--device cpu]
                                       [--dtype float32] [--iters 2] [--quick | --tiny] [--csv out.csv]

A random-initialised Llama of the given size (vocabulary of a real tokenizer) reads the first
``--docs`` pydoc topics. One row per provider, all on the same token-budget batches:

* ``forward``: ``model(input_ids, attention_mask)`` only (the floor);
* ``forward+topk``: plus fp32 log-sum-exp, ``torch.topk``, gold log-probs and the host copy
  (:func:`fastfuse.teachers.local_extract.topk_forward`);
* ``extract_topk``: the whole pipeline (tokenise, split, batch, top-k, write shards + meta.json).

Goal on a GPU with a real source model: extraction <= 5 % over the bare forward. On a CPU with a
tiny model the logits dominate and the overhead is much larger; the rows say what it is.
``--tiny``: 2 documents of 2000 characters, hidden 16, 1 layer, blocks of 128 tokens, one timed run.
"""
from __future__ import annotations

import sys
import tempfile

import numpy as np
import torch

import harness
from fastfuse.teachers.local_extract import (extract_topk, forward_logits, pad_token_ids, plan_batches,
                                             source_sequences, topk_forward)
from fastfuse.teachers.shards import ShardReader


def make_model(vocab: int, hidden: int, layers: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    heads = max(1, hidden // 64) if hidden >= 64 else 2
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 4 // 1 if hidden < 256 else
                      int(hidden * 8 / 3), num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=heads, max_position_embeddings=8192)
    return LlamaForCausalLM(cfg).eval()


def corpus(n_docs: int, chars: int | None = None) -> list[str]:
    """The first ``n_docs`` pydoc topics, each cut to ``chars`` characters if given."""
    from fastfuse.corpus import python_docs

    return [t[:chars] for t in python_docs(n_docs)] if chars else python_docs(n_docs)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def run(tokenizer_name="llama-spm", hidden=64, layers=2, docs=24, block_size=512, token_budget=4096, k=10,
        device=None, dtype=None, warmup=1, iters=2, res: harness.Results | None = None, chars=None) -> None:
    from fastfuse.tokenizer_files import load_tokenizer

    tok = load_tokenizer(tokenizer_name)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else (
        dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32))
    model = make_model(len(tok), hidden, layers).to(device=device, dtype=dtype)
    texts = corpus(docs, chars)
    seqs = [s.input_ids for s, _ in source_sequences(tok, texts, block_size)]
    lens = np.array([len(s) for s in seqs])
    batches = [[seqs[j] for j in b] for b in plan_batches(lens, token_budget)]
    n_tok = int(lens.sum())
    n_pad = sum(max(len(s) for s in b) * len(b) for b in batches)

    def bare():
        with torch.inference_mode():
            for b in batches:
                ids, mask = pad_token_ids(b)
                logits = forward_logits(model, torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device))
                del logits
        _sync(device)

    def with_topk():
        with torch.inference_mode():
            for b in batches:
                topk_forward(model, b, k, len(tok), device)
        _sync(device)

    def full():
        with tempfile.TemporaryDirectory() as d:
            st = extract_topk(model, tok, texts, d, k=k, block_size=block_size, token_budget=token_budget,
                              shard_size=len(seqs), device=device, dtype=dtype, progress=False)
            full.bpt = ShardReader(d).bytes_per_token()
            assert st["total_tokens"] == n_tok

    res = res or harness.Results()
    base = None
    x = dict(tokens=n_tok)
    desc = dict(device=str(device), dtype=str(dtype).replace("torch.", ""), model=f"llama h={hidden} L={layers} "
                f"V={len(tok)}", padding=f"{n_pad / n_tok - 1:.1%}")
    for name, fn in (("forward", bare), ("forward+topk", with_topk), ("extract_topk", full)):
        t = harness.measure(fn, str(device), warmup, iters)
        base = base or t.ms
        res.time("extract_topk", name, x, t, unit="s", **desc)
        res.add("extract_topk", name, "throughput", "tok/s", x, n_tok / t.seconds)
        res.add("extract_topk", name, "overhead", "%", x, 100 * (t.ms / base - 1))
        if name == "extract_topk":
            res.add("extract_topk", name, "bytes_per_token", "B", x, full.bpt)


def main(argv: list[str] | None = None) -> int:
    ap = harness.parser(__doc__)
    ap.add_argument("--tokenizer", default="llama-spm")
    ap.add_argument("--hidden", type=int, default=None, help="default 64 (--tiny: 16)")
    ap.add_argument("--layers", type=int, default=None, help="default 2 (--tiny: 1)")
    ap.add_argument("--docs", type=int, default=None, help="default 24 (--quick: 8, --tiny: 2)")
    ap.add_argument("--block-size", type=int, default=None, help="default 512 (--tiny: 128)")
    ap.add_argument("--token-budget", type=int, default=4096)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--dtype", default=None)
    a = ap.parse_args(argv)
    warmup, iters = harness.iterations(a, full=(1, 2), quick=(1, 1))
    tiny = a.tiny
    with harness.Results(a.csv) as res:
        run(a.tokenizer, a.hidden or (16 if tiny else 64), a.layers or (1 if tiny else 2),
            a.docs or (2 if tiny else 8 if a.quick else 24), a.block_size or (128 if tiny else 512), a.token_budget,
            a.k, a.device, a.dtype, warmup, iters, res, chars=2000 if tiny else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
