"""fit_transfer recovers a known law from noisy synthetic runs, and its intervals are calibrated."""
from __future__ import annotations

import math

import numpy as np
import pytest

from peftfx.scaling import PAPER_TEXT_TO_PYTHON, TransferFit, fit_transfer

TRUE = PAPER_TEXT_TO_PYTHON  # k 1.9e4, alpha 0.18, beta 0.38: an intercept far from the data
NS = np.logspace(5, 8, 6)  # 6 model sizes x 8 data sizes = 48 runs
DS = np.logspace(3, 6, 8)


def synthetic(seed: int, noise: float = 0.05) -> list[dict]:
    """Runs of D_T = k D_F^alpha N^beta times 5% multiplicative (log-normal) noise."""
    rng = np.random.default_rng(seed)
    return [{"N": n, "D_F": d, "D_T": TRUE["k"] * d ** TRUE["alpha"] * n ** TRUE["beta"] * math.exp(rng.normal(0, noise))}
            for n in NS for d in DS]


def test_recovers_known_law_and_intervals_cover_it():
    """One draw. Its intervals are 99% ones: a 95% interval misses 1 draw in 20 by design, so whether one
    seed's 95% interval covers is luck; the 95% level is checked over 40 draws below."""
    fit = fit_transfer(synthetic(0), seed=0, confidence=0.99)
    assert isinstance(fit, TransferFit)
    assert abs(fit.alpha - TRUE["alpha"]) < 0.1 * TRUE["alpha"]
    assert abs(fit.beta - TRUE["beta"]) < 0.1 * TRUE["beta"]
    assert 1 / 1.5 < fit.k / TRUE["k"] < 1.5
    assert TRUE["k"] in fit.k_interval and TRUE["alpha"] in fit.alpha_interval and TRUE["beta"] in fit.beta_interval
    truth = 10 ** (TRUE["beta"] / TRUE["alpha"])
    assert truth in fit.tradeoff_interval and fit.data_per_10x_model == pytest.approx(10 ** (fit.beta / fit.alpha))
    assert fit.n_runs == 48 and 0.03 < fit.residual_std < 0.07 and fit.r_squared > 0.99


def test_recovery_and_coverage_hold_across_seeds_not_just_one():
    """Every one of 40 seeds recovers the law; the 95% intervals cover the truth in >= 85% of them
    (a bootstrap that is too narrow, or centred wrong, fails this) and are not absurdly wide."""
    fits = [fit_transfer(synthetic(seed), seed=seed, n_bootstrap=1000) for seed in range(40)]
    for fit in fits:
        assert abs(fit.alpha / TRUE["alpha"] - 1) < 0.1 and abs(fit.beta / TRUE["beta"] - 1) < 0.1
        assert 1 / 1.5 < fit.k / TRUE["k"] < 1.5
        assert fit.alpha_interval.high - fit.alpha_interval.low < 0.05
    for name in ("k", "alpha", "beta"):
        covered = sum(TRUE[name] in getattr(fit, f"{name}_interval") for fit in fits)
        assert covered >= 34, (name, covered)


def test_same_seed_same_intervals_and_prediction():
    a, b = fit_transfer(synthetic(3), seed=7), fit_transfer(synthetic(3), seed=7)
    assert a == b
    assert a.predict(1e6, 1e4) == pytest.approx(a.k * 1e4 ** a.alpha * 1e6 ** a.beta)
    assert a.data_multiplier(100.0) == pytest.approx(a.data_per_10x_model ** 2)


def test_noiseless_law_is_exact():
    rows = [{"N": n, "D_F": d, "D_T": 3.0 * d ** 0.5 * n ** 0.25} for n in (1e5, 1e6, 1e7) for d in (1e3, 1e4)]
    fit = fit_transfer(rows)
    assert fit.k == pytest.approx(3.0) and fit.alpha == pytest.approx(0.5) and fit.beta == pytest.approx(0.25)
    assert fit.data_per_10x_model == pytest.approx(10 ** 0.5)


def test_skip_ossified_keeps_the_rest_and_reports_them():
    rows = synthetic(1) + [{"N": 1e5, "D_F": 1e3, "D_T": -50.0}, {"N": 1e5, "D_F": 1e4, "D_T": 0}]
    fit = fit_transfer(rows, skip_ossified=True)
    assert fit.n_runs == 48 and len(fit.skipped) == 2
    assert "skipped 2 ossified" in fit.render() and fit.to_dict()["skipped_ossified"] == 2


def test_alpha_not_positive_means_no_amount_of_data_matches_a_bigger_model():
    rows = [{"N": n, "D_F": d, "D_T": 10 * d ** -0.1 * n ** 0.4} for n in (1e5, 1e6, 1e7) for d in (1e3, 1e4)]
    assert fit_transfer(rows).data_per_10x_model == math.inf
