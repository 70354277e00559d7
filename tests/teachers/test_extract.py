"""Top-k extraction against a direct unbatched forward pass; splitting; kill-and-resume; errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from fastfuse.cli import build_parser  # noqa: E402
from fastfuse.cli import main as cli_main  # noqa: E402
from fastfuse.corpus import iter_corpus, source_sequences, special_tokens, split_points  # noqa: E402
from fastfuse.teachers.local_extract import extract_topk, plan_batches  # noqa: E402
from fastfuse.teachers.shards import META_NAME, ShardReader, shard_name  # noqa: E402


def tiny_model(family: str, vocab_size: int, seed: int = 0):
    """A random tiny causal LM whose output distributions are peaked (so top-k order is meaningful)."""
    torch.manual_seed(seed)
    if family == "llama":
        cfg = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512)
        m = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.GPT2Config(vocab_size=vocab_size, n_embd=16, n_layer=2, n_head=2, n_positions=512)
        m = transformers.GPT2LMHeadModel(cfg)
    with torch.no_grad():
        m.get_output_embeddings().weight.mul_(40.0)
    return m.eval()


def reference(model, ids: np.ndarray, n_real: int, k: int):
    """Unbatched full forward pass of one sequence: top-k of log_softmax (fp32) and mean CE."""
    with torch.no_grad():
        logits = model(input_ids=torch.from_numpy(ids)[None]).logits[0].float()
    logits[:, n_real:] = float("-inf")
    lp = torch.log_softmax(logits, -1)
    vals, idx = lp.topk(k, -1)
    ce = -lp[:-1].gather(1, torch.from_numpy(ids[1:])[:, None]).mean().item() if len(ids) >= 2 else float("nan")
    return lp.numpy(), vals.numpy(), idx.numpy(), ce


def check_against_reference(model, tok, texts, out, k, block_size):
    r = ShardReader(out)
    r.verify()
    seqs = [s for s, _ in source_sequences(tok, texts, block_size)]
    assert len(r) == len(seqs) and r.complete
    n_real = len(tok)
    agree = total = 0
    for s in seqs:
        item = r[s.seq_index]
        assert (item["doc_index"], item["char_start"], item["char_end"]) == (s.doc_index, s.char_start, s.char_end)
        lp, vals, idx, ce = reference(model, s.input_ids, n_real, k)
        ids, got = item["topk_ids"], item["topk_logprobs"].astype(np.float32)
        assert ids.shape == (len(s.input_ids), k) and ids.max() < n_real
        np.testing.assert_allclose(got, vals, atol=2e-2, rtol=2e-3)  # fp16 storage
        np.testing.assert_allclose(got, np.take_along_axis(lp, ids.astype(np.int64), 1), atol=2e-2, rtol=2e-3)
        agree += int((ids == idx).sum())
        total += ids.size
        if np.isnan(ce):
            assert np.isnan(item["ce"])
        else:
            assert item["ce"] == pytest.approx(ce, rel=1e-4, abs=1e-5)
    assert agree / total > 0.99  # only exact near-ties may swap places


@pytest.mark.parametrize("family,tok_name,pad", [("gpt2", "gpt-2", 0), ("llama", "llama-spm", 13)])
def test_matches_unbatched_forward(tmp_path, real_tokenizer, corpus, family, tok_name, pad):
    tok = real_tokenizer(tok_name)
    model = tiny_model(family, len(tok) + pad)  # pad > 0: padded embedding, masked columns
    texts = [corpus[i] for i in (0, 2, 3, 4)] + ["x", ""]  # a 1-token document (CE NaN) and an empty one (no sequence)
    k, block = 10, 96
    stats = extract_topk(model, tok, texts, tmp_path, k=k, block_size=block, token_budget=400, shard_size=7,
                         progress=False)
    assert stats["shards_written"] >= 2
    meta = json.loads((tmp_path / META_NAME).read_text())
    assert meta["vocab_size"] == len(tok) + pad and meta["tokenizer_size"] == len(tok) and meta["k"] == k
    check_against_reference(model, tok, texts, tmp_path, k, block)
    # the document "x" is one token (CE NaN) unless the tokenizer adds a BOS
    assert np.isnan(ShardReader(tmp_path).ce[-1]) == (not special_tokens(tok)[0])


@pytest.mark.parametrize("tok_name", ["llama-spm", "gpt-2", "qwen2"])
def test_long_document_split(real_tokenizer, corpus, tok_name):
    tok = real_tokenizer(tok_name)
    doc = "".join(corpus[:3]) + " Ünïcödé ✓ 日本語のテキスト 🙂🙂 " * 20 + corpus[3]
    prefix, suffix = special_tokens(tok)
    block = 50
    full = tok(doc, add_special_tokens=False)["input_ids"]
    seqs = [s for s, _ in source_sequences(tok, [doc, "short doc", doc], block)]
    per_doc = {d: [s for s in seqs if s.doc_index == d] for d in range(3)}
    assert [s.seq_index for s in seqs] == list(range(len(seqs)))
    assert len(per_doc[1]) == 1 and len(per_doc[0]) == len(per_doc[2]) > len(full) // block
    chunks = per_doc[0]
    assert all(len(s.input_ids) <= block for s in chunks)
    assert "".join(doc[s.char_start:s.char_end] for s in chunks) == doc
    assert chunks[0].char_start == 0 and chunks[-1].char_end == len(doc)
    assert all(a.char_end == b.char_start for a, b in zip(chunks, chunks[1:]))
    body = [s.input_ids[len(prefix):len(s.input_ids) - len(suffix)] for s in chunks]
    assert all(list(s.input_ids[:len(prefix)]) == prefix for s in chunks)
    np.testing.assert_array_equal(np.concatenate(body), full)  # token slices, never re-tokenised
    for s, b in zip(chunks, body):
        offs = s.offsets[len(prefix):len(prefix) + len(b)]
        assert offs[:, 1].max() <= s.char_end and offs[:, 0].min() >= s.char_start


def test_split_points_rule():
    offs = np.array([[0, 1], [1, 2], [2, 3], [2, 3], [2, 3], [3, 4], [4, 5]])  # tokens 2-4 share a character
    assert split_points(offs, 10) == [0, 7]
    assert split_points(offs, 4) == [0, 2, 6, 7]  # never cut inside the shared character
    assert split_points(offs, 3) == [0, 2, 5, 7]
    assert split_points(offs, 2) == [0, 2, 4, 6, 7]  # no clean cut within 2: cut at the limit


def test_plan_batches():
    lens = np.array([5, 9, 3, 9, 1, 4, 7])
    batches = plan_batches(lens, 20)
    assert sorted(np.concatenate(batches).tolist()) == list(range(7))
    assert all(lens[b].max() * len(b) <= 20 or len(b) == 1 for b in batches)
    assert [b.tolist() for b in batches] == [[1, 3], [6, 0], [5, 2, 4]]
    assert [b.tolist() for b in plan_batches([30, 2], 20)] == [[0], [1]]


def test_corpus_sources(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two", "x": 1}) + "\n")
    (tmp_path / "b.txt").write_text("three\nlines")
    assert list(iter_corpus([tmp_path / "a.jsonl", tmp_path / "b.txt"])) == ["one", "two", "three\nlines"]
    assert list(iter_corpus(iter(["p", "q"]))) == ["p", "q"]

    class FakeDataset:  # the part of datasets.Dataset that iter_corpus uses
        column_names = ["id", "text"]

        def __iter__(self):
            return iter([{"id": 0, "text": "r"}, {"id": 1, "text": "s"}])

    assert list(iter_corpus(FakeDataset())) == ["r", "s"]
    with pytest.raises(ValueError, match="column"):
        list(iter_corpus(FakeDataset(), text_field="body"))
    with pytest.raises(TypeError, match="texts"):
        list(iter_corpus("a bare string"))
    (tmp_path / "bad.jsonl").write_text('{"txt": "x"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        list(iter_corpus(tmp_path / "bad.jsonl"))


def test_bytes_per_token(tmp_path, real_tokenizer, corpus):
    tok = real_tokenizer("gpt-2")
    model = tiny_model("gpt2", len(tok))
    texts = [corpus[i] for i in (0, 1, 3, 4, 6, 7)]
    stats = extract_topk(model, tok, texts, tmp_path, k=10, block_size=512, token_budget=2048, shard_size=16,
                         progress=False)
    files = sum(p.stat().st_size for p in tmp_path.iterdir())
    bpt = files / stats["total_tokens"]
    print(f"\nbytes per token at k=10: {bpt:.2f} ({stats['total_tokens']} tokens, {stats['sequences']} sequences)")
    assert bpt == pytest.approx(stats["bytes_per_token"]) and 60 <= bpt <= 64


def test_resume_mismatch_errors(tmp_path, real_tokenizer, corpus):
    tok = real_tokenizer("gpt-2")
    model = tiny_model("gpt2", len(tok))
    kw = dict(block_size=64, token_budget=256, shard_size=4, progress=False)
    extract_topk(model, tok, corpus[:3], tmp_path, k=4, **kw)
    with pytest.raises(ValueError, match="k: 4 .* 5 now"):
        extract_topk(model, tok, corpus[:3], tmp_path, k=5, **kw)
    other = real_tokenizer("mpt")
    with pytest.raises(ValueError, match="tokenizer_fingerprint"):
        extract_topk(tiny_model("gpt2", len(other)), other, corpus[:3], tmp_path, k=4, **kw)
    with pytest.raises(ValueError, match="corpus differs"):
        extract_topk(model, tok, corpus[1:4], tmp_path, k=4, **kw)
    with pytest.raises(ValueError, match="fewer than"):
        extract_topk(model, tok, corpus[:1], tmp_path, k=4, **kw)
    with pytest.raises(ValueError, match="token_budget"):
        extract_topk(model, tok, corpus[:3], tmp_path / "x", k=4, block_size=64, token_budget=32)
    with pytest.raises(ValueError, match="logits"):
        extract_topk(tiny_model("gpt2", 100), tok, corpus[:3], tmp_path / "y", k=4, **kw)


KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from transformers import AutoModelForCausalLM
    from fastfuse.teachers.local_extract import extract_topk
    from fastfuse.tokenizer_files import load_tokenizer

    model_dir, corpus, out = sys.argv[1:4]
    def die(i, path):
        # a stray partial temp file, as if the process died while writing the next shard
        Path(out, ".shard-%05d.safetensors.tmp" % (i + 1)).write_bytes(b"partial")
        os.kill(os.getpid(), signal.SIGKILL)
    extract_topk(AutoModelForCausalLM.from_pretrained(model_dir), load_tokenizer("gpt-2"), [Path(corpus)], out,
                 k=10, block_size=64, token_budget=256, shard_size=5, progress=False, on_shard=die)
""")


def test_kill_and_resume_byte_identical(tmp_path, real_tokenizer, corpus):
    tok = real_tokenizer("gpt-2")
    model_dir = tmp_path / "model"
    tiny_model("gpt2", len(tok)).save_pretrained(model_dir)
    data = tmp_path / "corpus.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in [corpus[i] for i in (0, 3, 4, 6, 7, 8)]))
    killed = tmp_path / "killed"
    script = tmp_path / "kill.py"
    script.write_text(KILL_SCRIPT)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(script), str(model_dir), str(data), str(killed)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    assert sorted(p.name for p in killed.iterdir()) == [".shard-00001.safetensors.tmp", META_NAME, shard_name(0)]
    assert not json.loads((killed / META_NAME).read_text())["complete"]
    args = ["--model", str(model_dir), "--tokenizer", "gpt-2", "--input", str(data), "--k", "10", "--block-size", "64",
            "--token-budget", "256", "--shard-size", "5", "--quiet"]
    assert main(args + ["--out", str(killed)]) == 0  # resume through the command line
    fresh = tmp_path / "fresh"
    assert main(args + ["--out", str(fresh)]) == 0
    names = sorted(p.name for p in fresh.iterdir())
    assert names == sorted(p.name for p in killed.iterdir()) and len(names) > 3
    for n in names:
        assert (fresh / n).read_bytes() == (killed / n).read_bytes(), n
    # a finished run is a no-op when restarted
    assert main(args + ["--out", str(fresh)]) == 0
    assert (fresh / META_NAME).read_bytes() == (killed / META_NAME).read_bytes()


def main(args: list[str]) -> int:
    return cli_main(["extract", *args])


def test_cli_registration(capsys):
    a = build_parser().parse_args(["extract", "--model", "m", "--input", "a.jsonl", "b.txt", "--out", "o", "--k", "5"])
    assert a.k == 5 and a.input == ["a.jsonl", "b.txt"] and callable(a.func)
    assert main(["--model", "/nonexistent", "--input", "x", "--out", "o"]) == 2
    assert "--model" in capsys.readouterr().err


def test_bf16_matches_fp32_roughly(tmp_path, real_tokenizer, corpus):
    """The low-precision path (logits upcast chunk-wise) on CPU: same shapes, close values."""
    tok = real_tokenizer("llama-spm")
    texts = [corpus[0], corpus[4]]
    kw = dict(k=5, block_size=128, token_budget=512, shard_size=4, progress=False)
    extract_topk(tiny_model("llama", len(tok) + 3), tok, texts, tmp_path / "f32", **kw)
    extract_topk(tiny_model("llama", len(tok) + 3), tok, texts, tmp_path / "bf16", dtype="bfloat16", **kw)
    a, b = ShardReader(tmp_path / "f32"), ShardReader(tmp_path / "bf16")
    assert b.meta["dtype"] == "bfloat16" and len(a) == len(b) and a.num_tokens == b.num_tokens
    np.testing.assert_allclose(b.ce, a.ce, rtol=0.05)
    for x, y in zip(a, b):
        assert (y["topk_ids"] < len(tok)).all() and np.all(np.diff(y["topk_logprobs"].astype(np.float32), axis=1) <= 0)
        assert (x["topk_ids"][:, 0] == y["topk_ids"][:, 0]).mean() > 0.8
