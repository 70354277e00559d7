"""Row pass of ``fused_linear_loss``: the fused-loss row kernel on one chunk of logits.

``fused_linear_loss`` builds the sparse target of *all* tokens once (``sparse_teacher.py``) and
then, per token chunk, materialises ``logits_c = h_c @ W.T (+ b)`` and runs
:func:`fastfuse.kernels.fused_ce.fused_ce_kernel` on it **in place**: the chunk's logits become
``scale * (softmax(z) - target)``, ready for the two gradient matmuls. This module only launches
that kernel on a 2-d ``[n, V]`` chunk with row slices of the precomputed ``tids``/``coefs``
(``fused_loss_rows`` would rebuild the teacher from the source tensors on every call); the math
lives in ``fused_ce.py``.
"""
from .fused_ce import ce_rows


def fused_ce_rows_inplace(logits, tids, coefs, labels, ignore_index: int, scale, compute_grad: bool):
    """Per-row loss float32 ``[n]`` of ``logits [n, V]`` (unit last stride) against the sparse
    targets ``tids``/``coefs [n, E]`` (from :func:`~.sparse_teacher.sparse_teacher`, unique ids;
    row slices are fine), ``labels [n]``. With ``compute_grad`` the logits are overwritten by
    ``scale * dL/dlogits`` (``scale`` float32 on the device: one element, or one per row, applied
    in fp32 before the rounding to the logits dtype). Ids out of range are masked, never followed.
    """
    z = logits.unsqueeze(0)
    return ce_rows(z, z if compute_grad else None, tids, coefs, labels, ignore_index, scale, compute_grad)
