"""Fusion functions vs per-element Python loops; reward scorer and generation on tiny random HF models."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub access anywhere

import itertools
import math

import pytest
import torch


from fastfuse.batches import fusion_weights as fusion
from fastfuse.corpus import python_docs
from fastfuse.integrations import reward

NAN, INF = float("nan"), float("inf")

# ---------------------------------------------------------------------------------------------
# references: one column (the S values of one sequence / token) at a time, plain Python floats
# ---------------------------------------------------------------------------------------------


def ref_min_col(col):
    avail = [s for s, c in enumerate(col) if not math.isnan(c)]
    if not avail:
        return [1.0 / len(col)] * len(col)
    best = min(col[s] for s in avail)
    first = next(s for s in avail if col[s] == best)
    return [1.0 if s == first else 0.0 for s in range(len(col))]


def ref_soft_col(col, tau):
    """softmax(-col / tau), NaN -> 0, all NaN -> uniform, equal infinite minima tie."""
    avail = [s for s, c in enumerate(col) if not math.isnan(c)]
    if not avail:
        return [1.0 / len(col)] * len(col)
    best = min(col[s] for s in avail)
    e = [0.0] * len(col)
    for s in avail:
        if col[s] == best:
            e[s] = 1.0
        elif not math.isinf(col[s]):
            e[s] = math.exp(-(col[s] - best) / tau)
    z = sum(e)
    return [x / z for x in e]


def apply_columns(x: torch.Tensor, fn, mask=None) -> torch.Tensor:
    """Apply ``fn`` to every column x[:, b(, t)] with Python loops; masked-out columns uniform."""
    out = torch.empty_like(x, dtype=torch.float64)
    S = x.shape[0]
    for idx in itertools.product(*(range(n) for n in x.shape[1:])):
        if mask is not None and not bool(mask[idx]):
            w = [1.0 / S] * S
        else:
            w = fn([float(x[(s,) + idx]) for s in range(S)])
        for s in range(S):
            out[(s,) + idx] = w[s]
    return out


def random_ce(shape, seed, nan_p=0.15, inf_p=0.05, dtype=torch.float32):
    """CE >= 0 with ties (values on a coarse grid half the time), NaNs, +infs and all-NaN columns."""
    g = torch.Generator().manual_seed(seed)
    ce = torch.rand(shape, generator=g, dtype=torch.float64) * 5
    coarse = torch.rand(shape, generator=g) < 0.5
    ce = torch.where(coarse, (ce * 2).floor() / 2, ce)  # exact ties
    ce[torch.rand(shape, generator=g) < nan_p] = NAN
    ce[torch.rand(shape, generator=g) < inf_p] = INF
    if ce.shape[1] > 1:
        ce[:, 1] = NAN  # one sequence with no source at all
    return ce.to(dtype)


def random_mask(shape_bt, seed):
    g = torch.Generator().manual_seed(seed + 1000)
    lens = torch.randint(0, shape_bt[1] + 1, (shape_bt[0],), generator=g)
    return torch.arange(shape_bt[1])[None, :] < lens[:, None]  # right padding; some rows empty


def check_simplex(w: torch.Tensor):
    assert (w >= 0).all() and not torch.isnan(w).any()
    torch.testing.assert_close(w.sum(0), torch.ones(w.shape[1:], dtype=w.dtype))


SHAPES = [(3, 5), (1, 4), (4, 2, 7), (2, 3, 1), (5, 6, 9)]


# ---------------------------------------------------------------------------------------------
# weight functions vs references
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_min_ce_matches_loop(shape, seed, dtype):
    ce = random_ce(shape, seed, dtype=dtype)
    w = fusion.min_ce_weights(ce)
    assert w.shape == ce.shape and w.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    check_simplex(w)
    torch.testing.assert_close(w.double(), apply_columns(ce.float(), ref_min_col))


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("shape", [s for s in SHAPES if len(s) == 3])
def test_min_ce_per_token_mask(shape, seed):
    ce = random_ce(shape, seed)
    mask = random_mask(shape[1:], seed)
    for m in (mask, mask.to(torch.int64)):  # bool or 0/1 attention_mask
        w = fusion.min_ce_weights(ce, mask=m)
        check_simplex(w)
        torch.testing.assert_close(w.double(), apply_columns(ce, ref_min_col, mask))


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("tau", [0.1, 1.0, 7.5])
def test_avg_ce_matches_loop(shape, seed, tau):
    ce = random_ce(shape, seed, dtype=torch.float64)
    w = fusion.avg_ce_weights(ce, tau=tau)
    check_simplex(w)
    torch.testing.assert_close(w, apply_columns(ce, lambda c: ref_soft_col(c, tau)))
    if len(shape) == 3:
        mask = random_mask(shape[1:], seed)
        w = fusion.avg_ce_weights(ce, tau=tau, mask=mask)
        check_simplex(w)
        torch.testing.assert_close(w, apply_columns(ce, lambda c: ref_soft_col(c, tau), mask))


def test_avg_ce_without_nan_is_softmax_and_large_values_are_stable():
    ce = torch.tensor([[1.0, 1000.0], [2.0, 1001.0], [0.5, 5000.0]])
    w = fusion.avg_ce_weights(ce, tau=0.5)
    torch.testing.assert_close(w, torch.softmax(-ce / 0.5, 0))
    assert not torch.isnan(fusion.avg_ce_weights(ce, tau=1e-6)).any()


def test_small_examples():
    ce = torch.tensor([[1.0, NAN, 2.0, NAN], [0.5, NAN, 2.0, INF], [0.7, 3.0, 2.0, INF]])
    w = fusion.min_ce_weights(ce)
    expected = torch.tensor([[0.0, 0.0, 1.0, 0.0], [1.0, 0.0, 0.0, 1.0], [0.0, 1.0, 0.0, 0.0]])
    torch.testing.assert_close(w, expected)
    w = fusion.avg_ce_weights(torch.tensor([[NAN, NAN], [NAN, 1.0]]))
    torch.testing.assert_close(w, torch.tensor([[0.5, 0.0], [0.5, 1.0]]))


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("tau", [0.3, 2.0])
def test_reward_weights_match_loop(seed, tau):
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(4, 9, generator=g, dtype=torch.float64)
    r[torch.rand(4, 9, generator=g) < 0.3] = r[0, 0].item()  # ties
    r[torch.rand(4, 9, generator=g) < 0.15] = NAN
    r[:, 2] = NAN
    r[1, 3], r[2, 4], r[3, 4] = INF, -INF, INF
    neg = lambda fn: (lambda col: fn([-c for c in col]))  # noqa: E731  (higher reward = lower cost)
    w = fusion.reward_weights(r, method="max")
    check_simplex(w)
    torch.testing.assert_close(w, apply_columns(r, neg(ref_min_col)))
    w = fusion.reward_weights(r, method="softmax", tau=tau)
    check_simplex(w)
    torch.testing.assert_close(w, apply_columns(r, neg(lambda c: ref_soft_col(c, tau))))
    finite = torch.randn(3, 5, generator=g)
    torch.testing.assert_close(fusion.reward_weights(finite, "softmax", tau), torch.softmax(finite / tau, 0))


@pytest.mark.parametrize("seed", range(3))
def test_token_ce_to_sequence_ce(seed):
    S, B, T = 3, 5, 6
    g = torch.Generator().manual_seed(seed)
    ce = torch.rand(S, B, T, generator=g, dtype=torch.float64)
    mask = random_mask((B, T), seed)
    ce[0, 0, -1] = NAN  # NaN on a token: counts only when the token is valid
    got = fusion.token_ce_to_sequence_ce(ce, mask)
    ref = torch.empty(S, B, dtype=torch.float64)
    for s in range(S):
        for b in range(B):
            vals = [float(ce[s, b, t]) for t in range(T) if mask[b, t]]
            ref[s, b] = sum(vals) / len(vals) if vals else NAN
    torch.testing.assert_close(got, ref, equal_nan=True)
    torch.testing.assert_close(fusion.token_ce_to_sequence_ce(ce[1:]), ce[1:].mean(2))


@pytest.mark.parametrize("method", ["min_ce", "avg_ce"])
def test_fuse_weights_dispatch(method):
    ce_tok = random_ce((3, 4, 5), 7, inf_p=0.0)
    mask = random_mask((4, 5), 7)
    one = {"min_ce": lambda c, m=None: fusion.min_ce_weights(c, mask=m),
           "avg_ce": lambda c, m=None: fusion.avg_ce_weights(c, tau=0.7, mask=m)}[method]
    tok = fusion.fuse_weights(ce_tok, method=method, level="token", tau=0.7, mask=mask)
    torch.testing.assert_close(tok, one(ce_tok, mask))
    seq = fusion.fuse_weights(ce_tok, method=method, level="sequence", tau=0.7, mask=mask)
    assert seq.shape == (3, 4)
    torch.testing.assert_close(seq, one(fusion.token_ce_to_sequence_ce(ce_tok, mask)))
    ce_seq = random_ce((3, 4), 8)
    torch.testing.assert_close(fusion.fuse_weights(ce_seq, method=method, tau=0.7), one(ce_seq))


def test_with_target_candidate():
    src = random_ce((3, 4), 1) + 0.25  # > 0, so the target (CE 0) is strictly best in column 0
    tgt = torch.tensor([0.0, 9.0, NAN, 1.0])
    ce, idx = fusion.with_target_candidate(src, tgt)
    assert idx == 3 and ce.shape == (4, 4)
    torch.testing.assert_close(ce[:3], src, equal_nan=True)
    torch.testing.assert_close(ce[3], tgt, equal_nan=True)
    w = fusion.min_ce_weights(ce)
    assert w[idx, 0] == 1.0  # the target wins where its CE is lowest
    ce3, idx3 = fusion.with_target_candidate(random_ce((2, 3, 4), 2), torch.rand(1, 3, 4))
    assert idx3 == 2 and ce3.shape == (3, 3, 4)
    with pytest.raises(ValueError, match="target_ce"):
        fusion.with_target_candidate(src, torch.rand(5))
    with pytest.raises(TypeError, match="target_ce"):
        fusion.with_target_candidate(src, [0.0] * 4)


@pytest.mark.parametrize(
    "call,exc,name",
    [
        (lambda: fusion.min_ce_weights([[1.0]]), TypeError, "ce"),
        (lambda: fusion.min_ce_weights(torch.ones(2, 3, dtype=torch.int64)), TypeError, "ce"),
        (lambda: fusion.min_ce_weights(torch.ones(3)), ValueError, "ce"),
        (lambda: fusion.min_ce_weights(torch.ones(2, 3, 4, 5)), ValueError, "ce"),
        (lambda: fusion.min_ce_weights(torch.ones(0, 3)), ValueError, "ce"),
        (lambda: fusion.min_ce_weights(-torch.ones(2, 3)), ValueError, "ce"),
        (lambda: fusion.min_ce_weights(torch.ones(2, 3), mask=torch.ones(2, 3, dtype=torch.bool)), ValueError, "mask"),
        (lambda: fusion.min_ce_weights(torch.ones(2, 3, 4), mask=torch.ones(3, 3, dtype=torch.bool)), ValueError, "mask"),
        (lambda: fusion.min_ce_weights(torch.ones(2, 3, 4), mask=torch.ones(3, 4)), TypeError, "mask"),
        (lambda: fusion.min_ce_weights(torch.ones(2, 3, 4), mask=torch.full((3, 4), 2)), ValueError, "mask"),
        (lambda: fusion.avg_ce_weights(torch.ones(2, 3), tau=0.0), ValueError, "tau"),
        (lambda: fusion.avg_ce_weights(torch.ones(2, 3), tau=-1.0), ValueError, "tau"),
        (lambda: fusion.avg_ce_weights(torch.ones(2, 3), tau=INF), ValueError, "tau"),
        (lambda: fusion.avg_ce_weights(torch.ones(2, 3), tau="1"), TypeError, "tau"),
        (lambda: fusion.reward_weights(torch.ones(2, 3), method="argmax"), ValueError, "method"),
        (lambda: fusion.reward_weights(torch.ones(2, 3, 4)), ValueError, "rewards"),
        (lambda: fusion.reward_weights(torch.ones(2, 3), "softmax", tau=0), ValueError, "tau"),
        (lambda: fusion.token_ce_to_sequence_ce(torch.ones(2, 3)), ValueError, "ce_tok"),
        (lambda: fusion.fuse_weights(torch.ones(2, 3), method="mean"), ValueError, "method"),
        (lambda: fusion.fuse_weights(torch.ones(2, 3), level="word"), ValueError, "level"),
        (lambda: fusion.fuse_weights(torch.ones(2, 3), level="token"), ValueError, "token"),
    ],
)
def test_bad_inputs_name_argument(call, exc, name):
    with pytest.raises(exc, match=name):
        call()


def test_weights_carry_no_grad():
    ce = torch.rand(3, 4, requires_grad=True)
    assert not fusion.avg_ce_weights(ce).requires_grad and not fusion.min_ce_weights(ce).requires_grad


# ---------------------------------------------------------------------------------------------
# RewardScorer and generate_responses on tiny random models with a tokenizer trained here
# ---------------------------------------------------------------------------------------------

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

PROMPTS = ["What is a class?", "Explain the for statement.", "How do I raise an exception in a function?"]
RESPONSES = ["A class is an object.", "It loops.", "Use the raise statement, then handle it with try."]


@pytest.fixture(scope="module")
def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    texts = python_docs(40) + PROMPTS + RESPONSES
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "<unk>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>"
    )


def _config(tok, **kw):
    return transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=256, pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id, bos_token_id=None, **kw,
    )


@pytest.fixture(scope="module")
def reward_model(tiny_tokenizer):
    torch.manual_seed(0)
    return transformers.LlamaForSequenceClassification(_config(tiny_tokenizer, num_labels=1)).eval()


def test_reward_scorer_matches_unbatched_forward(tiny_tokenizer, reward_model):
    scorer = reward.RewardScorer(reward_model, tiny_tokenizer)
    reward_model.train()  # the scorer must score in eval mode and restore the mode
    got = scorer(PROMPTS, RESPONSES, batch_size=2)
    assert reward_model.training
    reward_model.eval()
    assert got.shape == (3,) and got.dtype == torch.float32
    ref = []
    with torch.no_grad():
        for p, r in zip(PROMPTS, RESPONSES):
            ids = tiny_tokenizer(p, r, return_tensors="pt").input_ids
            ref.append(reward_model(input_ids=ids).logits[0, 0])
    torch.testing.assert_close(got, torch.stack(ref), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scorer(PROMPTS, RESPONSES, batch_size=1), got, atol=1e-5, rtol=1e-5)
    # Rewards straight into ProFuser's inference-mode weights: [S=3 sources, B=1 prompt].
    w = fusion.reward_weights(got[:, None], method="max")
    assert w[int(got.argmax()), 0] == 1.0
    custom = reward.RewardScorer(reward_model, tiny_tokenizer, format=lambda p, r: p + "\n" + r)
    assert custom(PROMPTS[:1], RESPONSES[:1]).shape == (1,)
    assert scorer([], []).shape == (0,)


def test_reward_scorer_uses_chat_template_when_present(tiny_tokenizer, reward_model):
    template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    old = tiny_tokenizer.chat_template
    tiny_tokenizer.chat_template = template
    try:
        got = reward.RewardScorer(reward_model, tiny_tokenizer)(PROMPTS, RESPONSES, batch_size=3)
    finally:
        tiny_tokenizer.chat_template = old
    with torch.no_grad():
        for g, p, r in zip(got, PROMPTS, RESPONSES):
            ids = tiny_tokenizer(f"user: {p}\nassistant: {r}\n", return_tensors="pt").input_ids
            torch.testing.assert_close(g, reward_model(input_ids=ids).logits[0, 0], atol=1e-5, rtol=1e-5)


def test_reward_scorer_two_labels_uses_positive(tiny_tokenizer):
    torch.manual_seed(1)
    model = transformers.LlamaForSequenceClassification(_config(tiny_tokenizer, num_labels=2)).eval()
    got = reward.RewardScorer(model, tiny_tokenizer)(PROMPTS[:2], RESPONSES[:2])
    with torch.no_grad():
        ids = tiny_tokenizer(PROMPTS[0], RESPONSES[0], return_tensors="pt").input_ids
        torch.testing.assert_close(got[0], model(input_ids=ids).logits[0, 1], atol=1e-5, rtol=1e-5)


def test_reward_scorer_bad_inputs(tiny_tokenizer, reward_model):
    scorer = reward.RewardScorer(reward_model, tiny_tokenizer)
    with pytest.raises(ValueError, match="responses"):
        scorer(PROMPTS, RESPONSES[:2])
    with pytest.raises(TypeError, match="prompts"):
        scorer("a prompt", "a response")
    with pytest.raises(TypeError, match="responses"):
        scorer(["a"], [1])
    with pytest.raises(ValueError, match="batch_size"):
        scorer(PROMPTS, RESPONSES, batch_size=0)
    three = transformers.LlamaForSequenceClassification(_config(tiny_tokenizer, num_labels=3))
    with pytest.raises(ValueError, match="label"):
        reward.RewardScorer(three, tiny_tokenizer)
    assert reward.RewardScorer(three, tiny_tokenizer, label=2).label == 2
    no_pad = transformers.LlamaConfig(**{**_config(tiny_tokenizer).to_dict(), "pad_token_id": None})
    with pytest.raises(ValueError, match="pad_token_id"):
        reward.RewardScorer(transformers.LlamaForSequenceClassification(no_pad), tiny_tokenizer)


def test_generate_responses_greedy_left_padded(tiny_tokenizer):
    torch.manual_seed(2)
    model = transformers.LlamaForCausalLM(_config(tiny_tokenizer)).eval()
    out = reward.generate_responses(model, tiny_tokenizer, PROMPTS, max_new_tokens=6, batch_size=3)
    assert len(out) == 3 and all(isinstance(s, str) for s in out)
    # Batched left-padded greedy decoding equals decoding each prompt alone.
    for p, o in zip(PROMPTS, out):
        ids = tiny_tokenizer(p, return_tensors="pt").input_ids
        with torch.no_grad():
            ref = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                                 do_sample=False, pad_token_id=tiny_tokenizer.pad_token_id)
        assert o == tiny_tokenizer.decode(ref[0, ids.shape[1]:], skip_special_tokens=True)
        assert ref.shape[1] - ids.shape[1] <= 6
    assert reward.generate_responses(model, tiny_tokenizer, PROMPTS, max_new_tokens=6, batch_size=2) == out
    with pytest.raises(ValueError, match="max_new_tokens"):
        reward.generate_responses(model, tiny_tokenizer, PROMPTS, max_new_tokens=0)
    with pytest.raises(TypeError, match="prompts"):
        reward.generate_responses(model, tiny_tokenizer, "one prompt")
