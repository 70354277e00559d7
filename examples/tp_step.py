"""One fused-loss training step with a vocabulary-parallel lm_head: torch's tensor parallelism
(``ColwiseParallel`` on the lm_head) composed with FSDP2 on a 2-D device mesh ``(dp, tp)``.

    torchrun --nproc_per_node 2 examples/tp_step.py --tp 2 OUT.pt      # dp = 1, tp = 2
    torchrun --nproc_per_node 4 examples/tp_step.py --tp 2 OUT.pt      # dp = 2, tp = 2
    python examples/ddp_step.py OUT.pt                                 # the one-process gradients

``parallelize_module(net, mesh["tp"], {"lm_head": ColwiseParallel()})`` shards the lm_head weight by
vocabulary rows over "tp" (a DTensor ``Shard(0)``); ``fully_shard(..., mesh=mesh["dp"])`` shards
every parameter over "dp" too, and gathers them back over "dp" in the forward (the lm_head weight
then is the "tp" shard, never the whole matrix). The ranks of one tp group take the same sequences
(the loss is replicated there); the dp groups split the batch, and FSDP2 averages over them. Same
model, batch and teacher as ``ddp_step.py``, so the gradients equal its one-process ones.

OUT.pt holds the whole gradients of three paths (DTensor gradients gathered with ``full_tensor``):

- ``"linear"``: ``causal_lm_fusion_loss(net, ...)``, ``fused_linear_loss`` inside the model's forward
  with the lm_head weight shard: the ``[B, T, V]`` logits never exist, not even sharded;
- ``"logits"``: ``fused_loss`` on ``net(...).logits``: ``ColwiseParallel()`` (``use_local_output=True``)
  returns this rank's ``[B, T, V / tp]`` shard, passed with ``process_group=mesh["tp"].get_group()``;
- ``"logits-dtensor"``: ``ColwiseParallel(use_local_output=False)`` returns a DTensor sharded on the
  vocabulary, which ``fused_loss`` reads as such.
"""
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fastfuse  # noqa: E402
from ddp_step import B, batch, full_grads, model  # noqa: E402  (the same model, batch and teacher)
from fastfuse.integrations.hf import causal_lm_fusion_loss  # noqa: E402

PATHS = ("linear", "logits", "logits-dtensor")


def parallelize(net, mesh, use_local_output=True):
    """The lm_head vocabulary-parallel over "tp", then FSDP2 over "dp" (each decoder layer, then the root)."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    parallelize_module(net, mesh["tp"], {"lm_head": ColwiseParallel(use_local_output=use_local_output)})
    for layer in net.model.layers:
        fully_shard(layer, mesh=mesh["dp"])
    return fully_shard(net, mesh=mesh["dp"])


def step(net, b, share, path, tp_group):
    topk = fastfuse.SourceTopK(b["ids"][:, share], b["logprobs"][:, share])
    align = fastfuse.AlignMap(b["pos"][:, share], b["vocab"])
    if path == "linear":    # the lm_head's DTensor weight tells fused_linear_loss its shard and group
        loss = causal_lm_fusion_loss(net, {"input_ids": b["input_ids"][share], "labels": b["labels"][share]}, topk,
                                     align, labels_shifted=True, source_weights=b["weights"][:, share], lm_weight=0.7)
    else:
        logits = net(input_ids=b["input_ids"][share]).logits     # [B, T, V / tp], or a DTensor of [B, T, V]
        group = tp_group if path == "logits" else None
        loss = fastfuse.fused_loss(logits, topk, align, b["labels"][share], source_weights=b["weights"][:, share],
                                   lm_weight=0.7, process_group=group)
    loss.backward()


def main(out_path, tp):
    from torch.distributed.device_mesh import init_device_mesh

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if world % tp:
        raise SystemExit(f"--tp {tp} does not divide the world size {world}")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    mesh = init_device_mesh(device.type, (world // tp, tp), mesh_dim_names=("dp", "tp"))
    dp, dp_rank = world // tp, mesh["dp"].get_local_rank()
    b = batch(device)
    share = slice(dp_rank * B // dp, (dp_rank + 1) * B // dp)     # this dp group's sequences
    grads = {}
    for path in PATHS:
        net = parallelize(model().to(device), mesh, use_local_output=path != "logits-dtensor")
        step(net, b, share, path, mesh["tp"].get_group())
        grads[path] = full_grads(net)
    if rank == 0:
        torch.save(grads, out_path)
    dist.destroy_process_group()


if __name__ == "__main__":
    args = sys.argv[1:]
    main(args[-1], tp=int(args[args.index("--tp") + 1]) if "--tp" in args else 2)
