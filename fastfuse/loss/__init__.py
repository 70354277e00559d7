"""Layer 4, the loss: ``fused_loss`` and ``fused_linear_loss`` (Triton kernels on GPU, torch on CPU).

spec           the divergence registry and ``make_spec``
checks         argument checks, dtypes and the choice of backend
row_runner     the one prepare step (the per-row sparse target) and the row-runner interface
autograd       the two autograd Functions (logits; hidden states + lm_head), over any row runner
torch_path     the sparse torch path (``impl="torch"``) and the teacher code every torch path shares
torch_rows     every divergence's loss and gradient rows in torch, in stages
reference      the dense float64 reference the tests compare every path against (tests only)
logits_loss    ``fused_loss`` from logits
linear_loss    ``fused_linear_loss`` from hidden states and the lm_head weight
chunk_loop     the token chunks (512 MiB of logits) and the linear loss's loop over them
parallel/      the vocabulary-parallel row runner and entry points (tensor parallelism)
"""
