"""Clear errors instead of tracebacks (issue #11, items 8, 11, 13, 14, 15): each names the file,
line, example, field or argument."""
import json
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from fastfuse.cli import main as cli_main  # noqa: E402
from fastfuse.corpus import iter_corpus  # noqa: E402
from fastfuse.batches.dataset import FusionCollator  # noqa: E402


# ----------------------------------------------------------------------------- 8: text that is not text
def test_lone_surrogate_and_non_utf8_name_where(tmp_path, real_tokenizer):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"text": "fine"}\n{"text": "a \\ud800 b"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid Unicode text: a lone surrogate '\\ud800' at "
                                         r"character 2"):
        list(iter_corpus([f]))
    with pytest.raises(ValueError, match=r"texts\[1\]: not valid Unicode"):
        list(iter_corpus(["ok", "x\udc80"]))
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match="latin.txt: not UTF-8 text"):
        list(iter_corpus([latin]))
    from fastfuse.align.spans import align_texts
    tok = real_tokenizer("gpt-2")
    with pytest.raises(ValueError, match=r"texts\[0\]: not valid Unicode"):
        align_texts(tok, tok, ["\ud800"])
    out = tmp_path / "c.jsonl"
    assert cli_main(["chunk", "--tokenizers", "gpt-2", "--input", str(f), "--block-size", "64", "--out", str(out),
                     "--quiet"]) == 2


# ----------------------------------------------------------------------------- 11: the command line
def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "fastfuse", *args], capture_output=True, text=True, timeout=300,
                          cwd=cwd)


@pytest.mark.parametrize("args, says", [
    (["chunk", "--tokenizers", "gpt-2", "--block-size", "64", "--out", "x.jsonl"], "--input"),
    (["align", "--target", "gpt-2", "--source", "a=gpt-2:d", "--out", "o"], "--input"),
    (["chunk", "--tokenizers", "gpt-2", "--input", "IN", "--block-size", "64", "--out", "missing/dir/x.jsonl"],
     "--out: the directory"),
    (["chunk", "--tokenizers", "gpt-2", "--input", "IN", "--block-size", "64", "--out", "."], "--out:"),
    (["chunk", "--tokenizers", "nonsense", "--input", "IN", "--block-size", "64", "--out", "x.jsonl"],
     "--tokenizers: 'nonsense' is neither"),
    (["extract", "--model", "MODEL", "--input", "IN", "--out", "o", "--device", "cuda"], "device: 'cuda'"),
    (["extract", "--model", "MODEL", "--input", "IN", "--out", "o", "--dtype", "foo"], "dtype: 'foo' is not"),
    (["extract", "--model", "MODEL", "--input", "IN", "--out", "IN"], "--out: 'IN' is a file"),
])
def test_cli_errors_are_one_line_on_stderr(tmp_path, args, says, vocab_dir):
    if torch.cuda.is_available() and "cuda" in args:
        pytest.skip("CUDA is available here")
    (tmp_path / "IN").write_text('{"text": "hello world"}\n')
    if "MODEL" in args:
        from transformers import GPT2Config, GPT2LMHeadModel
        GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_embd=8, n_layer=1, n_head=2)).save_pretrained(tmp_path / "m")
        args = [str(tmp_path / "m") if a == "MODEL" else a for a in args] + ["--tokenizer", "gpt-2", "--quiet"]
    r = run_cli(*args, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
    assert says in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith(("fastfuse: error:", "usage:")) or \
        "error:" in r.stderr.strip().splitlines()[-1]


def test_verbose_shows_the_traceback(tmp_path, vocab_dir):
    r = run_cli("--verbose", "chunk", "--tokenizers", "nonsense", "--input", __file__, "--block-size", "8",
                "--out", str(tmp_path / "x.jsonl"))
    assert r.returncode == 2 and "Traceback" in r.stderr and "fastfuse: error: --tokenizers" in r.stderr


# ----------------------------------------------------------------------------- 13: the collator
def example(n=4, ts=3, k=2, **over):
    ex = {"input_ids": np.arange(n), "topk_ids": [np.zeros((ts, k), np.int32)],
          "topk_logprobs": [np.zeros((ts, k), np.float32)], "pos": [np.full(n, -1, np.int32)],
          "ce": np.array([1.0], np.float32)}
    return {**ex, **over}


@pytest.mark.parametrize("bad, says", [
    ({k: v for k, v in example().items() if k != "pos"}, r"examples\[1\]: missing fields \['pos'\]"),
    (example(ce=np.array([1.0, 2.0, 3.0])), r"examples\[1\]\['ce'\]: expected 1 values"),
    (example(pos=np.zeros(4)), r"examples\[1\]\['pos'\]: expected a list"),
    (example(input_ids=[[1, 2]]), r"examples\[1\]\['input_ids'\]: expected a 1-D integer array"),
    ("text", r"examples\[1\]: expected a dict"),
])
def test_collator_names_example_and_field(bad, says):
    c = FusionCollator([np.arange(10)], pad_token_id=0)
    with pytest.raises(ValueError, match=says):
        c([example(), bad])


def test_collator_source_without_positions_and_a_larger_k():
    c = FusionCollator([np.arange(10)], pad_token_id=0)
    batch = c([example(), example(ts=0, k=6)])
    assert batch["source_topk"].ids.shape == (1, 2, 3, 6)


def test_collator_pad_id_must_be_a_target_id():
    with pytest.raises(ValueError, match="pad_token_id: 50 is not a target id"):
        FusionCollator([np.arange(10)], pad_token_id=50, target_vocab_size=20)


# ----------------------------------------------------------------------------- 14: FusionTrainer's arguments
@pytest.mark.parametrize("kw, err, says", [
    ({"lm_weight": None}, TypeError, "lm_weight: expected a number"),
    ({"lm_weight": 1.5}, ValueError, r"lm_weight: expected a value in \[0, 1\], got 1.5"),
    ({"lm_weight": lambda step: 1.0 - step / 5}, ValueError, "at step 10"),       # leaves [0, 1] at the end
    ({"temperature": 0}, ValueError, "temperature"),
    ({"loss_kwargs": {"chunk_tokns": 4}}, ValueError, r"loss_kwargs: unknown options \['chunk_tokns'\]"),
    ({"loss_kwargs": {"chunk_tokens": 4}, "loss": "logits"}, ValueError, "loss_kwargs: unknown options"),
])
def test_trainer_checks_its_arguments_up_front(tmp_path, kw, err, says):
    transformers = pytest.importorskip("transformers")
    from fastfuse.integrations.trainer import FusionTrainer

    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=20, n_embd=8, n_layer=1, n_head=2))
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=10, report_to=[], use_cpu=True)
    with pytest.raises(err, match=says):
        FusionTrainer(model=model, args=args, **kw)


def test_shard_meta_written_by_json_is_read_back(tmp_path):
    # the JSON the writer produces passes the reader's shape checks (no false alarms)
    from fastfuse.teachers.shards import ShardReader, ShardWriter

    w = ShardWriter(tmp_path, {"source_name": "s", "model": "m", "tokenizer_fingerprint": "f", "tokenizer_size": 5,
                               "vocab_size": 5, "k": 2, "block_size": 4, "token_budget": 4, "shard_size": 1,
                               "dtype": "float32"})
    w.write_shard(offsets=np.array([0, 2]), topk_ids=np.zeros((2, 2), np.int32),
                  topk_logprobs=np.zeros((2, 2), np.float16), ce=np.zeros(1, np.float32), seq_index=np.array([0]),
                  doc_spans=np.zeros((1, 3), np.int64), corpus_fingerprint="x")
    w.finish()
    assert len(ShardReader(tmp_path)) == 1 and json.loads((tmp_path / "meta.json").read_text())["complete"]


def test_every_command_and_flag_says_what_it_is(capsys):
    """Each subcommand has a description and every flag a help text; --version prints the version."""
    import argparse

    from fastfuse import __version__
    from fastfuse.cli import build_parser

    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert set(sub.choices) == {"chunk", "extract", "align", "demo", "align-demo"}
    for name, p in sub.choices.items():
        assert p.description, f"fastfuse {name}: no description"
        undocumented = [a.option_strings for a in p._actions if a.option_strings and not a.help]
        assert not undocumented, f"fastfuse {name}: flags without help {undocumented}"
    with pytest.raises(SystemExit) as e:
        cli_main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"fastfuse {__version__}"


def test_a_missing_optional_dependency_is_one_line_naming_the_extra(tmp_path):
    """Without torch (blocked in a subprocess), `fastfuse demo` and fastfuse.fused_loss name the extra
    (tests/test_wheel.py checks the same from a wheel installed without extras)."""
    block = "import sys; sys.modules['torch'] = None; "
    r = subprocess.run([sys.executable, "-c", block + "from fastfuse.cli import main; sys.exit(main(['demo']))"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 2 and r.stdout == "", (r.stdout, r.stderr)
    assert r.stderr.splitlines() == ["fastfuse: error: fastfuse demo needs 'torch', which is not installed "
                                     "(the 'torch' extra): pip install \"fastfuse[torch,hf]\""]
    r = subprocess.run([sys.executable, "-c", block + "import fastfuse; fastfuse.fused_loss"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert "ModuleNotFoundError: fastfuse.fused_loss needs 'torch'" in r.stderr and "fastfuse[torch,hf]" in r.stderr
