"""Every bad input is a ScalingError (a PlanError, a ValueError) that names the offending value."""
from __future__ import annotations

import pytest

from peftfx.errors import PlanError, ScalingError
from peftfx.scaling import effective_data, effective_data_transferred, fit_transfer

CURVE = {1e3: 4.0, 1e4: 3.0, 1e5: 2.5}
GOOD = [{"N": n, "D_F": d, "D_T": d * n ** 0.1} for n in (1e5, 1e6) for d in (1e3, 1e4, 1e5)]


def test_scaling_error_is_a_plan_error_and_value_error():
    assert issubclass(ScalingError, PlanError) and issubclass(ScalingError, ValueError)


@pytest.mark.parametrize("key,value", [("N", 0), ("N", -1e6), ("D_F", -10.0), ("D_F", float("nan")),
                                       ("D_T", 0.0), ("D_T", -3.5), ("N", "big")])
def test_non_positive_sizes_in_runs(key, value):
    rows = [dict(r) for r in GOOD]
    rows[2][key] = value
    with pytest.raises(ScalingError, match=rf"{key} \(run 2.*{value!r}" if key != "N" or value != "big" else "big"):
        fit_transfer(rows)


def test_ossified_run_error_says_how_to_skip_it():
    rows = [dict(r) for r in GOOD]
    rows[0]["D_T"] = -12.0
    with pytest.raises(ScalingError, match="ossification.*skip_ossified=True"):
        fit_transfer(rows)


@pytest.mark.parametrize("curve,match", [({0: 4.0, 1e4: 3.0}, r"size D \(point 0\).*0"),
                                         ({1e3: 4.0, 1e4: -3.0}, r"loss \(point 1, D=10000.0\).*-3.0"),
                                         ({1e3: 4.0, 1e4: 0.0}, r"loss.*0.0")])
def test_non_positive_sizes_or_losses_on_the_scratch_curve(curve, match):
    with pytest.raises(ScalingError, match=match):
        effective_data(3.5, curve)


@pytest.mark.parametrize("value", [0.0, -2.0, float("inf")])
def test_non_positive_finetuned_loss_or_size(value):
    with pytest.raises(ScalingError, match=rf"fine-tuned loss.*{value!r}"):
        effective_data(value, CURVE)
    with pytest.raises(ScalingError, match=rf"D_F.*{value!r}"):
        effective_data_transferred(3.5, CURVE, value)


@pytest.mark.parametrize("n", [0, 1, 2, 3])
def test_fewer_runs_than_parameters(n):
    with pytest.raises(ScalingError, match=rf"more runs than its 3 parameters.*got {n} usable"):
        fit_transfer(GOOD[:n])


def test_design_that_cannot_separate_alpha_and_beta():
    with pytest.raises(ScalingError, match="every run has N=100000: beta cannot be fitted"):
        fit_transfer([r for r in GOOD if r["N"] == 1e5] * 2)
    collinear = [{"N": 10 * d, "D_F": d, "D_T": d} for d in (1e3, 1e4, 1e5, 1e6)]
    with pytest.raises(ScalingError, match="collinear"):
        fit_transfer(collinear)


@pytest.mark.parametrize("loss,side", [(5.0, "above the highest from-scratch loss 4"),
                                       (2.0, "below the lowest from-scratch loss 2.5")])
def test_loss_outside_scratch_range_needs_extrapolate(loss, side):
    with pytest.raises(ScalingError, match=rf"fine-tuned loss {loss:g} is {side}.*cannot be interpolated.*extrapolate=True"):
        effective_data(loss, CURVE)
    assert effective_data(loss, CURVE, extrapolate=True) > 0


@pytest.mark.parametrize("curve,match", [
    ({1e3: 4.0, 1e4: 4.5, 1e5: 2.5}, r"not decreasing: loss 4.5 at D=10000 is not below 4 at D=1000"),
    ({1e3: 4.0, 1e4: 4.0}, r"not decreasing: loss 4 at D=10000"),
    ([(1e3, 4.0), (1e3, 3.0)], r"two points at D=1000"),
    ({1e3: 4.0}, r"at least 2"),
])
def test_scratch_curve_not_decreasing(curve, match):
    with pytest.raises(ScalingError, match=match):
        effective_data(3.9, curve)


def test_bad_fit_options():
    with pytest.raises(ScalingError, match="confidence.*1.5"):
        fit_transfer(GOOD, confidence=1.5)
    with pytest.raises(ScalingError, match="n_bootstrap.*10"):
        fit_transfer(GOOD, n_bootstrap=10)
    with pytest.raises(ScalingError, match="run 0 has no D_T"):
        fit_transfer([{"N": 1, "D_F": 2}] * 5)
