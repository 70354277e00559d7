"""Bad inputs to ``fused_loss`` raise ValueError / TypeError naming the argument."""
import math

import pytest
import torch

from fastfuse import AlignMap, SourceTopK, fused_loss
from fastfuse.testing import random_inputs


@pytest.fixture
def d():
    return random_inputs(2, 5, 50, 2, 4, Ts=6, Vs=30, generator=torch.Generator().manual_seed(0))


def call(d, **over):
    args = dict(target_logits=d["target_logits"], ids=d["source_topk"][0], logprobs=d["source_topk"][1],
                pos=d["align_map"][0], vocab=d["align_map"][1], labels=d["labels"],
                source_weights=d["source_weights"])
    kw = {k: over.pop(k) for k in list(over) if k not in args}
    args.update(over)
    kw.setdefault("impl", "torch")
    return fused_loss(args["target_logits"], SourceTopK(args["ids"], args["logprobs"]),
                      AlignMap(args["pos"], args["vocab"]), args["labels"], args["source_weights"],
                      **kw)


def test_valid_inputs_pass(d):
    assert torch.isfinite(call(d))


@pytest.mark.parametrize("over,exc,match", [
    (lambda d: dict(target_logits=d["target_logits"].int()), TypeError, "target_logits"),
    (lambda d: dict(target_logits=d["target_logits"].double(), impl="triton"), ValueError,
     "impl='triton' takes float32/bfloat16/float16 target_logits"),
    (lambda d: dict(target_logits=d["target_logits"].long()), TypeError, "target_logits"),
    (lambda d: dict(target_logits=d["target_logits"][0, 0]), ValueError, "target_logits"),
    (lambda d: dict(target_logits=d["target_logits"].transpose(1, 2)), ValueError, "target_logits"),
    (lambda d: dict(labels=d["labels"].float()), TypeError, "labels"),
    (lambda d: dict(labels=d["labels"][:, :-1]), ValueError, "labels"),
    (lambda d: dict(ids=d["source_topk"][0].float()), TypeError, "source_topk.ids"),
    (lambda d: dict(ids=d["source_topk"][0][0]), ValueError, "source_topk.ids"),
    (lambda d: dict(ids=d["source_topk"][0][:, :1], logprobs=d["source_topk"][1][:, :1]),
     ValueError, "batch size"),
    (lambda d: dict(logprobs=d["source_topk"][1].long()), TypeError, "source_topk.logprobs"),
    (lambda d: dict(logprobs=d["source_topk"][1][..., :2]), ValueError, "source_topk.logprobs"),
    (lambda d: dict(pos=d["align_map"][0].float()), TypeError, "align_map.pos"),
    (lambda d: dict(pos=d["align_map"][0][:1]), ValueError, "align_map.pos"),
    (lambda d: dict(pos=d["align_map"][0][:, :, :-1]), ValueError, "align_map.pos"),
    (lambda d: dict(vocab=d["align_map"][1].float()), TypeError, "align_map.vocab"),
    (lambda d: dict(vocab=d["align_map"][1][:1]), ValueError, "align_map.vocab"),
    (lambda d: dict(source_weights=d["source_weights"][:1]), ValueError, "source_weights"),
    (lambda d: dict(source_weights=d["source_weights"].long()), TypeError, "source_weights"),
    (lambda d: dict(source_weights=[1.0, 2.0]), TypeError, "source_weights"),
    (lambda d: dict(reduction="avg"), ValueError, "reduction"),
    (lambda d: dict(impl="cuda"), ValueError, "impl"),
    (lambda d: dict(lm_weight=1.5), ValueError, "lm_weight"),
    (lambda d: dict(temperature=0.0), ValueError, "temperature"),
    (lambda d: dict(temperature=math.nan), ValueError, "temperature"),
    (lambda d: dict(ignore_index=1.5), TypeError, "ignore_index"),
    (lambda d: dict(ids=torch.randint(0, 30, (9, 2, 6, 4))), ValueError, "S"),
    (lambda d: dict(ids=torch.randint(0, 30, (2, 2, 6, 65)), logprobs=torch.randn(2, 2, 6, 65)),
     ValueError, "K"),
])
def test_shape_dtype_errors(d, over, exc, match):
    with pytest.raises(exc, match=match):
        call(d, **over(d))


def _set(t, idx, v):
    t = t.clone()
    t[idx] = v
    return t


@pytest.mark.parametrize("over,match", [
    (lambda d: dict(ids=_set(d["source_topk"][0], (0, 0, 0, 0), 30)), "source_topk.ids"),
    (lambda d: dict(ids=_set(d["source_topk"][0], (1, 1, 2, 3), -2)), "source_topk.ids"),
    (lambda d: dict(vocab=_set(d["align_map"][1], (1, 3), 50)), "align_map.vocab"),
    (lambda d: dict(vocab=_set(d["align_map"][1], (1, 3), -5)), "align_map.vocab"),
    (lambda d: dict(pos=_set(d["align_map"][0], (0, 1, 1), 6)), "align_map.pos"),
    (lambda d: dict(labels=_set(d["labels"], (0, 0), 50)), "labels"),
    (lambda d: dict(labels=_set(d["labels"], (0, 0), -1)), "labels"),
    (lambda d: dict(source_weights=_set(d["source_weights"], (0, 0, 0), -0.1)), "source_weights"),
    (lambda d: dict(source_weights=_set(d["source_weights"], (0, 0, 0), math.inf)), "source_weights"),
    (lambda d: dict(ids=_set(d["source_topk"][0], (0, 0, 0, 0), 3),
                    logprobs=_set(d["source_topk"][1], (0, 0, 0, 0), math.nan)), "source_topk.logprobs"),
])
def test_data_errors(d, over, match):
    with pytest.raises(ValueError, match=match):
        call(d, **over(d))


def test_validate_false_skips_data_checks(d):
    w = d["source_weights"].clone()
    w[0, 0, 0] = -0.1       # harmless for the math, rejected by validation
    with pytest.raises(ValueError):
        call(d, source_weights=w)
    assert torch.isfinite(call(d, source_weights=w, validate=False))


def test_nan_logprobs_at_padding_are_allowed(d):
    ids, lp = d["source_topk"]
    ids, lp = ids.clone(), lp.clone()
    ids[0, 0, 0, 0] = -1
    lp[0, 0, 0, 0] = math.nan
    assert torch.isfinite(call(d, ids=ids, logprobs=lp))


def test_device_mismatch(d):
    if not torch.cuda.is_available():
        meta = d["labels"].to("meta")
        with pytest.raises(ValueError, match="labels"):
            call(d, labels=meta)
    else:
        with pytest.raises(ValueError, match="labels"):
            call(d, labels=d["labels"].cuda())


def test_triton_on_cpu_without_interpreter(d, monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        fused_loss(d["target_logits"], SourceTopK(*d["source_topk"]), AlignMap(*d["align_map"]),
                   d["labels"], impl="triton")


def test_bad_containers(d):
    with pytest.raises(TypeError, match="source_topk"):
        fused_loss(d["target_logits"], d["source_topk"], AlignMap(*d["align_map"]), d["labels"])
    with pytest.raises(TypeError, match="align_map"):
        fused_loss(d["target_logits"], SourceTopK(*d["source_topk"]), d["align_map"], d["labels"])
    with pytest.raises(TypeError, match="target_logits"):
        fused_loss(d["target_logits"].numpy(), SourceTopK(*d["source_topk"]),
                   AlignMap(*d["align_map"]), d["labels"])


@pytest.mark.parametrize("kind", ["leaf", "view of a leaf", "leaf view of a buffer"])
def test_inplace_grad_refuses_a_leaf(d, kind):
    """The gradient would overwrite the leaf's own data (its .grad aliasing it): refused, naming inplace_grad."""
    full = d["target_logits"].clone()
    leaf = full.requires_grad_(True) if kind != "leaf view of a buffer" else full[:, :].requires_grad_(True)
    with pytest.raises(ValueError, match="inplace_grad=True: target_logits is a leaf"):
        call(d, target_logits=leaf[:, :] if kind == "view of a leaf" else leaf, inplace_grad=True)
    assert torch.equal(leaf.detach(), d["target_logits"])       # untouched


def test_reference_impl_is_deprecated_for_torch(d):
    """impl="reference" (the sparse torch path's old name) warns, points at the caller, and runs impl="torch"."""
    from fastfuse import fused_linear_loss

    want = call(d, impl="torch", reduction="none")
    with pytest.warns(DeprecationWarning, match="use impl='torch'") as rec:
        got = call(d, impl="reference", reduction="none")
    assert rec[0].filename == __file__
    assert torch.equal(got, want)
    hidden, weight = torch.randn(2, 5, 8), torch.randn(50, 8)
    topk, amap = SourceTopK(*d["source_topk"]), AlignMap(*d["align_map"])
    want = fused_linear_loss(hidden, weight, topk, amap, d["labels"], impl="torch")
    with pytest.warns(DeprecationWarning, match="use impl='torch'") as rec:
        got = fused_linear_loss(hidden, weight, topk, amap, d["labels"], impl="reference")
    assert rec[0].filename == __file__ and torch.equal(got, want)
