"""Training loops: fixed-length pre-training and early-stopped training on a fixed dataset.

Loss is next-byte cross entropy in nats per byte (token). Every run draws its batches from its own
seeded ``torch.Generator``; AdamW (betas 0.9/0.95, no weight decay), linear warm-up then:

* :func:`pretrain_steps`: cosine decay to 10% over a fixed number of steps (the source model);
* :func:`train_early_stopped`: constant learning rate; every 10 steps up to step 100 (small sets
  overfit that fast), then every ``eval_every`` steps, the held-out validation loss is measured, training stops after ``patience`` evaluations without improvement (or
  at ``max_steps``), and the TEST loss at the best validation point is the run's result. The step-0
  evaluation counts too: a fine-tune can never report a loss worse than its starting point.
  Selecting on validation and reporting test keeps the loss unbiased by the selection.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from bench.transfer_scaling.data import sample_batch

__all__ = ["Schedule", "RunResult", "lm_loss", "heldout_loss", "pretrain_steps", "train_early_stopped"]


@dataclass(frozen=True)
class Schedule:
    """Optimizer and stopping settings of one kind of run."""

    lr: float
    max_steps: int
    min_steps: int = 0
    warmup: int = 20
    eval_every: int = 25
    patience: int = 3
    batch: int = 16
    seq: int = 64


@dataclass(frozen=True)
class RunResult:
    test_loss: float  # nats/byte on the held-out test windows at the best validation point
    val_loss: float
    best_step: int
    steps: int  # steps actually run
    seconds: float  # wall
    train_cpu: float  # CPU seconds of this process in optimizer steps (time.process_time)
    eval_cpu: float  # ... and in held-out evaluations
    evals: int  # validation passes (each improving one adds a test pass)


def lm_loss(model: Callable, tokens: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy of ``tokens`` ``(batch, seq + 1)`` under ``model`` (HF-style output)."""
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    logits = model(input_ids=inputs).logits  # (batch, seq, vocab)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))


@torch.no_grad()
def heldout_loss(model: torch.nn.Module, windows: torch.Tensor, batch: int = 32) -> float:
    """Mean loss over held-out ``windows`` ``(n, seq + 1)``, in eval mode (restores the mode after)."""
    was_training = model.training
    model.eval()
    total = 0.0
    for i in range(0, len(windows), batch):
        chunk = windows[i : i + batch]
        total += lm_loss(model, chunk).item() * len(chunk)
    model.train(was_training)
    return total / len(windows)


def _optimizer(params, lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(list(params), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)


def _step(model, opt, tokens, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr
    loss = lm_loss(model, tokens)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
    opt.step()


def pretrain_steps(model: torch.nn.Module, tokens: torch.Tensor, sched: Schedule, seed: int) -> float:
    """Train all of ``model`` for ``sched.max_steps`` on random windows of ``tokens``; returns the last loss."""
    gen = torch.Generator().manual_seed(seed)
    opt = _optimizer(model.parameters(), sched.lr)
    model.train()
    for step in range(sched.max_steps):
        warm = min(1.0, (step + 1) / sched.warmup)
        cosine = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / sched.max_steps))
        _step(model, opt, sample_batch(tokens, sched.batch, sched.seq, gen), sched.lr * warm * cosine)
    with torch.no_grad():
        return lm_loss(model, sample_batch(tokens, 4 * sched.batch, sched.seq, gen)).item()


def train_early_stopped(model: torch.nn.Module, params, tokens: torch.Tensor, val: torch.Tensor, test: torch.Tensor,
                        sched: Schedule, seed: int) -> RunResult:
    """Train ``params`` of ``model`` on ``tokens`` with early stopping on ``val``; see the module docstring."""
    start, cpu_start = time.perf_counter(), time.process_time()
    params = [p for p in params if p.requires_grad]
    gen = torch.Generator().manual_seed(seed)
    opt = _optimizer(params, sched.lr)
    eval_cpu = time.process_time()
    best_val, best_test, best_step = heldout_loss(model, val), heldout_loss(model, test), 0
    eval_cpu, evals = time.process_time() - eval_cpu, 1
    since_best, step = 0, 0
    model.train()
    while step < sched.max_steps:
        _step(model, opt, sample_batch(tokens, sched.batch, sched.seq, gen), sched.lr * min(1.0, (step + 1) / sched.warmup))
        step += 1
        # small sets overfit within tens of steps: evaluate every 10 steps for the first 100
        every = 10 if step <= 100 else sched.eval_every
        if step % every and step != sched.max_steps:
            continue
        eval_start = time.process_time()
        val_loss, evals = heldout_loss(model, val), evals + 1
        if val_loss < best_val:
            best_val, best_test, best_step, since_best = val_loss, heldout_loss(model, test), step, 0
        else:
            since_best += 1
        eval_cpu += time.process_time() - eval_start
        if since_best >= sched.patience and step >= sched.min_steps:
            break
    cpu = time.process_time() - cpu_start
    return RunResult(best_test, best_val, best_step, step, time.perf_counter() - start, cpu - eval_cpu, eval_cpu, evals)
