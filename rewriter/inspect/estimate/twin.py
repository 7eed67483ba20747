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

from typing import Any

import torch
from torch import nn

import peftfx.passes  # noqa: F401  (registers the passes before any fake mode is active: their imports build tensors)
from peftfx.api import compile as compile_plan
from peftfx.kernels.modules import QLoRALinear
from peftfx.memory.twin import fake_twin

__all__ = ["compiled_twin", "layer_rows"]


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


