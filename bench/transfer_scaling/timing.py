"""Where the experiment's time goes: CPU seconds per phase, so that wall time under load can be told
apart from the work itself.

Every run row carries the CPU seconds (``time.process_time`` of its 1-thread worker) spent in
optimizer steps (``train_cpu``), held-out evaluation (``eval_cpu``) and preparing its model
(``prepare_cpu``: building it, or ``peftfx.compile`` / deep copy, paid once per size, method and
worker); the pre-training info carries ``cpu_seconds``. The main process adds its own phases
(analysis with the bootstrap, the figure) and the totals from ``resource.getrusage`` (itself plus
its reaped workers: imports, data loading and process start-up are the part no phase accounts for).

The quiet-machine projection of the wall time is the CPU time laid out on the workers: the main
process's own CPU (start-up, analysis, report), plus the busiest worker's run CPU, plus each
worker's share of the unaccounted worker CPU (imports, data). On a loaded machine CPU seconds are
themselves somewhat inflated (shared caches, hyper-threads), so the projection errs long.
"""
from __future__ import annotations

import resource
import time
from collections import defaultdict
from contextlib import contextmanager

from bench.common import markdown_table

__all__ = ["cpu_seconds", "Phases", "summary", "phase_table"]


def cpu_seconds() -> tuple[float, float]:
    """(CPU seconds of this process, of its terminated and waited-for children)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime


class Phases:
    """Wall and CPU seconds of named phases of the main process: ``with phases("analysis"): ...``."""

    def __init__(self) -> None:
        self.seconds: dict[str, tuple[float, float]] = {}

    @contextmanager
    def __call__(self, name: str):
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            w, c = self.seconds.get(name, (0.0, 0.0))
            self.seconds[name] = (w + time.perf_counter() - wall, c + time.process_time() - cpu)


def _groups(rows: list[dict], infos: dict[str, dict]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for size, info in infos.items():
        g = out[f"pre-train {size}"]
        g["runs"] += 1
        g["steps"] += 0 if info.get("cached") else info["steps"]
        g["train_cpu"] += 0.0 if info.get("cached") else info.get("cpu_seconds", 0.0)
        g["wall"] += 0.0 if info.get("cached") else info["seconds"]
        g["cached_cpu"] += info.get("cpu_seconds", 0.0) if info.get("cached") else 0.0
    for r in rows:
        g = out[f"{r['arm']} {r['size']}"]
        g["runs"] += 1
        for k in ("steps", "evals", "train_cpu", "eval_cpu", "prepare_cpu"):
            g[k] += r[k]
        g["wall"] += r["seconds"]
    return out


def summary(rows: list[dict], infos: dict[str, dict], phases: Phases, wall: float, main_cpu: float,
            worker_cpu: float, workers: int) -> dict[str, float]:
    """Totals (CPU seconds unless named wall): ``pretrain, scratch, finetune, train`` (optimizer steps,
    pre-training included), ``eval, prepare``, the main process's phases, ``unaccounted, total_cpu, wall,
    projected_wall``; ``pretrain_cached`` is the CPU the cached pre-trainings took when they were trained
    (not spent in this run) and ``projected_wall_cold`` the projection had they been trained now (spread
    over the workers)."""
    groups = _groups(rows, infos)
    by_kind: dict[str, float] = defaultdict(float)
    for name, g in groups.items():
        kind = name.split()[0]
        kind = kind if kind in ("pre-train", "scratch") else "fine-tune"
        by_kind[kind] += g["train_cpu"] + g["eval_cpu"] + g["prepare_cpu"]
        for k in ("train_cpu", "eval_cpu", "prepare_cpu"):
            by_kind[k] += g[k]
    run_cpu = by_kind["pre-train"] + by_kind["scratch"] + by_kind["fine-tune"]
    per_worker: dict[int, float] = defaultdict(float)
    for r in rows:
        per_worker[r.get("worker", 0)] += r["train_cpu"] + r["eval_cpu"] + r["prepare_cpu"]
    for info in infos.values():
        if not info.get("cached"):
            per_worker[info.get("worker", 0)] += info.get("cpu_seconds", 0.0)
    cached = sum(i.get("cpu_seconds", 0.0) for i in infos.values() if i.get("cached"))
    total = main_cpu + worker_cpu
    unaccounted = max(0.0, total - run_cpu - sum(c for _, c in phases.seconds.values()))
    if workers > 1:  # runs in workers; main process: start-up, scheduling and its own phases
        main_own = main_cpu
        worker_overhead = max(0.0, worker_cpu - run_cpu) / workers
        projected = main_own + max(per_worker.values(), default=0.0) + worker_overhead
    else:
        projected = total
    return {"pretrain": by_kind["pre-train"], "scratch": by_kind["scratch"], "finetune": by_kind["fine-tune"],
            "train": by_kind["train_cpu"], "eval": by_kind["eval_cpu"], "prepare": by_kind["prepare_cpu"],
            **{name: c for name, (_, c) in phases.seconds.items()}, "unaccounted": unaccounted,
            "total_cpu": total, "wall": wall, "projected_wall": projected, "pretrain_cached": cached,
            "projected_wall_cold": projected + cached / max(1, workers)}


def phase_table(rows: list[dict], infos: dict[str, dict]) -> str:
    """Markdown: one row per phase (pre-train / scratch / method, per size) with runs, steps and CPU split."""
    header = ["phase", "runs", "steps", "evals", "train CPU-s", "eval CPU-s", "prepare CPU-s", "wall s (sum of runs)"]
    body = []
    for name, g in sorted(_groups(rows, infos).items()):
        if g["cached_cpu"]:
            name += f" (from the cache; {g['cached_cpu']:.0f} CPU-s when trained)"
        body.append([name, f"{g['runs']:.0f}", f"{g['steps']:.0f}", f"{g['evals']:.0f}", f"{g['train_cpu']:.1f}",
                     f"{g['eval_cpu']:.1f}", f"{g['prepare_cpu']:.1f}", f"{g['wall']:.1f}"])
    return markdown_table(header, body)
