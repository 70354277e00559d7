"""The vocabulary-parallel loss on 2 and 3 CPU processes (gloo; V = 37 split 19/18 and 13/12/12, in rank
order or at explicit vocab_start): fused_loss and fused_linear_loss, every reduction, five divergence
configurations (the tail pass included), ignored rows, duplicate and unmapped teacher ids, labels and
teacher ids on every shard's first and last id, sequence parallelism and DTensor arguments: loss and
every gradient equal the one-process float64 results to 1e-10 (tests/_tp_worker.py checks them on
each rank). Then the errors: ranks that disagree raise a clear ValueError on every rank, never hang.
Last, examples/tp_step.py (ColwiseParallel lm_head + FSDP2 on a (dp, tp) mesh, a Llama model) gives the
one-process gradients of examples/ddp_step.py."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastfuse
from fastfuse.testing import random_inputs

WORKER = Path(__file__).resolve().parents[1] / "_tp_worker.py"
DDP_EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "ddp_step.py"
ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def _worker_module():
    spec = importlib.util.spec_from_file_location("_tp_worker", WORKER)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


WORKER_MOD = _worker_module()


def run_worker(mode: str, world: int, out: Path) -> list:
    """Every rank's ``{case: result}`` of one torchrun of the worker (a timeout: a hang fails)."""
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(world), str(WORKER), mode, str(out)], env=ENV, timeout=240, capture_output=True,
                          text=True)
    files = [out / f"rank-{r}.json" for r in range(world)]
    assert proc.returncode == 0 and all(f.exists() for f in files), proc.stderr[-3000:]
    return [json.loads(f.read_text()) for f in files]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    cache = {}

    def get(mode, world):
        if (mode, world) not in cache:
            cache[mode, world] = run_worker(mode, world, tmp_path_factory.mktemp(f"{mode}{world}"))
        return cache[mode, world]
    return get


CASES = [(w, name) for w in (2, 3) for name in [*WORKER_MOD.cases(w), "world-1-group"]]


@pytest.mark.parametrize("world,case", CASES, ids=[f"{w}ranks-{c}" for w, c in CASES])
def test_matches_one_process(results, world, case):
    per_rank = results("cases", world)
    for rank, res in enumerate(per_rank):
        assert res[case] == "ok", f"rank {rank}: {res[case]}"


def test_every_case_ran(results):
    for world in (2, 3):
        for res in results("cases", world):
            assert len(res) >= 70 and set(res) == {c for w, c in CASES if w == world}


LAST = 2        # the error cases run on 3 ranks; the last one is the odd one out
DISAGREE = "ValueError: fused_{}: the ranks of process_group disagree on {}: rank 0 has {}, rank 2 has {}"
ERRORS = {
    "tokens": DISAGREE.format("loss", "N (tokens, B*T)", 12, 10),
    "hidden-size": DISAGREE.format("linear_loss", "H (hidden size)", 8, 9),
    "dtype": DISAGREE.format("loss", "the dtype", "torch.float64", "torch.float32"),
    "top-k": DISAGREE.format("loss", "K (top-k)", 4, 3),
    "loss-arguments": "disagree on the loss arguments (divergence, tail, alpha",
    "divergence": "disagree on the loss arguments (divergence, tail, alpha",
    "grad-flags": DISAGREE.format("linear_loss", "weight requiring grad", 1, 0),
    "labels-content": "disagree on the contents of labels, source_topk, align_map or source_weights (rank 0 and rank 2)",
    "labels-range": "ValueError: labels must be ignore_index=-100 or in [0, V=37)",
    "vocab_start-out-of-range": "ValueError: vocab_start: the ranks' vocabulary ranges must tile [0, V) with V = 37 "
                                "(the sum of the shards' sizes) without gaps or overlaps; got rank 0: [0, 13), "
                                "rank 1: [13, 25), rank 2: [100, 112)",
    "vocab_start-overlap": "got rank 0: [0, 13), rank 1: [0, 12), rank 2: [0, 12)",
    "vocab_start-on-some-ranks": DISAGREE.format("loss", "vocab_start given", 1, 0),
    "sequence-shares": "ValueError: hidden: the ranks' shares of the tokens ([1, 1, 1]) add up to 3, but labels hold 6",
    "recovers": "no error",
    "hf-rowwise-head": "NotImplementedError: model: LlamaForCausalLM's lm_head weight is a DTensor placed "
                       "(Shard(dim=1),); the vocabulary-parallel loss takes an lm_head sharded by vocabulary rows",
}
REJECTED = "ValueError: fused_loss: rank 2 of process_group rejected its arguments (see that rank's error)"
ONE_RANK = {
    "one-rank-invalid": "TypeError: labels must be int64 (or int32), got torch.float64",
    "vocab_start-negative": "ValueError: vocab_start must be None or an int >= 0",
}


@pytest.mark.parametrize("case", [*ERRORS, *ONE_RANK])
def test_errors_on_every_rank(results, case):
    per_rank = results("errors", 3)
    for rank, res in enumerate(per_rank):
        want = ERRORS.get(case) or (ONE_RANK[case] if rank == LAST else REJECTED)
        assert want in res[case], f"rank {rank}: {res[case]}"
    assert set(per_rank[0]) == set(ERRORS) | set(ONE_RANK)


def _inputs():
    d = random_inputs(2, 3, 11, 2, 3, Ts=4, Vs=9, generator=torch.Generator().manual_seed(0))
    return d["target_logits"], fastfuse.SourceTopK(*d["source_topk"]), fastfuse.AlignMap(*d["align_map"]), d["labels"]


def test_one_process_arguments():
    """Without a process group: vocab_start or sequence_parallel alone is refused, as is a process_group
    that is no torch.distributed group (no collective is entered)."""
    z, topk, amap, labels = _inputs()
    with pytest.raises(ValueError, match="process_group: the vocabulary-parallel loss"):
        fastfuse.fused_loss(z, topk, amap, labels, vocab_start=0)
    hidden, W = torch.randn(2, 3, 4), torch.randn(11, 4)
    with pytest.raises(ValueError, match="process_group: the vocabulary-parallel loss"):
        fastfuse.fused_linear_loss(hidden, W, topk, amap, labels, sequence_parallel=True)
    with pytest.raises((TypeError, ValueError), match="process_group"):
        fastfuse.fused_loss(z, topk, amap, labels, process_group="group")


def _fsdp2_available() -> bool:
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401  (FSDP2, torch >= 2.6)
        from torch.distributed.tensor.parallel import ColwiseParallel  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "single.pt"
    subprocess.run([sys.executable, str(DDP_EXAMPLE), str(out)], check=True, env=ENV, timeout=300)
    return torch.load(out)


@pytest.mark.skipif(not _fsdp2_available(), reason="FSDP2 and torch.distributed.tensor.parallel need torch >= 2.6")
@pytest.mark.parametrize("world", [2, 4], ids=["dp1-tp2", "dp2-tp2"])
def test_tp_fsdp2_example_matches_one_process(one_process, tmp_path, world):
    pytest.importorskip("transformers")
    out = tmp_path / "tp.pt"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(world), str(WORKER), "example", "2", str(out)], env=ENV, timeout=300,
                          capture_output=True, text=True)
    assert proc.returncode == 0 and out.exists(), proc.stderr[-3000:]
    got = torch.load(out)
    want = one_process["linear"]
    assert set(got) == {"linear", "logits", "logits-dtensor"}
    for path, grads in got.items():
        assert grads.keys() == want.keys()
        for name in want:
            torch.testing.assert_close(grads[name], want[name], rtol=1e-4, atol=1e-6, msg=f"{path} {name}")
    assert want["lm_head.weight"].abs().sum() > 0
