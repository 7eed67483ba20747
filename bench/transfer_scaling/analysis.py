"""From raw runs to effective data and fitted laws, with :mod:`peftfx.scaling`.

Per model size, the scratch curve is the lower envelope of its from-scratch (D, test loss) points
(:func:`peftfx.scaling.lower_envelope`: a point that does not improve on a smaller D is dropped and
counted). Each fine-tuned loss is placed on it: interpolated when inside the curve's loss range;
outside it, the end segment's power law is extrapolated and the run is flagged ``extrapolated``.
D_T <= 0 is ossification. The fit per method uses the runs with D_T > 0 that were interpolated
(extrapolated D_E values past a flattening curve can be arbitrarily large), unless fewer than 5 are
left: then the extrapolated runs join, and the table says how many.
"""
from __future__ import annotations

from collections import defaultdict

from peftfx.errors import ScalingError
from peftfx.scaling import TransferFit, effective_data, fit_transfer, lower_envelope

__all__ = ["scratch_curves", "transfer_rows", "fit_methods"]


def scratch_curves(rows: list[dict]) -> dict[str, tuple]:
    """``{size: (ScratchCurve, dropped points)}`` from the scratch arm's rows."""
    points: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for r in rows:
        if r["arm"] == "scratch":
            points[r["size"]].append((r["D"], r["test_loss"]))
    out = {}
    for size, pts in points.items():
        try:
            curve = lower_envelope(pts)
        except ScalingError:  # fewer than 2 improving points: no curve for this size
            continue
        out[size] = (curve, len(pts) - len(curve.sizes))
    return out


def transfer_rows(rows: list[dict]) -> list[dict]:
    """One row per fine-tuning run: method, size, N, D_F, loss, D_E, D_T, the flags and the run's steps and CPU."""
    curves = scratch_curves(rows)
    out = []
    for r in rows:
        if r["arm"] in ("scratch", "pretrain") or r["size"] not in curves:
            continue
        curve = curves[r["size"]][0]
        low, high = curve.loss_range
        d_e = effective_data(r["test_loss"], curve, extrapolate=True)
        out.append({"method": r["arm"], "size": r["size"], "N": r["N"], "D_F": r["D"], "finetuned_loss": r["test_loss"],
                    "D_E": d_e, "D_T": d_e - r["D"], "extrapolated": not low <= r["test_loss"] <= high,
                    "ossified": d_e - r["D"] <= 0,
                    **{k: r[k] for k in ("steps", "best_step", "train_cpu", "eval_cpu") if k in r}})
    return out


def fit_methods(transfer: list[dict], n_bootstrap: int, seed: int = 0) -> tuple[dict, dict[str, int]]:
    """``({method: fit or why it could not be fitted}, {method: extrapolated runs in its fit})``.

    Interpolated runs with D_T > 0 first; when fewer than 5 of them are left (3 parameters need a
    few spare runs), the extrapolated ones join and the count says so.
    """
    fits: dict[str, TransferFit | str] = {}
    extrapolated_used: dict[str, int] = {}
    for method in dict.fromkeys(t["method"] for t in transfer):
        positive = [t for t in transfer if t["method"] == method and not t["ossified"]]
        usable = [t for t in positive if not t["extrapolated"]]
        if len(usable) < 5:
            usable = positive
        extrapolated_used[method] = sum(t["extrapolated"] for t in usable)
        try:
            fits[method] = fit_transfer(usable, n_bootstrap=n_bootstrap, seed=seed)
        except ScalingError as exc:
            fits[method] = f"not fitted: {exc}"
    return fits, extrapolated_used
