"""causal_lm_fusion_loss on tiny random HF models: equals fused_loss on the full logits, same
parameter gradients, and a few training steps lower the loss."""
import numpy as np
import pytest
import torch

from fastfuse.data import FusionCollator
from fastfuse.integrations.hf import causal_lm_fusion_loss
from fastfuse.loss import fused_loss

V = 80


def batch():
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


def models():
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32))
    tied = LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                                        tie_word_embeddings=True))
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=32, n_layer=1, n_head=2, n_positions=32))
    return {"llama": llama, "llama-tied": tied, "gpt2": gpt2}


@pytest.mark.parametrize("name", ["llama", "llama-tied", "gpt2"])
def test_equals_full_logits_and_gradients(name):
    model = models()[name].eval()
    b = batch()
    loss = causal_lm_fusion_loss(model, b, lm_weight=0.6, chunk_tokens=5)
    grads = torch.autograd.grad(loss, [p for p in model.parameters()], allow_unused=True)
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    ref = fused_loss(logits, b["source_topk"], b["align_map"], b["labels"], source_weights=b["source_weights"],
                     lm_weight=0.6)
    ref_grads = torch.autograd.grad(ref, [p for p in model.parameters()], allow_unused=True)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        if r is None:
            assert g is None or float(g.abs().sum()) == 0
        else:
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


def test_training_steps_lower_the_loss():
    model = models()["llama"].train()
    b = batch()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        loss = causal_lm_fusion_loss(model, b, lm_weight=0.9)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.8 * losses[0]


def test_bad_batch_and_model():
    with pytest.raises(ValueError, match="batch: missing"):
        causal_lm_fusion_loss(models()["llama"], {"input_ids": torch.zeros(1, 2, dtype=torch.long)})
    with pytest.raises(TypeError, match="model: expected a Hugging Face causal LM"):
        causal_lm_fusion_loss(torch.nn.Linear(2, 2), batch())
