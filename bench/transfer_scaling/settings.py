"""The experiment's configurations: the full run (<= 30 min on 2 cores), ``--quick`` (<= 3 min: the
slow smoke test checks its fit) and ``--smoke`` (the default test suite's end-to-end check).

Dataset sizes count byte tokens. Every run trains up to ``max_steps`` with early stopping (see
:mod:`bench.transfer_scaling.train`): small sets overfit and stop early, large ones use the cap, so
the loss is data-limited where the data is small and step-limited past ~``max_steps * batch * seq``
tokens. In the full run scratch runs and fine-tunes get the same step cap (as in Hernandez et al., both
are trained to their early-stopping point; a lower fine-tuning cap would leave the largest
fine-tuning sets step-limited where scratch is not). Ossification at D_F = 100k persists with equal
caps (bench/RESULTS.md), so it is not an artifact of the cap. The scratch
curve extends 3x past the largest fine-tuning set so that fine-tuned losses, lower than scratch at
the same D when transfer helps, can still be interpolated on it.
"""
from __future__ import annotations

from dataclasses import dataclass

from bench.transfer_scaling.models import ModelSize
from bench.transfer_scaling.train import Schedule

__all__ = ["Settings", "FULL", "QUICK", "SMOKE"]


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


_SIZES = (ModelSize(24, 1), ModelSize(48, 2), ModelSize(80, 2), ModelSize(96, 3))  # 7.0k .. 332k non-embedding: 47x

FULL = Settings(
    sizes=_SIZES,
    finetune_sizes=(1_000, 3_000, 10_000, 30_000, 100_000),
    scratch_sizes=(1_000, 3_000, 10_000, 30_000, 100_000, 300_000),
    pretrain=Schedule(lr=5e-3, max_steps=1200, warmup=50),
    scratch=Schedule(lr=3e-3, max_steps=1000, patience=4),
    finetune={"full": Schedule(lr=1e-3, max_steps=1000, patience=4),
              "lora": Schedule(lr=3e-3, max_steps=1000, patience=4),
              "qlora": Schedule(lr=3e-3, max_steps=1000, patience=4)},
    heldout_windows=64,
)

QUICK = Settings(
    sizes=(ModelSize(16, 2), ModelSize(24, 2), ModelSize(32, 2)),  # 6.7k .. 25k
    # where these tiny models still gain from pre-training; below ~3k and above ~20k tokens they ossify
    finetune_sizes=(3_000, 5_000, 8_000, 12_000),
    scratch_sizes=(2_000, 8_000, 32_000, 96_000),
    pretrain=Schedule(lr=5e-3, max_steps=600, warmup=20),
    scratch=Schedule(lr=3e-3, max_steps=300, eval_every=20, patience=3, batch=8),
    finetune={m: Schedule(lr=lr, max_steps=150, eval_every=20, patience=3, batch=8)
              for m, lr in (("full", 1e-3), ("lora", 3e-3), ("qlora", 3e-3))},
    heldout_windows=16,
    n_bootstrap=500,
)

# The default test suite's end-to-end check (``--smoke``): every arm, the analysis and the report in
# ~20 CPU-seconds. Too few steps for a meaningful fit: the science is in FULL, the fit check in QUICK.
SMOKE = Settings(
    sizes=(ModelSize(16, 1), ModelSize(24, 1)),
    finetune_sizes=(2_000, 8_000),
    scratch_sizes=(1_000, 4_000, 16_000),
    pretrain=Schedule(lr=5e-3, max_steps=150, warmup=10, batch=8),
    scratch=Schedule(lr=3e-3, max_steps=60, eval_every=20, patience=2, batch=8),
    finetune={m: Schedule(lr=lr, max_steps=40, eval_every=20, patience=2, batch=8)
              for m, lr in (("full", 1e-3), ("lora", 3e-3), ("qlora", 3e-3))},
    heldout_windows=8,
    n_bootstrap=100,
)
