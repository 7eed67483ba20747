"""Capture the compiled model's source again, bound to the compiled module's own adapters.

``peftfx.compile`` captures one call signature. Two things need more graphs of the same model:
calls with another set of the forward's keyword arguments (compiled with ``labels``, evaluated
without) and generation (a KV-cache step, :mod:`peftfx.serve.kv_cache`). :func:`recapture` exports
the source model again and runs the same passes with ``PassContext.options[SHARE_OPTION] = gm``,
so every pass installs the compiled module's QLoRALinear / prefix / prompt / bottleneck module
objects (:func:`peftfx.pass_manager.shared_module`) instead of building new ones: there is no
second copy of packed weights or adapters, and a training step is visible in every graph.

The source model's quantized layers were released by compile (their weights are meta tensors).
While exporting, :func:`stand_ins` puts a stride-0 zero tensor of the same shape and dtype there
(one element of memory): export only needs shapes, and the pass that swaps each such layer drops
the stand-in from the new graph.

:class:`EntryPoints` answers ``gm.forward`` (an instance attribute, so nn.Module hooks still run):
the compiled keyword set runs the graph, another set of the original forward's named keyword
arguments is captured on first use and cached. Keyword arguments passed as ``None`` count as absent.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import weakref
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule

from peftfx.emit import PLAN_KEY, emit
from peftfx.errors import TraceError
from peftfx.pass_manager import SHARE_OPTION, SKIP_OPTION, PassContext, run_passes
from peftfx.trace import SIGNATURE_KEY, capture, signature_error

__all__ = ["SOURCE_KEY", "remember_source", "source_model", "stand_ins", "recapture", "EntryPoints",
           "install_entry_points"]

SOURCE_KEY = "peftfx.source_model"
_MULTI_KEY = "peftfx.multi"  # compile_multi's meta key (peftfx.serve depends on this module, not the reverse)


def remember_source(gm: GraphModule, model: nn.Module) -> None:
    """Keep a reference to the model ``gm`` was compiled from (its parameters are ``gm``'s own)."""
    gm.meta[SOURCE_KEY] = model


def source_model(gm: nn.Module) -> nn.Module:
    """The model ``gm`` was compiled from; TraceError for a module peftfx.compile did not produce."""
    model = getattr(gm, "meta", {}).get(SOURCE_KEY)
    if model is None:
        raise TraceError(f"{type(gm).__name__} was not produced by peftfx.compile (no source model attached), so it "
                         "cannot be captured for another call signature or for generation")
    return model


def _device(model: nn.Module) -> torch.device:
    for t in [*model.parameters(), *model.buffers()]:
        if not t.is_meta:
            return t.device
    return torch.device("cpu")


@contextlib.contextmanager
def stand_ins(model: nn.Module):
    """Released (meta) parameters and buffers of ``model`` become stride-0 zeros while the block runs."""
    device = _device(model)
    swapped = []
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for name, t in list(table.items()):
                if t is None or not t.is_meta:
                    continue
                stand = torch.zeros((), dtype=t.dtype, device=device).expand(t.shape)
                table[name] = nn.Parameter(stand, requires_grad=False) if isinstance(t, nn.Parameter) else stand
                swapped.append((table, name, t))
    try:
        yield
    finally:
        for table, name, t in swapped:
            table[name] = t


def recapture(gm: GraphModule, module: nn.Module, example_inputs: Any, *, dynamic_shapes: Any = None,
              skip_sections: tuple[str, ...] = ()) -> GraphModule:
    """Export ``module`` (the source model, or a view of it sharing its submodules) and rewrite it
    with ``gm``'s plan, binding every adapter / quantized module to ``gm``'s objects.

    Args:
        gm: a module from :func:`peftfx.compile`.
        module: what to export; its submodule names must be the source model's.
        example_inputs: as for :func:`peftfx.trace.capture`.
        dynamic_shapes: torch.export's spec (default: batch and sequence dims dynamic).
        skip_sections: plan sections whose passes must not run (generation applies prefix and
            prompt tuning outside the graph, through the cache and the embeddings).

    Returns:
        A GraphModule (its own root in eval mode). ``gm``'s parameters keep their ``requires_grad``
        flags and its modules their train/eval mode; callers set the mode they run in.
    """
    model = source_model(gm)
    plan = gm.meta[PLAN_KEY]
    flags = [(p, p.requires_grad) for p in gm.parameters()]
    modes = [(m, m.training) for m in gm.modules()]
    with stand_ins(model):
        new = capture(module, example_inputs, dynamic_shapes=dynamic_shapes)
    ctx = PassContext(plan=plan, model=model, example_inputs=example_inputs,
                      options={"release_source_weights": False, SHARE_OPTION: gm, SKIP_OPTION: skip_sections})
    try:
        new, records = run_passes(new, ctx, snapshots=False)
        return emit(new, training=False, plan=plan, records=records)
    finally:  # freeze and emit touched shared parameters and modules: gm's flags and modes win
        for p, flag in flags:
            p.requires_grad_(flag)
        for m, mode in modes:
            m.training = mode


def _accepted_names(model: nn.Module) -> set[str]:
    """Named parameters of the model's forward (not ``**kwargs``)."""
    params = inspect.signature(model.forward).parameters.values()
    return {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def _exportable(v: Any) -> Any:
    """Size-1 batch / sequence dims doubled (export would fix a size-1 dim to 1)."""
    if not isinstance(v, torch.Tensor):
        return v
    for dim in range(min(v.dim(), 2)):
        if v.shape[dim] == 1:
            v = torch.cat([v, v], dim)
    return v


class EntryPoints:
    """``gm.forward``: the compiled keyword set runs the graph; another one is captured once, bound to
    ``gm``'s modules, and cached (see the module docstring)."""

    def __init__(self, gm: GraphModule | None) -> None:
        self._gm = weakref.ref(gm) if gm is not None else (lambda: None)
        self.variants: dict[tuple, GraphModule] = {}

    def __reduce__(self):
        # a copy or unpickled module is bound again by install_entry_points (GraphModule deepcopy hook)
        return EntryPoints, (None,)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        gm = self._gm()
        if gm is None:
            raise TraceError("this compiled module's entry points are not bound (a copy made without its "
                             "deepcopy hooks?); call peftfx.recapture.install_entry_points(gm) once")
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        if _captured_call(gm, args, kwargs):
            return type(gm).forward(gm, *args, **kwargs)
        variant = self.variant(gm, args, kwargs)
        variant.train(gm.training)
        return variant(*args, **kwargs)

    def variant(self, gm: GraphModule, args: tuple, kwargs: dict) -> GraphModule:
        """The graph for this call's positional count and keyword names (captured on first use)."""
        key = (len(args), frozenset(kwargs))
        if key in self.variants:
            return self.variants[key]
        n_args, names = gm.meta[SIGNATURE_KEY]
        model = source_model(gm)
        unknown = sorted(set(kwargs) - _accepted_names(model))
        if unknown or args or n_args:
            why = f"{type(model).__name__}.forward takes no argument {', '.join(map(repr, unknown))}; " if unknown \
                else "only a module compiled and called with keyword arguments captures other keyword sets; "
            raise signature_error(n_args, names, args, kwargs, why + "drop it, or recompile with example_inputs "
                                  "that contain it")
        if gm.meta.get(_MULTI_KEY) is not None:
            raise signature_error(n_args, names, args, kwargs, "a compile_multi module answers only the keyword "
                                  "set it was compiled with; pass example_inputs with these arguments instead")
        not_tensors = sorted(k for k, v in kwargs.items() if k not in names and not isinstance(v, torch.Tensor))
        if not_tensors:
            raise signature_error(n_args, names, args, kwargs, f"new keyword arguments must be tensors to be captured "
                                  f"on first use ({', '.join(not_tensors)} are not); put them in example_inputs")
        variant = recapture(gm, model, {k: _exportable(v) for k, v in kwargs.items()})
        self.variants[key] = variant
        return variant


def _captured_call(gm: nn.Module, args: tuple, kwargs: dict) -> bool:
    n_args, names = gm.meta[SIGNATURE_KEY]
    return len(args) == n_args and set(kwargs) == set(names)


class _CapturedOnly:
    """Export's input check (it rejects any other keyword set), run on the captured set only; ``None``
    keyword arguments are dropped first. A class, not a closure, so the compiled module pickles."""

    def __init__(self, check) -> None:
        self.check = check

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict):
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        if _captured_call(module, args, kwargs):
            self.check(module, args, kwargs)
        return args, kwargs


def _entry_forward(entry: EntryPoints, *args: Any, **kwargs: Any) -> Any:
    return entry(*args, **kwargs)


def install_entry_points(gm: GraphModule) -> None:
    """Make ``gm`` answer calls with other keyword sets of its source model's forward."""
    for hid, hook in list(gm._forward_pre_hooks.items()):
        if getattr(hook, "__name__", "") == "_check_input_constraints_pre_hook":
            gm._forward_pre_hooks[hid] = _CapturedOnly(hook)
    entry = EntryPoints(gm)
    # a partial of a module-level function (picklable; torch.export reads ``forward.func.__code__``)
    forward = functools.partial(_entry_forward, entry)
    forward.entry_points = entry
    forward.dispatches_signatures = True  # read by peftfx.trace's signature check
    gm.forward = forward
    if install_entry_points not in gm._deepcopy_hooks:
        gm._deepcopy_hooks.append(install_entry_points)  # merge() copies the module: the copy answers too
