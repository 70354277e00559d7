"""Layer 4, the loss: ``fused_loss`` and ``fused_linear_loss`` (Triton kernels on GPU, torch on CPU).

spec           the divergence registry and ``make_spec``
checks         argument checks, dtypes and the choice of backend
row_runner     the per-row sparse target and the one call that runs its rows
torch_rows     every divergence's loss and gradient rows in torch, in stages
reference      the dense float64-capable reference and the sparse torch path
logits_loss    ``fused_loss`` from logits
linear_loss    ``fused_linear_loss`` from hidden states and the lm_head weight
chunk_loop     the linear loss's loop over token chunks
parallel/      the same losses on a vocabulary shard (tensor parallelism)
"""
