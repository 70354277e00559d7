"""`fastfuse extract --server` against a real llama-cpp-python server process on loopback.

A tiny random Llama (llama-spm tokenizer) is written as GGUF and served with all logits kept; its
shards must equal a local transformers forward pass of the same weights. llama-cpp-python is a CI
requirement (requirements-dev.txt): if it is missing or its server does not start, these tests fail.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from _llama_server import MODEL_ALIAS, llama_server, tiny_llama, write_gguf  # noqa: E402
from fastfuse.cli import main as cli_main  # noqa: E402
from fastfuse.corpus import source_sequences  # noqa: E402
from fastfuse.teachers.local_extract import extract_topk  # noqa: E402
from fastfuse.teachers.shards import META_NAME, ShardReader  # noqa: E402

KEY_ENV = "FASTFUSE_TEST_SERVER_KEY"
KEY = "test-key-0123"
BLOCK = 96
TOL = 2e-2  # fp16 storage of log-probs around -10 is 0.008 apart; llama.cpp and torch differ by ~1e-5


@pytest.fixture(scope="module")
def served(tmp_path_factory, real_tokenizer, vocab_dir, corpus):
    tok = real_tokenizer("llama-spm")
    d = tmp_path_factory.mktemp("served")
    model = tiny_llama(tok)
    write_gguf(model, str(vocab_dir / "ggml-vocab-llama-spm.gguf"), str(d / "tiny.gguf"))
    data = d / "corpus.jsonl"
    # short documents (one sequence each: text prompts are tokenised by the server whole) + a longer one
    texts = [corpus[i][:300] for i in (0, 2, 3, 4, 5, 6, 7)] + ["x", corpus[8][:900]]
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    os.environ[KEY_ENV] = KEY
    try:
        with llama_server(str(d / "tiny.gguf"), api_key=KEY) as url:
            yield {"url": url, "tok": tok, "model": model, "data": data, "texts": texts, "dir": d}
    finally:
        os.environ.pop(KEY_ENV, None)


def run(s, out, *extra, block=BLOCK) -> int:
    return cli_main(["extract", "--server", s["url"], "--served-model", MODEL_ALIAS, "--tokenizer", "llama-spm",
                     "--input", str(s["data"]), "--out", str(out), "--k", "10", "--block-size", str(block),
                     "--shard-size", "3", "--api-key-env", KEY_ENV, "--concurrency", "2", "--timeout", "60",
                     "--quiet", *extra])


def full_run(s):
    """The uninterrupted run, made once per module (each takes a while: the server sorts the whole
    vocabulary in Python at every position)."""
    if "full" not in s:
        assert run(s, s["dir"] / "full") == 0
        s["full"] = s["dir"] / "full"
    return s["full"]


def test_matches_local_forward(served, tmp_path, capsys):
    tok, model = served["tok"], served["model"]
    r = ShardReader(full_run(served))
    r.verify()
    seqs = [s for s, _ in source_sequences(tok, served["texts"], BLOCK)]
    assert len(r) == len(seqs) and r.complete and r.meta["dtype"] == "served"
    checked = 0
    for s in seqs:
        item = r[s.seq_index]
        assert (item["doc_index"], item["char_start"], item["char_end"]) == (s.doc_index, s.char_start, s.char_end)
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=torch.from_numpy(s.input_ids)[None]).logits[0].float(), -1).numpy()
        ids, got = item["topk_ids"], item["topk_logprobs"].astype(np.float32)
        # llama-cpp-python never reports the prediction after BOS alone: row 0 is "no teacher"
        assert (ids[0] == -1).all() and np.isneginf(got[0]).all()
        ref = np.sort(lp[1:], axis=1)[:, ::-1][:, :10]
        np.testing.assert_allclose(got[1:], ref, atol=TOL, rtol=2e-3)
        np.testing.assert_allclose(got[1:], np.take_along_axis(lp[1:], ids[1:].astype(np.int64), 1), atol=TOL)
        # ids equal wherever the neighbouring log-probs are apart by more than the tolerance
        ref_ids = np.argsort(-lp[1:], axis=1, kind="stable")[:, :10]
        gaps = np.diff(ref, axis=1)
        clear = np.ones_like(ids[1:], dtype=bool)
        clear[:, :-1] &= -gaps > TOL
        clear[:, 1:] &= -gaps > TOL
        assert (ids[1:][clear] == ref_ids[clear]).all()
        checked += int(clear.sum())
        gold = lp[np.arange(1, len(s.input_ids) - 1), s.input_ids[2:]]
        if len(gold):
            assert item["ce"] == pytest.approx(-gold.mean(), abs=1e-4)
    assert checked > 0.75 * 10 * (r.num_tokens - len(r))  # most neighbours are clearly apart
    # the same bytes per token as local extraction of the same weights
    local = extract_topk(model, tok, served["texts"], tmp_path / "local", k=10, block_size=BLOCK, token_budget=512,
                         shard_size=3, progress=False)
    assert r.bytes_per_token() == pytest.approx(local["bytes_per_token"], rel=0.02)
    assert r.num_tokens == local["total_tokens"]


def test_tokenizer_mismatch_names_sequence_and_position(served, tmp_path, capsys):
    # gpt-2's tokenisation of the same text: the server's echo differs, the run stops before any shard
    code = cli_main(["extract", "--server", served["url"], "--served-model", MODEL_ALIAS, "--tokenizer", "gpt-2",
                     "--input", str(served["data"]), "--out", str(tmp_path / "o"), "--k", "5", "--block-size", "96",
                     "--api-key-env", KEY_ENV, "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "sequence 0" in err and "tokenised it differently" in err and "position" in err, err
    assert not (tmp_path / "o" / "shard-00000.safetensors").exists()


def test_errors_name_the_flag(served, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    assert run(served, tmp_path / "a", "--api-key-env", "NO_SUCH_KEY_VAR") == 2
    assert "--api-key-env" in capsys.readouterr().err
    monkeypatch.setenv("WRONG_KEY", "nope")
    assert run(served, tmp_path / "b", "--api-key-env", "WRONG_KEY") == 2
    err = capsys.readouterr().err
    assert "--api-key-env" in err and "401" in err and "not accepted" in err
    no_key = ["extract", "--server", served["url"], "--served-model", MODEL_ALIAS, "--tokenizer", "llama-spm",
              "--input", str(served["data"]), "--out", str(tmp_path / "c"), "--quiet"]
    assert cli_main(no_key) == 2
    assert "needs an API key" in capsys.readouterr().err
    assert run(served, tmp_path / "d", "--served-model", "other") == 2
    err = capsys.readouterr().err
    assert "--served-model" in err and MODEL_ALIAS in err
    port_closed = served["url"].rsplit(":", 1)[0] + ":9"
    code = cli_main(["extract", "--server", port_closed, "--served-model", "m", "--tokenizer", "llama-spm",
                     "--input", str(served["data"]), "--out", str(tmp_path / "e"), "--timeout", "2", "--max-retries", "1",
                     "--quiet"])
    assert code == 2 and "--server" in capsys.readouterr().err
    assert cli_main(["extract", "--server", served["url"], "--model", "m", "--input", str(served["data"]),
                     "--out", str(tmp_path / "f")]) == 2
    assert "--model" in capsys.readouterr().err


KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from fastfuse.teachers.served import extract_served
    from fastfuse.tokenizer_files import load_tokenizer

    url, model, data, out, key = sys.argv[1:6]
    def die(i, path):
        os.kill(os.getpid(), signal.SIGKILL)  # killed right after the first shard is on disk
    extract_served(url, model, load_tokenizer("llama-spm"), [Path(data)], out, k=10, block_size=96, shard_size=3,
                   concurrency=2, api_key=key, progress=False, on_shard=die)
""")


def test_kill_and_resume(served, tmp_path, capsys):
    killed = tmp_path / "killed"
    script = tmp_path / "kill.py"
    script.write_text(KILL_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), served["url"], MODEL_ALIAS, str(served["data"]), str(killed),
                           KEY], env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    meta = json.loads((killed / META_NAME).read_text())
    assert meta["num_sequences"] == 3 and not meta["complete"]
    first = (killed / "shard-00000.safetensors").read_bytes()
    assert run(served, killed) == 0, capsys.readouterr().err   # resumes through the command line
    a, b = ShardReader(killed), ShardReader(full_run(served))
    a.verify()
    assert (killed / "shard-00000.safetensors").read_bytes() == first  # kept, not rewritten
    assert len(a) == len(b) and a.num_tokens == b.num_tokens and a.complete
    for x, y in zip(a, b):  # no sequence missing or twice, same values (the server is deterministic)
        assert x["seq_index"] == y["seq_index"] and x["char_start"] == y["char_start"]
        np.testing.assert_allclose(x["topk_logprobs"].astype(np.float32), y["topk_logprobs"].astype(np.float32),
                                   atol=TOL)
    assert run(served, killed) == 0  # a finished run is a no-op
    assert json.loads((killed / META_NAME).read_text())["num_sequences"] == len(b)
