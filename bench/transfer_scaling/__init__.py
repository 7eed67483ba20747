"""Scaling laws for transfer, in miniature: Shakespeare -> Python, measured and fitted with peftfx.scaling.

Reproduces the set-up of Hernandez et al. (2021), "Scaling Laws for Transfer", at CPU scale:

1. pre-train byte-level Llama decoders of 4 sizes (7.0k .. 332k non-embedding parameters, 47x) on
   Shakespeare's plays (cached by content hash, see :mod:`.models`);
2. train the same sizes from scratch on Python (this interpreter's standard library, split by file)
   at 6 dataset sizes (1k .. 300k tokens): the data -> loss curves;
3. fine-tune the pre-trained models on 5 dataset sizes (1k .. 100k tokens, 100x), three ways: full
   fine-tuning, LoRA and NF4 QLoRA, both compiled by ``peftfx.compile`` (see :mod:`.methods`);
4. effective data transferred D_T per fine-tune, and k, alpha, beta per method (:mod:`.analysis`);
5. the ``transfer_scaling`` section of bench/RESULTS.md, bench/transfer_scaling.png and the runs
   as CSV (bench/transfer_scaling_runs.csv: refit with ``peftfx scaling fit ... --by method``).

    python -m bench.transfer_scaling [--quick] [--workers 2] [--cache-dir DIR] [--time-limit MIN]

The full run takes ~10 CPU-minutes per worker (2 workers; longer while other jobs share the cores:
``--time-limit MIN`` stops starting new runs and reports what finished, smallest models first);
``--quick`` (3 tiny sizes, 4 data sizes, <= 150-300 steps per run) takes 1-2 CPU-minutes and writes
under out/transfer_scaling_quick/ unless told otherwise.
"""
from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

__all__ = ["main"]

_BENCH = Path(__file__).resolve().parents[1]


def main(argv=None) -> dict:
    """Run the experiment; returns ``{"rows", "transfer", "fits", "seconds", "load"}``."""
    from bench.common import RESULTS, machine_markdown, write_section
    from bench.transfer_scaling import analysis, report
    from bench.transfer_scaling.models import cache_dir
    from bench.transfer_scaling.runs import run_all
    from bench.transfer_scaling.settings import FULL, QUICK
    from peftfx.scaling import TransferFit, write_runs

    ap = argparse.ArgumentParser(prog="python -m bench.transfer_scaling", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny smoke run (1-2 CPU-minutes)")
    ap.add_argument("--workers", type=int, help="worker processes, 1 thread each (default 2; 1 with --quick)")
    ap.add_argument("--cache-dir", help="pre-trained model cache (default $PEFTFX_TRANSFER_CACHE or "
                    "~/.cache/peftfx/transfer_scaling)")
    ap.add_argument("--time-limit", type=float, metavar="MIN",
                    help="start no new run after MIN minutes; what finished is analysed and reported")
    ap.add_argument("--out", help="RESULTS.md to write the section into")
    ap.add_argument("--plot", help="figure path")
    ap.add_argument("--csv", help="runs CSV path")
    args = ap.parse_args(argv)
    settings = QUICK if args.quick else FULL
    default_dir = Path("out/transfer_scaling_quick") if args.quick else _BENCH
    out = Path(args.out) if args.out else (default_dir / "RESULTS.md" if args.quick else RESULTS)
    plot_path = Path(args.plot) if args.plot else default_dir / "transfer_scaling.png"
    csv_path = Path(args.csv) if args.csv else default_dir / "transfer_scaling_runs.csv"
    for path in (out, plot_path, csv_path):
        path.parent.mkdir(parents=True, exist_ok=True)
    workers = args.workers or (1 if args.quick else 2)
    cache = cache_dir(args.cache_dir)

    start = time.perf_counter()
    load_before = os.getloadavg()
    print(f"transfer scaling ({'quick' if args.quick else 'full'}): {len(settings.sizes)} sizes, "
          f"{workers} worker(s), cache {cache}")
    deadline = time.time() + 60 * args.time_limit if args.time_limit else math.inf
    rows, infos = run_all(settings, cache, workers, deadline=deadline)
    cut = time.time() > deadline
    transfer = analysis.transfer_rows(rows)
    fits, extrapolated_used = analysis.fit_methods(transfer, settings.n_bootstrap, settings.seed)
    seconds = time.perf_counter() - start
    load_after = os.getloadavg()

    write_runs(csv_path, transfer, ["method", "size", "finetuned_loss", "D_E", "extrapolated", "ossified"])
    scratch = [r for r in rows if r["arm"] == "scratch"]
    curves = analysis.scratch_curves(rows)
    report.plot(plot_path, transfer, fits, scratch, curves)
    s = settings
    cached = sum(1 for i in infos.values() if i.get("cached"))
    cut_text = (f", CUT SHORT by --time-limit {args.time_limit:g} min: only the {len(rows)} runs listed below finished"
                if cut else "")
    sizes_text = ", ".join(f"{name} {info['N']:,}" for name, info in infos.items())
    body = f"""## Scaling laws for transfer, in miniature (text -> Python)

`python -m bench.transfer_scaling{' --quick' if args.quick else ''}`: byte-level Llama decoders pre-trained on
Shakespeare's plays ({s.pretrain.max_steps} steps of {s.pretrain.batch}x{s.pretrain.seq} bytes), then trained
on this interpreter's Python standard library (split by file; {s.heldout_windows} validation and
{s.heldout_windows} test windows of {s.scratch.seq} bytes from held-out files). Sizes N (non-embedding
parameters): {sizes_text}. From scratch at D =
{', '.join(f'{d:,}' for d in s.scratch_sizes)} tokens; fine-tuned at D_F = {', '.join(f'{d:,}' for d in s.finetune_sizes)}
three ways: full (lr {s.finetune['full'].lr:g}), LoRA r=8 on all 7 projections (lr {s.finetune['lora'].lr:g}) and NF4
QLoRA (same LoRA; block 64, double quant), both compiled by `peftfx.compile`. Every run: AdamW, early
stopping on validation (every {s.scratch.eval_every} steps, patience {s.scratch.patience}, at most
{s.scratch.max_steps} steps of {s.scratch.batch}x{s.scratch.seq} bytes), test loss reported (nats/byte). D_T = D_E - D_F with D_E interpolated in log-log on each size's
scratch curve (lower envelope); fits use interpolated runs with D_T > 0, and the extrapolated ones too
where fewer than 5 are interpolated (`peftfx.scaling.fit_transfer`, {s.n_bootstrap} bootstrap resamples). Wall time {seconds / 60:.1f} min with {workers} worker process(es)
({cached}/{len(infos)} pre-trained models from the cache){cut_text}; load average {' '.join(f'{x:.1f}' for x in load_before)}
at the start, {' '.join(f'{x:.1f}' for x in load_after)} at the end: other engineers' jobs shared the 2 cores.
Refit: `peftfx scaling fit {csv_path.name} --by method --skip-ossified` (extrapolated runs included there).

{report.fits_table(fits, transfer, extrapolated_used)}

{report.ossification_text(transfer)}

Per run (fine-tuned test loss / D_T; * = D_E extrapolated past the scratch curve):

{report.runs_table(transfer, scratch)}

Scratch curves (test loss; "dropped" = not below a smaller D's loss, left out of the envelope):

{report.scratch_table(scratch, curves)}

![transfer scaling]({plot_path.name})

{machine_markdown()}
"""
    write_section("transfer_scaling", body, out)
    for method, fit in fits.items():
        print(f"\n{method}:\n{fit.render() if isinstance(fit, TransferFit) else fit}")
    print(f"\n{report.ossification_text(transfer)}\nwall time {seconds:.0f} s; wrote {out}, {plot_path}, {csv_path}")
    return {"rows": rows, "transfer": transfer, "fits": fits, "seconds": seconds, "load": load_after}
