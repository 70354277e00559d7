"""Served teachers without a model server: token strings, reply parsing, vLLM offline outputs, and the
HTTP client's retries, limits and ordering against a stub on loopback that answers from a local
model (the real server is tests/teachers/test_served_server.py)."""
from __future__ import annotations

import json
import random
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from fastfuse.corpus import source_sequences  # noqa: E402
from fastfuse.teachers.local_extract import extract_topk  # noqa: E402
from fastfuse.teachers.served import ServerError, extract_served, rows_from_choice  # noqa: E402
from fastfuse.teachers.shards import ShardReader  # noqa: E402
from fastfuse.teachers.served_tokens import TokenStrings  # noqa: E402
from fastfuse.teachers.vllm_outputs import vllm_prompts, write_vllm_outputs  # noqa: E402
from _llama_server import tiny_llama  # noqa: E402
from test_extract import tiny_model  # noqa: E402


@pytest.mark.parametrize("name", ["llama-spm", "gpt-2", "qwen2"])
def test_token_strings_map_back_exactly(real_tokenizer, name):
    tok = real_tokenizer(name)
    ts = TokenStrings(tok)
    twins = 0
    for i in range(len(tok)):
        b = ts.surfaces[i]
        assert ts.lookup(f"token_id:{i}") == i
        if b.decode("utf-8", "ignore").encode() != b:  # not UTF-8 on its own: only as bytes or an id
            assert ts.lookup("bytes:" + "".join(f"\\x{c:02x}" for c in b)) == i
            continue
        j = ts.lookup(b.decode())
        if j != i:  # a byte-fallback token whose byte a regular token spells
            assert ts.byte_fallback[i] and not ts.byte_fallback[j] and ts.surfaces[j] == b
            twins += 1
        assert ts.consistent(b.decode(), i)
    assert (twins > 0) == (name == "llama-spm")  # <0x61> and a, ...
    with pytest.raises(ValueError, match="lossy"):
        ts.lookup("")  # llama-cpp-python's rendering of a token that is part of a character
    with pytest.raises(ValueError, match="outside"):
        ts.lookup(f"token_id:{len(tok)}")


def test_token_strings_refuse_several_ids():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    wp = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1, "##a": 2, "b": 3}, unk_token="[UNK]"))
    wp.pre_tokenizer = pre_tokenizers.Whitespace()
    wp.decoder = decoders.WordPiece()
    ts = TokenStrings(PreTrainedTokenizerFast(tokenizer_object=wp))
    assert ts.lookup("b") == 3
    with pytest.raises(ValueError, match="2 tokens .* token ids"):
        ts.lookup("a")  # "a" and "##a" have the same text


def local_rows(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=torch.from_numpy(ids)[None]).logits[0].float(), -1).numpy()


def openai_choice(lp: np.ndarray, ids: np.ndarray, k: int, render, hide_first: bool) -> dict:
    """A completions choice as vLLM (every prompt token echoed, ids) or llama-cpp-python (BOS hidden,
    strings, the prompt token added as a k+1-th entry) shape it, from true log-probs ``lp``."""
    gen = int(np.argmax(lp[-1]))
    toks = list(ids[1:] if hide_first else ids) + [gen]
    entries = [None]
    for j in range(1, len(toks)):
        row = lp[j if hide_first else j - 1]
        top = {render(int(t)): float(row[t]) for t in np.argsort(-row)[:k]}
        top[render(toks[j])] = float(row[toks[j]])
        entries.append(top)
    tlp = [None] + [float(lp[j if hide_first else j - 1][toks[j]]) for j in range(1, len(toks))]
    return {"index": 0, "finish_reason": "length",
            "logprobs": {"tokens": [render(int(t)) for t in toks], "token_logprobs": tlp, "top_logprobs": entries}}


@pytest.mark.parametrize("shape", ["vllm", "llama-cpp"])
def test_rows_from_choice(real_tokenizer, corpus, shape):
    tok = real_tokenizer("llama-spm")
    ts = TokenStrings(tok)
    model = tiny_llama(tok)  # byte-fallback rows zeroed: text names every top-k token exactly
    s = next(iter(source_sequences(tok, [corpus[3][:400]], 128)))[0]
    lp = local_rows(model, s.input_ids)
    render = (lambda t: f"token_id:{t}") if shape == "vllm" else (lambda t: ts.surfaces[t].decode("utf-8", "ignore"))
    choice = openai_choice(lp, s.input_ids, 5, render, hide_first=shape == "llama-cpp")
    rows = rows_from_choice(choice, s.input_ids, 5, ts, "sequence 0", hidden_ok=True)
    first = 1 if shape == "llama-cpp" else 0  # llama-cpp-python never reports the prediction after BOS
    assert (rows.ids[:first] == -1).all() and np.isneginf(rows.logprobs[:first].astype(np.float32)).all()
    want = np.argsort(-lp, axis=1, kind="stable")[:, :5]
    assert (rows.ids[first:] == want[first:]).mean() > 0.98
    np.testing.assert_allclose(rows.logprobs[first:].astype(np.float32), np.sort(lp, 1)[:, ::-1][first:, :5],
                               atol=1e-2)
    gold = lp[np.arange(len(s.input_ids) - 1), s.input_ids[1:]]
    assert rows.ce() == pytest.approx(-gold[first:].mean(), rel=1e-5)
    bad = json.loads(json.dumps(choice))
    bad["logprobs"]["tokens"][4] = render(int(s.input_ids[9]))
    with pytest.raises(ValueError, match="sequence 0: the server tokenised it differently: first difference at "
                                         f"position {4 + first}"):
        rows_from_choice(bad, s.input_ids, 5, ts, "sequence 0", hidden_ok=True)
    bad = json.loads(json.dumps(choice))
    for key in ("tokens", "token_logprobs", "top_logprobs"):  # the server read one token fewer
        del bad["logprobs"][key][-2:]
    with pytest.raises(ValueError, match="tokenised it differently"):
        rows_from_choice(bad, s.input_ids, 5, ts, "sequence 0", hidden_ok=True)
    lossy = json.loads(json.dumps(choice))
    lossy["logprobs"]["top_logprobs"][3] = {"": -0.1, **lossy["logprobs"]["top_logprobs"][3]}
    with pytest.raises(ValueError, match="sequence 0, position .*lossy"):
        rows_from_choice(lossy, s.input_ids, 5, ts, "sequence 0", hidden_ok=True)


def fake_vllm_outputs(model, prompts: list[dict], k: int) -> list:
    """``RequestOutput``-shaped objects (prompt_token_ids, prompt_logprobs of {id: Logprob(logprob,
    rank)}, outputs[0].logprobs) from a local forward pass: what vLLM returns, without vLLM."""
    outs = []
    for p in prompts:
        ids = np.asarray(p["prompt_token_ids"])
        lp = local_rows(model, ids)

        def entry(row: np.ndarray, extra: int | None) -> dict:
            order = np.argsort(-row, kind="stable")
            rank = np.empty_like(order)
            rank[order] = np.arange(1, len(row) + 1)
            keep = list(order[:k]) + ([extra] if extra is not None else [])
            return {int(t): SimpleNamespace(logprob=float(row[t]), rank=int(rank[t]), decoded_token=None) for t in keep}

        plp = [None] + [entry(lp[j - 1], int(ids[j])) for j in range(1, len(ids))]
        gen = SimpleNamespace(token_ids=[int(np.argmax(lp[-1]))], logprobs=[entry(lp[-1], None)])
        outs.append(SimpleNamespace(prompt_token_ids=ids.tolist(), prompt_logprobs=plp, outputs=[gen]))
    return outs


def test_vllm_outputs_match_local_extraction_and_resume(tmp_path, real_tokenizer, corpus):
    tok = real_tokenizer("llama-spm")
    model = tiny_model("llama", len(tok))
    texts = [corpus[i][:700] for i in (0, 2, 3)] + ["x"]
    kw = dict(k=6, block_size=64, shard_size=4, progress=False)
    local = extract_topk(model, tok, texts, tmp_path / "local", token_budget=256, **kw)
    outs = fake_vllm_outputs(model, vllm_prompts(tok, texts, 64), 6)
    stats = write_vllm_outputs(outs, tok, texts, tmp_path / "vllm", model_name="tiny", **kw)
    assert stats["rows_without_teacher"] == 0 and stats["total_tokens"] == local["total_tokens"]
    a, b = ShardReader(tmp_path / "local"), ShardReader(tmp_path / "vllm")
    np.testing.assert_allclose(b.ce, a.ce, rtol=1e-5, equal_nan=True)
    for x, y in zip(a, b):
        assert (x["topk_ids"] == y["topk_ids"]).mean() > 0.99
        np.testing.assert_allclose(y["topk_logprobs"].astype(np.float32), x["topk_logprobs"].astype(np.float32),
                                   atol=1e-2)
    assert b.bytes_per_token() == pytest.approx(a.bytes_per_token(), rel=0.02)
    # interrupted after the first shard; vllm_prompts then asks only for the rest; same bytes in the end
    part = tmp_path / "part"

    def first_five():
        yield from outs[:5]
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        write_vllm_outputs(first_five(), tok, texts, part, model_name="tiny", **kw)
    rest = vllm_prompts(tok, texts, 64, part)
    assert len(rest) == len(outs) - 4
    write_vllm_outputs(fake_vllm_outputs(model, rest, 6), tok, texts, part, model_name="tiny", **kw)
    for f in sorted(p.name for p in (tmp_path / "vllm").iterdir()):
        assert (part / f).read_bytes() == (tmp_path / "vllm" / f).read_bytes(), f
    with pytest.raises(ValueError, match="model_fingerprint"):
        write_vllm_outputs(outs, tok, texts, part, model_name="other", **kw)
    wrong = fake_vllm_outputs(model, vllm_prompts(tok, texts, 64), 6)
    wrong[1].prompt_token_ids[3] += 1
    with pytest.raises(ValueError, match="sequence 1: prompt_token_ids differ from the sequence at position 3"):
        write_vllm_outputs(wrong, tok, texts, tmp_path / "w", model_name="tiny", **kw)
    with pytest.raises(ValueError, match="ended before sequence"):
        write_vllm_outputs(outs[:-1], tok, texts, tmp_path / "w2", model_name="tiny", **kw)


class Stub:
    """An OpenAI-style completions endpoint on loopback that answers vLLM-shaped replies (ids echoed,
    "token_id:N" strings) from a local model, after injected failures and random delays."""

    def __init__(self, model, fail: list[int] | None = None, delay: float = 0.0, cap: int | None = None):
        self.model, self.fail, self.delay, self.cap = model, list(fail or []), delay, cap
        self.calls = 0
        self.lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def reply(self, code: int, obj) -> None:
                body = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    self.wfile.write(body)
                except BrokenPipeError:  # the client gave up on a hanging request, as it should
                    pass

            def do_GET(self):
                self.reply(200, {"data": [{"id": "stub"}]})

            def do_POST(self):
                req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with stub.lock:
                    stub.calls += 1
                    code = stub.fail.pop(0) if stub.fail else 200
                if code == "hang":
                    time.sleep(3)
                    code = 503
                if code != 200:
                    return self.reply(code, {"error": {"message": "injected"}})
                if stub.cap is not None and req["logprobs"] > stub.cap:
                    return self.reply(400, {"error": {"message": f"Requested sample logprobs of {req['logprobs']}, "
                                                                 f"which is greater than max allowed: {stub.cap}"}})
                time.sleep(random.random() * stub.delay)
                ids = np.asarray(req["prompt"])
                with stub.lock:
                    lp = local_rows(stub.model, ids)
                choice = openai_choice(lp, ids, req["logprobs"], lambda t: f"token_id:{t}", hide_first=False)
                self.reply(200, {"choices": [choice], "usage": {"prompt_tokens": len(ids), "completion_tokens": 1}})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def test_client_retries_orders_and_caps(tmp_path, real_tokenizer, corpus):
    tok = real_tokenizer("llama-spm")
    model = tiny_llama(tok)
    texts = [corpus[i][:200] for i in range(12)]
    kw = dict(k=5, block_size=64, shard_size=5, progress=False, timeout=1.0)
    with Stub(model, delay=0.2) as stub:  # replies out of order: shards still in order
        one = extract_served(stub.url, "stub", tok, texts, tmp_path / "one", concurrency=1, **kw)
        many = extract_served(stub.url, "stub", tok, texts, tmp_path / "many", concurrency=6, **kw)
    assert one["prompt_format"] == "ids" and many["rows_without_teacher"] == 0
    for f in sorted(p.name for p in (tmp_path / "one").iterdir()):
        assert (tmp_path / "many" / f).read_bytes() == (tmp_path / "one" / f).read_bytes(), f
    with Stub(model, fail=[503, 429, "hang", 502]) as stub:  # 4 failures, 5 retries: succeeds
        extract_served(stub.url, "stub", tok, texts[:2], tmp_path / "retry", concurrency=1, max_retries=5, **kw)
        assert stub.calls == 4 + len(ShardReader(tmp_path / "retry"))
    t0 = time.monotonic()
    with Stub(model, fail=[503] * 10) as stub, pytest.raises(ServerError, match="failed 3 times .*503"):
        extract_served(stub.url, "stub", tok, texts[:2], tmp_path / "fail", concurrency=1, max_retries=2, **kw)
    assert stub.calls == 3 and time.monotonic() - t0 < 10  # bounded: 0.5 s + 1 s of backoff
    with Stub(model, cap=20) as stub, pytest.raises(ValueError, match="k: .*max allowed: 20.*max-logprobs"):
        extract_served(stub.url, "stub", tok, texts[:2], tmp_path / "cap", concurrency=1, **{**kw, "k": 30})
    with Stub(model) as stub, pytest.raises(ValueError, match="served_model: .*serves \\['stub'\\]"):
        extract_served(stub.url, "nope", tok, texts[:2], tmp_path / "name", **kw)
