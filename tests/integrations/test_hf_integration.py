"""causal_lm_fusion_loss on tiny random-initialised HF models (no hub): equals fused_loss on the
model's full logits, same parameter gradients (untied, tied and biased lm_heads), both label
conventions, the lm_head never runs on the sequence, and a few training steps lower the loss."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("transformers")

from fastfuse.batches.dataset import FusionCollator  # noqa: E402
from fastfuse.integrations.hf import causal_lm_fusion_loss  # noqa: E402
from fastfuse.loss.logits_loss import fused_loss  # noqa: E402
from fastfuse.loss.spec import DEFAULT_SPEC  # noqa: E402

from _wrappers import Wrapper  # noqa: E402  (tests/ is on sys.path under pytest)

V = 80


def batch():
    """A FusionCollator batch: labels already shifted (labels[:, t] = input_ids[:, t + 1])."""
    rng = np.random.default_rng(0)
    maps = [rng.integers(0, V, 40).astype(np.int32), np.where(rng.random(30) < 0.7, rng.integers(0, V, 30), -1).astype(np.int32)]
    exs = []
    for T in (9, 12, 6):
        ex = {"input_ids": rng.integers(1, V, T), "topk_ids": [], "topk_logprobs": [], "pos": [], "ce": rng.uniform(1, 2, 2)}
        for Vs in (40, 30):
            ex["topk_ids"].append(rng.integers(0, Vs, (T, 4)).astype(np.int32))
            ex["topk_logprobs"].append(np.log(rng.dirichlet(np.ones(4), T)).astype(np.float32))
            ex["pos"].append(np.where(rng.random(T) < 0.8, rng.integers(0, T, T), -1).astype(np.int32))
        exs.append(ex)
    return FusionCollator(maps, pad_token_id=0, pin_memory=False, fusion="avg_ce")(exs)


def hf_labels(b):
    """The same targets in Hugging Face's convention: input_ids, padding = -100 (unshifted)."""
    return torch.where(b["attention_mask"].bool(), b["input_ids"], torch.full_like(b["input_ids"], -100))


def make_model(name):
    from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PhiConfig, PhiForCausalLM,
                              Qwen2Config, Qwen2ForCausalLM)

    torch.manual_seed(0)
    small = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                 max_position_embeddings=32)
    if name == "llama":
        return LlamaForCausalLM(LlamaConfig(num_key_value_heads=2, **small))
    if name == "llama-tied":
        return LlamaForCausalLM(LlamaConfig(num_key_value_heads=2, tie_word_embeddings=True, **small))
    if name == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(num_key_value_heads=2, **small))
    if name == "phi-bias":      # lm_head with a bias
        return PhiForCausalLM(PhiConfig(**small))
    if name == "gpt2":          # tied, Conv1D blocks, base_model_prefix "transformer"; no dropout
        return GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=32, n_layer=1, n_head=2, n_positions=32,
                                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    raise ValueError(name)


@pytest.mark.parametrize("name", ["llama", "llama-tied", "qwen2", "phi-bias", "gpt2"])
def test_equals_full_logits_and_gradients(name):
    model = make_model(name).eval()
    b = batch()
    params = [p for p in model.parameters()]
    calls = []
    hook = model.get_output_embeddings().register_forward_hook(lambda *a: calls.append(1))
    loss = causal_lm_fusion_loss(model, b, lm_weight=0.6, chunk_tokens=5, labels_shifted=True)
    assert not calls, "the lm_head ran on the sequence"
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    hook.remove()

    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    ref = fused_loss(logits, b["source_topk"], b["align_map"], b["labels"], source_weights=b["source_weights"],
                     lm_weight=0.6)
    ref_grads = torch.autograd.grad(ref, params, allow_unused=True)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    if name == "llama-tied":
        assert model.lm_head.weight is model.get_input_embeddings().weight
    if name == "phi-bias":
        assert model.lm_head.bias is not None
    for p, g, r in zip(params, grads, ref_grads):
        if r is None:
            assert g is None or float(g.abs().sum()) == 0
        else:
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)

    # the default for a FusionCollator batch: labels already shifted
    torch.testing.assert_close(causal_lm_fusion_loss(model, b, lm_weight=0.6), ref, rtol=1e-5, atol=1e-6)
    # Hugging Face's unshifted labels: the same loss, shifted inside
    hf = dict(b, labels=hf_labels(b))
    torch.testing.assert_close(causal_lm_fusion_loss(model, hf, lm_weight=0.6, labels_shifted=False), ref,
                               rtol=1e-5, atol=1e-6)
    # an HF batch with the teacher as arguments (default: unshifted), and reduction="none"
    rows = causal_lm_fusion_loss(model, {k: hf[k] for k in ("input_ids", "attention_mask", "labels", "source_weights")},
                                 b["source_topk"], b["align_map"], lm_weight=0.6, reduction="none")
    ref_rows = fused_loss(logits, b["source_topk"], b["align_map"], b["labels"], source_weights=b["source_weights"],
                          lm_weight=0.6, reduction="none")
    torch.testing.assert_close(rows, ref_rows.detach(), rtol=1e-5, atol=1e-6)


def test_training_steps_lower_the_loss():
    model = make_model("llama").train()
    b = dict(batch())
    b["labels"] = hf_labels(b)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        loss = causal_lm_fusion_loss(model, b, lm_weight=0.9, labels_shifted=False)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.8 * losses[0], losses


def test_bad_batch_and_model():
    model = make_model("llama")
    with pytest.raises(ValueError, match="batch: missing \\['labels', 'source_topk', 'align_map'\\]"):
        causal_lm_fusion_loss(model, {"input_ids": torch.zeros(1, 2, dtype=torch.long)})
    with pytest.raises(TypeError, match="batch must be a mapping"):
        causal_lm_fusion_loss(model, [1, 2])
    with pytest.raises(TypeError, match="model: expected a Hugging Face causal LM"):
        causal_lm_fusion_loss(torch.nn.Linear(2, 2), batch())
    model.config.output_multiplier_scale = 2.0          # a transform the loss does not know
    with pytest.raises(NotImplementedError, match="output_multiplier_scale"):
        causal_lm_fusion_loss(model, batch())
    del model.config.output_multiplier_scale
    model.config.final_logit_softcapping = 30.0         # a config that says more than the forward does
    with pytest.raises(NotImplementedError, match="beyond its config's {'softcap': 30.0}"):
        causal_lm_fusion_loss(model, batch())


def make_transforming_model(name):
    from transformers import (CohereConfig, CohereForCausalLM, Gemma2Config, Gemma2ForCausalLM, GraniteConfig,
                              GraniteForCausalLM)

    torch.manual_seed(0)
    small = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=2, max_position_embeddings=32)
    if name == "gemma2":         # final_logit_softcapping: 30 * tanh(z / 30); a small cap so it bites
        return Gemma2ForCausalLM(Gemma2Config(head_dim=16, final_logit_softcapping=2.0, **small))
    if name == "cohere":         # logits * logit_scale
        return CohereForCausalLM(CohereConfig(logit_scale=0.25, **small))
    return GraniteForCausalLM(GraniteConfig(logits_scaling=3.0, **small))    # logits / logits_scaling


@pytest.mark.parametrize("name", ["gemma2", "cohere", "granite"])
@pytest.mark.parametrize("divergence", [DEFAULT_SPEC.divergence, "reverse_kl"])
def test_models_that_transform_their_logits(name, divergence):
    """Soft-capped / scaled logits: the loss applies the model's own transform, same loss and grads."""
    model = make_transforming_model(name).eval()
    b = batch()
    params = list(model.parameters())
    kw = dict(lm_weight=0.6, divergence=divergence, tail="bucket" if divergence == "reverse_kl" else "renormalize")
    loss = causal_lm_fusion_loss(model, b, chunk_tokens=7, **kw)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    ref = fused_loss(logits, b["source_topk"], b["align_map"], b["labels"], source_weights=b["source_weights"], **kw)
    ref_grads = torch.autograd.grad(ref, params, allow_unused=True)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        if r is not None:
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="already fixes its logit transform"):
        causal_lm_fusion_loss(model, b, softcap=5.0)


def test_autocast_bf16():
    """Under torch.autocast the hidden states and the head run in the autocast dtype."""
    model = make_model("llama")
    b = batch()
    ref = causal_lm_fusion_loss(model, b, labels_shifted=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = causal_lm_fusion_loss(model, b, labels_shifted=True)
    loss.backward()
    assert loss.dtype == torch.float32 and model.lm_head.weight.grad.dtype == torch.float32
    assert abs(float(loss.detach()) - float(ref.detach())) < 3e-2 * float(ref.detach())


def test_final_hidden_states_without_backbone(monkeypatch):
    """No separate backbone: hidden states from output_hidden_states (lm_head on one position only)."""
    import fastfuse.integrations.hf as hfmod

    model = make_model("llama")
    b = batch()
    ref = hfmod.final_hidden_states(model, b["input_ids"], attention_mask=b["attention_mask"])
    real = hfmod.backbone_and_head
    monkeypatch.setattr(hfmod, "backbone_and_head", lambda m: (None, real(m)[1]))
    torch.testing.assert_close(hfmod.final_hidden_states(model, b["input_ids"], attention_mask=b["attention_mask"]),
                               ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_through_a_wrapper(name):
    """A wrapped model runs through the wrapper's forward; same loss, gradients and hidden states."""
    from fastfuse.integrations.hf import final_hidden_states, unwrap_model

    model = make_model(name)
    net = Wrapper(Wrapper(model))
    assert unwrap_model(net) is model and unwrap_model(model) is model
    b = batch()
    params = list(model.parameters())
    loss, hidden = causal_lm_fusion_loss(net, b, lm_weight=0.6, return_hidden=True)
    assert net.calls == 1 and net.module.calls == 1
    assert not hidden.requires_grad
    torch.testing.assert_close(hidden, final_hidden_states(model, b["input_ids"], attention_mask=b["attention_mask"]))
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    ref = causal_lm_fusion_loss(model, b, lm_weight=0.6)
    ref_grads = torch.autograd.grad(ref, params, allow_unused=True)
    torch.testing.assert_close(loss, ref, rtol=0, atol=0)
    for g, r in zip(grads, ref_grads):
        assert (g is None) == (r is None)
        if r is not None:
            torch.testing.assert_close(g, r, rtol=0, atol=0)


def test_head_restored_after_an_error():
    model = make_model("gpt2")
    head = model.get_output_embeddings()
    b = batch()
    with pytest.raises(RuntimeError, match="its lm_head received hidden states of shape"):
        causal_lm_fusion_loss(Wrapper(model), dict(b, labels=b["labels"][:, :-1]), labels_shifted=True)
    assert model.get_output_embeddings() is head and model.lm_head.weight is model.transformer.wte.weight
    assert dict(model.named_modules())["lm_head"] is head
    causal_lm_fusion_loss(model, b).backward()
    assert model.transformer.wte.weight.grad is not None


def test_data_parallel_over_several_gpus_is_refused():
    """It would scatter the batch to replicas but not the teacher and labels the loss closes over."""
    net = torch.nn.DataParallel(make_model("llama"))
    net.device_ids = [0, 1]     # what it holds on a 2-GPU machine
    with pytest.raises(NotImplementedError, match="DataParallel over several GPUs"):
        causal_lm_fusion_loss(net, batch())
