"""``fused_loss`` as the loss of a tiny randomly initialised Hugging Face causal LM."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from fastfuse import AlignMap, SourceTopK, fused_loss  # noqa: E402
from fastfuse.loss.reference import fused_loss_reference  # noqa: E402


def _model(V):
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg)


def _batch(V, B=2, T=16, S=2, K=4, Vs=90):
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, V, (B, T + 1), generator=g)
    labels = input_ids[:, 1:].clone()
    labels[0, :3] = -100                                    # e.g. a prompt
    ids = torch.randint(0, Vs, (S, B, T, K), generator=g).to(torch.int32)
    ids[..., 0] = labels.clamp_min(0)                        # sources mostly agree with the text
    lp = torch.log_softmax(torch.randn(S, B, T, K, generator=g), -1)
    pos = torch.arange(T, dtype=torch.int32).expand(S, B, T).clone()
    pos[1, :, ::3] = -1                                      # source 1 misaligned at some positions
    vocab = torch.arange(Vs, dtype=torch.int32).expand(S, Vs).clone()
    vocab[:, V:] = -1                                        # source ids beyond the target vocab
    vocab[1, ::5] = -1
    w = torch.tensor([[0.7, 0.2], [0.3, 0.8]])
    return input_ids[:, :-1], labels, SourceTopK(ids, lp), AlignMap(pos, vocab), w


@pytest.mark.parametrize("inplace", [False, True])
def test_tiny_llama_training_step(inplace):
    V = 64
    model = _model(V)
    input_ids, labels, topk, amap, w = _batch(V)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(8):
        logits = model(input_ids=input_ids).logits            # [B, T, V]
        loss = fused_loss(logits, topk, amap, labels, w, lm_weight=0.9, inplace_grad=inplace)
        if step == 0:                                        # matches the dense reference
            with torch.no_grad():
                want = fused_loss_reference(model(input_ids=input_ids).logits.double(), topk,
                                            amap, labels, w)
            torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-5)
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses


def test_gradients_match_reference_through_model():
    V = 64
    input_ids, labels, topk, amap, w = _batch(V)
    grads = []
    for use_ref in (False, True):
        model = _model(V)
        logits = model(input_ids=input_ids).logits
        if use_ref:
            loss = fused_loss_reference(logits, topk, amap, labels, w, 0.9)
        else:
            loss = fused_loss(logits, topk, amap, labels, w, 0.9)
        loss.backward()
        grads.append(model.lm_head.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)
