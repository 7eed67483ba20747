"""The experiment's two configurations: the full run (<= 30 min on 2 cores) and ``--quick`` (smoke test).

Dataset sizes count byte tokens. Every run trains up to ``max_steps`` with early stopping (see
:mod:`bench.transfer_scaling.train`): small sets overfit and stop early, large ones use the cap, so
the loss is data-limited where the data is small and step-limited past ~``max_steps * batch * seq``
tokens. The scratch curve
extends 3x past the largest fine-tuning set so that fine-tuned losses, lower than scratch at the same
D when transfer helps, can still be interpolated on it.
"""
from __future__ import annotations

from dataclasses import dataclass

from bench.transfer_scaling.models import ModelSize
from bench.transfer_scaling.train import Schedule

__all__ = ["Settings", "FULL", "QUICK"]


@dataclass(frozen=True)
class Settings:
    sizes: tuple[ModelSize, ...]
    finetune_sizes: tuple[int, ...]
    scratch_sizes: tuple[int, ...]
    pretrain: Schedule
    scratch: Schedule
    finetune: dict  # method -> Schedule (learning rates differ: adapters want a larger step)
    heldout_windows: int
    seed: int = 0
    n_bootstrap: int = 2000


_SIZES = (ModelSize(32, 1), ModelSize(48, 2), ModelSize(80, 2), ModelSize(112, 3))  # 12.6k .. 458k non-embedding

FULL = Settings(
    sizes=_SIZES,
    finetune_sizes=(1_000, 3_000, 10_000, 30_000, 100_000),
    scratch_sizes=(1_000, 3_000, 10_000, 30_000, 100_000, 300_000),
    pretrain=Schedule(lr=5e-3, max_steps=1200, warmup=50),
    scratch=Schedule(lr=3e-3, max_steps=800, patience=4),
    finetune={"full": Schedule(lr=1e-3, max_steps=800, patience=4),
              "lora": Schedule(lr=3e-3, max_steps=800, patience=4),
              "qlora": Schedule(lr=3e-3, max_steps=800, patience=4)},
    heldout_windows=64,
)

QUICK = Settings(
    sizes=(ModelSize(16, 1), ModelSize(32, 1), ModelSize(48, 1)),  # 3.4k .. 27k
    finetune_sizes=(1_000, 4_000, 16_000),
    scratch_sizes=(1_000, 4_000, 16_000, 64_000),
    pretrain=Schedule(lr=5e-3, max_steps=600, warmup=20, batch=8),
    scratch=Schedule(lr=3e-3, max_steps=150, eval_every=25, patience=3, batch=8),
    finetune={m: Schedule(lr=lr, max_steps=150, eval_every=25, patience=3, batch=8)
              for m, lr in (("full", 1e-3), ("lora", 3e-3), ("qlora", 3e-3))},
    heldout_windows=16,
    n_bootstrap=500,
)
