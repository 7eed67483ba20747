"""``peftfx.compile``: the only place that chains trace -> passes -> emit."""
from __future__ import annotations

import os
from typing import Any

from torch import nn
from torch.fx import GraphModule

import peftfx.passes  # noqa: F401  (importing the package registers every pass)
from peftfx.emit import REPORT_KEY, emit
from peftfx.errors import PlanError
from peftfx.pass_manager import PassContext, run_passes
from peftfx.plan import Plan
from peftfx.recapture import install_entry_points, remember_source
from peftfx.trace import capture

__all__ = ["compile", "as_plan", "trainable_parameters", "report"]


def as_plan(plan: Any) -> Plan:
    """A :class:`Plan` from a Plan, a dict, or a path to a .toml/.json file."""
    if isinstance(plan, Plan):
        return plan
    if isinstance(plan, dict):
        return Plan.from_dict(plan)
    if isinstance(plan, (str, os.PathLike)):
        return Plan.from_file(plan)
    raise PlanError(f"plan must be a peftfx.Plan, a dict or a path to a .toml/.json file, got {type(plan).__name__}")


def compile(  # noqa: A001 - the public verb
    model: nn.Module,
    plan: Any,
    *,
    example_inputs: Any = None,
    release_source_weights: bool = True,
    snapshots: bool = True,
    tokenizer: Any = None,
    weight_source: Any = None,
    dynamic: bool = True,
) -> GraphModule:
    """Compile ``model`` and ``plan`` into a trainable GraphModule.

    Args:
        model: the model to fine-tune (Hugging Face or plain ``nn.Module``), on the device you
            will train on. Its quantized layers' dense weights are consumed (replaced by meta
            tensors) unless ``release_source_weights=False``; non-targeted parameters are shared.
        plan: a :class:`Plan`, a dict, or a path to a plan file.
        example_inputs: the kwargs (dict), args (tuple) or tensor you call ``model`` with; batch
            and sequence dims are made dynamic, so use batch >= 2 and sequence >= 2.
        release_source_weights: free each quantized layer's full-precision weight as it goes.
        snapshots: keep the graph code before/after every pass for ``peftfx inspect``.
        tokenizer: turns ``prompt.init_text`` into token ids for prompt-tuning init (a plan
            cannot hold a tokenizer).
        weight_source: ``peftfx.load``'s streaming source: ``weight_source.materialize(weight)``
            runs on each targeted linear's weight just before it is quantized (placeholders are
            read from disk, one layer at a time), ``weight_source.built(fqn, module)`` on each
            swapped module right after (a sharded load keeps only this rank's part of it).
        dynamic: False captures for the example's exact shapes only (a faster capture, e.g. for
            the memory estimate's fake twin, which runs one input size).

    Returns:
        A ``torch.fx.GraphModule`` with the model's call signature and output structure, in the
        model's train/eval mode, in which only adapter parameters require grad. Called with
        another set of the model's keyword arguments (``labels`` left out or added), it captures
        that signature once, sharing the same modules (:mod:`peftfx.recapture`).

    Example::

        >>> import torch, peftfx
        >>> model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
        >>> gm = peftfx.compile(model, {"targets": ["0", "2"], "quant": {"format": "nf4"}, "lora": {"r": 4}},
        ...                     example_inputs=(torch.randn(2, 64),))
        >>> gm(torch.randn(3, 64)).shape
        torch.Size([3, 8])
    """
    plan = as_plan(plan)
    training = model.training
    gm = capture(model, example_inputs, dynamic=dynamic)
    ctx = PassContext(
        plan=plan,
        model=model,
        example_inputs=example_inputs,
        options={"release_source_weights": release_source_weights, "tokenizer": tokenizer,
                 "weight_source": weight_source},
    )
    gm, records = run_passes(gm, ctx, snapshots=snapshots)
    gm = emit(gm, training=training, plan=plan, records=records)
    remember_source(gm, model)  # other call signatures and generation capture it again
    install_entry_points(gm)
    return gm


def trainable_parameters(gm: nn.Module) -> dict[str, nn.Parameter]:
    """``{name: parameter}`` of every parameter that requires grad (what the optimizer gets)."""
    return {name: p for name, p in gm.named_parameters() if p.requires_grad}


def report(gm: GraphModule) -> list:
    """The per-pass records (:class:`peftfx.pass_manager.PassRecord`) of a compiled module."""
    records = getattr(gm, "meta", {}).get(REPORT_KEY)
    if records is None:
        raise PlanError("this module was not produced by peftfx.compile (no pass report attached)")
    return records
