"""``fastfuse demo`` end to end with the tiny preset (the table, the JSON figures and the plot), and
the pieces it is built from: the models' vocabulary rows and their unigram initialisation."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from fastfuse import demo
from fastfuse.cli import build_parser
from fastfuse.cli import demos as demo_cli
from fastfuse.cli import main as cli_main


def test_tiny_demo_runs_end_to_end(real_tokenizer, tmp_path, capsys):
    out = tmp_path / "figures.json"
    png = tmp_path / "curves.png"
    assert cli_main(["demo", "--size", "tiny", "--seed", "1", "--workdir", str(tmp_path / "work"), "--json", str(out),
                      "--plot", str(png), "--quiet", "--baselines", "--divergence", "skew_reverse_kl", "--tail", "bucket",
                      "--alpha", "0.2"]) == 0
    text = capsys.readouterr().out
    for row in ("source llama2", "source gpt2", "target at init", "target clm-only", "target fused", "bits/byte",
                "fused - CLM-only", "gold target token", "alignment coverage", "time per stage",
                "target KD from llama2 only", "target KD from gpt2 only", "best single-source KD",
                "skew_reverse_kl/bucket tail (alpha 0.2)"):
        assert row in text
    f = json.loads(out.read_text())
    for key in ("clm_only_eval_loss", "fused_eval_loss", "clm_only_eval_bpb", "fused_eval_bpb"):
        assert math.isfinite(f[key]) and f[key] > 0
    for s in f["sources"].values():
        assert math.isfinite(s["eval_loss"]) and math.isfinite(s["eval_bpb"])
        assert s["rows"] < s["vocab"]                      # vocab="train": rows for the training split's types
    for name in demo.SOURCES:
        assert 0.5 < f["coverage"][name]["aligned_1to1"] <= 1
        assert 0 < f["teachers"]["gold_in_topk"][name] <= 1 and 0 < f["teachers"]["topk_mass"][name] <= 1
    assert sum(f["minCE_picks"].values()) == f["train"]["sequences"]
    assert f["loss"]["divergence"] == "skew_reverse_kl" and f["loss"]["tail"] == "bucket" and f["loss"]["mix"] == 0.2
    assert sorted(f["single_source_eval_bpb"]) == sorted(demo.SOURCES)
    for name, bpb in f["single_source_eval_bpb"].items():   # distinct trainings: distinct targets
        assert math.isfinite(bpb) and bpb != f["fused_eval_bpb"] and f["target"][f"single {name}"]["bpb"] == bpb
    t = f["target"]
    assert t["fused"]["loss"] == f["fused_eval_loss"] and t["clm_only"]["bpb"] == f["clm_only_eval_bpb"]
    for mode in ("clm_only", "fused"):   # the seen / unseen split adds up to the whole
        r = t[mode]
        assert 0 <= r["unseen_rate"] < 1
        assert math.isclose(r["loss"], (1 - r["unseen_rate"]) * r["loss_seen"] + r["unseen_rate"] * r["loss_unseen"],
                            rel_tol=1e-6)
        assert f["curves"][mode]["eval_loss"][0] == t["init_eval_loss"]
        assert f["curves"][mode]["eval_loss"][-1] == r["loss"]
    assert f["curves"]["clm_only"]["eval_step"] == f["curves"]["fused"]["eval_step"]
    assert len(f["curves"]["fused"]["train_ce"]) == f["preset"]["tgt_steps"]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert f["plot"] is None
    else:
        assert f["plot"] == str(png) and png.read_bytes()[:4] == b"\x89PNG"


def test_cli_registration_and_argument_errors():
    args = build_parser().parse_args(["demo", "--size", "tiny", "--lm-weight", "0.3"])
    assert args.func.__module__ == "fastfuse.cli.demos" and demo_cli.demo_overrides(args) == {"lm_weight": 0.3}
    assert sorted(demo_cli.PRESET_NAMES) == sorted(demo.PRESETS)
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device"):
            demo.run_demo(size="tiny", device="cuda", progress=False)
    with pytest.raises(ValueError, match="size"):
        demo.run_demo(size="huge", progress=False)
    args = build_parser().parse_args(["demo", "--divergence", "jsd", "--beta", "0.3", "--tail", "uniform"])
    assert (args.divergence, args.beta, args.tail, args.baselines) == ("jsd", 0.3, "uniform", False)
    with pytest.raises(ValueError, match="alpha is not a parameter of divergence='jsd'"):
        demo.run_demo(size="tiny", progress=False, loss={"divergence": "jsd", "alpha": 0.3})
    with pytest.raises(ValueError, match="tail must be one of"):
        demo.run_demo(size="tiny", progress=False, variants={"x": {"tail": "drop"}})


def test_corpus_split_is_deterministic_and_disjoint():
    a_train, a_held = demo.load_corpus(0, 16000)
    b_train, b_held = demo.load_corpus(0, 16000)
    assert (a_train, a_held) == (b_train, b_held)
    assert not set(a_train) & set(a_held) and sum(map(len, a_held)) >= 16000
    h1, h2 = demo.halves(a_train)
    assert len(h1) + len(h2) == len(a_train) and set(h1 + h2) == set(a_train) and not set(h1) & set(h2)
    assert abs(sum(map(len, h1)) - sum(map(len, h2))) <= max(map(len, a_train))


def test_model_vocab_is_a_distribution_over_every_id():
    v = demo.ModelVocab(10, kept=[4, 1, 3, 3])
    assert (v.num_rows, v.other, v.n_other) == (4, 3, 7)
    ids = torch.tensor([[1, 3, 4, 0, 9, -100]])
    assert v.rows(ids).tolist() == [[0, 1, 2, 3, 3, -100]]
    z = torch.randn(2, 4, dtype=torch.float64)
    full = v.full_logits(z)
    assert full.shape == (2, 10)
    lp, lpf = z.log_softmax(-1), full.log_softmax(-1)
    torch.testing.assert_close(lpf[:, [1, 3, 4]], lp[:, :3])
    for other in (0, 2, 5, 9):                  # the shared row's probability split evenly over 7 ids
        torch.testing.assert_close(lpf[:, other], lp[:, 3] - math.log(7))
    labels = torch.tensor([4, 9])
    rows = v.rows(labels)
    ce = F.cross_entropy(z, rows, reduction="none") + v.token_nats(rows)
    torch.testing.assert_close(ce, F.cross_entropy(full, labels, reduction="none"))
    every = demo.ModelVocab(10)
    assert every.num_rows == 10 and torch.equal(every.rows(ids), ids) and every.full_logits(z) is z
    with pytest.raises(ValueError, match="kept"):
        demo.ModelVocab(10, kept=[3, 10])


def test_make_model_ties_the_head_and_starts_from_the_smoothed_unigram(real_tokenizer):
    tok = real_tokenizer("gpt-2")
    inputs = [[5, 7, 7, 9], [7, 5]]
    counts = demo.unigram_counts(inputs, len(tok))       # predicted tokens only: 7 x2, 9, 5
    assert counts.sum() == 4 and counts[7] == 2 and counts[5] == 1
    V, a = len(tok), 0.1
    p = (counts + a) / (4 + a * V)
    for kind in ("train", "full"):
        vocab = demo.model_vocab(tok, kind, inputs)
        m = demo.make_model(tok, vocab, 32, 1, 16, 0, counts=counts)
        assert m.lm_head.weight is m.transformer.wte.weight and m.lm_head.weight.shape[0] == vocab.num_rows
        q = vocab.full_logits(m.lm_head.bias.detach().double()).softmax(-1)   # the head's prior over every id
        torch.testing.assert_close(q, p.double(), rtol=1e-4, atol=1e-9)
        if kind == "train":
            assert vocab.num_rows == 3 + len({tok.eos_token_id, tok.bos_token_id, tok.pad_token_id} - {None}) + 1
