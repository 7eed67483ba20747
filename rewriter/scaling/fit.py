"""Fit D_T = k * D_F**alpha * N**beta by least squares in log space, with bootstrap intervals.

Taking logs makes the law linear: ``log D_T = log k + alpha * log D_F + beta * log N``, so ordinary
least squares on ``X = [1, log D_F, log N]`` (shape ``(runs, 3)``) against ``y = log D_T`` gives the
maximum-likelihood fit under multiplicative (log-normal) noise, the noise model of a measured D_T.

Intervals come from a pairs bootstrap: resample the runs with replacement ``n_bootstrap`` times
(seeded numpy Generator: the same seed gives the same intervals), refit each resample, widen the
spread around the estimate by ``sqrt(n / (n - 3))`` (the small-sample correction HC1 applies to
sandwich errors) and take percentiles. Pairs (not residuals) are resampled so a design with uneven
noise is not assumed away.

The derived trade-off: a model ``m`` times larger multiplies D_T by ``m**beta``; fine-tuning data
``x`` times larger multiplies it by ``x**alpha``; they are worth the same when ``x = m**(beta/alpha)``.
For the paper's text -> Python numbers (alpha 0.18, beta 0.38) a 10x larger model is worth ~130x
more fine-tuning data.
"""
from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from peftfx.errors import ScalingError
from peftfx.scaling.effective_data import check_positive
from peftfx.scaling.runs_csv import read_runs

__all__ = ["Interval", "TransferFit", "fit_transfer", "PAPER_TEXT_TO_PYTHON"]

N_PARAMETERS = 3  # log k, alpha, beta
# Hernandez et al. (2021), "Scaling Laws for Transfer", text -> Python (N = non-embedding parameters,
# D in characters of Python).
PAPER_TEXT_TO_PYTHON = {"k": 1.9e4, "alpha": 0.18, "beta": 0.38}


@dataclass(frozen=True)
class Interval:
    """A closed confidence interval ``[low, high]``."""

    low: float
    high: float

    def __contains__(self, value: float) -> bool:
        return self.low <= value <= self.high

    def __str__(self) -> str:
        return f"[{self.low:.3g}, {self.high:.3g}]"


@dataclass(frozen=True)
class TransferFit:
    """The fitted law ``D_T = k * D_F**alpha * N**beta`` with bootstrap confidence intervals.

    ``residual_std`` is the standard deviation of the natural-log residuals (0.05 ~ 5% scatter);
    ``skipped`` holds the runs left out as ossified (D_T <= 0) when ``skip_ossified=True``.
    """

    k: float
    alpha: float
    beta: float
    k_interval: Interval
    alpha_interval: Interval
    beta_interval: Interval
    tradeoff_interval: Interval
    confidence: float
    n_runs: int
    n_bootstrap: int
    residual_std: float
    r_squared: float
    skipped: tuple[Mapping, ...] = field(default=(), compare=False)

    def predict(self, n_params: float, finetune_size: float) -> float:
        """D_T the law predicts for a model of ``n_params`` fine-tuned on ``finetune_size`` tokens."""
        return self.k * finetune_size**self.alpha * n_params**self.beta

    def data_multiplier(self, model_factor: float = 10.0) -> float:
        """How many times more fine-tuning data is worth a ``model_factor`` times larger model.

        ``inf`` when alpha <= 0 (more fine-tuning data does not add transferred data at all).
        """
        if self.alpha <= 0:
            return math.inf
        try:
            return model_factor ** (self.beta / self.alpha)
        except OverflowError:  # beta / alpha in the hundreds: no realistic amount of data
            return math.inf

    @property
    def data_per_10x_model(self) -> float:
        """``10 ** (beta / alpha)``: the fine-tuning data multiplier that equals a 10x larger model."""
        return self.data_multiplier(10.0)

    def to_dict(self) -> dict:
        def iv(i: Interval) -> list[float]:
            return [i.low, i.high]

        return {"k": self.k, "alpha": self.alpha, "beta": self.beta, "k_interval": iv(self.k_interval),
                "alpha_interval": iv(self.alpha_interval), "beta_interval": iv(self.beta_interval),
                "data_per_10x_model": self.data_per_10x_model, "data_per_10x_model_interval": iv(self.tradeoff_interval),
                "confidence": self.confidence, "n_runs": self.n_runs, "n_bootstrap": self.n_bootstrap,
                "residual_std": self.residual_std, "r_squared": self.r_squared, "skipped_ossified": len(self.skipped)}

    def render(self) -> str:
        pct = f"{100 * self.confidence:g}%"
        lines = [
            f"D_T = k * D_F^alpha * N^beta  ({self.n_runs} runs; {pct} bootstrap intervals, {self.n_bootstrap} resamples)",
            f"  k     = {self.k:<10.3g} {self.k_interval}",
            f"  alpha = {self.alpha:<10.3g} {self.alpha_interval}",
            f"  beta  = {self.beta:<10.3g} {self.beta_interval}",
            f"  a 10x larger model is worth {self.data_per_10x_model:.3g}x more fine-tuning data "
            f"{self.tradeoff_interval} (10^(beta/alpha))",
            f"  fit: R^2 = {self.r_squared:.3f}, residual sd {100 * self.residual_std:.1f}% (log space)",
        ]
        if self.skipped:
            lines.append(f"  skipped {len(self.skipped)} ossified run(s) with D_T <= 0")
        return "\n".join(lines)


def _design(rows: list[Mapping], skip_ossified: bool) -> tuple[np.ndarray, np.ndarray, tuple[Mapping, ...]]:
    """``X (runs, 3) = [1, log D_F, log N]``, ``y (runs,) = log D_T`` and the skipped ossified rows."""
    xs, ys, skipped = [], [], []
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise ScalingError(f"run {i} must be a mapping with keys N, D_F, D_T, got {type(row).__name__}")
        missing = [key for key in ("N", "D_F", "D_T") if key not in row]
        if missing:
            raise ScalingError(f"run {i} has no {', '.join(missing)} (keys: {sorted(map(str, row))}); "
                               "each run needs N (model parameters), D_F (fine-tuning tokens), D_T (effective data transferred)")
        n_params = check_positive("N", row["N"], f" (run {i})")
        d_f = check_positive("D_F", row["D_F"], f" (run {i})")
        try:
            d_t = float(row["D_T"])
        except (TypeError, ValueError):
            raise ScalingError(f"D_T (run {i}) must be a number, got {row['D_T']!r}") from None
        if math.isfinite(d_t) and d_t <= 0 and skip_ossified:
            skipped.append(row)
            continue
        if not math.isfinite(d_t) or d_t <= 0:
            raise ScalingError(
                f"D_T (run {i}, N={n_params:g}, D_F={d_f:g}) must be a finite number > 0 to fit in log space, got "
                f"{row['D_T']!r}; D_T <= 0 means pre-training did not help there (ossification): pass "
                "skip_ossified=True (CLI: --skip-ossified) to fit the other runs")
        xs.append((1.0, math.log(d_f), math.log(n_params)))
        ys.append(math.log(d_t))
    return np.asarray(xs, dtype=np.float64).reshape(-1, N_PARAMETERS), np.asarray(ys, dtype=np.float64), tuple(skipped)


def _check_identifiable(x: np.ndarray) -> None:
    n = len(x)
    if n <= N_PARAMETERS:
        raise ScalingError(f"fit_transfer needs more runs than its {N_PARAMETERS} parameters (log k, alpha, beta), "
                           f"at least {N_PARAMETERS + 1} so the noise can be estimated; got {n} usable run(s)")
    for col, name, what in ((1, "D_F", "alpha"), (2, "N", "beta")):
        values = np.unique(np.round(np.exp(x[:, col]), 9))
        if len(values) < 2:
            raise ScalingError(f"every run has {name}={values[0]:g}: {what} cannot be fitted; measure at least "
                               f"two {name} values")
    if np.linalg.matrix_rank(x) < N_PARAMETERS:
        raise ScalingError("log D_F and log N are collinear across the runs (every size pairs with one data size): "
                           "alpha and beta cannot be told apart; cross the sizes")


def _bootstrap(x: np.ndarray, y: np.ndarray, n_bootstrap: int, seed: int) -> np.ndarray:
    """``(kept, 3)`` refits of pairs-bootstrap resamples; rank-deficient resamples are dropped."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(x), size=(n_bootstrap, len(x)))
    xb, yb = x[idx], y[idx]  # (B, runs, 3), (B, runs)
    xtx = np.einsum("bri,brj->bij", xb, xb)
    xty = np.einsum("bri,br->bi", xb, yb)
    ok = np.linalg.cond(xtx) < 1e12
    return np.linalg.solve(xtx[ok], xty[ok][..., None])[..., 0]


def fit_transfer(rows: Iterable[Mapping] | str | os.PathLike, *, confidence: float = 0.95, n_bootstrap: int = 2000,
                 seed: int = 0, skip_ossified: bool = False) -> TransferFit:
    """Fit ``D_T = k * D_F**alpha * N**beta`` to measured runs.

    Args:
        rows: mappings with keys ``N`` (model parameters), ``D_F`` (fine-tuning tokens) and ``D_T``
            (effective data transferred, e.g. from :func:`effective_data_transferred`), or the path
            of a CSV with those columns (:func:`read_runs`).
        confidence: two-sided level of the percentile intervals.
        n_bootstrap: resamples; 2000 keeps the 2.5/97.5 percentiles stable to a few percent.
        seed: seeds the bootstrap's ``numpy.random.Generator``.
        skip_ossified: leave out runs with D_T <= 0 (kept in ``result.skipped``) instead of raising.

    Raises:
        ScalingError: a non-positive N/D_F/D_T, a missing key, no more runs than parameters, or a
            design that cannot separate alpha from beta (one N, one D_F, or collinear sizes).
    """
    if isinstance(rows, (str, os.PathLike)):
        rows = read_runs(rows)
    if not 0 < confidence < 1:
        raise ScalingError(f"confidence must be in (0, 1), got {confidence!r}")
    if int(n_bootstrap) != n_bootstrap or n_bootstrap < 100:
        raise ScalingError(f"n_bootstrap must be an integer >= 100 for stable percentiles, got {n_bootstrap!r}")
    x, y, skipped = _design(list(rows), skip_ossified)
    _check_identifiable(x)
    theta, *_ = np.linalg.lstsq(x, y, rcond=None)
    resid = y - x @ theta
    dof = len(y) - N_PARAMETERS
    total = float(np.sum((y - y.mean()) ** 2))
    r_squared = 1.0 - float(resid @ resid) / total if total > 0 else 1.0

    boot = _bootstrap(x, y, int(n_bootstrap), seed)
    # degrees-of-freedom correction (as HC1 does for sandwich errors): resampled fits spread like
    # the residuals' plug-in variance, which is low by n/(n - p); without it 95% covers ~92%
    boot = theta + (boot - theta) * math.sqrt(len(y) / dof)
    tail = (1 - confidence) / 2
    lo, hi = np.quantile(boot, [tail, 1 - tail], axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        log10_multiplier = np.where(boot[:, 1] > 0, boot[:, 2] / boot[:, 1], np.inf)
    # inverted_cdf picks sample values, so an inf (alpha <= 0 in that resample) stays inf, not nan
    t_lo, t_hi = np.quantile(log10_multiplier, [tail, 1 - tail], method="inverted_cdf")
    with np.errstate(over="ignore"):
        m_lo, m_hi = (float(v) for v in np.power(10.0, [t_lo, t_hi]))
    return TransferFit(
        k=math.exp(theta[0]), alpha=float(theta[1]), beta=float(theta[2]),
        k_interval=Interval(math.exp(lo[0]), math.exp(hi[0])),
        alpha_interval=Interval(float(lo[1]), float(hi[1])), beta_interval=Interval(float(lo[2]), float(hi[2])),
        tradeoff_interval=Interval(m_lo, m_hi),
        confidence=confidence, n_runs=len(y), n_bootstrap=len(boot),
        residual_std=math.sqrt(float(resid @ resid) / dof), r_squared=r_squared, skipped=skipped,
    )
