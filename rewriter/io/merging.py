"""Fold LoRA into the base for deployment, and undo it.

``merge(gm, into="dense")`` replaces every LoRA layer ``y = x·deq(W)ᵀ + b + s·(x·Aᵀ)·Bᵀ`` by a
plain ``nn.Linear`` with ``W' = deq(W) + s·B·A`` (computed in fp32, stored in the base dtype), so
the served graph has no adapter op at all. ``into="quantized"`` re-quantizes ``W'`` in the
layer's own format and block sizes (a frozen, quantize-only ``QLoRALinear``) and records per layer
the error re-quantization added on top of the dense merge (max / mean absolute difference).

Both return a **new** GraphModule: modules and graph are copied, tensors of untouched layers are
shared with ``gm`` (no memory doubling), and ``gm`` itself is not modified. The merged module keeps
the original adapter layers (packed base + A + B, by reference) in ``meta``, so :func:`unmerge`
restores them exactly: nothing is recovered by subtraction. Merging a graph with no LoRA left to
merge returns it unchanged, so ``merge(merge(gm)) is merge(gm)``. Prompt/prefix tuning modules are
not foldable and stay as they are.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn
from torch.fx import GraphModule

from peftfx.errors import CheckpointError
from peftfx.graph import set_submodule
from peftfx.kernels import quantizer, reference
from peftfx.kernels.modules import QLoRALinear, qlora_layers

__all__ = ["merge", "unmerge", "merge_report", "merged_weight", "UNMERGE_KEY", "MERGE_REPORT_KEY"]

UNMERGE_KEY = "peftfx.unmerge"
MERGE_REPORT_KEY = "peftfx.merge"


def merged_weight(m: nn.Module) -> Tensor:
    """``deq(W) + s·B·A`` ``[out, in]`` in fp32 for one LoRA layer."""
    with torch.no_grad():
        w = m.dequantized_weight(torch.float32).clone()
        w.addmm_(m.lora_B.detach().float(), m.lora_A.detach().float(), alpha=float(m.scaling))
    return w


def _copy_sharing_tensors(gm: GraphModule) -> GraphModule:
    """A deep copy of modules, graph and meta whose parameters and buffers are ``gm``'s own tensors."""
    memo: dict[int, Any] = {}
    for t in [*gm.parameters(), *gm.buffers()]:
        memo[id(t)] = t
    stash = getattr(gm, "meta", {}).get(UNMERGE_KEY)
    if stash is not None:
        memo[id(stash)] = stash  # stored adapter layers stay the originals, never copies
    return copy.deepcopy(gm, memo)


def _dense_module(m: nn.Module, w: Tensor) -> nn.Linear:
    lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
    lin.weight = nn.Parameter(w.to(m.weight_dtype), requires_grad=False)
    if m.bias is not None:
        lin.bias = nn.Parameter(m.bias.detach().clone(), requires_grad=False)
    return lin


def _quantized_module(m: nn.Module, w: Tensor, fqn: str) -> tuple[nn.Module, dict[str, Any]]:

    if m.format == "none":
        return _dense_module(m, w), {"layer": fqn, "format": "none", "max_abs": 0.0, "mean_abs": 0.0}
    qw = quantizer.quantize(w.to(m.weight_dtype), m.format, block_size=m.block_size,
                            double_quant=m.weight_scales2 is not None, block_size2=m.block_size2,
                            threshold=m.threshold, name=fqn)
    new = QLoRALinear(qw, m.bias.detach().clone() if m.bias is not None else None, r=None, name=fqn,
                      compute_dtype=getattr(m, "compute_dtype", None))
    err = (reference.dequantize(qw, torch.float32) - w).abs()
    return new, {"layer": fqn, "format": m.format, "max_abs": err.max().item(), "mean_abs": err.mean().item()}


def merge(gm: GraphModule, *, into: str = "dense") -> GraphModule:
    """A GraphModule with every LoRA layer folded into its base weight.

    Args:
        gm: a module from :func:`peftfx.compile` (not modified).
        into: ``"dense"`` (an ``nn.Linear`` holding ``deq(W) + s·B·A``) or ``"quantized"``
            (the merged weight re-quantized in the layer's format; error in :func:`merge_report`).

    Returns:
        A new GraphModule with the same signature and outputs (in eval mode: LoRA dropout is
        gone), or ``gm`` itself when it has no LoRA layer left to merge.

    Example::

        >>> served = peftfx.merge(gm)                              # doctest: +SKIP
        >>> peftfx.merge(served) is served                         # doctest: +SKIP
        True
    """
    if into not in ("dense", "quantized"):
        raise CheckpointError(f"merge(into={into!r}): expected 'dense' or 'quantized'")
    layers = qlora_layers(gm, with_lora=True)
    if not layers:
        return gm
    new = _copy_sharing_tensors(gm)
    stash = dict(new.meta.get(UNMERGE_KEY, {}))
    report = list(new.meta.get(MERGE_REPORT_KEY, []))
    for fqn, m in layers.items():
        w = merged_weight(m)
        if into == "dense":
            module, info = _dense_module(m, w), {"layer": fqn, "into": "dense", "max_abs": 0.0, "mean_abs": 0.0}
        else:
            module, info = _quantized_module(m, w, fqn)
            info["into"] = "quantized"
        set_submodule(new, fqn, module)
        stash[fqn] = m  # the original layer (packed base + A + B): unmerge reinstalls it as is
        report.append(info)
    new.meta[UNMERGE_KEY] = stash
    new.meta[MERGE_REPORT_KEY] = report
    new.recompile()
    new.train(gm.training)
    return new


def unmerge(gm: GraphModule) -> GraphModule:
    """Undo :func:`merge` exactly: a new GraphModule with the original adapter layers back.

    The restored layers are the very modules that were merged (same packed base, A and B
    tensors), so training can continue where it stopped.

    Raises:
        CheckpointError: ``gm`` was not produced by :func:`merge` (nothing to restore).
    """
    stash = getattr(gm, "meta", {}).get(UNMERGE_KEY)
    if not stash:
        raise CheckpointError("unmerge: this module was not produced by peftfx.merge (no adapter layers stored); "
                              "a merge that was saved and reloaded cannot be undone, keep the adapters instead")
    new = _copy_sharing_tensors(gm)
    for fqn, m in stash.items():
        set_submodule(new, fqn, m)
    del new.meta[UNMERGE_KEY]
    new.meta.pop(MERGE_REPORT_KEY, None)
    new.recompile()
    new.train(gm.training)
    return new


def merge_report(gm: nn.Module) -> list[dict[str, Any]]:
    """Per merged layer: ``{"layer", "into", "format", "max_abs", "mean_abs"}``.

    For ``into="quantized"`` the errors are ``|deq(requant(W')) - W'|`` where ``W'`` is the dense
    merge: what re-quantization added. Dense merges record 0.
    """
    return list(getattr(gm, "meta", {}).get(MERGE_REPORT_KEY, []))
