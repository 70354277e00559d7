"""torchrun with 2 CPU processes (gloo): gradients equal a single-process run, under DDP and under
FSDP2, for fused_loss on the logits and for fused_linear_loss computed inside the wrapper's forward
(FusionTrainer's default path; DDP with find_unused_parameters=True as Hugging Face Trainer sets it)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "ddp_step.py"
WORKER = Path(__file__).resolve().parents[1] / "_ddp_worker.py"  # runs EXAMPLE, skips gloo teardown
ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "single.pt"
    subprocess.run([sys.executable, str(EXAMPLE), str(out)], check=True, env=ENV, timeout=300)
    return torch.load(out)


def _fsdp2_available() -> bool:
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401  (FSDP2, torch >= 2.6)
    except ImportError:
        return False
    return True


@pytest.mark.parametrize("how", ["ddp", pytest.param("fsdp", marks=pytest.mark.skipif(
    not _fsdp2_available(), reason="torch.distributed.fsdp.fully_shard (FSDP2) needs torch >= 2.6"))])
def test_distributed_gradients_match_single_process(single, tmp_path, how):
    flags = ["--fsdp"] if how == "fsdp" else []
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    str(WORKER), *flags, str(tmp_path / "dist.pt")], check=True, env=ENV, timeout=300)
    dist = torch.load(tmp_path / "dist.pt")
    assert single.keys() == dist.keys() == {"logits", "linear"}
    for path in single:
        assert single[path].keys() == dist[path].keys()
        for name in single[path]:
            torch.testing.assert_close(dist[path][name], single[path][name], rtol=1e-4, atol=1e-6,
                                       msg=f"{how} {path} {name}")
            # the two paths compute the same loss
            torch.testing.assert_close(single["linear"][name], single["logits"][name], rtol=1e-4, atol=1e-6, msg=name)
        assert any(g.abs().sum() > 0 for g in single[path].values())
