"""The fake twin: a model (or a compiled module) with fake tensors, compiled by the plan's own passes.

The model is deep-copied with every parameter and buffer replaced by a ``FakeTensor``
(``torch._subclasses.FakeTensorMode``): shapes, dtypes and strides, no storage. A model built under
``torch.device("meta")`` works the same way. Hugging Face code skips its data-dependent mask checks on
fake tensors (``is_tracing``), so the real forward runs.

The plan is applied by ``peftfx.compile`` itself, every pass included (``fuse_activations``,
``activation_checkpoint``): targeted linears become the real ``QLoRALinear``; ``swap_linear`` sees
that the fake weights hold no data and gives them the quantizer's storage layout unfilled
(:func:`peftfx.kernels.quantizer.empty_quantized`), so ``peftfx::qlora_linear`` runs its fake impl
and saves exactly what the kernels save; ``freeze`` decides what trains. The capture is static
(one input size) unless the caller will run other sizes (``--fit`` varies the batch).
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

import peftfx.passes  # noqa: F401  (registers the passes before any fake mode is active: their imports build tensors)
from peftfx.api import compile as compile_plan
from peftfx.inspect.estimate.allocator import measure
from peftfx.inspect.estimate.results import Breakdown
from peftfx.kernels.modules import QLoRALinear

__all__ = ["fake_like", "fake_twin", "fake_inputs", "compiled_twin", "layer_rows", "step_breakdown"]


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


def compiled_twin(model: nn.Module, plan, mode, dtype: torch.dtype | None, inputs: Any, *,
                  dynamic: bool = False) -> nn.Module:
    """``peftfx.compile`` of a fake twin of ``model`` on fake ``inputs`` (made with ``mode``), in train mode."""
    twin = fake_twin(model, mode, dtype)
    config = getattr(twin, "config", None)
    if config is not None and getattr(config, "use_cache", False):
        config.use_cache = False
    twin.train()
    with mode:
        gm = compile_plan(twin, plan, example_inputs=inputs, release_source_weights=False, snapshots=False,
                          dynamic=dynamic)
    return gm.train()


def layer_rows(gm: nn.Module) -> list[dict]:
    """One row per swapped linear: name, ``[out, in]``, format, LoRA rank, weight bytes, bits per weight."""
    rows = []
    for name, m in gm.named_modules():
        if not isinstance(m, QLoRALinear):
            continue
        qw = m.quantized_weight()
        nbytes = qw.nbytes() if qw is not None else m.weight.numel() * m.weight.element_size()
        n = m.out_features * m.in_features
        rows.append({"target": name, "shape": [m.out_features, m.in_features], "format": m.format, "r": m.r,
                     "weight_bytes": nbytes, "bits_per_param": round(8.0 * nbytes / n, 4)})
    return rows


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
