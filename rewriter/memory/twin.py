"""A fake twin of a module and the estimated memory of one training step of it.

The module is deep-copied with every parameter and buffer replaced by a ``FakeTensor``
(``torch._subclasses.FakeTensorMode``): shapes, dtypes and strides, no storage; a model built under
``torch.device("meta")`` works the same way. :func:`step_breakdown` runs forward + backward of the twin
under the simulated allocator (:mod:`peftfx.memory.allocator`). It sits below the passes, so
``activation_checkpoint`` can fit a ``memory.budget`` with it; :mod:`peftfx.inspect.estimate` builds
on it to estimate whole plans.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

from peftfx.memory.allocator import measure
from peftfx.memory.breakdown import Breakdown

__all__ = ["fake_like", "fake_twin", "fake_inputs", "step_breakdown"]


def fake_like(mode, t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A fake CPU tensor shaped like ``t`` (which may be on meta, cpu or cuda).

    CPU rather than meta, so that dispatch picks the kernels training would run: on meta,
    ``scaled_dot_product_attention`` falls back to the math path that saves the ``[B*H, S, S]``
    attention weights, while CPU (and CUDA) use a flash kernel that saves only the output and
    its log-sum-exp.
    """
    with mode:
        if dtype is not None and dtype != t.dtype:
            return torch.empty(t.shape, dtype=dtype, device="cpu")
        return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="cpu")


def fake_twin(model: nn.Module, mode, dtype: torch.dtype | None = None) -> nn.Module:
    """A deep copy of ``model`` whose parameters and buffers are fake (no storage is copied)."""
    memo: dict[int, Any] = {}
    for p in model.parameters():
        cast = dtype if dtype is not None and p.is_floating_point() else None
        memo[id(p)] = nn.Parameter(fake_like(mode, p, cast), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = fake_like(mode, b)
    return copy.deepcopy(model, memo)


def fake_inputs(mode, example_inputs: Any) -> Any:
    return tree_map(lambda t: fake_like(mode, t) if isinstance(t, torch.Tensor) else t, example_inputs)


def step_breakdown(module: nn.Module, example_inputs: Any, *, optimizer: str = "adamw",
                   train_device: str = "cpu") -> Breakdown:
    """The estimated memory of one training step of ``module`` as it is (e.g. a compiled model), on a fake twin.

    ``module`` is not run or changed; it may hold real, meta or fake tensors.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode, is_fake

    # a module that is itself a fake twin (a budget planned while the estimate compiles) keeps its
    # fake mode: tensors of two fake modes cannot meet in one op
    fake = next((t for t in module.parameters() if is_fake(t)), None)
    mode = fake.fake_mode if fake is not None else FakeTensorMode(allow_non_fake_inputs=False)
    twin = fake_twin(module, mode).train()
    return measure(twin, fake_inputs(mode, example_inputs), mode, optimizer, train_device)
