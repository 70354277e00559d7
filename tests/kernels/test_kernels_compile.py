"""The Triton kernels compile for real GPUs (sm_80, sm_90) on a machine without one.

The interpreter (``TRITON_INTERPRET=1``) checks the kernels' arithmetic but not what only the
compiler checks (e.g. a loop-carried value that changes type passes the interpreter). The launch
wrappers run here on CPU tensors with the launches recorded instead of run
(:mod:`fastfuse.testing.aot`), and every recorded launch is compiled down to a cubin. Not marked
``interpreter``: these run in the main session, where Triton is imported compiled (tests/_interpreter.py).
"""
import importlib.util
import itertools
from types import SimpleNamespace

import pytest
import torch

from _interpreter import kernels_interpreted

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)


@pytest.fixture(scope="module")
def kern():
    """The kernel modules and the AOT helpers (compiled mode: see the module's docstring)."""
    if kernels_interpreted():
        pytest.skip("the kernels are interpreted in this process (TRITON_INTERPRET=1): nothing to compile")
    try:
        from fastfuse.testing import aot
    except ImportError as e:  # pragma: no cover - a Triton without ASTSource/GPUTarget
        pytest.skip(f"no ahead-of-time compilation in this Triton: {e}")
    from fastfuse.kernels import divergence, fused_ce, sparse_teacher
    return SimpleNamespace(aot=aot, fused_ce=fused_ce, divergence=divergence, sparse_teacher=sparse_teacher)


def _compile_all(k, launches, hopper_only=False):
    for target in [k.aot.HOPPER] + ([] if hopper_only else [k.aot.AMPERE]):
        for kernel, args, kwargs in launches:
            assert k.aot.compile_launch(kernel, args, kwargs, target).asm.get("cubin"), (kernel, target)


# V: a small vocabulary, Llama-2 (one block per row), Llama-3 and Gemma (two passes)
@pytest.mark.parametrize("V", [1000, 32000, 128256, 262144])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("compute_grad", [True, False])
def test_fused_loss_kernels_compile_for_gpus(kern, V, dtype, compute_grad):
    launches = kern.aot.fused_loss_launches(V, dtype, compute_grad, S=3, B=2, seed=V)
    assert [k for k, _, _ in launches] == [kern.sparse_teacher.sparse_teacher_kernel, kern.fused_ce.fused_ce_kernel]
    _compile_all(kern, launches)


@pytest.mark.parametrize("K", [1, 64])  # BLOCK_K and num_warps change with K
def test_sparse_teacher_compiles_for_any_k(kern, K):
    launches = kern.aot.fused_loss_launches(300, torch.float32, S=8, T=3, K=K, Vs=100, seed=K)
    teacher = [launch for launch in launches if launch[0] is kern.sparse_teacher.sparse_teacher_kernel]
    assert len(teacher) == 1
    _compile_all(kern, teacher)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_linear_loss_row_kernel_compiles_for_gpus(kern, dtype):
    n, V, E = 16, 128256, 21
    with kern.aot.record_launches(kern.fused_ce.fused_ce_kernel) as launches:
        z = torch.empty(1, n, V, dtype=dtype)      # a chunk's logits, overwritten by their gradient
        kern.fused_ce.ce_rows(z, z, torch.zeros(n, E, dtype=torch.int32), torch.zeros(n, E),
                              torch.zeros(n, dtype=torch.int64), -100, torch.ones(1), compute_grad=True)
    assert len(launches) == 1
    _compile_all(kern, launches, hopper_only=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rescale_kernel_compiles_for_gpus(kern, dtype):
    """The backward's device-side grad_output multiply: per-row factors on [B, T, V], one on [R, C]."""
    with kern.aot.record_launches(kern.fused_ce.rescale_kernel) as launches:
        kern.fused_ce.rescale_rows_(torch.empty(2, 3, 1000, dtype=dtype), torch.ones(6))
        kern.fused_ce.rescale_rows_(torch.empty(5, 7, dtype=dtype), torch.ones(1))
    assert len(launches) == 2
    _compile_all(kern, launches)


def test_recording_is_undone(kern):
    kernel = kern.fused_ce.fused_ce_kernel
    with kern.aot.record_launches(kernel):
        assert "run" in vars(kernel)
    assert "run" not in vars(kernel)


def test_hopper_kernels_do_not_spill(kern):
    """Register spills would put the row's values in local memory: a performance bug the
    interpreter cannot see. Checked on the two Hopper paths (one block per row; two passes)."""
    aot = kern.aot
    for V in (32000, 128256):
        for kernel, args, kwargs in aot.fused_loss_launches(V, torch.bfloat16, inplace_grad=True, Vs=50):
            try:
                res = aot.ptxas_resources(aot.compile_launch(kernel, args, kwargs, aot.HOPPER))
            except RuntimeError as e:  # this Triton ships no ptxas that takes its own PTX
                pytest.skip(str(e))
            assert res["spill_stores"] == 0 and res["spill_loads"] == 0, (kernel.__name__, V, res)


@pytest.mark.parametrize("name", ["2pass_l2", "2pass_l2_fp32", "2pass_v1"])
def test_named_two_pass_configs_compile_without_spills(kern, name):
    """Every two-pass entry of fused_ce.CONFIGS (the table's sm_80 and sm_90 choices and the v1
    configuration kept for comparison), recorded through fused_loss at V = 128256, compiles for
    sm_80 and sm_90 and does not spill on either."""
    from fastfuse.kernels.launch import forced
    fc = kern.fused_ce
    assert {v for k, v in fc.LAUNCH_TABLE.items() if k[0] == "two_pass"} <= set(fc.CONFIGS)
    aot = kern.aot
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        with forced("fused_ce", name):
            launches = [x for x in aot.fused_loss_launches(128256, dtype, inplace_grad=True, Vs=50)
                        if x[0] is fc.fused_ce_kernel]
        assert len(launches) == 1 and launches[0][2]["BLOCK_V"] == fc.CONFIGS[name].block_v
        kernel, args, kwargs = launches[0]
        # aligned: what a GPU compiles for V = 128256 (16-byte loads, cp.async-pipelined)
        for (target, arch), aligned in itertools.product(((aot.HOPPER, "sm_90a"), (aot.AMPERE, "sm_80")),
                                                         (False, True)):
            try:
                res = aot.ptxas_resources(aot.compile_launch(kernel, args, kwargs, target, aligned), arch)
            except RuntimeError as e:
                pytest.skip(str(e))
            assert res["spill_stores"] == 0 and res["spill_loads"] == 0, (name, dtype, arch, aligned, res)


@pytest.mark.parametrize("tail", ["renormalize", "uniform", "bucket"])
def test_divergence_kernel_compiles_without_spills(kern, tail):
    """Every divergence of the generic row kernel (with the heaviest student transform: softcap and
    a temperature) compiles for sm_90 -- and the three-pass "uniform" ones for sm_80 too -- at
    V = 128256 with the library's launch, without spilling."""
    from fastfuse.loss.spec import DIVERGENCES, make_spec
    aot = kern.aot
    targets = [(aot.HOPPER, "sm_90a")] + ([(aot.AMPERE, "sm_80")] if tail == "uniform" else [])
    for divergence in DIVERGENCES:
        spec = make_spec(divergence, tail, softcap=30.0, student_temperature=2.0)
        launches = aot.divergence_launches(128256, torch.bfloat16, spec, seed=len(divergence))
        assert [k for k, _, _ in launches] == [kern.sparse_teacher.sparse_teacher_kernel,
                                               kern.divergence.divergence_kernel]
        kernel, args, kwargs = launches[-1]
        for target, arch in targets:
            try:
                res = aot.ptxas_resources(aot.compile_launch(kernel, args, kwargs, target, aligned=True), arch)
            except RuntimeError as e:
                pytest.skip(str(e))
            assert res["spill_stores"] == 0 and res["spill_loads"] == 0, (divergence, tail, arch, res)
        _compile_all(kern, launches[:1], hopper_only=True)      # the tail-mass teacher


def _no_spills(aot, kernel, args, kwargs, what):
    for aligned in (False, True):
        try:
            res = aot.ptxas_resources(aot.compile_launch(kernel, args, kwargs, aot.HOPPER, aligned), "sm_90a")
        except RuntimeError as e:
            pytest.skip(str(e))
        assert res["spill_stores"] == 0 and res["spill_loads"] == 0, (what, aligned, res)


@pytest.mark.parametrize("name", ["2pass_l2", "2pass_l2_s4", "2pass_l2_s5", "2pass_l2_hoist", "2pass_l2_persistent"])
def test_fused_ce_candidates_compile_for_hopper_without_spills(kern, name):
    """Each candidate a GPU run compares (fused_ce.CANDIDATES), bf16 at V = 128256 and V = 32000
    (a two-pass configuration forced onto a one-block vocabulary), compiles for sm_90 unspilled."""
    from fastfuse.kernels.launch import forced
    fc, aot = kern.fused_ce, kern.aot
    assert name in fc.CANDIDATES["two_pass"]
    for V in (128256, 32000):
        with forced("fused_ce", name):
            (launch,) = [x for x in aot.fused_loss_launches(V, torch.bfloat16, inplace_grad=True, Vs=50)
                         if x[0] is fc.fused_ce_kernel]
        assert launch[2]["NUM_STAGES"] == fc.CONFIGS[name].num_stages
        _no_spills(aot, *launch, (name, V))


@pytest.mark.parametrize("name", ["generic", "generic_s3", "generic_s4", "generic_s5", "generic_hoist",
                                  "generic_persistent"])
def test_divergence_launches_compile_for_hopper_without_spills(kern, name):
    """Each divergence.LAUNCHES entry on the heaviest combinations (softcap and a temperature; the
    tail-pass jsd/uniform, reverse_kl/uniform, the bucket's fp64 pass) at V = 128256, sm_90."""
    from fastfuse.loss.spec import make_spec
    from fastfuse.kernels.launch import forced
    assert name in kern.divergence.LAUNCHES
    for div, tail in (("jsd", "uniform"), ("reverse_kl", "uniform"), ("jsd", "bucket")):
        spec = make_spec(div, tail, softcap=30.0, student_temperature=2.0)
        with forced("divergence", name):
            launch = kern.aot.divergence_launches(128256, torch.bfloat16, spec)[-1]
        want = kern.divergence.LAUNCHES[name]
        assert launch[2]["NUM_STAGES"] == want["num_stages"]
        assert (launch[2]["HOIST"], launch[2]["PERSISTENT"]) == (want.get("hoist", False), want.get("persistent", False))
        _no_spills(kern.aot, *launch, (name, div, tail))


def test_rescale_row_candidate_compiles_for_gpus(kern):
    from fastfuse.kernels.launch import forced
    with kern.aot.record_launches(kern.fused_ce.rescale_row_kernel) as launches, forced("rescale", "row"):
        kern.fused_ce.rescale_rows_(torch.empty(2, 3, 128256, dtype=torch.bfloat16), torch.ones(6))
    assert len(launches) == 1
    _compile_all(kern, launches)
    _no_spills(kern.aot, *launches[0], "rescale row")
