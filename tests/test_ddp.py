"""torchrun DDP with 2 CPU processes (gloo): gradients equal a single-process run, for fused_loss on
the logits and for fused_linear_loss computed inside the DDP wrapper's forward (FusionTrainer's
default path, under find_unused_parameters=True as Hugging Face Trainer sets it)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "ddp_step.py"
WORKER = Path(__file__).resolve().with_name("_ddp_worker.py")  # runs EXAMPLE, skips gloo teardown


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
def test_ddp_gradients_match_single_process(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    subprocess.run([sys.executable, str(EXAMPLE), str(tmp_path / "single.pt")], check=True, env=env, timeout=300)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    str(WORKER), str(tmp_path / "ddp.pt")], check=True, env=env, timeout=300)
    single, ddp = torch.load(tmp_path / "single.pt"), torch.load(tmp_path / "ddp.pt")
    assert single.keys() == ddp.keys() == {"logits", "linear"}
    for path in single:
        assert single[path].keys() == ddp[path].keys()
        for name in single[path]:
            torch.testing.assert_close(ddp[path][name], single[path][name], rtol=1e-4, atol=1e-6, msg=f"{path} {name}")
            # the two paths compute the same loss
            torch.testing.assert_close(single["linear"][name], single["logits"][name], rtol=1e-4, atol=1e-6, msg=name)
        assert any(g.abs().sum() > 0 for g in single[path].values())
