"""Jobs: a pre-training, one from-scratch run (model size, dataset size), or one (model size, method)
over all fine-tuning dataset sizes; they run in-process or in worker processes (1 thread each),
longest first.

Arms: ``pretrain`` (fills the cache), ``scratch`` (a fresh model on Python), and the fine-tuning
methods of :mod:`bench.transfer_scaling.methods`. Each run returns a plain dict row:
``size, N, arm, D, test_loss, val_loss, steps, best_step, evals, seconds, train_cpu, eval_cpu,
prepare_cpu, trainable, worker`` (``*_cpu``: CPU seconds of the worker, see :mod:`.timing`; ``worker``
its process id).

A fine-tuning job prepares its model once (``peftfx.compile`` for LoRA and QLoRA, a deep copy for
full fine-tuning) and resets it before each dataset size: one compile per (size, method), not per run.
"""
from __future__ import annotations

import functools
import hashlib
import math
import os
import time
import zlib
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from bench.transfer_scaling.data import shakespeare_bytes, split_python
from bench.transfer_scaling.methods import METHODS, prepare
from bench.transfer_scaling.models import ModelSize, build_model, non_embedding_params, pretrained
from bench.transfer_scaling.settings import Settings
from bench.transfer_scaling.train import RunResult, train_early_stopped

__all__ = ["Job", "run_job", "run_all", "estimated_cost"]


@dataclass(frozen=True)
class Job:
    settings: Settings
    size: ModelSize
    arm: str  # "pretrain", "scratch" or a method
    cache: str
    tokens: int = 0  # the dataset size D of a scratch run (0: pre-training, or every fine-tuning size)
    deadline: float = math.inf  # time.time() after which a fine-tuning job starts no further dataset size


def _data(settings: Settings):
    """(Shakespeare tokens, their sha256, the Python split), read once per process."""
    return _read_data(max(settings.scratch_sizes + settings.finetune_sizes), settings.heldout_windows,
                      settings.scratch.seq, settings.seed)


@functools.lru_cache(maxsize=2)
def _read_data(pool_tokens: int, heldout_windows: int, seq: int, seed: int):
    raw = shakespeare_bytes()
    source = torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()
    split = split_python(pool_tokens=pool_tokens, heldout_windows=heldout_windows, seq=seq, seed=seed)
    return source, hashlib.sha256(raw).hexdigest(), split


def _seed(*parts: object) -> int:
    return zlib.crc32(repr(parts).encode())


def _row(job: Job, n_params: int, tokens: int, res: RunResult, trainable: int, prepare_cpu: float) -> dict:
    return {"size": job.size.name, "N": n_params, "arm": job.arm, "D": tokens, "test_loss": res.test_loss,
            "val_loss": res.val_loss, "steps": res.steps, "best_step": res.best_step, "evals": res.evals,
            "seconds": res.seconds, "train_cpu": res.train_cpu, "eval_cpu": res.eval_cpu,
            "prepare_cpu": prepare_cpu, "trainable": trainable, "worker": os.getpid()}


def run_job(job: Job) -> tuple[Job, list[dict], dict]:
    """Run ``job``; returns (job, its rows, pre-training info or {})."""
    torch.set_num_threads(1)
    s = job.settings
    source, source_digest, split = _data(s)
    if job.arm == "pretrain":
        base, info = pretrained(job.size, source, source_digest, s.pretrain, s.seed, Path(job.cache))
        return job, [], {**info, "N": non_embedding_params(base), "worker": os.getpid()}
    start = time.process_time()
    if job.arm == "scratch":
        model = build_model(job.size, s.scratch.seq, _seed(s.seed, job.size, "scratch"))
        build_cpu = time.process_time() - start
        res = train_early_stopped(model, model.parameters(), split.train_tokens(job.tokens), split.val, split.test,
                                  s.scratch, _seed(s.seed, job.size, "scratch", job.tokens))
        n_params, trainable = non_embedding_params(model), sum(p.numel() for p in model.parameters())
        return job, [_row(job, n_params, job.tokens, res, trainable, build_cpu)], {}
    base, _ = pretrained(job.size, source, source_digest, s.pretrain, s.seed, Path(job.cache))
    prepared = prepare(job.arm, base, s.finetune[job.arm].seq)
    prepare_cpu, rows = time.process_time() - start, []
    for tokens in s.finetune_sizes:
        if time.time() > job.deadline:
            break
        prepared.reset()
        res = train_early_stopped(prepared.model, prepared.params, split.train_tokens(tokens), split.val, split.test,
                                  s.finetune[job.arm], _seed(s.seed, job.size, job.arm, tokens))
        rows.append(_row(job, non_embedding_params(base), tokens, res, prepared.trainable, prepare_cpu))
        prepare_cpu = 0.0  # paid once, booked on the first run
    return job, rows, {}


def estimated_cost(job: Job) -> float:
    """A rough CPU cost (arbitrary units) to order jobs longest first; measured per-step costs scale
    ~ 5 ms + N / 7k ms (full), adapters ~1.5x; small sets stop early, large ones reach the step cap."""
    z = job.size
    n = 12 * z.hidden * z.hidden * z.layers  # ~ non-embedding parameters
    per_step = 5.0 + n / 7000.0
    s = job.settings
    if job.arm == "pretrain":
        return per_step * s.pretrain.max_steps
    sched = s.scratch if job.arm == "scratch" else s.finetune[job.arm]
    sizes = [job.tokens] if job.arm == "scratch" else s.finetune_sizes
    steps = sum(min(sched.max_steps, 60 + 5 * d / (sched.batch * sched.seq)) for d in sizes)
    return per_step * steps * (1.0 if job.arm in ("scratch", "full") else 1.5)


_ARMS = ("scratch", *METHODS)


def run_all(settings: Settings, cache: Path, workers: int, *, deadline: float = math.inf,
            log: Callable[[str], None] = print) -> tuple[list[dict], dict[str, dict]]:
    """All runs of ``settings``: rows and ``{size name: pre-training info}``, smallest model first.

    Pre-training jobs go first (largest model first: a size's fine-tunes wait for its pre-trained
    model), then every other ready job, longest (:func:`estimated_cost`) first, so that the two
    workers finish together; at most ``workers`` at a time (``1``: in this process). No job starts
    after ``deadline`` (``time.time()``): the rows finished by then are returned.
    """
    ready = [Job(settings, z, "pretrain", str(cache)) for z in settings.sizes]
    ready += [Job(settings, z, "scratch", str(cache), d) for z in settings.sizes for d in settings.scratch_sizes]
    rank = {z.name: i for i, z in enumerate(sorted(settings.sizes, key=lambda z: z.hidden ** 2 * z.layers))}
    rows: list[dict] = []
    infos: dict[str, dict] = {}

    def done(job: Job, out: list[dict], info: dict) -> None:
        if job.arm == "pretrain":
            origin = "from cache" if info.get("cached") else f"{info['seconds']:.0f} s"
            log(f"  {job.size.name:>7} pre-trained ({origin}), train loss {info['train_loss']:.3f}")
            infos[job.size.name] = info
            ready.extend(Job(settings, job.size, m, str(cache), deadline=deadline) for m in METHODS)
        rows.extend(out)
        for r in out:
            log(f"  {job.size.name:>7} {job.arm:<7} D={r['D']:<7} loss {r['test_loss']:.3f} after {r['steps']} steps "
                f"(best {r['best_step']}), {r['train_cpu'] + r['eval_cpu'] + r['prepare_cpu']:.1f} CPU-s")

    def next_job() -> Job | None:
        if time.time() > deadline:
            ready.clear()
            return None
        ready.sort(key=lambda j: (j.arm != "pretrain", -estimated_cost(j)))
        return ready.pop(0)

    def result() -> tuple[list[dict], dict[str, dict]]:
        rows.sort(key=lambda r: (rank[r["size"]], _ARMS.index(r["arm"]), r["D"]))
        return rows, dict(sorted(infos.items(), key=lambda kv: rank[kv[0]]))

    if workers <= 1:
        while ready and (job := next_job()) is not None:
            done(*run_job(job))
        return result()
    import multiprocessing  # only for worker processes

    os.environ.setdefault("OMP_NUM_THREADS", "1")  # spawned workers inherit it before torch starts its pool
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        running: set = set()
        while ready or running:
            while ready and len(running) < workers and (job := next_job()) is not None:
                running.add(pool.submit(run_job, job))
            if not running:
                break
            finished, running = wait(running, return_when=FIRST_COMPLETED)
            for fut in finished:
                done(*fut.result())
    return result()
