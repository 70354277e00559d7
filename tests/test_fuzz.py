"""Generated bad input at the public entry points and the command line, each run in a subprocess:
the only ways out are a result, or a ``ValueError``/``TypeError`` whose message names the argument
(a ``fastfuse: error: ...`` line and exit status 2 for the CLI) -- never a signal, a hang past the
bound, or a file written outside the output directory. Time-boxed: a few hundred examples."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow       # every case runs in a subprocess
pytest.importorskip("hypothesis")
pytest.importorskip("torch")

# One worker per entry point group: hypothesis picks an argument and a bad value for it; the worker
# prints the first offending call and exits 1, so a crash (signal) shows as a negative return code.
WORKER = textwrap.dedent(r'''
    import math, sys
    import numpy as np
    import torch
    from hypothesis import HealthCheck, given, settings, strategies as st
    import fastfuse
    from fastfuse.testing import random_inputs

    BAD = st.one_of(
        st.sampled_from([None, True, -1, 0, 2**31, 2**40, 2**64, -2**63, float("nan"), float("inf"), -0.5, 1.5,
                         "x", "", [], [[1]], [1.5, 2.5], ("a",), {"k": 1}, b"\xff", object()]),
        st.integers(min_value=-2**70, max_value=2**70),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=8),
        st.lists(st.integers(min_value=-2**40, max_value=2**40), max_size=6),
        st.builds(lambda n, dt, scale: (np.random.default_rng(n).standard_normal(n % 7 + 1) * scale).astype(dt),
                  st.integers(0, 50), st.sampled_from(["float64", "int64", "int32", "float16", "uint8"]),
                  st.sampled_from([1.0, 1e12, -5.0])),
        st.builds(lambda shape, dt: torch.zeros(shape, dtype=dt),
                  st.lists(st.integers(0, 3), max_size=4).map(tuple),
                  st.sampled_from([torch.float32, torch.int64, torch.int32, torch.bool, torch.float64])),
    )

    def check(name, fn, base, arg, value, aliases=()):
        kwargs = dict(base)
        kwargs[arg] = value
        try:
            fn(**kwargs)
        except (ValueError, TypeError) as e:
            msg = str(e)
            if not any(a in msg for a in (arg, *aliases)):
                raise AssertionError(f"{name}({arg}={value!r:.80}): {type(e).__name__} does not name {arg!r}: "
                                     f"{msg[:300]}") from None
        except Exception as e:
            raise AssertionError(f"{name}({arg}={value!r:.80}): {type(e).__name__}: {str(e)[:300]}") from None

    def run(name, fn, base, aliases={}):
        @settings(max_examples=int(sys.argv[2]), deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(st.sampled_from(sorted(base)), BAD)
        def prop(arg, value):
            check(name, fn, base, arg, value, aliases.get(arg, ()))
        prop()

    import warnings
    warnings.simplefilter("ignore")
    group = sys.argv[1]
    if group == "alignment":
        ends = np.array([1, 3, 6]), np.array([2, 3, 6])
        run("align_offsets", fastfuse.align_offsets, {"tgt_ends": ends[0], "src_ends": ends[1]})
        run("align_offsets_batch", fastfuse.align_offsets_batch,
            {"tgt_ends": [ends[0]], "src_ends": [ends[1]], "num_threads": 2})
        run("align_groups", fastfuse.align_groups, {"tgt_ends": ends[0], "src_ends": ends[1]})
        run("dtw_align", fastfuse.dtw_align,
            {"src_tokens": ["ab", "c"], "tgt_tokens": ["a", "bc"], "num_threads": 1, "max_cells": 100})
        run("dtw_align_batch", fastfuse.dtw_align_batch,
            {"src_batch": [["ab", "c"]], "tgt_batch": [["a", "bc"]], "num_threads": 1})
    elif group == "loss":
        d = random_inputs(2, 3, 40, 2, 4, Ts=5, Vs=30, generator=torch.Generator().manual_seed(0))
        topk, amap = fastfuse.SourceTopK(*d["source_topk"]), fastfuse.AlignMap(*d["align_map"])
        teacher = {"source_topk": topk, "align_map": amap, "labels": d["labels"],
                   "source_weights": d["source_weights"], "lm_weight": 0.5, "temperature": 1.0,
                   "ignore_index": -100, "reduction": "mean", "impl": "torch", "validate": True}
        run("fused_loss", fastfuse.fused_loss, {"target_logits": d["target_logits"], **teacher},
            aliases={"source_topk": ("source_topk",), "align_map": ("align_map",)})
        run("fused_linear_loss", fastfuse.fused_linear_loss,
            {"hidden": torch.randn(2, 3, 8), "weight": torch.randn(40, 8), "bias": None, "chunk_tokens": 4,
             **teacher})
    elif group == "fusion":
        ce = torch.rand(3, 4)
        run("fuse_weights", fastfuse.fuse_weights, {"ce": ce, "method": "min_ce", "level": "sequence", "tau": 1.0})
        run("avg_ce_weights", fastfuse.avg_ce_weights, {"ce": ce, "tau": 1.0, "mask": None})
        run("reward_weights", fastfuse.reward_weights, {"rewards": ce, "method": "max", "tau": 1.0})
        run("FusionCollator", fastfuse.FusionCollator,
            {"vocab_maps": [np.arange(10)], "pad_token_id": 0, "target_vocab_size": 20, "fusion": "min_ce"})
        ex = {"input_ids": np.arange(4), "topk_ids": [np.zeros((3, 2), np.int32)],
              "topk_logprobs": [np.zeros((3, 2), np.float32)], "pos": [np.full(4, -1, np.int32)],
              "ce": np.array([1.0], np.float32)}
        collate = fastfuse.FusionCollator([np.arange(10)], pad_token_id=0)
        run("FusionCollator()", lambda **kw: collate([{**ex, **kw}]), dict(ex),
            aliases={k: ("examples[0]",) for k in ex})
    print("OK")
''')

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("group", ["alignment", "loss", "fusion"])
def test_library_entry_points_under_generated_bad_input(tmp_path, group):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    r = subprocess.run([sys.executable, str(script), group, "60"], capture_output=True, text=True, timeout=600,
                       cwd=tmp_path, env={**os.environ, "TRITON_INTERPRET": "0"})
    assert r.returncode == 0 and r.stdout.strip().endswith("OK"), \
        f"exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"


def tree(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}


FLAG_VALUES = ["", "..", "../escape", "../../escape", "/dev/null", "x" * 300, "-1", "0", "2147483648", "nan",
               "a=b", "target=gpt-2:in.jsonl", "../x=gpt-2:.", "../../x=gpt-2:in.jsonl", "gpt-2", "nonsense",
               "in.jsonl", "\u00e9\u00e8", "cuda", "float16", "foo"]
OUT_VALUES = ["out", "out/sub", "out/c.jsonl", "out/missing/c.jsonl", "in.jsonl"]   # where writing is asked for


def test_command_line_under_generated_bad_input(tmp_path, vocab_dir):
    """Valid commands with 1-3 flags replaced by generated values, in a sandbox: exit 0 or 2 with one
    error line, never a traceback or a signal, and nothing written outside ``work/out*``."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from transformers import GPT2Config, GPT2LMHeadModel

    sandbox = tmp_path / "sandbox"
    work = sandbox / "work"
    work.mkdir(parents=True)
    (work / "in.jsonl").write_text('{"text": "Hello world, hello fusion."}\n{"text": "Second document."}\n')
    GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_embd=8, n_layer=1, n_head=2, n_positions=64)).save_pretrained(
        work / "model")
    base = {"chunk": {"--tokenizers": "gpt-2", "--input": "in.jsonl", "--block-size": "32", "--out": "out/c.jsonl"},
            "align": {"--target": "gpt-2", "--source": "s=gpt-2:src", "--input": "in.jsonl", "--out": "out/al"},
            "extract": {"--model": "model", "--tokenizer": "gpt-2", "--input": "in.jsonl", "--out": "out/x",
                        "--k": "4", "--block-size": "32", "--token-budget": "64", "--shard-size": "1"}}
    extra = {"chunk": ["--text-field"], "align": ["--mode", "--threads", "--workers"],
             "extract": ["--device", "--dtype", "--source-name", "--rank", "--world-size", "--server"]}
    before = tree(sandbox)

    @settings(max_examples=20, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(st.sampled_from(sorted(base)).flatmap(lambda c: st.tuples(st.just(c), st.lists(
        st.sampled_from(sorted(base[c]) + extra[c]).flatmap(
            lambda f: st.tuples(st.just(f), st.sampled_from(OUT_VALUES if f == "--out" else FLAG_VALUES))),
        min_size=1, max_size=3))))
    def prop(cmd_and_flags):
        cmd, pairs = cmd_and_flags
        flags = dict(base[cmd])
        flags.update(pairs)
        argv = [cmd, "--quiet"] + [x for kv in flags.items() for x in kv]
        r = subprocess.run([sys.executable, "-m", "fastfuse", *argv], capture_output=True, text=True, timeout=180,
                           cwd=work, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert r.returncode in (0, 2), f"{argv}: exit {r.returncode}\n{r.stderr[-2000:]}"
        assert "Traceback" not in r.stderr, f"{argv}:\n{r.stderr[-2000:]}"
        if r.returncode == 2:
            assert "error:" in r.stderr.strip().splitlines()[-1], f"{argv}:\n{r.stderr[-2000:]}"
        new = {p for p in tree(sandbox) - before if not p.startswith("work/out")}
        assert not new, f"{argv} wrote outside its output: {sorted(new)}"

    prop()


# ---- served teachers against a misbehaving server on 127.0.0.1 (tests/_hostile_server.py) ----
# Every run below is bounded by its own settings (timeout, retries, the server's MAX_S), not by pytest-timeout.

def served_setup(real_tokenizer, corpus):
    tok = real_tokenizer("llama-spm")
    texts = [corpus[i][:150] for i in range(4)]
    return tok, texts, dict(k=4, block_size=48, shard_size=3, progress=False, concurrency=2)


def served_run(url, tok, texts, out, **kw):
    from fastfuse.teachers.served import extract_served

    return extract_served(url, "stub", tok, texts, out, **kw)


@pytest.mark.parametrize("mode", ["drip", "drip_headers"])
def test_served_deadline_bounds_the_whole_request(tmp_path, real_tokenizer, corpus, mode):
    """A server that sends its reply a byte at a time is cut off at the timeout, retried, then a
    ServerError -- in about (retries + 1) x timeout + backoff, not the server's 20 s."""
    import time

    from _hostile_server import HostileServer
    from fastfuse.teachers.served import ServerError

    tok, texts, kw = served_setup(real_tokenizer, corpus)
    t0 = time.monotonic()
    with HostileServer(len(tok), [mode] * 2) as s, pytest.raises(ServerError, match="failed 2 times"):
        served_run(s.url, tok, texts, tmp_path / "a", timeout=1.0, max_retries=1, **kw)
    assert time.monotonic() - t0 < 8
    with HostileServer(len(tok), [mode]) as s:      # one slow reply: the retry succeeds
        st = served_run(s.url, tok, texts, tmp_path / "b", timeout=1.0, max_retries=2, **kw)
    assert st["rows_without_teacher"] == 0 and time.monotonic() - t0 < 16


@pytest.mark.parametrize("mode", ["huge", "huge_length"])
def test_served_huge_reply_is_refused(tmp_path, real_tokenizer, corpus, mode):
    from _hostile_server import HostileServer

    tok, texts, kw = served_setup(real_tokenizer, corpus)
    with HostileServer(len(tok), [mode]) as s, pytest.raises(ValueError, match="server_url: .*more than the \\d+"):
        served_run(s.url, tok, texts, tmp_path / "a", timeout=10.0, max_retries=0, **kw)


@pytest.mark.parametrize("kind,field", [
    ("top_inf", "top_logprobs"), ("top_positive", "top_logprobs"), ("top_huge", "top_logprobs"),
    ("top_true", "top_logprobs"), ("top_tiny", "top_logprobs"), ("gold_inf", "token_logprobs"),
    ("gold_nan", "token_logprobs"), ("gold_abc", "token_logprobs"), ("gold_dict", "token_logprobs")])
def test_served_impossible_values_are_refused(tmp_path, real_tokenizer, corpus, kind, field):
    """Log-probs must be numbers, finite, <= 0 and storable: refused naming sequence, position and field;
    nothing written."""
    from _hostile_server import HostileServer

    tok, texts, kw = served_setup(real_tokenizer, corpus)
    with HostileServer(len(tok), [kind]) as s, \
            pytest.raises(ValueError, match=f"sequence 0, position 1: {field}"):
        served_run(s.url, tok, texts, tmp_path / "a", timeout=10.0, max_retries=0, **kw)
    assert not list((tmp_path / "a").glob("shard-*"))


@pytest.mark.parametrize("modes", [["status_500"], ["status_500", "status_502", "status_599"], ["status_503"]])
def test_served_5xx_on_the_first_request_is_retried(tmp_path, real_tokenizer, corpus, modes):
    from _hostile_server import HostileServer
    from fastfuse.teachers.shards import ShardReader

    tok, texts, kw = served_setup(real_tokenizer, corpus)
    with HostileServer(len(tok), modes) as s:
        st = served_run(s.url, tok, texts, tmp_path / "a", timeout=10.0, max_retries=3, **kw)
        assert st["prompt_format"] == "ids" and s.calls == len(modes) + len(ShardReader(tmp_path / "a"))


SECRET, KEY = "pa55-w0rd-SECRET", "sk-KEY-0123456789"


@pytest.mark.parametrize("mode", ["echo_400", "echo_401", "echo_500", "echo_in_token", "closed"])
def test_served_secrets_are_never_recorded_or_printed(tmp_path, real_tokenizer, corpus, capsys, monkeypatch, mode):
    """The URL's password and the API key go to the server only: not in meta.json, not in an error,
    however the server quotes them back."""
    import base64
    import json
    import socket

    from _hostile_server import HostileServer
    from fastfuse.cli import main as cli_main

    tok, texts, _ = served_setup(real_tokenizer, corpus)
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    monkeypatch.setenv("FF_KEY", KEY)
    leaks = (SECRET, KEY, base64.b64encode(f"user:{SECRET}".encode()).decode())
    with HostileServer(len(tok), [mode] * (1 if mode in ("echo_400", "echo_401") else 3)) as s:
        url = s.url.replace("http://", f"http://user:{SECRET}@")
        if mode == "closed":
            with socket.socket() as sk:
                sk.bind(("127.0.0.1", 0))
                url = f"http://user:{SECRET}@127.0.0.1:{sk.getsockname()[1]}"
        argv = ["extract", "--server", url, "--served-model", "stub", "--tokenizer", "llama-spm", "--input",
                str(data), "--k", "4", "--block-size", "48", "--timeout", "5", "--max-retries", "1", "--quiet"]
        code = cli_main(argv + ["--out", str(tmp_path / "a"), "--api-key-env", "FF_KEY"])
        err = capsys.readouterr().err
        assert code == 2 and err.strip().count("\n") == 0, err
        assert not any(x in err for x in leaks), err
        if mode == "echo_400":
            assert s.seen_auth[0] == f"Bearer {KEY}" and "<redacted>" in err
            assert cli_main(argv + ["--out", str(tmp_path / "b")]) == 0      # basic auth from the URL: works
            assert s.seen_auth[-1].startswith("Basic ")
            meta = (tmp_path / "b" / "meta.json").read_text()
            assert SECRET not in meta and "user" not in meta and s.url in meta


def test_served_timeout_flag_must_be_finite(tmp_path, real_tokenizer, corpus, capsys):
    import json

    from fastfuse.cli import main as cli_main

    tok, texts, kw = served_setup(real_tokenizer, corpus)
    data = tmp_path / "in.jsonl"
    data.write_text(json.dumps({"text": texts[0]}) + "\n")
    for value in ("inf", "1e300", "nan", "0", "-1"):
        code = cli_main(["extract", "--server", "http://127.0.0.1:9", "--served-model", "m", "--tokenizer",
                         "llama-spm", "--input", str(data), "--out", str(tmp_path / "a"), "--timeout", value, "--quiet"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.count("\n") == 0 and "--timeout" in err, (value, err)
    for value in (float("inf"), 1e300, True):
        with pytest.raises(ValueError, match="timeout"):
            served_run("http://127.0.0.1:9", tok, texts, tmp_path / "b", timeout=value, **kw)


def served_records(reader):
    return [(r["seq_index"], r["doc_index"], r["char_start"], r["char_end"], r["topk_ids"].tobytes(),
             r["topk_logprobs"].tobytes(), float(r["ce"])) for r in reader]


def test_served_extraction_splits_by_rank(tmp_path, real_tokenizer, corpus, monkeypatch):
    """`extract --server` with --rank/--world-size, or torchrun's RANK/WORLD_SIZE, writes the rank's part
    of the corpus (the parts a local extraction writes), each sequence asked once: read back, the
    parts are the one-process result exactly."""
    import json

    from _hostile_server import HostileServer
    from fastfuse.cli import main as cli_main
    from fastfuse.teachers.local_extract import rank_partition
    from fastfuse.teachers.rank_parts import PartsReader, open_shards, part_name
    from fastfuse.teachers.shards import ShardReader

    tok = real_tokenizer("llama-spm")
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps({"text": corpus[i][:300]}) + "\n" for i in range(5)))
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    argv = ["extract", "--served-model", "stub", "--tokenizer", "llama-spm", "--input", str(data), "--k", "4",
            "--block-size", "48", "--shard-size", "2", "--timeout", "10", "--concurrency", "2", "--quiet"]
    with HostileServer(len(tok)) as s:
        argv += ["--server", s.url]
        assert cli_main(argv + ["--out", str(tmp_path / "one")]) == 0
        n = s.calls
        assert cli_main(argv + ["--out", str(tmp_path / "two"), "--rank", "1", "--world-size", "2"]) == 0
        monkeypatch.setenv("RANK", "0")
        monkeypatch.setenv("WORLD_SIZE", "2")
        assert cli_main(argv + ["--out", str(tmp_path / "two")]) == 0
        assert s.calls == 2 * n                     # every sequence once, not once per rank
        assert cli_main(argv + ["--out", str(tmp_path / "two")]) == 0 and s.calls == 2 * n   # resumed: done
    one, two = open_shards(tmp_path / "one"), open_shards(tmp_path / "two")
    assert isinstance(two, PartsReader) and not (tmp_path / "two" / "meta.json").exists()
    assert served_records(one) == served_records(two) and len(one) == n
    for r in range(2):
        part = ShardReader(tmp_path / "two" / part_name(r, 2))
        assert part.meta["partition"] == rank_partition(tok, [data], 48, "text", r, 2)


def swap_a_letter(tok, text: str) -> str:
    """``text`` with one letter (the last one that can be) changed so that it tokenises to as many tokens."""
    from fastfuse.corpus import source_sequences

    n = [len(s.input_ids) for s, _ in source_sequences(tok, [text], 64)]
    for j in sorted((i for i, c in enumerate(text) if c.isalpha()), reverse=True):
        for c in "etaoinshrdlu":
            other = text[:j] + c + text[j + 1:]
            if other != text and [len(s.input_ids) for s, _ in source_sequences(tok, [other], 64)] == n:
                return other
    raise AssertionError("no same-length variant")


def test_rank_parts_from_other_corpora_are_refused(tmp_path, real_tokenizer, corpus, capsys):
    """Parts of two corpora with the same token counts read as one source (nothing in the parts alone
    can tell); aligning them against a corpus compares every part's corpus fingerprints with it and
    refuses, naming the part."""
    import json
    import shutil

    from _hostile_server import HostileServer
    from fastfuse.cli import main as cli_main
    from fastfuse.batches.corpus_align import align_corpus
    from fastfuse.teachers.rank_parts import open_shards, part_name

    tok, tgt = real_tokenizer("llama-spm"), real_tokenizer("gpt-2")
    a = [corpus[i][:120] for i in range(6)]
    b = a[:5] + [swap_a_letter(tok, a[5])]
    kw = dict(k=4, block_size=64, shard_size=2, progress=False, concurrency=1, timeout=10.0)
    with HostileServer(len(tok)) as s:
        for name, texts in (("a", a), ("b", b)):
            served_run(s.url, tok, texts, tmp_path / f"{name}1", **kw)
            for r in range(2):
                served_run(s.url, tok, texts, tmp_path / name, rank=r, world_size=2, **kw)
    align_corpus(a, tgt, {"s": (tok, tmp_path / "a")}, tmp_path / "ok", progress=False)        # the right one
    for bad, part in (("b", part_name(1, 2)), ("b1", "shard-00002")):
        with pytest.raises(ValueError, match=f"sources\\['s'\\]: .*{part}.* another corpus"):
            align_corpus(a, tgt, {"s": (tok, tmp_path / bad)}, tmp_path / f"al-{bad}", progress=False)
    for first, second, named in (("a", "b", part_name(1, 2)), ("b", "a", part_name(1, 2))):
        mix = tmp_path / f"mix-{first}{second}"
        shutil.copytree(tmp_path / first / part_name(0, 2), mix / part_name(0, 2))
        shutil.copytree(tmp_path / second / part_name(1, 2), mix / part_name(1, 2))
        assert len(open_shards(mix)) == len(a)
        corpus_of = a if first == "a" else b
        with pytest.raises(ValueError, match=f"{named}.* another corpus"):
            align_corpus(corpus_of, tgt, {"s": (tok, mix)}, tmp_path / f"al-{first}{second}", progress=False)
    data = tmp_path / "a.jsonl"                    # the command line: one error line, exit 2
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in a))
    assert cli_main(["align", "--target", "gpt-2", "--source", f"s=llama-spm:{tmp_path / 'mix-ab'}", "--input",
                     str(data), "--out", str(tmp_path / "al-cli"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and part_name(1, 2) in err and "another corpus" in err, err


def vllm_like(prompts: list[dict], k: int, vocab: int) -> list:
    """RequestOutput-shaped objects whose log-probs come from the hostile server's prefix "model"."""
    from types import SimpleNamespace

    from _hostile_server import prefix_logprobs

    outs = []
    for p in prompts:
        ids = p["prompt_token_ids"]

        def entry(row, extra):
            order = list(np.argsort(-row, kind="stable")[:k]) + ([extra] if extra is not None else [])
            return {int(t): SimpleNamespace(logprob=float(row[t]), rank=j + 1) for j, t in enumerate(order)}
        rows = [prefix_logprobs(ids[:j + 1], vocab) for j in range(len(ids))]
        plp = [None] + [entry(rows[j - 1], ids[j]) for j in range(1, len(ids))]
        outs.append(SimpleNamespace(prompt_token_ids=list(ids), prompt_logprobs=plp,
                                    outputs=[SimpleNamespace(logprobs=[entry(rows[-1], None)])]))
    return outs


@pytest.mark.parametrize("kind", ["inf", "positive", "huge", "true", "tiny", "gold_nan", "gold_inf", "abc", "dict",
                                  "ids_numpy", "ids_text", "none_output", "key_bool"])
def test_vllm_outputs_bad_values(tmp_path, real_tokenizer, corpus, kind):
    """Impossible log-probs and malformed outputs are refused naming sequence, position and field;
    a numpy array of prompt ids is read like a list."""
    import copy

    from fastfuse.teachers.shards import ShardReader
    from fastfuse.teachers.vllm_outputs import vllm_prompts, write_vllm_outputs

    tok = real_tokenizer("llama-spm")
    texts = [corpus[i][:150] for i in range(3)]
    kw = dict(k=4, block_size=48, shard_size=2, progress=False, model_name="m")
    good = vllm_like(vllm_prompts(tok, texts, 48), 4, len(tok))
    outs = copy.deepcopy(good)
    d = outs[1].prompt_logprobs[3]                 # sequence 1, position 2
    top, gold = next(iter(d)), outs[1].prompt_token_ids[3]
    value = {"inf": float("inf"), "positive": 0.5, "huge": 1e6, "true": True, "tiny": -1e6, "abc": "abc",
             "dict": {"a": 1}}.get(kind)
    if value is not None:
        d[top].logprob = value
    elif kind.startswith("gold_"):
        d[gold].logprob = float(kind[5:])
    elif kind == "ids_numpy":
        outs[1].prompt_token_ids = np.asarray(outs[1].prompt_token_ids)
    elif kind == "ids_text":
        outs[1].prompt_token_ids = "abc"
    elif kind == "none_output":
        outs[1] = None
    elif kind == "key_bool":
        d[True] = d.pop(top)
    if kind == "ids_numpy":
        write_vllm_outputs(outs, tok, texts, tmp_path / "a", **kw)
        write_vllm_outputs(good, tok, texts, tmp_path / "b", **kw)
        assert [r["topk_ids"].tolist() for r in ShardReader(tmp_path / "a")] == \
            [r["topk_ids"].tolist() for r in ShardReader(tmp_path / "b")]
        return
    want = {"ids_text": "sequence 1: prompt_token_ids must be a 1-d sequence of ints",
            "none_output": "outputs: item 1 \\(sequence 1\\) is None",
            "key_bool": "sequence 1, position 2: prompt_logprobs\\[3\\]: key True is not a token id"}.get(
        kind, "sequence 1, position 2: prompt_logprobs\\[3\\]: token \\d+: logprob")
    with pytest.raises(ValueError, match=want):
        write_vllm_outputs(outs, tok, texts, tmp_path / "a", **kw)
    assert len(list((tmp_path / "a").glob("shard-*"))) <= 1      # at most the shard before it


def test_served_extraction_under_torchrun(tmp_path, real_tokenizer, corpus):
    """`torchrun --nproc-per-node 2 -m fastfuse extract --server ...`: two clients, one server, each
    sequence asked once, the parts read back as a one-process run (bounded: the run's own timeout)."""
    import json

    from _hostile_server import HostileServer
    from fastfuse.teachers.rank_parts import open_shards

    tok = real_tokenizer("llama-spm")
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps({"text": corpus[i][:300]}) + "\n" for i in range(5)))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")} | \
        {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    with HostileServer(len(tok)) as s:
        flags = ["extract", "--server", s.url, "--served-model", "stub", "--tokenizer", "llama-spm", "--input",
                 str(data), "--k", "4", "--block-size", "48", "--shard-size", "2", "--timeout", "10", "--quiet"]
        for out, launcher in (("one", []), ("two", ["-m", "torch.distributed.run", "--standalone",
                                                     "--nproc-per-node", "2"])):
            r = subprocess.run([sys.executable, *launcher, "-m", "fastfuse", *flags, "--out", str(tmp_path / out)],
                               env=env, capture_output=True, text=True, timeout=300)
            assert r.returncode == 0, r.stderr[-3000:]
        one, two = open_shards(tmp_path / "one"), open_shards(tmp_path / "two")
        assert s.calls == 2 * len(one) and len(two.parts) == 2
    assert served_records(one) == served_records(two)


def test_completion_client_never_shows_a_credential():
    """Every spelling of every credential (a token as the user name too) is redacted; the recorded URL has none."""
    from fastfuse.teachers.completion_client import CompletionClient

    for url, key, creds in (("http://TOKEN-abc@127.0.0.1:9", None, ["TOKEN-abc"]),
                            ("https://u:p%40ss-x@example.com/proxy/v1/", "sk-1", ["p@ss-x", "p%40ss-x", "sk-1"])):
        c = CompletionClient(url, api_key=key)
        assert "@" not in c.base and not any(x in c.base for x in creds)
        text = " ".join(creds + [h for h in c.headers.values()])
        assert not any(x in c.redact(text) for x in creds + [c.headers.get("Authorization", "").split()[-1]])
    with pytest.raises(ValueError, match="server_url") as e:
        CompletionClient("ftp://u:SECRET@host")
    assert "SECRET" not in str(e.value)
