"""One backend rule for fused_loss and fused_linear_loss (fastfuse.loss.checks.choose_impl)."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

# TRITON_INTERPRET=1 set *after* the kernels were imported (so they are compiled, not interpreted):
# impl="auto" takes the torch path in both entry points; impl="triton" raises the same error in both.
CHILD = r"""
import json, os
import torch
import fastfuse.kernels.fused_ce  # compiled for a GPU, not for the interpreter
os.environ["TRITON_INTERPRET"] = "1"
from fastfuse import AlignMap, SourceTopK, fused_linear_loss, fused_loss
from fastfuse.testing import random_inputs
d = random_inputs(1, 3, 40, 2, 4, generator=torch.Generator().manual_seed(0))
topk, amap = SourceTopK(*d["source_topk"]), AlignMap(*d["align_map"])
hidden = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
weight = torch.randn(40, 8, generator=torch.Generator().manual_seed(2))
out = {}
out["logits_auto"] = float(fused_loss(hidden @ weight.T, topk, amap, d["labels"][0]))
out["linear_auto"] = float(fused_linear_loss(hidden, weight, topk, amap, d["labels"][0]))
out["logits_ref"] = float(fused_loss(hidden @ weight.T, topk, amap, d["labels"][0], impl="torch"))
for name, call in (("logits", lambda: fused_loss(hidden @ weight.T, topk, amap, d["labels"][0], impl="triton")),
                   ("linear", lambda: fused_linear_loss(hidden, weight, topk, amap, d["labels"][0], impl="triton"))):
    try:
        call()
        out[name + "_triton"] = "no error"
    except ValueError as e:
        out[name + "_triton"] = str(e)
print(json.dumps(out))
"""


@pytest.mark.slow
def test_same_backend_rule_when_interpreter_set_late():
    r = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "TRITON_INTERPRET": "0"})
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["logits_auto"] == pytest.approx(out["logits_ref"], rel=1e-6)
    assert out["linear_auto"] == pytest.approx(out["logits_ref"], rel=1e-5)
    assert "TRITON_INTERPRET" in out["logits_triton"]
    assert out["logits_triton"] == out["linear_triton"]


def test_unknown_impl_is_refused_by_both():
    import torch

    from fastfuse import AlignMap, SourceTopK, fused_linear_loss, fused_loss
    from fastfuse.testing import random_inputs

    d = random_inputs(1, 3, 40, 2, 4, generator=torch.Generator().manual_seed(0))
    topk, amap = SourceTopK(*d["source_topk"]), AlignMap(*d["align_map"])
    h, w = torch.randn(3, 8), torch.randn(40, 8)
    with pytest.raises(ValueError, match="impl must be") as a:
        fused_loss(h @ w.T, topk, amap, d["labels"][0], impl="cuda")
    with pytest.raises(ValueError, match="impl must be") as b:
        fused_linear_loss(h, w, topk, amap, d["labels"][0], impl="cuda")
    assert str(a.value) == str(b.value)
