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

import pytest

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
    from fastfuse.reference import random_inputs

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
                   "ignore_index": -100, "reduction": "mean", "impl": "reference", "validate": True}
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
