"""lm_weight schedules and ProFuser's progressive schedule: endpoints, monotonicity, mix, validation."""
from __future__ import annotations

import math

import pytest
import torch


from fastfuse.batches import schedules as sch
ConstantSchedule, LinearSchedule, ProgressiveSchedule = sch.ConstantSchedule, sch.LinearSchedule, sch.ProgressiveSchedule


def test_constant():
    s = ConstantSchedule(0.9)
    assert [s(k) for k in (0, 1, 10**9)] == [0.9, 0.9, 0.9]


@pytest.mark.parametrize("start,end,total", [(0.0, 1.0, 10), (0.9, 0.5, 7), (0.3, 0.3, 1), (1.0, 0.0, 1000)])
def test_linear_endpoints_monotone_clamped(start, end, total):
    s = LinearSchedule(start, end, total)
    vals = [s(k) for k in range(total + 5)]
    assert vals[0] == start and vals[total] == end and all(v == end for v in vals[total:])
    diffs = [b - a for a, b in zip(vals, vals[1:])]
    assert all(d * (end - start) >= -1e-15 for d in diffs)  # monotone in the direction of end - start
    for k in range(total + 1):  # matches the closed form
        assert vals[k] == pytest.approx(start + (end - start) * k / total, abs=1e-12)


@pytest.mark.parametrize("kind", ["linear", "step", "cosine"])
@pytest.mark.parametrize("start,end", [(0.0, 1.0), (0.2, 0.7), (0.5, 0.5)])
def test_progressive_endpoints_and_monotone(kind, start, end):
    total = 37
    s = ProgressiveSchedule(total, kind=kind, start=start, end=end, step_at=0.3)
    vals = [s.alpha(k) for k in range(total + 10)]
    assert vals[0] == start and vals[total] == end and all(v == end for v in vals[total:])
    assert all(b >= a - 1e-15 for a, b in zip(vals, vals[1:]))
    assert all(0.0 <= v <= 1.0 for v in vals)
    assert s(5) == s.alpha(5)


def test_progressive_shapes_of_curves():
    lin = ProgressiveSchedule(100, "linear")
    cos = ProgressiveSchedule(100, "cosine")
    step = ProgressiveSchedule(100, "step", step_at=0.25)
    assert lin.alpha(50) == pytest.approx(0.5) and cos.alpha(50) == pytest.approx(0.5)
    assert cos.alpha(10) == pytest.approx((1 - math.cos(math.pi * 0.1)) / 2)
    assert cos.alpha(10) < lin.alpha(10)  # cosine starts slowly
    assert [step.alpha(k) for k in (0, 24, 25, 99)] == [0.0, 0.0, 1.0, 1.0]


def test_progressive_decreasing_is_allowed():
    s = ProgressiveSchedule(10, start=1.0, end=0.0)
    vals = [s(k) for k in range(11)]
    assert vals[0] == 1.0 and vals[-1] == 0.0 and all(b <= a for a, b in zip(vals, vals[1:]))


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("shape", [(3, 5), (4, 2, 7), (1, 3)])
def test_mix_matches_reference_and_renormalises(seed, shape):
    g = torch.Generator().manual_seed(seed)
    inf_w = torch.rand(shape, generator=g, dtype=torch.float64)
    train_w = torch.rand(shape, generator=g, dtype=torch.float64)
    train_w = train_w / train_w.sum(0)  # one normalised, one not: the mix must renormalise anyway
    s = ProgressiveSchedule(10, "linear")
    for step in (0, 3, 10, 50):
        a = s.alpha(step)
        got = s.mix(inf_w, train_w, step)
        ref = (1 - a) * inf_w + a * train_w
        ref = ref / ref.sum(0)
        assert got.shape == inf_w.shape
        torch.testing.assert_close(got, ref)
        torch.testing.assert_close(got.sum(0), torch.ones(shape[1:], dtype=torch.float64))
        assert (got >= 0).all()
    torch.testing.assert_close(s.mix(inf_w, train_w, 0), inf_w / inf_w.sum(0))
    torch.testing.assert_close(s.mix(inf_w, train_w, 10), train_w)


def test_mix_all_zero_column_is_uniform():
    s = ProgressiveSchedule(4)
    z = torch.zeros(3, 2)
    z[:, 1] = torch.tensor([0.0, 1.0, 0.0])
    got = s.mix(z, z, 2)
    torch.testing.assert_close(got[:, 0], torch.full((3,), 1 / 3))
    torch.testing.assert_close(got[:, 1], torch.tensor([0.0, 1.0, 0.0]))


@pytest.mark.parametrize(
    "make,exc,name",
    [
        (lambda: ConstantSchedule("0.9"), TypeError, "value"),
        (lambda: ConstantSchedule(float("nan")), ValueError, "value"),
        (lambda: ConstantSchedule(True), TypeError, "value"),
        (lambda: LinearSchedule(0.0, 1.0, 0), ValueError, "total_steps"),
        (lambda: LinearSchedule(0.0, 1.0, 2.5), TypeError, "total_steps"),
        (lambda: LinearSchedule(float("inf"), 1.0, 3), ValueError, "start"),
        (lambda: LinearSchedule(0.0, None, 3), TypeError, "end"),
        (lambda: ProgressiveSchedule(0), ValueError, "total_steps"),
        (lambda: ProgressiveSchedule(10, kind="exp"), ValueError, "kind"),
        (lambda: ProgressiveSchedule(10, start=-0.1), ValueError, "start"),
        (lambda: ProgressiveSchedule(10, end=1.5), ValueError, "end"),
        (lambda: ProgressiveSchedule(10, step_at=2.0), ValueError, "step_at"),
    ],
)
def test_bad_construction_names_argument(make, exc, name):
    with pytest.raises(exc, match=name):
        make()


@pytest.mark.parametrize(
    "schedule", [ConstantSchedule(0.5), LinearSchedule(0.0, 1.0, 5), ProgressiveSchedule(5)]
)
def test_bad_step_names_argument(schedule):
    with pytest.raises(ValueError, match="step"):
        schedule(-1)
    with pytest.raises(TypeError, match="step"):
        schedule(1.5)
    with pytest.raises(TypeError, match="step"):
        schedule(True)
    assert schedule(torch.tensor(3)) == schedule(3)  # integer-like steps are fine


def test_mix_bad_inputs_name_argument():
    s = ProgressiveSchedule(5)
    w = torch.full((2, 3), 0.5)
    with pytest.raises(TypeError, match="inference_weights"):
        s.mix([[0.5]], w, 1)
    with pytest.raises(TypeError, match="training_weights"):
        s.mix(w, torch.ones(2, 3, dtype=torch.int64), 1)
    with pytest.raises(ValueError, match="training_weights"):
        s.mix(w, torch.full((3, 3), 0.5), 1)
    with pytest.raises(ValueError, match="inference_weights"):
        s.mix(-w, w, 1)
    with pytest.raises(ValueError, match="training_weights"):
        s.mix(w, torch.full((2, 3), float("nan")), 1)
    with pytest.raises(ValueError, match="inference_weights"):
        s.mix(torch.ones(4), torch.ones(4), 1)
    with pytest.raises(ValueError, match="step"):
        s.mix(w, w, -2)
