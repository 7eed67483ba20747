"""``estimate``: one training step's memory before and after a plan; ``fit``: settings for a budget."""
from __future__ import annotations

import dataclasses
import time
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

from peftfx.api import as_plan
from peftfx.errors import PlanError
from peftfx.inspect.estimate.results import Estimate
from peftfx.inspect.estimate.twin import compiled_twin, layer_rows
from peftfx.inspect.model_source import default_inputs
from peftfx.kernels.checkpointed_block import CheckpointedBlock
from peftfx.kernels.tiled_mlp import TiledMLP
from peftfx.memory.allocator import OPTIMIZERS, measure
from peftfx.memory.twin import fake_inputs, fake_twin
from peftfx.passes.activation_checkpoint import planning_device
from peftfx.passes.tile_mlp import set_mlp_tiling
from peftfx.plan import MemorySpec, Plan
from peftfx.plan_io import check_size

__all__ = ["estimate", "MEMORY_SETTINGS"]

# cheapest first: each later setting trades more recompute (or host traffic) for less memory
MEMORY_SETTINGS = (("off", "none"), ("selective", "none"), ("blocks", "none"), ("blocks", "cpu"))
_POLICY = {"off": "none", "selective": "selective", "blocks": "full"}


def _check_args(optimizer: str, train_device: str, dtype: Any) -> torch.dtype | None:
    if optimizer not in OPTIMIZERS:
        raise PlanError(f"optimizer {optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
    if train_device not in ("cpu", "cuda"):
        raise PlanError(f"train_device {train_device!r} must be 'cpu' or 'cuda'")
    if isinstance(dtype, str):
        if dtype not in ("float32", "bfloat16", "float16"):
            raise PlanError(f"dtype {dtype!r} must be float32, bfloat16 or float16")
        dtype = getattr(torch, dtype)
    return dtype


def _with_batch(mode, inputs: Any, batch: int, new: int) -> Any:
    """Fake inputs like ``inputs`` with every tensor's batch dim (size ``batch``) made ``new``."""
    def resize(t):
        if not isinstance(t, torch.Tensor) or t.dim() == 0 or t.shape[0] != batch:
            return t
        with mode:
            return torch.zeros((new, *t.shape[1:]), dtype=t.dtype, device="cpu")
    return tree_map(resize, inputs)


def _fit(model: nn.Module, plan: Plan, budget: int, mode, dtype, inputs: Any, batch: int, optimizer: str,
         train_device: str) -> dict:
    """Try each memory setting (cheapest first) on one dynamic-shape compile; the largest batch for the cheapest fit."""
    memory = dataclasses.replace(plan.memory or MemorySpec(), checkpoint="blocks", offload="none", budget=None)
    gm = compiled_twin(model, dataclasses.replace(plan, memory=memory), mode, dtype, inputs, dynamic=True)
    blocks = [m for m in gm.modules() if isinstance(m, CheckpointedBlock)]
    settings = [s for s in MEMORY_SETTINGS if s[1] == "none" or train_device == "cuda"]
    if not blocks:
        settings = [("off", "none")]

    def tiles(setting) -> bool:  # what the plan's tile_mlp means with this checkpoint mode
        return dataclasses.replace(memory, checkpoint=setting[0]).tiles_mlp

    def peak(setting, b: int) -> int:
        for block in blocks:
            block.set_policy(_POLICY[setting[0]], setting[1] == "cpu")
        set_mlp_tiling(gm, tiles(setting))
        return measure(gm, _with_batch(mode, inputs, batch, b), mode, optimizer, train_device).peak

    tiled = set_mlp_tiling(gm, True) > 0
    tried = [{"checkpoint": c, "offload": o, "tile_mlp": tiled and tiles((c, o)), "peak": (p := peak((c, o), batch)),
              "fits": p <= budget} for c, o in settings]
    chosen = next((s for s in tried if s["fits"]), None)
    max_batch = None
    if chosen is not None:  # the peak is affine in the batch: two points, a prediction, then a check
        setting = (chosen["checkpoint"], chosen["offload"])
        slope = max(1, peak(setting, 2 * batch) - chosen["peak"]) / batch
        max_batch = max(batch, int(batch + (budget - chosen["peak"]) // slope))
        while max_batch > batch and peak(setting, max_batch) > budget:
            max_batch -= max(1, max_batch // 64)
    return {"budget": budget, "batch": batch, "settings": tried,
            "chosen": None if chosen is None else {k: chosen[k] for k in ("checkpoint", "offload", "tile_mlp", "peak")},
            "max_batch": max_batch}


def estimate(model: nn.Module, plan: Any = None, *, example_inputs: Any = None, batch: int | None = None,
             seq: int | None = None, optimizer: str = "adamw", dtype: torch.dtype | str | None = None,
             train_device: str = "cpu", fit: int | str | None = None) -> Estimate:
    """Memory of one training step of ``model`` before (full fine-tune) and after the compiled ``plan``.

    Nothing is allocated: the model (real or built under ``torch.device("meta")``) is copied into
    fake tensors, compiled with the plan's own passes and run under a simulated allocator.

    Args:
        model: the model; its weights are not read or changed.
        plan: a :class:`~peftfx.plan.Plan`, dict or plan file path; None estimates only "before".
        example_inputs: kwargs dict / args tuple / tensor; default :func:`default_inputs` of
            ``[batch, seq]`` (batch 2, sequence 8 unless given).
        batch, seq: sizes of the default inputs (used only when ``example_inputs`` is None).
        optimizer: ``adamw | sgd | adamw-8bit``.
        dtype: training dtype of the floating-point parameters (default: as they are).
        train_device: ``cpu`` (single-tensor AdamW) or ``cuda`` (foreach AdamW temporaries; host
            offload of checkpointed blocks takes effect).
        fit: a memory size (``"24GiB"`` or bytes): also find the cheapest ``[memory]`` settings
            whose peak fits, and the largest batch that fits with them (``Estimate.fit``).

    Returns:
        An :class:`Estimate`; ``est.after.peak`` is the predicted peak bytes of a step.

    Example::

        >>> import torch, peftfx.inspect.estimate as E
        >>> m = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 4))
        >>> est = E.estimate(m, {"targets": ["0"], "quant": {"format": "nf4"}, "lora": {"r": 8}},
        ...                  example_inputs=(torch.randn(4, 256),))
        >>> est.bits_per_param()
        {'nf4': 4.127}
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    start = time.perf_counter()
    dtype = _check_args(optimizer, train_device, dtype)
    budget = None if fit is None else check_size("fit", fit)
    plan = None if plan is None else as_plan(plan)
    if budget is not None and plan is None:
        raise PlanError("fit needs a plan: the memory settings it picks are a plan's [memory] section")
    first = next(model.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    if example_inputs is None:
        with torch.device("meta") if device.type == "meta" else torch.device("cpu"):
            example_inputs = default_inputs(model, batch or 2, seq or 8, device=device)
    mode = FakeTensorMode(allow_non_fake_inputs=False)
    inputs = fake_inputs(mode, example_inputs)
    twin = fake_twin(model, mode, dtype).train()
    config = getattr(twin, "config", None)
    if config is not None and getattr(config, "use_cache", False):
        config.use_cache = False
    for p in twin.parameters():
        p.requires_grad_(p.is_floating_point())
    before = measure(twin, inputs, mode, optimizer, train_device)
    del twin
    after, rows, memory, fitted, notes = None, [], {}, None, []
    if plan is not None:
        with planning_device(train_device):
            gm = compiled_twin(model, plan, mode, dtype, inputs)
        rows = layer_rows(gm)
        after = measure(gm, inputs, mode, optimizer, train_device)
        blocks = [m for m in gm.modules() if isinstance(m, CheckpointedBlock)]
        if plan.memory is not None:
            memory = {**plan.memory.to_dict(), "checkpointed_blocks": len(blocks),
                      "policies": sorted({b.policy for b in blocks}),
                      "tiled_mlps": sum(1 for m in gm.modules() if isinstance(m, TiledMLP) and m.enabled)}
            if plan.memory.offload == "cpu" and train_device != "cuda":
                notes.append("memory.offload = 'cpu' has no effect when training on cpu")
        del gm
        if budget is not None:
            b = _batch_of(example_inputs) or 1
            fitted = _fit(model, plan, budget, mode, dtype, inputs, b, optimizer, train_device)
    b, s = _batch_of(example_inputs), _seq_of(example_inputs)
    return Estimate(model=type(model).__name__, batch=b, seq=s, optimizer=optimizer,
                    dtype=str(dtype or (first.dtype if first is not None else torch.float32)).removeprefix("torch."),
                    train_device=train_device, before=before, after=after, layers=rows, notes=notes,
                    seconds=time.perf_counter() - start, memory=memory, fit=fitted)


def _first_tensor(inputs: Any) -> torch.Tensor | None:
    return next((t for t in tree_flatten(inputs)[0] if isinstance(t, torch.Tensor)), None)


def _batch_of(inputs: Any) -> int | None:
    t = _first_tensor(inputs)
    return t.shape[0] if t is not None and t.dim() >= 1 else None


def _seq_of(inputs: Any) -> int | None:
    t = _first_tensor(inputs)
    return t.shape[1] if t is not None and t.dim() >= 2 else None
