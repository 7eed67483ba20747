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

    python -m bench.transfer_scaling [--quick | --smoke] [--workers 2] [--cache-dir DIR] [--time-limit MIN]

Runs go to 2 worker processes of 1 thread each (the machine's 2 cores), pre-training first, then the
longest jobs first so both workers finish together (:mod:`.runs`). Every run books its CPU time
(optimizer steps, evaluation, model preparation) and the section ends with where the time went and
a quiet-machine projection of the wall time from CPU time (:mod:`.timing`), so a run slowed by other
jobs on the machine can still be judged. Measured (bench/RESULTS.md): the full run is ~24 CPU-minutes
of runs plus ~3 of pre-training (cached), ~12-14 min of wall time with 2 workers on a quiet machine
(50 min at load 7-10); ``--time-limit MIN`` stops starting new jobs and reports what finished.
``--quick`` (3 tiny sizes, 4 data sizes, <= 150-300 steps per run) is ~2.7 CPU-minutes, 2.7 min of
wall time with 2 workers at load 4-7 (~1.4 min projected quiet); ``--smoke`` (2 sizes, tens
of steps: no science) ~20 CPU-seconds, the default test suite's end-to-end check. Both write under
out/transfer_scaling_{quick,smoke}/ unless told otherwise.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

__all__ = ["main"]

_BENCH = Path(__file__).resolve().parents[1]


def main(argv=None) -> dict:
    """Run the experiment; returns ``{"rows", "transfer", "fits", "seconds", "load", "cost"}`` (``cost``:
    :func:`bench.transfer_scaling.timing.summary`)."""
    from bench.common import RESULTS, machine_markdown, write_section
    from bench.transfer_scaling import analysis, report, timing
    from bench.transfer_scaling.models import cache_dir
    from bench.transfer_scaling.runs import run_all
    from bench.transfer_scaling.settings import FULL, QUICK, SMOKE
    from peftfx.scaling import TransferFit, write_runs

    ap = argparse.ArgumentParser(prog="python -m bench.transfer_scaling", description=__doc__.split("\n")[0])
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small run whose fit is checked (~3 CPU-minutes, "
                      "<= 3 min with 2 workers)")
    size.add_argument("--smoke", action="store_true", help="every arm end to end in ~20 CPU-seconds (no science)")
    ap.add_argument("--workers", type=int, default=2, help="worker processes, 1 thread each (default 2: the "
                    "machine's cores; 1 runs everything in this process)")
    ap.add_argument("--cache-dir", help="pre-trained model cache (default $PEFTFX_TRANSFER_CACHE or "
                    "~/.cache/peftfx/transfer_scaling)")
    ap.add_argument("--time-limit", type=float, metavar="MIN",
                    help="start no new run after MIN minutes; what finished is analysed and reported")
    ap.add_argument("--out", help="RESULTS.md to write the section into")
    ap.add_argument("--plot", help="figure path")
    ap.add_argument("--csv", help="runs CSV path")
    args = ap.parse_args(argv)
    variant = "quick" if args.quick else "smoke" if args.smoke else "full"
    settings = {"quick": QUICK, "smoke": SMOKE, "full": FULL}[variant]
    default_dir = _BENCH if variant == "full" else Path(f"out/transfer_scaling_{variant}")
    out = Path(args.out) if args.out else (RESULTS if variant == "full" else default_dir / "RESULTS.md")
    plot_path = Path(args.plot) if args.plot else default_dir / "transfer_scaling.png"
    csv_path = Path(args.csv) if args.csv else default_dir / "transfer_scaling_runs.csv"
    timing_path = csv_path.with_name(csv_path.stem.replace("_runs", "") + "_timing.json")
    for path in (out, plot_path, csv_path):
        path.parent.mkdir(parents=True, exist_ok=True)
    workers = args.workers
    cache = cache_dir(args.cache_dir)

    start = time.perf_counter()
    phases = timing.Phases()
    load_before = os.getloadavg()
    print(f"transfer scaling ({variant}): {len(settings.sizes)} sizes, "
          f"{workers} worker(s), cache {cache}")
    deadline = time.time() + 60 * args.time_limit if args.time_limit else math.inf
    rows, infos = run_all(settings, cache, workers, deadline=deadline)
    cut = time.time() > deadline
    with phases("analysis (D_E, fits, bootstrap)"):
        transfer = analysis.transfer_rows(rows)
        fits, extrapolated_used = analysis.fit_methods(transfer, settings.n_bootstrap, settings.seed)
    with phases("report (CSV, figure)"):
        write_runs(csv_path, transfer, ["method", "size", "finetuned_loss", "D_E", "extrapolated", "ossified",
                                        "steps", "best_step", "train_cpu", "eval_cpu"])
        scratch = [r for r in rows if r["arm"] == "scratch"]
        curves = analysis.scratch_curves(rows)
        report.plot(plot_path, transfer, fits, scratch, curves)
    seconds = time.perf_counter() - start
    load_after = os.getloadavg()
    main_cpu, worker_cpu = timing.cpu_seconds()  # the pool has exited: its workers' CPU is in RUSAGE_CHILDREN
    cost = timing.summary(rows, infos, phases, seconds, main_cpu, worker_cpu, workers)
    s = settings
    cached = sum(1 for i in infos.values() if i.get("cached"))
    cut_text = (f", CUT SHORT by --time-limit {args.time_limit:g} min: only the {len(rows)} runs listed below finished"
                if cut else "")
    sizes_text = ", ".join(f"{name} {info['N']:,}" for name, info in infos.items())
    body = f"""## Scaling laws for transfer, in miniature (text -> Python)

`python -m bench.transfer_scaling{'' if variant == 'full' else ' --' + variant}`: byte-level Llama decoders pre-trained on
Shakespeare's plays ({s.pretrain.max_steps} steps of {s.pretrain.batch}x{s.pretrain.seq} bytes), then trained
on this interpreter's Python standard library (split by file; {s.heldout_windows} validation and
{s.heldout_windows} test windows of {s.scratch.seq} bytes from held-out files). Sizes N (non-embedding
parameters): {sizes_text}. From scratch at D =
{', '.join(f'{d:,}' for d in s.scratch_sizes)} tokens; fine-tuned at D_F = {', '.join(f'{d:,}' for d in s.finetune_sizes)}
three ways: full (lr {s.finetune['full'].lr:g}), LoRA r=8 on all 7 projections (lr {s.finetune['lora'].lr:g}) and NF4
QLoRA (same LoRA; block 64, double quant), both compiled by `peftfx.compile`. Every run: AdamW, early
stopping on validation (every 10 steps up to step 100, then every {s.scratch.eval_every}; patience {s.scratch.patience}; at most
{s.scratch.max_steps} steps from scratch and {s.finetune['full'].max_steps} fine-tuning, of {s.scratch.batch}x{s.scratch.seq} bytes), test loss reported (nats/byte). D_T = D_E - D_F with D_E interpolated in log-log on each size's
scratch curve (lower envelope); fits use interpolated runs with D_T > 0, and the extrapolated ones too
where fewer than 5 are interpolated (`peftfx.scaling.fit_transfer`, {s.n_bootstrap} bootstrap resamples). Wall time {seconds / 60:.1f} min with {workers} worker process(es)
({cached}/{len(infos)} pre-trained models from the cache){cut_text}; load average {' '.join(f'{x:.1f}' for x in load_before)}
at the start, {' '.join(f'{x:.1f}' for x in load_after)} at the end: other engineers' jobs shared the 2 cores.
CPU time {cost['total_cpu'] / 60:.1f} min in all processes; laid out on {workers} worker(s) that is
{cost['projected_wall'] / 60:.1f} min of wall time on a quiet machine, {cost['projected_wall_cold'] / 60:.1f} min with the pre-training
({cost['pretrain_cached']:.0f} CPU-s when the cached models were trained) done now (see "Where the time went" below).
Refit: `peftfx scaling fit {csv_path.name} --by method --skip-ossified` (extrapolated runs included there).

{report.fits_table(fits, transfer, extrapolated_used)}

{report.ossification_text(transfer)}

Per run (fine-tuned test loss / D_T; * = D_E extrapolated past the scratch curve):

{report.runs_table(transfer, scratch)}

Scratch curves (test loss; "dropped" = not below a smaller D's loss, left out of the envelope):

{report.scratch_table(scratch, curves)}

![transfer scaling]({plot_path.name})

Where the time went (CPU seconds; `bench/transfer_scaling/timing.py`): pre-training
{cost['pretrain']:.0f}, scratch runs {cost['scratch']:.0f}, fine-tunes {cost['finetune']:.0f}; of the runs' CPU,
optimizer steps {cost['train']:.0f}, held-out evaluation {cost['eval']:.0f}, model preparation (build,
`peftfx.compile` once per size, method and worker) {cost['prepare']:.0f}; analysis with the bootstrap
{cost['analysis (D_E, fits, bootstrap)']:.0f}, CSV and figure {cost['report (CSV, figure)']:.0f}; imports, data and process start-up
{cost['unaccounted']:.0f}. Total {cost['total_cpu']:.0f} CPU-s over {seconds:.0f} s of wall time.

{timing.phase_table(rows, infos)}

{machine_markdown()}
"""
    write_section("transfer_scaling", body, out)
    timing_path.write_text(json.dumps({"summary": cost, "load_before": load_before, "load_after": load_after,
                                       "workers": workers, "pretrain": infos, "runs": rows}, indent=1))
    for method, fit in fits.items():
        print(f"\n{method}:\n{fit.render() if isinstance(fit, TransferFit) else fit}")
    print(f"\n{report.ossification_text(transfer)}\nwall time {seconds:.0f} s, CPU {cost['total_cpu']:.0f} s "
          f"(projected quiet wall {cost['projected_wall']:.0f} s), load {load_after[0]:.1f}; "
          f"wrote {out}, {plot_path}, {csv_path}, {timing_path}")
    return {"rows": rows, "transfer": transfer, "fits": fits, "seconds": seconds, "load": load_after, "cost": cost}
