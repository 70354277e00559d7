"""The element math of ``divergence.py``'s row kernel, as Triton device functions: the divergence
and tail codes, ``F(p, q)`` and ``p dF/dp`` of each divergence (``fastfuse.loss.torch_rows.terms``
in torch), the student transform (logit scale, soft-capping) and its derivative, and the per-lane
running log-sum-exp the passes keep."""
import triton
import triton.language as tl

# the DIV codes of fastfuse.loss.spec.REGISTRY, each named after its divergence (name.upper()), and the
# TAIL codes (positions in spec.TAILS); tests/kernels/test_divergence_kernel.py checks both
CE, FORWARD_KL, REVERSE_KL, JSD, SKEW_KL, SKEW_REVERSE_KL, TVD = (tl.constexpr(c) for c in range(7))
RENORMALIZE, UNIFORM, BUCKET = (tl.constexpr(c) for c in range(3))


@triton.jit
def log_add_exp(a, b):
    hi = tl.maximum(a, b)
    lo = tl.minimum(a, b)
    return tl.where(hi == float("-inf"), float("-inf"), hi + tl.log(1.0 + tl.exp(lo - hi)))


@triton.jit
def divergence_terms(p, logp, q, mix, log_a, log_b, DIV: tl.constexpr):
    """Elementwise ``F(p, q)`` and ``G = p dF/dp`` (``fastfuse.loss.torch_rows.terms``)."""
    qpos = q > 0.0
    ppos = p > 0.0
    logq = tl.log(q)
    if DIV == CE or DIV == FORWARD_KL:
        F = tl.where(qpos, -q * logp, 0.0)
        if DIV == FORWARD_KL:
            F += tl.where(qpos, q * logq, 0.0)
        G = -q + 0.0 * p
    elif DIV == REVERSE_KL:
        F = tl.where(ppos, p * (logp - logq), 0.0)
        G = tl.where(ppos, F + p, 0.0)
    elif DIV == JSD:
        logm = log_add_exp(log_a + logq, log_b + logp)
        kp = tl.where(ppos, p * (logp - logm), 0.0)
        F = mix * tl.where(qpos, q * (logq - logm), 0.0) + (1.0 - mix) * kp
        G = (1.0 - mix) * kp
    elif DIV == SKEW_KL:
        logm = log_add_exp(log_a + logq, log_b + logp)
        F = tl.where(qpos, q * (logq - logm), 0.0)
        G = tl.where(qpos & ppos, -(1.0 - mix) * q * tl.exp(logp - logm), 0.0)
    elif DIV == SKEW_REVERSE_KL:
        logm = log_add_exp(log_a + logp, log_b + logq)
        F = tl.where(ppos, p * (logp - logm), 0.0)
        G = F + tl.where(qpos & ppos, (1.0 - mix) * q * tl.exp(logp - logm), 0.0)
    else:                   # TVD
        d = p - q
        F = 0.5 * tl.abs(d)
        G = 0.5 * p * tl.where(d > 0.0, 1.0, tl.where(d < 0.0, -1.0, 0.0))
    return F, G


@triton.jit
def transform_logits(x, logit_scale, softcap, TRANSFORM: tl.constexpr):
    """``z'``: 0 identity, 1 ``logit_scale * z``, 2 ``softcap * tanh(logit_scale * z / softcap)``."""
    if TRANSFORM == 0:
        return x
    elif TRANSFORM == 1:
        return x * logit_scale
    else:
        y = x * (logit_scale / softcap)
        # tanh through exp of a non-positive argument (no overflow): sign(y) (1 - e) / (1 + e)
        e = tl.exp(-2.0 * tl.abs(y))
        t = (1.0 - e) / (1.0 + e)
        return softcap * tl.where(y < 0.0, -t, t)


@triton.jit
def transform_grad(zt, logit_scale, softcap, TRANSFORM: tl.constexpr):
    """``dz'/dz`` from ``z'``."""
    if TRANSFORM == 2:
        r = zt / softcap
        return logit_scale * (1.0 - r * r)
    else:
        return tl.zeros_like(zt) + logit_scale      # (not 0 * zt: NaN at a -inf logit)


@triton.jit
def online_update(mv, sv, x):
    """One step of a per-lane running (max, sum of exp); returns the new (max, sum, weight of the
    old sum, weight of x) so a companion sum can follow the same rescaling."""
    hi = tl.maximum(mv, x)
    e = tl.where(hi == float("-inf"), 0.0, tl.exp(tl.minimum(mv, x) - hi))
    up = x > mv
    return hi, tl.where(up, sv * e + 1.0, sv + e), tl.where(up, e, 1.0), tl.where(up, 1.0, e)


@triton.jit
def lane_logsumexp(mv, sv):
    m = tl.max(mv, axis=0)
    m_ref = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(mv - m_ref)
    return m + tl.log(tl.sum(sv * w, axis=0)), w
