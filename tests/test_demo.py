"""``fastfuse demo`` end to end with the tiny preset: the table, the JSON figures and the plot."""
import argparse
import json
import math

import pytest

from fastfuse import demo


def test_tiny_demo_runs_end_to_end(real_tokenizer, tmp_path, capsys):
    out = tmp_path / "figures.json"
    png = tmp_path / "curves.png"
    assert demo.main(["--size", "tiny", "--seed", "1", "--workdir", str(tmp_path / "work"), "--json", str(out),
                      "--plot", str(png), "--quiet"]) == 0
    text = capsys.readouterr().out
    for row in ("source llama2", "source gpt2", "target clm-only", "target fused", "bits/byte",
                "alignment coverage", "time per stage"):
        assert row in text
    f = json.loads(out.read_text())
    for key in ("clm_only_eval_loss", "fused_eval_loss", "clm_only_eval_bpb", "fused_eval_bpb"):
        assert math.isfinite(f[key]) and f[key] > 0
    for s in f["sources"].values():
        assert math.isfinite(s["eval_loss"]) and math.isfinite(s["eval_bpb"])
    for name in demo.SOURCES:
        assert 0.5 < f["coverage"][name]["aligned_1to1"] <= 1
    assert f["curves"]["clm_only"]["eval_step"] == f["curves"]["fused"]["eval_step"]
    assert len(f["curves"]["fused"]["train_ce"]) == f["preset"]["tgt_steps"]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert f["plot"] is None
    else:
        assert f["plot"] == str(png) and png.read_bytes()[:4] == b"\x89PNG"


def test_cli_registration_and_argument_errors():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="command")
    demo.add_demo_command(sub)
    args = p.parse_args(["demo", "--size", "tiny", "--lm-weight", "0.3"])
    assert args.func is demo._run and demo._overrides(args) == {"lm_weight": 0.3}
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device"):
            demo.run_demo(size="tiny", device="cuda", progress=False)
    with pytest.raises(ValueError, match="size"):
        demo.run_demo(size="huge", progress=False)


def test_corpus_split_is_deterministic_and_disjoint():
    a_train, a_held = demo.load_corpus(0, 16000)
    b_train, b_held = demo.load_corpus(0, 16000)
    assert (a_train, a_held) == (b_train, b_held)
    assert not set(a_train) & set(a_held) and sum(map(len, a_held)) >= 16000
    h1, h2 = demo.halves(a_train)
    assert len(h1) + len(h2) == len(a_train) and set(h1 + h2) == set(a_train) and not set(h1) & set(h2)
    assert abs(sum(map(len, h1)) - sum(map(len, h2))) <= max(map(len, a_train))
