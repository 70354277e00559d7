"""FusionCollator: padding is inert (batched loss = sum of per-sequence losses), padded vocabularies, errors."""
import numpy as np
import pytest
import torch

from fastfuse.batches.dataset import FusionCollator
from fastfuse import AlignMap, SourceTopK, fused_loss

V = 97  # target vocab
SRC_TOK = [50, 70]  # source tokenizer sizes
SRC_MODEL = [64, 70]  # source 0 has a padded embedding (64 > 50)


def random_example(rng, T, Ts, K):
    ex = {"input_ids": rng.integers(0, V, T), "topk_ids": [], "topk_logprobs": [], "pos": [],
          "ce": rng.uniform(0.5, 3, len(SRC_TOK)).astype(np.float32)}
    for s in range(len(SRC_TOK)):
        ids = rng.integers(0, SRC_MODEL[s], (Ts[s], K[s]))
        ids[rng.random(ids.shape) < 0.1] = -1
        ex["topk_ids"].append(ids.astype(np.int32))
        ex["topk_logprobs"].append(np.log(rng.dirichlet(np.ones(K[s]), Ts[s])).astype(np.float16))
        p = rng.integers(-1, Ts[s], T).astype(np.int32)
        ex["pos"].append(p)
    return ex


@pytest.fixture
def setup():
    rng = np.random.default_rng(0)
    maps = [np.where(rng.random(n) < 0.8, rng.integers(0, V, n), -1).astype(np.int32) for n in SRC_TOK]
    return rng, maps


@pytest.mark.parametrize("fusion", ["min_ce", "avg_ce", "min_ce_norm", "avg_ce_norm", "equal", "token", None])
def test_batched_loss_equals_sum_of_single_sequences(setup, fusion):
    rng, maps = setup
    exs = [random_example(rng, int(rng.integers(2, 12)), [int(rng.integers(1, 15)) for _ in SRC_TOK], [3, 5])
           for _ in range(4)]
    col = FusionCollator(maps, pad_token_id=0, source_vocab_sizes=SRC_MODEL, target_vocab_size=V, fusion=fusion,
                         pin_memory=False)
    batch = col(exs)
    B, T = batch["input_ids"].shape
    logits = torch.randn(B, T, V, dtype=torch.float32)
    total = fused_loss(logits, batch["source_topk"], batch["align_map"], batch["labels"],
                       source_weights=batch["source_weights"], reduction="sum", impl="torch")
    parts = 0.0
    for b, ex in enumerate(exs):
        one = col([ex])
        n = len(ex["input_ids"])
        parts += fused_loss(logits[b:b + 1, :n], one["source_topk"], one["align_map"], one["labels"],
                            source_weights=one["source_weights"], reduction="sum", impl="torch")
        # labels are the next tokens, the last position and padding ignored
        assert batch["labels"][b, : n - 1].tolist() == list(ex["input_ids"][1:])
        assert (batch["labels"][b, n - 1:] == -100).all()
    torch.testing.assert_close(total, parts, rtol=1e-5, atol=1e-4)


def test_weights_follow_min_ce(setup):
    rng, maps = setup
    ex = random_example(rng, 5, [5, 5], [2, 2])
    ex["ce"] = np.array([2.0, 1.0], dtype=np.float32)
    batch = FusionCollator(maps, 0, SRC_MODEL, pin_memory=False)([ex])
    assert batch["source_weights"][:, 0].tolist() == [0.0, 1.0]


def test_weightings_by_name_against_a_loop(setup):
    """Every weighting of FUSIONS computed from the padded batch equals a per-example loop over the raw fields."""
    from fastfuse.batches.dataset import FUSIONS

    rng, maps = setup
    exs = [random_example(rng, int(rng.integers(3, 12)), [int(rng.integers(2, 15)) for _ in SRC_TOK], [3, 5])
           for _ in range(5)]
    for ex in exs:        # make the gold token often one of the top-k, so the token choice has something to pick
        for s in range(len(SRC_TOK)):
            for t, j in enumerate(ex["pos"][s][:-1]):
                if j >= 0 and rng.random() < 0.6:
                    hits = np.nonzero(maps[s] == ex["input_ids"][t + 1])[0]
                    if len(hits):
                        ex["topk_ids"][s][j, int(rng.integers(0, ex["topk_ids"][s].shape[1]))] = hits[0]
    for fusion in FUSIONS:
        w = FusionCollator(maps, 0, SRC_MODEL, fusion=fusion, tau=0.7, pin_memory=False)(exs)["source_weights"]
        for b, ex in enumerate(exs):
            T = len(ex["input_ids"])
            ce = ex["ce"].astype(np.float64)
            if fusion.endswith("_norm"):
                ce = ce * np.array([len(ex["topk_ids"][s]) - 1 for s in range(2)]) / (T - 1)
            if fusion.startswith("min_ce"):
                want = np.eye(2)[np.argmin(ce)]
            elif fusion.startswith("avg_ce"):
                want = np.exp(-ce / 0.7) / np.exp(-ce / 0.7).sum()
            elif fusion == "equal":
                want = np.array([0.5, 0.5])
            if fusion != "token":
                np.testing.assert_allclose(w[:, b].numpy(), want, rtol=1e-5)
                continue
            for t in range(T - 1):                 # per target position: the highest gold probability wins
                p = np.full(2, np.nan)
                for s in range(2):
                    j = ex["pos"][s][t]
                    if j >= 0:
                        ids, lps = ex["topk_ids"][s][j], ex["topk_logprobs"][s][j].astype(np.float32)
                        ok = (ids >= 0) & (ids < len(maps[s]))
                        p[s] = sum(np.exp(lp) for i, lp, o in zip(ids, lps, ok) if o and maps[s][i] == ex["input_ids"][t + 1])
                best = np.nanmax(p) if not np.isnan(p).all() else 0.0
                want = np.eye(2)[int(np.nanargmax(p))] if best > 0 else np.array([0.5, 0.5])
                np.testing.assert_allclose(w[:, b, t].numpy(), want, rtol=1e-5, err_msg=f"example {b} position {t}")
    with pytest.raises(ValueError, match="fusion: expected one of"):
        FusionCollator(maps, 0, SRC_MODEL, fusion="max_ce")


def test_padded_vocab_ids_map_to_nothing(setup):
    rng, maps = setup
    col = FusionCollator(maps, 0, SRC_MODEL, pin_memory=False)
    assert col.vocab.shape == (2, 70)
    assert (col.vocab[0, 50:] == -1).all()
    np.testing.assert_array_equal(col.vocab[0, :50].numpy(), maps[0])


def test_bad_examples(setup):
    rng, maps = setup
    col = FusionCollator(maps, 0, pin_memory=False)  # no padded vocab declared
    ex = random_example(rng, 4, [4, 4], [2, 2])
    ex["topk_ids"][0][0, 0] = 60  # beyond tokenizer size 50 and no source_vocab_sizes given
    with pytest.raises(ValueError, match="source 0 topk_ids must lie in"):
        col([ex])
    col = FusionCollator(maps, 0, SRC_MODEL, pin_memory=False)
    ex = random_example(rng, 4, [4, 4], [2, 2])
    ex["pos"][1] = np.array([0, 1, 2, 9], dtype=np.int32)
    with pytest.raises(ValueError, match="source 1 pos points past"):
        col([ex])
    ex = random_example(rng, 4, [4, 4], [2, 2])
    ex["pos"][1] = ex["pos"][1][:3]
    with pytest.raises(ValueError, match="source 1 pos must have the target length"):
        col([ex])
    with pytest.raises(ValueError, match="source_vocab_sizes\\[0\\]"):
        FusionCollator(maps, 0, source_vocab_sizes=[10, 70])
    with pytest.raises(ValueError, match="mapped ids must be < target_vocab_size"):
        FusionCollator(maps, 0, target_vocab_size=5)
    with pytest.raises(ValueError, match="pad_token_id"):
        FusionCollator(maps, -1)
    with pytest.raises(ValueError, match="examples: expected at least one"):
        FusionCollator(maps, 0)([])
