"""One job = one (model size, arm) over all its dataset sizes; jobs run in-process or in worker processes.

Arms: ``pretrain`` (fills the cache), ``scratch`` (a fresh model per dataset size, on Python), and the
fine-tuning methods of :mod:`bench.transfer_scaling.methods`. Each job returns plain dict rows:
``size, N, arm, D, test_loss, val_loss, steps, best_step, seconds, trainable``.
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

__all__ = ["Job", "run_job", "run_all"]


@dataclass(frozen=True)
class Job:
    settings: Settings
    size: ModelSize
    arm: str  # "pretrain", "scratch" or a method
    cache: str
    deadline: float = math.inf  # time.time() after which no new dataset size starts


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


def _row(job: Job, n_params: int, tokens: int, res: RunResult, trainable: int) -> dict:
    return {"size": job.size.name, "N": n_params, "arm": job.arm, "D": tokens, "test_loss": res.test_loss,
            "val_loss": res.val_loss, "steps": res.steps, "best_step": res.best_step, "seconds": res.seconds,
            "trainable": trainable}


def run_job(job: Job) -> tuple[Job, list[dict], dict]:
    """Run every dataset size of ``job``; returns (job, rows, info about the pre-trained model).

    Past ``job.deadline`` (``time.time()``), no further dataset size is started: the rows so far return.
    """
    torch.set_num_threads(1)
    s = job.settings
    source, source_digest, split = _data(s)
    rows: list[dict] = []
    if job.arm == "scratch":  # needs no pre-trained model: runs while the pre-training jobs do
        init_seed = _seed(s.seed, job.size, "scratch")
        n_params = non_embedding_params(build_model(job.size, s.scratch.seq, init_seed))
        for tokens in s.scratch_sizes:
            if time.time() > job.deadline:
                break
            model = build_model(job.size, s.scratch.seq, init_seed)
            res = train_early_stopped(model, model.parameters(), split.train_tokens(tokens), split.val, split.test,
                                      s.scratch, _seed(s.seed, job.size, "scratch", tokens))
            rows.append(_row(job, n_params, tokens, res, sum(p.numel() for p in model.parameters())))
        return job, rows, {}
    if time.time() > job.deadline:
        return job, rows, {}
    base, info = pretrained(job.size, source, source_digest, s.pretrain, s.seed, Path(job.cache))
    n_params = non_embedding_params(base)
    if job.arm == "pretrain":
        return job, rows, {**info, "N": n_params}
    prepared = prepare(job.arm, base, s.finetune[job.arm].seq)
    for tokens in s.finetune_sizes:
        if time.time() > job.deadline:
            break
        prepared.reset()
        res = train_early_stopped(prepared.model, prepared.params, split.train_tokens(tokens), split.val, split.test,
                                  s.finetune[job.arm], _seed(s.seed, job.size, job.arm, tokens))
        rows.append(_row(job, n_params, tokens, res, prepared.trainable))
    return job, rows, info


_ARM_ORDER = ("pretrain", "scratch", *METHODS)


def run_all(settings: Settings, cache: Path, workers: int, *, deadline: float = math.inf,
            log: Callable[[str], None] = print) -> tuple[list[dict], dict[str, dict]]:
    """All runs of ``settings``: rows and ``{size name: pre-training info}``.

    Jobs go smallest model first, in the order pre-train, scratch, full, LoRA, QLoRA (a size's
    fine-tunes wait for its pre-trained model), at most ``workers`` at a time (``1``: in this
    process). Smallest-first means that a run cut short by ``deadline`` (``time.time()``) still
    leaves whole sizes to fit; the jobs left then return no rows.
    """
    sizes = sorted(settings.sizes, key=lambda z: z.hidden ** 2 * z.layers)
    ready = [Job(settings, z, arm, str(cache), deadline) for z in sizes for arm in ("pretrain", "scratch")]
    rows: list[dict] = []
    infos: dict[str, dict] = {}

    def done(job: Job, out: list[dict], info: dict) -> None:
        rows.extend(out)
        if job.arm == "pretrain" and info:
            origin = "from cache" if info.get("cached") else f"{info['seconds']:.0f} s"
            log(f"  {job.size.name:>7} pre-trained ({origin}), train loss {info['train_loss']:.3f}")
            infos[job.size.name] = info
            ready.extend(Job(settings, job.size, m, str(cache), deadline) for m in METHODS)
        elif out:
            log(f"  {job.size.name:>7} {job.arm:<7} " + " ".join(f"D={r['D']}:{r['test_loss']:.3f}" for r in out))

    def next_job() -> Job:
        ready.sort(key=lambda j: (sizes.index(j.size), _ARM_ORDER.index(j.arm)))
        return ready.pop(0)

    if workers <= 1:
        while ready:
            done(*run_job(next_job()))
        return rows, infos
    import multiprocessing

    os.environ.setdefault("OMP_NUM_THREADS", "1")  # spawned workers inherit it before torch starts its pool
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        running: set = set()
        while ready or running:
            while ready and len(running) < workers:
                running.add(pool.submit(run_job, next_job()))
            finished, running = wait(running, return_when=FIRST_COMPLETED)
            for fut in finished:
                done(*fut.result())
    return rows, infos
