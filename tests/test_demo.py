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


@pytest.mark.slow
def test_tiny_demo_runs_end_to_end(real_tokenizer, tmp_path, capsys):
    out = tmp_path / "figures.json"
    png = tmp_path / "curves.png"
    assert cli_main(["demo", "--size", "tiny", "--seed", "1", "--workdir", str(tmp_path / "work"), "--json", str(out),
                      "--plot", str(png), "--quiet", "--divergence", "skew_reverse_kl", "--tail", "bucket",
                      "--alpha", "0.2", "--fusion", "token"]) == 0
    text = capsys.readouterr().out
    for row in ("source prose (prose expert)", "source code (code expert)", "target at init", "target CLM-only",
                "target CLM + label smoothing", "target KD from prose only", "target KD from code only",
                "target fused", "bits/byte", "prose b/B", "code b/B", "fused - CLM-only", "fused - KD from",
                "gold target token", "alignment coverage", "time per stage", "token, skew_reverse_kl/bucket tail alpha 0.2"):
        assert row in text
    f = json.loads(out.read_text())
    assert set(f["bpb"]) == {"clm_only", "label_smoothing", "single prose", "single code", "fused"}
    for mode, r in f["targets"].items():
        assert math.isfinite(r["bpb"]) and r["bpb"] > 0 and f["bpb"][mode] == r["bpb"]
        assert set(r["domains"]) == set(demo.DOMAINS)
        # the whole held-out set is the sum of its domains
        nats = sum(d["loss"] * d["tokens"] for d in r["domains"].values())
        assert r["tokens"] == sum(d["tokens"] for d in r["domains"].values())
        assert math.isclose(r["bpb"], nats / math.log(2) / sum(d["bytes"] for d in r["domains"].values()), rel_tol=1e-9)
        assert math.isclose(r["loss"], (1 - r["unseen_rate"]) * r["loss_seen"] + r["unseen_rate"] * r["loss_unseen"],
                            rel_tol=1e-6)
        assert f["curves"][mode]["eval_loss"][0] == f["target"]["init"]["loss"]
        assert f["curves"][mode]["eval_loss"][-1] == r["loss"]
    assert len(set(f["bpb"].values())) == len(f["bpb"])          # distinct trainings: distinct targets
    for name, (tok, dom) in demo.SOURCES.items():
        s = f["sources"][name]
        assert (s["tokenizer"], s["domain"]) == (tok, dom) and s["rows"] < s["vocab"]
        assert math.isfinite(s["eval"]["bpb"])
        assert 0.5 < f["coverage"][name]["aligned_1to1"] <= 1
        assert 0 < f["teachers"]["gold_in_topk"][name] <= 1 and 0 < f["teachers"]["topk_mass"][name] <= 1
    shares = f["weights"]["token"]["by_domain"]
    for dom in demo.DOMAINS:
        assert math.isclose(sum(shares[dom].values()), 1.0, rel_tol=1e-6)
    eps = (1 - f["fused_settings"]["lm_weight"]) * f["weights"]["token"]["tail_mass"]
    assert 0 < f["label_smoothing"] == eps < 1
    assert f["fused_settings"]["divergence"] == "skew_reverse_kl" and f["fused_settings"]["alpha"] == 0.2
    assert len(f["curves"]["fused"]["train_ce"]) == f["preset"]["tgt_steps"]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert f["plot"] is None
    else:
        assert f["plot"] == str(png) and png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_per_source_figures_are_looked_up_by_name(real_tokenizer, tmp_path):
    """The demo's sources are defined in an order ("prose", "code") that their names do not sort in: every
    per-source figure must still be that source's (a dataset of the source alone gives the same figure)."""
    from fastfuse.corpus import pad_token_id
    from fastfuse.batches.dataset import FusionDataset

    assert list(demo.SOURCES) != sorted(demo.SOURCES)
    f = demo.run_demo(size="tiny", seed=2, workdir=str(tmp_path), progress=False, log=lambda *_: None)
    pad = pad_token_id(real_tokenizer(demo.TARGET))
    for name in demo.SOURCES:
        alone = FusionDataset(tmp_path / "align", sources=[name])
        want = demo.teacher_stats(alone, alone.collator(pad_token_id=pad, pin_memory=False))
        assert f["teachers"]["topk_mass"][name] == want["topk_mass"][name]
        assert f["teachers"]["gold_in_topk"][name] == want["gold_in_topk"][name]
    assert f["teachers"]["topk_mass"]["prose"] != f["teachers"]["topk_mass"]["code"]


@pytest.mark.slow
def test_several_seeds_report_mean_sd_and_wins(tmp_path, capsys):
    out = tmp_path / "seeds.json"
    assert cli_main(["demo", "--size", "tiny", "--seeds", "2", "--workdir", str(tmp_path), "--json", str(out),
                     "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "over 2 seeds (0, 1)" in text and "vs best single teacher" in text and "wins" in text
    r = json.loads(out.read_text())
    assert r["seeds"] == [0, 1] and [f["seed"] for f in r["per_seed"]] == [0, 1]
    s = r["summary"]
    for mode, stats in s["bpb"].items():
        xs = [f["bpb"][mode] for f in r["per_seed"]]
        assert math.isclose(stats["mean"], sum(xs) / 2) and math.isclose(stats["sd"], abs(xs[0] - xs[1]) / math.sqrt(2))
    m = s["margins"]["fused"]
    for f, d in zip(r["per_seed"], m["best_single"]["per_seed"]):
        assert math.isclose(d, f["bpb"]["fused"] - min(f["bpb"]["single prose"], f["bpb"]["single code"]))
    assert m["clm_only"]["wins"] == sum(f["bpb"]["fused"] < f["bpb"]["clm_only"] for f in r["per_seed"])
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert r["plot"] and open(r["plot"], "rb").read(4) == b"\x89PNG"


@pytest.mark.slow
def test_online_and_on_policy_targets(tmp_path, capsys):
    """``--online``: the teachers score each batch while the target trains -- the same batches as the
    shards give, so the same target (sources looked up by name: the online batch orders them otherwise).
    ``--on-policy``: a share of the steps trains on the target's own continuations (no gold text there:
    ``train_ce`` None), a different target; both are read against the fused one in the table and JSON."""
    out = tmp_path / "f.json"
    assert cli_main(["demo", "--size", "tiny", "--seed", "1", "--workdir", str(tmp_path / "w"), "--json", str(out),
                     "--quiet", "--online", "--on-policy", "0.5", "--tgt-steps", "6"]) == 0
    text = capsys.readouterr().out
    assert "fused, online - fused:" in text and "fused, on-policy 0.5 - fused:" in text
    f = json.loads(out.read_text())
    assert f["variant_settings"]["online"]["online"] is True and f["variant_settings"]["on-policy 0.5"]["on_policy"] == 0.5
    assert f["bpb"]["variant online"] == pytest.approx(f["bpb"]["fused"], abs=1e-4)
    assert f["curves"]["variant online"]["train_ce"] == pytest.approx(f["curves"]["fused"]["train_ce"], abs=1e-4)
    c = f["curves"]["variant on-policy 0.5"]
    assert 0 < len(c["on_policy_steps"]) < 6 and set(c["on_policy_steps"]) <= set(c["step"])
    assert [s for s, x in zip(c["step"], c["train_ce"]) if x is None] == c["on_policy_steps"]
    assert math.isfinite(f["bpb"]["variant on-policy 0.5"]) and f["bpb"]["variant on-policy 0.5"] != f["bpb"]["fused"]
    assert f["curves"]["fused"]["on_policy_steps"] == []
    # one source, online: the same source as offline (by name), not the one at its index
    g = demo.run_demo(size="tiny", seed=1, workdir=str(tmp_path / "w" / "seed-1"), progress=False, log=lambda *_: None,
                      overrides={"tgt_steps": 6}, variants={"code online": {"online": True, "sources": ["code"]}})
    assert g["bpb"]["single code"] == f["bpb"]["single code"]
    online, code, prose = g["bpb"]["variant code online"], g["bpb"]["single code"], g["bpb"]["single prose"]
    assert abs(online - code) * 10 < abs(prose - code), (online, code, prose)


@pytest.mark.slow
def test_a_variant_can_start_from_the_trained_fused_target(tmp_path):
    """``init="fused"``: a second stage of training from the fused target's weights (the setting on-policy
    distillation is meant for), on other batches; its curve continues the fused target's."""
    f = demo.run_demo(size="tiny", seed=2, workdir=str(tmp_path / "w"), progress=False, log=lambda *_: None,
                      overrides={"tgt_steps": 6}, variants={"continued": {"init": "fused"}})
    c, fused = f["curves"]["variant continued"], f["curves"]["fused"]
    assert c["step"] == list(range(7, 13)) and c["eval_step"][0] == 6
    assert c["eval_loss"][0] == f["targets"]["fused"]["loss"]
    # its first batch meets the trained weights, not the initialisation every other target starts from
    assert c["train_ce"][0] < fused["train_ce"][0] - 0.1, (c["train_ce"][0], fused["train_ce"][0])
    assert f["variant_settings"]["continued"]["init"] == "fused"


def test_sampled_rows_become_ids_of_the_full_vocabulary():
    """``ModelVocab.ids`` inverts ``rows``: a kept row is its id, the shared row one of the ids it stands for
    (each of them drawn); ``FullVocabLM.generate`` keeps the prompt and returns real ids."""
    v = demo.ModelVocab(10, kept=[4, 1, 3])
    rows = torch.tensor([[0, 1, 2, 3] * 200])
    ids = v.ids(rows, generator=torch.Generator().manual_seed(0))
    assert torch.equal(v.rows(ids), rows)
    assert ids[0, :3].tolist() == [1, 3, 4] and set(ids[rows == 3].tolist()) == {0, 2, 5, 6, 7, 8, 9}
    assert torch.equal(demo.ModelVocab(10).ids(rows), rows)

    class Tok:
        def __len__(self):
            return 10

    m = demo.FullVocabLM(demo.make_model(Tok(), v, 32, 1, 16, 0), v)
    prompt = torch.tensor([[4, 1, 9], [3, 3, 0]])
    torch.manual_seed(0)
    out = m.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=5, min_new_tokens=5,
                     do_sample=True, top_k=0, pad_token_id=4)
    assert out.shape == (2, 8) and torch.equal(out[:, :3], prompt) and 0 <= out.min() and out.max() < 10
    with pytest.raises(ValueError, match="temperature 1"):       # the shared row's mass would be reshaped
        m.generate(input_ids=prompt, max_new_tokens=2, do_sample=True, temperature=2.0, pad_token_id=4)
    with pytest.raises(ValueError, match="eos_token_id: id 9 has no row"):
        m.generate(input_ids=prompt, max_new_tokens=2, do_sample=True, top_k=0, pad_token_id=4, eos_token_id=9)
    assert m.requires_grad_(False) is m and not any(p.requires_grad for p in m.parameters())
    assert m.train().training and not m.eval().training


def test_summary_reads_a_variant_against_the_fused_target():
    from fastfuse.demo.seeds import summary_report

    per_seed = [{"seed": i, "heldout": {"prose": 1}, "bpb": bpb,
                 "bpb_by_domain": {m: {"prose": v} for m, v in bpb.items()}}
                for i, bpb in enumerate([{"clm_only": 2.0, "label_smoothing": 1.9, "single a": 1.8, "single b": 1.85,
                                          "fused": 1.7, "variant x": 1.75},
                                         {"clm_only": 2.1, "label_smoothing": 2.0, "single a": 1.95, "single b": 1.9,
                                          "fused": 1.8, "variant x": 1.78}])]
    s = demo.summarize(per_seed)
    assert "fused" not in s["margins"]["fused"]
    vs = s["margins"]["variant x"]["fused"]
    assert vs["per_seed"] == pytest.approx([0.05, -0.02]) and vs["wins"] == 1
    assert s["margins"]["variant x"]["best_single"]["per_seed"] == pytest.approx([-0.05, -0.12])
    assert "off_policy" not in s["margins"]["variant x"]
    # an on-policy second stage is read against the same second stage off-policy (its twin by settings)
    base = {"fusion": "token", "divergence": "ce", "tail": "uniform", "lm_weight": 0.3, "temperature": 2.0}
    stage2 = {"warm": {**base, "init": "fused"}, "warm op": {**base, "init": "fused", "on_policy": 0.5},
              "op": {**base, "on_policy": 0.5}, "x": {**base, "lm_weight": 0.5}}
    for f, (a, b) in zip(per_seed, [(1.6, 1.65), (1.7, 1.66)]):
        f["variant_settings"], f["fused_settings"] = stage2, base
        f["bpb"].update({"variant warm": a, "variant warm op": b, "variant op": 1.9})
        f["bpb_by_domain"].update({m: {"prose": f["bpb"][m]} for m in ("variant warm", "variant warm op", "variant op")})
    s = demo.summarize(per_seed)
    assert s["margins"]["variant warm op"]["off_policy"]["per_seed"] == pytest.approx([0.05, -0.04])
    assert s["margins"]["variant warm op"]["off_policy"]["wins"] == 1
    assert "off_policy" not in s["margins"]["variant op"] and "off_policy" not in s["margins"]["variant warm"]
    text = summary_report(s, per_seed)
    assert "vs same, off-policy" in text and "a 2nd stage from the trained fused target" in text


def test_cli_registration_and_argument_errors():
    from fastfuse.batches.dataset import FUSIONS

    args = build_parser().parse_args(["demo", "--size", "tiny", "--lm-weight", "0.3"])
    assert args.func.__module__ == "fastfuse.cli.demos" and demo_cli.demo_overrides(args) == {"lm_weight": 0.3}
    assert sorted(demo_cli.PRESET_NAMES) == sorted(demo.PRESETS)
    assert demo_cli.FUSIONS == FUSIONS
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device"):
            demo.run_demo(size="tiny", device="cuda", progress=False)
    with pytest.raises(ValueError, match="size"):
        demo.run_demo(size="huge", progress=False)
    args = build_parser().parse_args(["demo", "--divergence", "jsd", "--beta", "0.3", "--tail", "uniform",
                                      "--fusion", "avg_ce"])
    assert demo_cli.fused_settings(args) == {"fusion": "avg_ce", "divergence": "jsd", "tail": "uniform", "beta": 0.3}
    with pytest.raises(ValueError, match="alpha is not a parameter of divergence='jsd'"):
        demo.run_demo(size="tiny", progress=False, fused={"divergence": "jsd", "alpha": 0.3})
    with pytest.raises(ValueError, match="tail must be one of"):
        demo.run_demo(size="tiny", progress=False, variants={"x": {"tail": "drop"}})
    with pytest.raises(ValueError, match="fusion must be one of"):
        demo.run_demo(size="tiny", progress=False, variants={"x": {"fusion": "best"}})
    assert cli_main(["demo", "--seeds", "0"]) == 2
    assert cli_main(["demo", "--on-policy", "1.5"]) == 2
    args = build_parser().parse_args(["demo", "--online", "--on-policy", "0.25"])
    assert demo_cli.demo_variants(args) == {"online": {"online": True}, "on-policy 0.25": {"on_policy": 0.25}}
    with pytest.raises(ValueError, match="on_policy must be a fraction"):
        demo.run_demo(size="tiny", progress=False, variants={"x": {"on_policy": 2}})
    with pytest.raises(ValueError, match="online must be True or False"):
        demo.run_demo(size="tiny", progress=False, variants={"x": {"online": "yes"}})
    with pytest.raises(ValueError, match="init must be 'fused'"):
        demo.run_demo(size="tiny", progress=False, variants={"x": {"init": "clm_only"}})
    with pytest.raises(ValueError, match="init is a variant's setting"):
        demo.run_demo(size="tiny", progress=False, fused={"init": "fused"})


def test_corpus_split_is_deterministic_and_disjoint():
    preset = demo.PRESETS["small"]
    a, b = demo.load_corpus(0, preset), demo.load_corpus(0, preset)
    assert (a.heldout, a.fusion, a.sources) == (b.heldout, b.fusion, b.sources)
    sets = [set(a.heldout[d]) for d in demo.DOMAINS] + [set(a.fusion[d]) for d in demo.DOMAINS] + \
        [set(v) for v in a.sources.values()]
    assert sum(map(len, sets)) == len(set().union(*sets))         # no document in two sets
    assert demo.load_corpus(1, preset).heldout != a.heldout
    for dom in demo.DOMAINS:
        assert sum(map(len, a.heldout[dom])) >= preset.heldout_chars
        assert sum(map(len, a.fusion[dom])) >= preset.fuse_chars
    from fastfuse.corpus import python_code

    code = set(python_code(doc_chars=4000))
    for name, (_, own) in demo.SOURCES.items():
        docs = a.sources[name]
        own_chars = sum(len(d) for d in docs if (d in code) == (own == "code"))
        assert sum(map(len, docs)) >= 0.9 * preset.src_chars
        assert own_chars >= (1 - preset.src_mix) * 0.95 * sum(map(len, docs))      # mostly its own domain


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
