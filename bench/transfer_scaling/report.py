"""The experiment's outputs: the RESULTS.md section (fits beside the paper, per-run effective data,
scratch curves, where ossification shows) and the figure (effective data with fitted surfaces)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from bench.common import markdown_table
from peftfx.scaling import PAPER_TEXT_TO_PYTHON, TransferFit

__all__ = ["fits_table", "runs_table", "scratch_table", "ossification_text", "plot"]

_LABEL = {"full": "full fine-tuning", "lora": "LoRA (peftfx)", "qlora": "NF4 QLoRA (peftfx)"}


def _g(x: float) -> str:
    return f"{x:.3g}"


def fits_table(fits: dict, transfer: list[dict], extrapolated_used: dict[str, int]) -> str:
    """One row per method beside the paper's; "fitted runs" counts those in the fit (of which extrapolated)."""
    header = ["method", "k [95% CI]", "alpha [95% CI]", "beta [95% CI]", "10x model = data x",
              "fitted runs (extrapolated)", "ossified", "extrapolated", "R^2"]
    p = PAPER_TEXT_TO_PYTHON
    rows = [["paper, text -> Python (Hernandez et al. 2021)", _g(p["k"]), _g(p["alpha"]), _g(p["beta"]),
             _g(10 ** (p["beta"] / p["alpha"])), "", "", "", ""]]
    for method, fit in fits.items():
        mine = [t for t in transfer if t["method"] == method]
        counts = [str(sum(t["ossified"] for t in mine)), str(sum(t["extrapolated"] for t in mine))]
        if isinstance(fit, TransferFit):
            rows.append([_LABEL.get(method, method), f"{_g(fit.k)} {fit.k_interval}", f"{_g(fit.alpha)} {fit.alpha_interval}",
                         f"{_g(fit.beta)} {fit.beta_interval}", f"{_g(fit.data_per_10x_model)} {fit.tradeoff_interval}",
                         f"{fit.n_runs}/{len(mine)} ({extrapolated_used.get(method, 0)})", *counts,
                         f"{fit.r_squared:.2f}"])
        else:
            rows.append([_LABEL.get(method, method), fit, "", "", "", f"0/{len(mine)}", *counts, ""])
    return markdown_table(header, rows)


def runs_table(transfer: list[dict], scratch: list[dict]) -> str:
    """Rows (size, D_F): the scratch loss at D_F, then each method's loss and D_T (flags: * extrapolated)."""
    methods = list(dict.fromkeys(t["method"] for t in transfer))
    scratch_at = {(r["size"], r["D"]): r["test_loss"] for r in scratch}
    by = {(t["size"], t["D_F"], t["method"]): t for t in transfer}
    keys = list(dict.fromkeys((t["size"], t["N"], t["D_F"]) for t in transfer))
    header = ["size", "N", "D_F", "scratch loss", *[f"{m} loss / D_T" for m in methods]]
    rows = []
    for size, n, d_f in keys:
        cells = []
        for m in methods:
            t = by.get((size, d_f, m))
            cells.append("" if t is None else f"{t['finetuned_loss']:.3f} / {t['D_T']:.3g}{'*' if t['extrapolated'] else ''}")
        s = scratch_at.get((size, d_f))
        rows.append([size, f"{n:,}", f"{d_f:,}", "" if s is None else f"{s:.3f}", *cells])
    return markdown_table(header, rows)


def scratch_table(scratch: list[dict], curves: dict) -> str:
    sizes = list(dict.fromkeys(r["size"] for r in scratch))
    ds = sorted({r["D"] for r in scratch})
    loss = {(r["size"], r["D"]): r["test_loss"] for r in scratch}
    rows = []
    for size in sizes:
        kept = set(curves[size][0].sizes) if size in curves else set()
        rows.append([size, *[f"{loss[(size, d)]:.3f}{'' if d in kept else ' (dropped)'}" if (size, d) in loss else ""
                             for d in ds]])
    return markdown_table(["size", *[f"D={d:,}" for d in ds]], rows)


def ossification_text(transfer: list[dict]) -> str:
    oss = [t for t in transfer if t["ossified"]]
    if not oss:
        return "No run showed ossification: every fine-tune reached a loss worth more data than it was given (D_T > 0)."
    by_method: dict[str, list[str]] = {}
    for t in oss:
        by_method.setdefault(t["method"], []).append(f"{t['size']} at D_F={t['D_F']:,} (D_T={t['D_T']:.3g})")
    parts = [f"{_LABEL.get(m, m)}: {', '.join(v)}" for m, v in by_method.items()]
    return f"Ossification (D_T <= 0: pre-training did not help, or hurt) in {len(oss)}/{len(transfer)} runs. " + "; ".join(parts) + "."


def plot(path: Path, transfer: list[dict], fits: dict, scratch: list[dict], curves: dict) -> None:
    """Top row: D_T vs D_F per method, one colour per size, fitted surface slices as lines.
    Bottom: the scratch curves with the fine-tuned losses on them; log10 D_T of the full fine-tuning
    surface over (D_F, N); alpha and beta per method beside the paper's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    if not transfer:  # a run cut short before any fine-tune finished: nothing to draw
        return
    methods = list(dict.fromkeys(t["method"] for t in transfer))
    sizes = list(dict.fromkeys(t["size"] for t in sorted(transfer, key=lambda t: t["N"])))
    colors = dict(zip(sizes, plt.cm.viridis(np.linspace(0, 0.9, max(1, len(sizes))))))
    fig, axes = plt.subplots(2, 3, figsize=(15, 9))
    d_grid = np.logspace(np.log10(min(t["D_F"] for t in transfer)), np.log10(max(t["D_F"] for t in transfer)), 50)
    for ax, method in zip(axes[0], methods):
        fit = fits.get(method)
        for size in sizes:
            pts = [t for t in transfer if t["method"] == method and t["size"] == size]
            if not pts:
                continue
            n = pts[0]["N"]
            for t in pts:
                marker = "x" if t["ossified"] else ("^" if t["extrapolated"] else "o")
                ax.scatter(t["D_F"], max(t["D_T"], 1.0), color=colors[size], marker=marker, s=30)
            if isinstance(fit, TransferFit):
                ax.plot(d_grid, fit.predict(n, d_grid), color=colors[size])
        title = _LABEL.get(method, method)
        if isinstance(fit, TransferFit):
            title += f"\nalpha={fit.alpha:.2f}, beta={fit.beta:.2f}, k={fit.k:.2g}"
        ax.set(xscale="log", yscale="log", xlabel="D_F (fine-tuning tokens)", ylabel="D_T (effective data transferred)",
               title=title)
        handles = [Line2D([], [], color=colors[z], marker="o", label=z) for z in sizes]
        ax.legend(handles=handles, fontsize=7, title="o interpolated, ^ extrapolated, x D_T<=0 (at 1)",
                  title_fontsize=7)
    ax = axes[1][0]
    for size in sizes:
        pts = sorted((r["D"], r["test_loss"]) for r in scratch if r["size"] == size)
        ax.plot(*zip(*pts), "o-", color=colors[size], label=f"{size} scratch")
        ft = sorted((t["D_F"], t["finetuned_loss"]) for t in transfer if t["size"] == size and t["method"] == "full")
        if ft:
            ax.plot(*zip(*ft), "s--", color=colors[size], alpha=0.6)
    ax.set(xscale="log", xlabel="D (Python tokens)", ylabel="held-out loss (nats/byte)",
           title="scratch curves (solid) and full fine-tunes (dashed)")
    ax.legend(fontsize=7)
    ax = axes[1][1]
    fit = fits.get("full")
    if isinstance(fit, TransferFit):
        ns = np.logspace(np.log10(min(t["N"] for t in transfer)), np.log10(max(t["N"] for t in transfer)), 50)
        dd, nn = np.meshgrid(d_grid, ns)
        cs = ax.contourf(dd, nn, np.log10(fit.predict(nn, dd)), levels=12, cmap="viridis")
        fig.colorbar(cs, ax=ax, label="log10 D_T (fit)")
        ax.scatter([t["D_F"] for t in transfer if t["method"] == "full"],
                   [t["N"] for t in transfer if t["method"] == "full"], c="white", edgecolors="k", s=20)
    ax.set(xscale="log", yscale="log", xlabel="D_F", ylabel="N (non-embedding parameters)",
           title="fitted surface, full fine-tuning")
    ax = axes[1][2]
    names = ["paper"] + [m for m in methods if isinstance(fits.get(m), TransferFit)]
    for j, (param, color) in enumerate((("alpha", "#4c72b0"), ("beta", "#c44e52"))):
        vals, lows, highs = [PAPER_TEXT_TO_PYTHON[param]], [0.0], [0.0]
        for m in names[1:]:
            f = fits[m]
            v, iv = getattr(f, param), getattr(f, f"{param}_interval")
            vals.append(v)
            lows.append(v - iv.low)
            highs.append(iv.high - v)
        x = np.arange(len(names)) + (j - 0.5) * 0.35
        ax.bar(x, vals, 0.35, yerr=[lows, highs], color=color, label=param, capsize=3)
    ax.set_xticks(np.arange(len(names)), names)
    ax.axhline(0, color="k", lw=0.5)
    ax.set(title="exponents (95% bootstrap CI)")
    ax.legend()
    fig.suptitle("Scaling laws for transfer in miniature: Shakespeare -> Python stdlib, byte-level Llama")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
