"""Scaling laws for transfer (Hernandez et al. 2021): effective data and D_T = k * D_F^alpha * N^beta.

* :func:`effective_data_transferred`: D_T = D_E - D_F, with D_E read off a from-scratch data -> loss
  curve by log-log interpolation (:mod:`peftfx.scaling.effective_data`);
* :func:`fit_transfer`: k, alpha, beta by log-space least squares with bootstrap intervals, and the
  trade-off ``10**(beta/alpha)``: how much more fine-tuning data a 10x larger model is worth
  (:mod:`peftfx.scaling.fit`);
* :func:`read_runs` / :func:`write_runs`: runs as CSV (:mod:`peftfx.scaling.runs_csv`);
* ``peftfx scaling fit runs.csv``: the CLI (:mod:`peftfx.scaling.cli`).

numpy only: no torch import. The experiment that measures the runs is ``python -m bench.transfer_scaling``.
"""
from __future__ import annotations

from peftfx.errors import ScalingError
from peftfx.scaling.effective_data import ScratchCurve, effective_data, effective_data_transferred, lower_envelope
from peftfx.scaling.fit import PAPER_TEXT_TO_PYTHON, Interval, TransferFit, fit_transfer
from peftfx.scaling.runs_csv import group_runs, read_runs, write_runs

__all__ = [
    "ScalingError", "ScratchCurve", "effective_data", "effective_data_transferred", "lower_envelope",
    "Interval", "TransferFit", "fit_transfer", "PAPER_TEXT_TO_PYTHON", "read_runs", "write_runs", "group_runs",
]
