"""One fused-loss training step under torchrun DDP or FSDP2 (also the plain-PyTorch example of the loss).

    torchrun --nproc_per_node 2 examples/ddp_step.py OUT.pt          # DDP: gloo on CPU, nccl on GPUs
    torchrun --nproc_per_node 2 examples/ddp_step.py --fsdp OUT.pt   # FSDP2 (fully_shard per layer + root)
    python examples/ddp_step.py OUT.pt                               # one process, whole batch

Each rank takes its share of a fixed batch; DDP and FSDP average the gradients. With equal numbers
of non-ignored tokens per rank that equals the single-process gradient of the mean loss.

The step runs twice, on two copies of the model, and OUT.pt holds both gradients:
- "logits": ``fused_loss`` on ``net(...).logits``;
- "linear": ``fused_linear_loss`` through ``causal_lm_fusion_loss(net, ...)`` (what
  ``FusionTrainer`` does by default): the loss is computed inside the DDP wrapper's forward, with
  the model's lm_head swapped for a loss module, so the ``[B, T, V]`` logits never exist. Its DDP
  uses ``find_unused_parameters=True``, Hugging Face Trainer's default, under which a loss that
  used the lm_head weight after the forward would fail. Under FSDP2 the root module's forward
  gathers the (sharded) lm_head weight, so the loss module sees it whole.
"""
import os
import sys

import torch
import torch.distributed as dist

import fastfuse
from fastfuse.integrations.hf import causal_lm_fusion_loss

V, T, B, S, K, VS = 96, 10, 4, 2, 5, 80


def batch(device):
    g = torch.Generator().manual_seed(1234)
    input_ids = torch.randint(1, V, (B, T), generator=g)
    labels = torch.cat([input_ids[:, 1:], torch.full((B, 1), -100)], 1)  # next token; last ignored
    ids = torch.randint(0, VS, (S, B, T, K), generator=g, dtype=torch.int32)
    logprobs = torch.log_softmax(torch.randn(S, B, T, K, generator=g), -1)
    pos = torch.where(torch.rand(S, B, T, generator=g) < 0.8, torch.randint(0, T, (S, B, T), generator=g), -1).int()
    vocab = torch.where(torch.rand(S, VS, generator=g) < 0.9, torch.randint(0, V, (S, VS), generator=g), -1).int()
    weights = torch.softmax(torch.randn(S, B, generator=g), 0)
    return {k: v.to(device) for k, v in dict(input_ids=input_ids, labels=labels, ids=ids, logprobs=logprobs, pos=pos,
                                              vocab=vocab, weights=weights).items()}


def model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64))


def step(net, b, share, linear):
    """Forward and backward of this rank's share of the batch; ``net`` may be DDP-wrapped."""
    topk = fastfuse.SourceTopK(b["ids"][:, share], b["logprobs"][:, share])
    align = fastfuse.AlignMap(b["pos"][:, share], b["vocab"])
    if linear:
        loss = causal_lm_fusion_loss(net, {"input_ids": b["input_ids"][share], "labels": b["labels"][share]}, topk,
                                     align, labels_shifted=True, source_weights=b["weights"][:, share], lm_weight=0.7)
    else:
        logits = net(input_ids=b["input_ids"][share]).logits
        loss = fastfuse.fused_loss(logits, topk, align, b["labels"][share], source_weights=b["weights"][:, share],
                                   lm_weight=0.7)
    loss.backward()


def wrap(net, how, device):
    """``net`` for this rank: DDP, or FSDP2 with each decoder layer and the root sharded."""
    if how == "fsdp":
        from torch.distributed.fsdp import fully_shard  # torch >= 2.6

        for layer in net.model.layers:
            fully_shard(layer)
        return fully_shard(net)
    return torch.nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None,
                                                     find_unused_parameters=how == "ddp-linear")


def full_grads(net):
    """Parameter gradients on the CPU, whole (FSDP2 keeps them as sharded DTensors)."""
    mod = net.module if isinstance(net, torch.nn.parallel.DistributedDataParallel) else net
    return {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).detach().cpu()
            for n, p in mod.named_parameters()}


def main(out_path, how="ddp"):
    distributed = "RANK" in os.environ
    if distributed:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else torch.device("cpu")
    b = batch(device)
    share = slice(rank * B // world, (rank + 1) * B // world)  # this rank's sequences
    grads = {}
    for path in ("logits", "linear"):
        net = model().to(device)
        if distributed:
            net = wrap(net, "fsdp" if how == "fsdp" else f"ddp-{path}", device)
        step(net, b, share, linear=path == "linear")
        grads[path] = full_grads(net)
    if rank == 0:
        torch.save(grads, out_path)
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    args = sys.argv[1:]
    main(args[-1], how="fsdp" if "--fsdp" in args else "ddp")
