"""Every candidate launch configuration (``fused_ce.CANDIDATES``, ``fused_ce.RESCALES``,
``divergence.LAUNCHES``) computes the same loss and gradient as the float64 reference, run through
``fused_loss`` under the interpreter on CPU (fresh random inputs per case). The features are kept and
only the chunk shrunk, so rows span several chunks; a persistent grid runs 3 programs over the rows.
Forcing is a context manager: nothing is left set afterwards."""
import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.interpreter

triton = pytest.importorskip("triton")

from fastfuse.kernels import divergence, fused_ce  # noqa: E402
from fastfuse.kernels.launch import forced, forced_config  # noqa: E402
from fastfuse import AlignMap, SourceTopK, fused_loss  # noqa: E402
from fastfuse.loss.reference import fused_loss_reference  # noqa: E402
from fastfuse.loss.spec import lookup, make_spec  # noqa: E402
from fastfuse.testing import random_inputs, tolerance


def _check(kernel, config, dtype, seed, inplace=False, grad_output=0.5, **divergence_kw):
    d = random_inputs(B=2, T=5, V=700, S=2, K=6, Ts=6, Vs=80, dtype=dtype, device=DEVICE, missing_mass=0.3,
                      generator=torch.Generator().manual_seed(seed))
    topk, amap = SourceTopK(*d["source_topk"]), AlignMap(*d["align_map"])
    z64 = d["target_logits"].double().requires_grad_()
    want = fused_loss_reference(z64, SourceTopK(topk.ids, topk.logprobs.double()), amap, d["labels"],
                                d["source_weights"], 0.8, 1.0, **divergence_kw)
    want.backward(torch.tensor(grad_output, dtype=torch.float64))
    z = d["target_logits"].clone().requires_grad_()
    x = z * 1 if inplace else z
    with forced(kernel, config):
        got = fused_loss(x, topk, amap, d["labels"], d["source_weights"], 0.8, 1.0, inplace_grad=inplace,
                         impl="triton", **divergence_kw)
        got.backward(torch.tensor(grad_output))
    assert forced_config(kernel) is None
    n = int((d["labels"] != -100).sum())
    tol = tolerance(dtype, "mean", n, grad_output, d["target_logits"].abs().max().item())
    scale = max(1.0, abs(want.item()))
    torch.testing.assert_close(got.double(), want.detach(), rtol=tol["loss"]["rtol"], atol=tol["loss"]["atol"] * scale)
    torch.testing.assert_close(z.grad.double(), z64.grad, **tol["grad"])


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted({c for v in fused_ce.CANDIDATES.values() for c in v}))
@pytest.mark.parametrize("dtype,inplace", [(torch.float32, False), (torch.bfloat16, True)])
def test_fused_ce_candidates_match_reference(name, dtype, inplace):
    cfg = fused_ce.CONFIGS[name]
    if cfg.block_v:                       # keep the features, shrink the chunk: 700 = 5 chunks + a tail
        cfg = cfg._replace(block_v=128)
    _check("fused_ce", cfg, dtype, seed=len(name), inplace=inplace)


def test_persistent_grid_launches_fewer_programs_than_rows():
    from fastfuse.testing.aot import record_launches
    with record_launches(fused_ce.fused_ce_kernel) as rec, \
            forced("fused_ce", fused_ce.CONFIGS["2pass_l2_persistent"]._replace(block_v=128)):
        z = torch.zeros(1, 10, 700)
        fused_ce.ce_rows(z, z, torch.zeros(10, 3, dtype=torch.int32), torch.zeros(10, 3),
                         torch.zeros(10, dtype=torch.int64), -100, torch.ones(1), compute_grad=True)
    (_, args, kwargs), = rec
    assert kwargs["PERSISTENT"] and kwargs["HOIST"] and args[16] == 10      # N, looped over by 3 programs
    assert rec.grids == [(3,)]


def test_persistent_divergence_grid_launches_fewer_programs_than_rows():
    from fastfuse.testing.aot import record_launches
    with record_launches(divergence.divergence_kernel) as rec:
        z = torch.zeros(1, 10, 700)
        divergence.divergence_rows(z, z, torch.zeros(10, 3, dtype=torch.int32), torch.zeros(10, 3), torch.zeros(10),
                                   torch.zeros(10, dtype=torch.int64), -100, torch.ones(1), True,
                                   make_spec("jsd", "uniform"), 0.5, launch="generic_persistent")
    (_, args, kwargs), = rec
    assert kwargs["PERSISTENT"] and kwargs["HOIST"] and args[17] == 10      # N, looped over by 3 programs
    assert rec.grids == [(3,)]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(fused_ce.RESCALES))
@pytest.mark.parametrize("grad_output", [0.5, 1.0])
def test_rescale_candidates_match_reference(name, grad_output):
    _check("rescale", name, torch.float32, seed=3, grad_output=grad_output)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(divergence.LAUNCHES))
@pytest.mark.parametrize("div,tail", [("jsd", "uniform"), ("reverse_kl", "renormalize"), ("ce", "bucket")])
def test_divergence_launches_match_reference(name, div, tail):
    launch = dict(divergence.LAUNCHES[name], block_v=128, num_warps=1)
    _check("divergence", launch, torch.float32, seed=len(name) + len(div), tail=tail, **lookup(div).options())


def test_divergence_rows_run_their_own_table_unless_forced(tmp_path):
    """Unforced, ``divergence_rows`` launches ``LAUNCH_TABLE``'s entry (no GPU: sm_90's); a forced
    launch or, on a GPU, a GPU run's winner replaces it."""
    import json

    from fastfuse.kernels import launch
    from fastfuse.testing.aot import divergence_launches

    def launched():
        kw = divergence_launches(10000, torch.float32, make_spec("jsd", "uniform"))[-1][2]
        return dict(block_v=kw["BLOCK_V"], num_warps=kw["num_warps"], num_stages=kw["NUM_STAGES"])

    assert launched() == divergence.LAUNCHES[divergence.LAUNCH_TABLE[9]] == divergence.launch_config()
    with forced("divergence", "generic_s4"):
        assert launched() == divergence.LAUNCHES["generic_s4"]
    assert divergence.launch_config(8) == divergence.LAUNCHES[divergence.LAUNCH_TABLE[8]]
    path = tmp_path / "launch_tuned.json"
    path.write_text(json.dumps({"divergence": {"8": "generic_s5"}}))
    try:
        launch.load_tuned(str(path))
        assert divergence.launch_config(8) == divergence.LAUNCHES["generic_s5"]
        assert divergence.launch_config(9) == divergence.launch_config(None) == divergence.LAUNCHES["generic"]
        with forced("divergence", "generic_s3"):
            assert divergence.launch_config(8) == divergence.LAUNCHES["generic_s3"]
    finally:
        launch.load_tuned()


def test_forcing_an_unknown_kernel_is_a_clear_error():
    with pytest.raises(ValueError, match="kernel must be one of"):
        with forced("fused_cee", "2pass_l2"):
            pass


def test_a_gpu_runs_winners_take_precedence_unless_forced(tmp_path):
    import json

    from fastfuse.kernels import launch
    path = tmp_path / "launch_tuned.json"
    path.write_text(json.dumps({"fused_ce": {"two_pass/bf16/9": "2pass_l2_persistent"}, "rescale": {"9": "row"}}))
    try:
        launch.load_tuned(str(path))
        assert fused_ce.launch_config(128256, torch.bfloat16) == fused_ce.CONFIGS["2pass_l2_persistent"]
        assert fused_ce.launch_config(128256, torch.float16) == fused_ce.CONFIGS["2pass_l2"]    # not measured
        with forced("fused_ce", "2pass_v1"):
            assert fused_ce.launch_config(128256, torch.bfloat16) == fused_ce.CONFIGS["2pass_v1"]
        path.write_text(json.dumps({"dry_run": True, "fused_ce": {"two_pass/bf16/9": "2pass_l2_s5"}}))
        launch.load_tuned(str(path))                    # a dry run's winners are no measurement
        assert fused_ce.launch_config(128256, torch.bfloat16) == fused_ce.CONFIGS["2pass_l2"]
    finally:
        launch.load_tuned()
