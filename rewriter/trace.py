"""Capture a model into a torch.fx GraphModule and normalize it into the one IR passes see.

transformers 5.x removed its fx tracer and ``torch.fx.symbolic_trace`` fails on current Hugging
Face models, so we capture with ``torch.export.export(strict=False)`` and dynamic batch/sequence
dims, then normalize ``ep.module()``:

* ``.train()`` / ``.eval()`` work again (export installs instance overrides that refuse them);
* dropout that export baked in as ``aten.dropout(x, p, True)`` becomes a mode-aware
  ``nn.Dropout`` submodule, and SDPA's baked ``dropout_p`` a ``DropoutRate`` module that reads
  ``self.training``;
* every node keeps ``meta["nn_module_stack"]``; :func:`owner_fqn` turns it into the owning
  module's name as PEFT spells it (``model.layers.3.self_attn.q_proj``).

Capture runs in train mode (so dropout is visible), then the model's own mode is restored.
"""
from __future__ import annotations

import contextlib
import re
import traceback
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule, Node

from peftfx.errors import TraceError

__all__ = ["capture", "normalize_inputs", "owner_fqn", "owner_stack", "DropoutRate", "SIGNATURE_KEY",
           "signature_error"]

aten = torch.ops.aten
_DROPOUT_OPS = (aten.dropout.default,)
_SDPA = aten.scaled_dot_product_attention.default


class DropoutRate(nn.Module):
    """Returns ``p`` in training and 0.0 in eval: replaces a baked SDPA ``dropout_p`` constant."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = float(p)

    def forward(self) -> float:
        return self.p if self.training else 0.0

    def extra_repr(self) -> str:
        return f"p={self.p}"


def normalize_inputs(example_inputs: Any) -> tuple[tuple, dict]:
    """``example_inputs`` as (args, kwargs): a dict is kwargs, a tuple/list args, a tensor one arg."""
    if example_inputs is None:
        raise TraceError(
            "example_inputs is missing: peftfx captures the model by running it once. Pass "
            "example_inputs={'input_ids': ids, 'attention_mask': mask} (the kwargs you call the "
            "model with; batch >= 2 and sequence >= 2 so those dims stay dynamic)."
        )
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise TraceError(
        f"example_inputs must be a dict of keyword arguments, a tuple of positional arguments or a "
        f"tensor, got {type(example_inputs).__name__}"
    )


def _unalias(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Clone example tensors passed twice (``labels=input_ids``).

    export turns one tensor object into one graph input, so two arguments that alias in the
    example would be read from the same placeholder forever after: later calls with different
    labels would silently train on the input ids.
    """
    seen: set[int] = set()

    def fresh(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            if id(v) in seen:
                return v.clone()
            seen.add(id(v))
        return v

    return tuple(fresh(a) for a in args), {k: fresh(v) for k, v in kwargs.items()}


def _dynamic_shapes(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Mark batch and sequence dims (dims 0 and 1) of every tensor input ``Dim.AUTO``.

    AUTO lets export specialize a dim the model needs static (image channels, hidden size) instead
    of failing, so marking more than needed is harmless.
    """
    from torch.export import Dim

    def spec(v: Any) -> Any:
        if isinstance(v, torch.Tensor) and v.dim() >= 1:
            return {d: Dim.AUTO for d in range(min(v.dim(), 2))}
        return None

    return tuple(spec(a) for a in args), {k: spec(v) for k, v in kwargs.items()}


@contextlib.contextmanager
def _capture_mode(model: nn.Module):
    """Train mode (dropout visible to export) and no KV cache (export cannot return a Cache)."""
    was_training = model.training
    config = getattr(model, "config", None)
    had_cache = getattr(config, "use_cache", None)
    if config is not None and had_cache:
        config.use_cache = False
    model.train()
    try:
        yield
    finally:
        model.train(was_training)
        if config is not None and had_cache:
            config.use_cache = had_cache


def _user_frame(exc: BaseException) -> str:
    """The innermost stack frame outside torch: where in the model's code export gave up."""
    frames = traceback.extract_tb(exc.__traceback__)
    text = str(exc)
    # export also quotes user frames inside its own message ("File ..., line N").
    for line in reversed(text.splitlines()):
        m = re.search(r'File "([^"]+)", line (\d+)', line)
        if m and "/torch/" not in m.group(1):
            return f"{m.group(1)}:{m.group(2)}"
    for fr in reversed(frames):
        if "/torch/" not in fr.filename and "/peftfx/" not in fr.filename and "rewriter/" not in fr.filename:
            return f"{fr.filename}:{fr.lineno}: {fr.line}"
    return "<no user frame found>"


_HINTS = (
    ("data-dependent", "the model branches on tensor values; rewrite the branch with torch.where/torch.cond"),
    ("Cache", "pass use_cache=False (peftfx trains without a KV cache)"),
    ("flash", "load the model with attn_implementation='sdpa'"),
    ("Constraints violated", "an input dim cannot be dynamic; use batch >= 2 and sequence >= 2 in example_inputs"),
)


def capture(model: nn.Module, example_inputs: Any, *, dynamic: bool = True, dynamic_shapes: Any = None) -> GraphModule:
    """Export ``model`` on ``example_inputs`` and return the normalized GraphModule.

    Args:
        model: any ``nn.Module`` torch.export can capture non-strictly (Hugging Face models included).
        example_inputs: dict of kwargs, tuple of args, or one tensor; batch and sequence dims
            (dims 0 and 1 of each tensor) become dynamic.
        dynamic: False captures for exactly these input shapes (faster: no symbolic shapes).
        dynamic_shapes: torch.export's spec, replacing that default (generation graphs mark the
            KV cache's batch and length dims inside lists of tensors).

    Returns:
        A GraphModule whose parameters are the model's own Parameter objects (shared storage),
        whose call signature and output structure match ``model``'s, in ``model``'s train/eval mode.
    """
    if not isinstance(model, nn.Module):
        raise TraceError(f"peftfx.compile takes an nn.Module, got {type(model).__name__}")
    args, kwargs = _unalias(*normalize_inputs(example_inputs))
    dyn_args, dyn_kwargs = _dynamic_shapes(args, kwargs)
    # export matches dynamic_shapes to inputs in call order: positional args, then kwargs
    if dynamic_shapes is None and dynamic:
        dynamic_shapes = dyn_kwargs if not args else tuple(dyn_args) + tuple(dyn_kwargs.values())
    with _capture_mode(model):
        try:
            ep = torch.export.export(model, args, kwargs, strict=False, dynamic_shapes=dynamic_shapes)
        except Exception as exc:  # noqa: BLE001 - re-raised with the user's line and a hint
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            hint = next((h for key, h in _HINTS if key in str(exc)), "check that the model runs on example_inputs")
            raise TraceError(
                f"could not capture {type(model).__name__} with torch.export: {msg}\n"
                f"  at {_user_frame(exc)}\n  hint: {hint}"
            ) from exc
    gm = ep.module()
    gm.meta[SIGNATURE_KEY] = (len(args), tuple(kwargs))
    gm.register_forward_pre_hook(_check_signature, with_kwargs=True, prepend=True)
    _restore_train_eval(gm)
    _unbake_dropout(gm)
    gm.recompile()
    gm.train(model.training)
    return gm


SIGNATURE_KEY = "peftfx.signature"


def _check_signature(gm: GraphModule, args: tuple, kwargs: dict) -> None:
    """The graph was captured for one set of arguments: say so plainly when a call differs."""
    if getattr(gm.__dict__.get("forward"), "dispatches_signatures", False):
        return  # peftfx.recapture.EntryPoints answers other keyword sets (and checks them) itself
    n_args, names = gm.meta.get(SIGNATURE_KEY, (len(args), tuple(kwargs)))
    if len(args) != n_args or set(kwargs) != set(names):
        raise signature_error(n_args, names, args, kwargs)


def signature_error(n_args: int, names: tuple, args: tuple, kwargs: dict, accepted: str = "") -> TraceError:
    """The TraceError for a call whose arguments differ from the captured ones (``accepted``: what to do)."""
    got = [f"{len(args)} positional"] + sorted(kwargs)
    want = [f"{n_args} positional"] + sorted(names)
    return TraceError(
        f"this module was compiled for arguments ({', '.join(want)}) but was called with ({', '.join(got)}); "
        + (accepted or "the graph is fixed by example_inputs, so pass every argument you will call with "
                       "(labels included) in example_inputs when compiling")
    )


def _restore_train_eval(gm: GraphModule) -> None:
    """ep.module() shadows train/eval with instance attributes that raise; drop them."""
    for name in ("train", "eval"):
        if name in gm.__dict__:
            del gm.__dict__[name]


def _unique_name(gm: GraphModule, base: str) -> str:
    name, k = base, 1
    while _has_attr(gm, name):
        name, k = f"{base}_{k}", k + 1
    return name


def _has_attr(gm: GraphModule, dotted: str) -> bool:
    obj: Any = gm
    for part in dotted.split("."):
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return True


def _unbake_dropout(gm: GraphModule) -> None:
    """Turn export's fixed-training dropout into modules that follow ``.train()``/``.eval()``."""
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target in _DROPOUT_OPS:
            x, p = node.args[0], float(node.args[1])
            owner = owner_fqn(node) or ""
            owner_mod = _get_module(gm, owner)
            if isinstance(owner_mod, nn.Dropout):
                name = owner  # keep the model's own name (bert.embeddings.dropout)
            else:
                name = _unique_name(gm, f"{owner}.peftfx_dropout" if owner else "peftfx_dropout")
            if not isinstance(owner_mod, nn.Dropout) or owner_mod.p != p:
                gm.add_submodule(name, nn.Dropout(p))
            elif not isinstance(_get_module(gm, name), nn.Dropout):
                gm.add_submodule(name, nn.Dropout(p))
            with graph.inserting_before(node):
                new = graph.call_module(name, (x,))
            new.meta.update(node.meta)
            node.replace_all_uses_with(new)
            graph.erase_node(node)
        elif node.op == "call_function" and node.target == _SDPA:
            p = node.kwargs.get("dropout_p", node.args[4] if len(node.args) > 4 else 0.0)
            if isinstance(p, (int, float)) and p > 0:
                owner = owner_fqn(node) or ""
                name = _unique_name(gm, f"{owner}.peftfx_attn_dropout" if owner else "peftfx_attn_dropout")
                gm.add_submodule(name, DropoutRate(p))
                with graph.inserting_before(node):
                    rate = graph.call_module(name, ())
                rate.meta["nn_module_stack"] = node.meta.get("nn_module_stack", {})
                if "dropout_p" in node.kwargs:
                    node.update_kwarg("dropout_p", rate)
                else:
                    node.update_arg(4, rate)
    graph.lint()


def _get_module(gm: GraphModule, fqn: str) -> nn.Module | None:
    if not fqn:
        return gm
    try:
        return gm.get_submodule(fqn)
    except AttributeError:
        return None


def owner_stack(node: Node) -> list[tuple[str, str]]:
    """``[(module FQN, type name), ...]`` outermost first, from export's ``nn_module_stack``."""
    stack = node.meta.get("nn_module_stack") or {}
    out = []
    for value in stack.values():
        fqn, typ = value[0], value[1]
        typ = typ if isinstance(typ, str) else getattr(typ, "__qualname__", str(typ))
        out.append((re.sub(r"@\d+$", "", fqn), typ))
    return [(f, t) for f, t in out if not f.startswith("_empty_nn_module_stack")]


def owner_fqn(node: Node) -> str | None:
    """Name of the innermost module that produced ``node`` (``model.layers.0.self_attn.q_proj``)."""
    stack = owner_stack(node)
    return stack[-1][0] if stack else None
