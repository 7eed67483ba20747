"""effective_data_transferred reads D_E off the scratch curve exactly for a power law."""
from __future__ import annotations

import pytest

from peftfx.scaling import ScratchCurve, effective_data, effective_data_transferred, lower_envelope

C, A = 7.5, 0.3  # scratch loss(D) = C * D**-A


def loss(d: float) -> float:
    return C * d ** -A


CURVE = {d: loss(d) for d in (1e3, 3e3, 1e4, 1e5, 1e6)}


@pytest.mark.parametrize("d_e", [1e3, 2e3, 5.5e3, 1e4, 4.2e4, 7.7e5, 1e6])
def test_exact_on_power_law(d_e):
    assert effective_data(loss(d_e), CURVE) == pytest.approx(d_e, rel=1e-12)
    assert effective_data_transferred(loss(d_e), CURVE, 500.0) == pytest.approx(d_e - 500.0, rel=1e-12)


def test_curve_accepts_pairs_in_any_order_and_extrapolates_on_request():
    pairs = sorted(CURVE.items(), reverse=True)
    assert effective_data(loss(2e4), pairs) == pytest.approx(2e4)
    # past either end, the end segment's power law (exact here: the whole curve is one power law)
    assert effective_data(loss(1e7), CURVE, extrapolate=True) == pytest.approx(1e7)
    assert effective_data(loss(100.0), CURVE, extrapolate=True) == pytest.approx(100.0)


def test_negative_transfer_is_returned_not_hidden():
    """A fine-tune worse than scratch at its own D_F: D_T < 0 (ossification)."""
    assert effective_data_transferred(loss(2e3), CURVE, 1e4) == pytest.approx(2e3 - 1e4)


def test_piecewise_between_measured_points():
    curve = {1e3: 4.0, 1e4: 2.0, 1e5: 1.5}
    # halfway in log loss between 4.0 and 2.0 is sqrt(8): halfway in log D is sqrt(1e7)
    assert effective_data(8 ** 0.5, curve) == pytest.approx(1e7 ** 0.5)
    assert effective_data(2.0, curve) == pytest.approx(1e4)


def test_lower_envelope_drops_points_that_do_not_improve():
    env = lower_envelope([(1e3, 4.0), (3e3, 4.2), (1e4, 3.0), (3e4, 3.0), (1e4, 2.9), (1e5, 2.5)])
    assert isinstance(env, ScratchCurve)
    assert env.sizes == (1e3, 1e4, 1e5) and env.losses == (4.0, 2.9, 2.5)
