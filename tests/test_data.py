"""FusionCollator: padding is inert (batched loss = sum of per-sequence losses), padded vocabularies, errors."""
import numpy as np
import pytest
import torch

from fastfuse.data import FusionCollator
from fastfuse.loss import AlignMap, SourceTopK, fused_loss

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


@pytest.mark.parametrize("fusion", ["min_ce", "avg_ce", None])
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
                       source_weights=batch["source_weights"], reduction="sum", impl="reference")
    parts = 0.0
    for b, ex in enumerate(exs):
        one = col([ex])
        n = len(ex["input_ids"])
        parts += fused_loss(logits[b:b + 1, :n], one["source_topk"], one["align_map"], one["labels"],
                            source_weights=one["source_weights"], reduction="sum", impl="reference")
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
