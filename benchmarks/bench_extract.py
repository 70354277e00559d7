"""Top-k extraction benchmark: overhead over a bare forward pass on the same batches, and bytes/token.

    python benchmarks/bench_extract.py [--tokenizer llama-spm] [--hidden 64] [--layers 2] [--docs 24]
                                       [--block-size 512] [--token-budget 4096] [--device cpu]
                                       [--dtype float32] [--repeats 2] [--csv out.csv]

A random-initialised Llama of the given size (vocabulary of a real tokenizer) reads the first
``--docs`` pydoc topics. One row per provider, all on the same token-budget batches:

* ``forward``: ``model(input_ids, attention_mask)`` only (the floor);
* ``forward+topk``: plus fp32 log-sum-exp, ``torch.topk``, gold log-probs and the host copy
  (:func:`fastfuse.teachers.local_extract.topk_forward`);
* ``extract_topk``: the whole pipeline (tokenise, split, batch, top-k, write shards + meta.json).

Goal on a GPU with a real source model: extraction <= 5 % over the bare forward. On a CPU with a
tiny model the logits dominate and the overhead is much larger; the table says what it is. Under
pytest (``pytest benchmarks/bench_extract.py --benchmark-enable``) a small configuration runs
through pytest-benchmark.
"""
from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from fastfuse.teachers.local_extract import (extract_topk, forward_logits, pad_token_ids, plan_batches,  # noqa: E402
                              source_sequences, topk_forward)
from fastfuse.teachers.shards import ShardReader  # noqa: E402

from _common import write_csv  # noqa: E402


def make_model(vocab: int, hidden: int, layers: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    heads = max(1, hidden // 64) if hidden >= 64 else 2
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 4 // 1 if hidden < 256 else
                      int(hidden * 8 / 3), num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=heads, max_position_embeddings=8192)
    return LlamaForCausalLM(cfg).eval()


def corpus(n_docs: int) -> list[str]:
    from fastfuse.corpus import python_docs

    return python_docs(n_docs)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def run(tokenizer_name="llama-spm", hidden=64, layers=2, docs=24, block_size=512, token_budget=4096, k=10,
        device=None, dtype=None, repeats=2) -> list[dict]:
    from fastfuse.tokenizer_files import load_tokenizer

    tok = load_tokenizer(tokenizer_name)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else (
        dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32))
    model = make_model(len(tok), hidden, layers).to(device=device, dtype=dtype)
    texts = corpus(docs)
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

    rows = []
    base = None
    for name, fn in (("forward", bare), ("forward+topk", with_topk), ("extract_topk", full)):
        fn()  # warm-up
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        base = base or best
        rows.append(dict(provider=name, device=str(device), dtype=str(dtype).replace("torch.", ""),
                         model=f"llama h={hidden} L={layers} V={len(tok)}", tokens=n_tok,
                         padding=f"{n_pad / n_tok - 1:.1%}", time_s=best, tokens_per_s=n_tok / best,
                         overhead=best / base - 1, bytes_per_token=getattr(full, "bpt", None) if name == "extract_topk"
                         else None))
    return rows


def print_table(rows: list[dict]) -> None:
    r0 = rows[0]
    print(f"\n{r0['model']}, {r0['device']} {r0['dtype']}, {r0['tokens']} tokens, padding waste {r0['padding']}\n")
    print(f"{'provider':<14}{'time (s)':>10}{'tok/s':>11}{'overhead':>10}{'bytes/tok':>11}")
    for r in rows:
        bpt = f"{r['bytes_per_token']:.2f}" if r["bytes_per_token"] else "-"
        print(f"{r['provider']:<14}{r['time_s']:>10.3f}{r['tokens_per_s']:>11.0f}{r['overhead']:>10.1%}{bpt:>11}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer", default="llama-spm")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--docs", type=int, default=24)
    ap.add_argument("--block-size", type=int, default=512)
    ap.add_argument("--token-budget", type=int, default=4096)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--csv", help="also write the rows to this CSV file")
    a = ap.parse_args(argv)
    rows = run(a.tokenizer, a.hidden, a.layers, a.docs, a.block_size, a.token_budget, a.k, a.device, a.dtype,
               a.repeats)
    print_table(rows)
    if a.csv:
        write_csv(a.csv, rows)


# ------------------------------------------------------------------ pytest-benchmark
def test_bench_extract(benchmark, tmp_path):
    pytest.importorskip("transformers")
    from fastfuse.tokenizer_files import load_tokenizer

    tok = load_tokenizer("llama-spm")
    model = make_model(len(tok), 32, 1)
    texts = corpus(4)

    def once():
        d = tempfile.mkdtemp(dir=tmp_path)
        return extract_topk(model, tok, texts, d, k=10, block_size=256, token_budget=1024, shard_size=8,
                            progress=False)

    st = benchmark.pedantic(once, rounds=1, iterations=1)
    benchmark.extra_info.update(tokens=st["total_tokens"], bytes_per_token=st["bytes_per_token"])
    assert st["bytes_per_token"] <= 64


if __name__ == "__main__":
    main()
