"""Row pass of ``fused_linear_loss``: the fused-loss row kernel on one chunk of logits.

``fused_linear_loss`` builds the sparse target of *all* tokens once (``sparse_teacher.py``) and
then, per token chunk, materialises ``logits_c = h_c @ W.T (+ b)`` and runs
:func:`fastfuse.kernels.fused_ce.fused_ce_kernel` on it **in place**: the chunk's logits become
``scale * (softmax(z) - target)``, ready for the two gradient matmuls. This module only launches
that kernel on a 2-d ``[n, V]`` chunk with row slices of the precomputed ``tids``/``coefs``
(``fused_loss_rows`` would rebuild the teacher from the source tensors on every call); the math
lives in ``fused_ce.py``.
"""
import triton

from .fused_ce import fused_ce_kernel, launch_config


def fused_ce_rows_inplace(logits, tids, coefs, labels, ignore_index: int, scale, compute_grad: bool):
    """Per-row loss float32 ``[n]`` of ``logits [n, V]`` (unit last stride) against the sparse
    targets ``tids``/``coefs [n, E]`` (from :func:`~.sparse_teacher.sparse_teacher`, unique ids;
    row slices are fine), ``labels [n]``. With ``compute_grad`` the logits are overwritten by
    ``scale * dL/dlogits`` (``scale`` a 1-element float32 device tensor). Inputs already validated.
    """
    import torch

    n, V = logits.shape
    E = tids.shape[1]
    loss = torch.empty(n, dtype=torch.float32, device=logits.device)
    block_v, num_warps = launch_config(V)
    fused_ce_kernel[(n,)](
        logits, 0, logits.stride(0),
        logits, 0, logits.stride(0),
        tids, coefs, labels, loss, scale,
        n, V, E, int(ignore_index),
        BLOCK_V=block_v, BLOCK_E=max(2, triton.next_power_of_2(E)), COMPUTE_GRAD=bool(compute_grad),
        SINGLE_BLOCK=block_v >= V,
        num_warps=num_warps,
    )
    return loss
