"""``peftfx scaling fit runs.csv``: fit D_T = k * D_F^alpha * N^beta to measured runs and print it.

:func:`add_scaling_parser` registers the ``scaling`` subcommand on the main CLI's subparsers; its
handler (:func:`run_fit`) returns an exit code and lets :class:`~peftfx.errors.ScalingError` (a
PlanError: exit code 2) reach the main CLI's error printer.

    $ peftfx scaling fit runs.csv --by method --skip-ossified
    $ peftfx scaling fit runs.csv --json
"""
from __future__ import annotations

import argparse
import json

from peftfx.scaling.fit import fit_transfer
from peftfx.scaling.runs_csv import group_runs, read_runs

__all__ = ["add_scaling_parser", "run_fit"]


def run_fit(args: argparse.Namespace) -> int:
    """Fit the CSV (one fit per ``--by`` value) and print text or JSON; returns exit code 0."""

    rows = read_runs(args.csv)
    groups = group_runs(rows, args.by) if args.by else {"all runs": rows}
    fits = {name: fit_transfer(group, confidence=args.confidence, n_bootstrap=args.bootstrap, seed=args.seed,
                               skip_ossified=args.skip_ossified)
            for name, group in groups.items()}
    if args.json:
        print(json.dumps({name: fit.to_dict() for name, fit in fits.items()}, indent=2))
    else:
        print("\n\n".join(f"{args.by}={name}:\n{fit.render()}" if args.by else fit.render()
                          for name, fit in fits.items()))
    return 0


def _level(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be in (0, 1), e.g. 0.95")
    return value


def add_scaling_parser(subparsers) -> None:
    """Add ``scaling fit`` to the main CLI's ``add_subparsers()`` object (handler in ``fn``)."""
    scaling = subparsers.add_parser("scaling", help="scaling laws for transfer: fit D_T = k * D_F^alpha * N^beta")
    actions = scaling.add_subparsers(dest="scaling_command", required=True, metavar="{fit}")
    p = actions.add_parser("fit", help="fit k, alpha, beta with bootstrap intervals to a runs CSV",
                           description="Fit D_T = k * D_F^alpha * N^beta by log-space least squares. The CSV needs "
                           "columns N (model parameters), D_F (fine-tuning tokens), D_T (effective data transferred).")
    p.add_argument("csv", metavar="RUNS_CSV", help="CSV with columns N, D_F, D_T (others are kept for --by)")
    p.add_argument("--by", metavar="COLUMN", help="one fit per value of this column (e.g. method)")
    p.add_argument("--skip-ossified", action="store_true", help="leave out runs with D_T <= 0 instead of failing")
    p.add_argument("--confidence", type=_level, default=0.95, help="interval level (default 0.95)")
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples (default 2000, >= 100)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(fn=run_fit)
