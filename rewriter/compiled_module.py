"""What a compiled GraphModule adds to torch's: pickling that keeps the graph, and a guard on dtype casts.

**Pickling.** ``torch.fx.GraphModule.__reduce__`` pickles the generated code and re-traces it on
load, which loses every node's ``meta`` (export's module stack, shapes, peftfx's provenance and
prefix marks that ``export_peft`` and the reports read) and all forward hooks; and the module
``torch.export`` returns carries lambda hooks that pickle cannot name at all. :func:`install`
replaces those lambdas by picklable hooks and gives the module's own class (``GraphModule``
makes one class per instance) a ``__reduce__`` that pickles the graph node by node: ops by their
qualified name (``aten::add.Tensor``), arguments with node references by name, and each node's
picklable meta. Export's fake tensors (``meta["val"]``) become ``meta`` device tensors of the
example shapes, so dtypes and static sizes survive; dynamic sizes read as their example value.
``torch.save`` / ``torch.load``, ``pickle`` (multiprocessing spawn, Ray) and ``copy.deepcopy``
all round-trip with the hooks (signature check, multi-adapter ids) in place.

**dtype casts.** Export specializes the graph to the dtypes it was captured with (casts and
``_assert_tensor_metadata`` checks are baked in), so ``gm.to(torch.bfloat16)`` used to fail deep
inside the first forward with "Tensor dtype mismatch". A cast that would change the dtype of any
frozen floating tensor of the module (the model's own weights and buffers) now raises
:class:`~peftfx.errors.TraceError` before anything is cast, saying to compile a model of that dtype. Quantization state never changes under a cast
(see :class:`~peftfx.kernels.modules.QLoRALinear`); device moves are untouched.
"""
from __future__ import annotations

import copy
import marshal
import math
import pickle
import sys
import types
from typing import Any, Callable

import torch
from torch import nn
from torch._export import non_strict_utils
from torch.fx import Graph, GraphModule, Node
from torch.fx.experimental.symbolic_shapes import SYMPY_INTERP

from peftfx.errors import TraceError

__all__ = ["install"]

# ---------------------------------------------------------------- export's closures


class _ModuleInputTypes:
    """Picklable stand-in for export's lambda hooks that (de)register nn.Module graph inputs as pytrees."""

    def __init__(self, fn: Callable[[set], None], module_types: set) -> None:
        self.fn, self.module_types = fn, module_types

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        self.fn(self.module_types)


class _GuardsForward:
    """Picklable ``forward`` of export's ``_guards_fn`` (input shape guards, a function exec'd from source).

    Pickled as its marshalled code object plus the Python version (marshal is version-specific);
    rebuilt in export's namespace (sympy helpers, ``math``, ``inf``).
    """

    def __init__(self, code: bytes, python: tuple[int, int]) -> None:
        if tuple(sys.version_info[:2]) != tuple(python):
            raise TraceError(f"this compiled module was pickled under Python {python[0]}.{python[1]} and its input "
                             f"guards cannot load under {sys.version_info[0]}.{sys.version_info[1]}; compile the "
                             "model again here and load the adapters (peftfx.load_adapters / import_peft)")
        self.code, self.python = code, tuple(python)
        fn = types.FunctionType(marshal.loads(code), {**SYMPY_INTERP, "math": math, "inf": float("inf")})
        self.fn = torch._dynamo.dont_skip_tracing(fn)

    @classmethod
    def wrap(cls, forward: Callable) -> _GuardsForward | None:
        """From export's wrapped function (None when it is not the expected shape)."""
        cells = [c.cell_contents for c in getattr(forward, "__closure__", None) or ()]
        inner = next((f for f in cells if callable(f) and getattr(f, "__name__", "") == "_"), None)
        return None if inner is None else cls(marshal.dumps(inner.__code__), tuple(sys.version_info[:2]))

    def __call__(self, *args: Any) -> None:
        return self.fn(*args)

    def __reduce__(self):
        return _GuardsForward, (self.code, self.python)


def _replace_export_lambdas(gm: GraphModule) -> None:
    """Swap ``_create_stateful_graph_module``'s lambda hooks for :class:`_ModuleInputTypes` (same keys)."""
    for hooks in (gm._forward_pre_hooks, gm._forward_hooks):
        for key, hook in list(hooks.items()):
            code = getattr(hook, "__code__", None)
            if code is None or hook.__name__ != "<lambda>" or code.co_freevars != ("module_types",):
                continue
            fn = next((getattr(non_strict_utils, n) for n in code.co_names
                       if n.endswith("_graph_inputs_of_type_nn_module")), None)
            if fn is not None:
                hooks[key] = _ModuleInputTypes(fn, hook.__closure__[0].cell_contents)
    guards = gm._modules.get("_guards_fn")
    forward = guards.__dict__.get("forward") if guards is not None else None
    if forward is not None and not isinstance(forward, _GuardsForward):
        wrapped = _GuardsForward.wrap(forward)
        if wrapped is not None:
            guards.forward = wrapped


# ---------------------------------------------------------------- graph <-> picklable state


class _NodeRef:
    """A reference to an earlier node, by name, inside pickled arguments."""

    def __init__(self, name: str) -> None:
        self.name = name


class _Op:
    """A ``torch.ops`` callable by qualified name (OpOverloads and their packets do not pickle)."""

    def __init__(self, target: Any) -> None:
        if isinstance(target, torch._ops.OpOverload):
            self.path = (target.namespace, target._opname, target._overloadname)
        elif isinstance(target, torch._ops.OpOverloadPacket):
            ns, _, name = target._qualified_op_name.partition("::")
            self.path = (ns, name)
        else:  # HigherOrderOperator
            self.path = ("higher_order", target.name())

    def resolve(self) -> Any:
        obj: Any = torch.ops
        for part in self.path:
            obj = getattr(obj, part)
        return obj


_OPS = (torch._ops.OpOverload, torch._ops.OpOverloadPacket, torch._ops.HigherOrderOperator)


def _plain_val(val: Any) -> Any:
    """Export's fake tensors / SymInts as meta tensors / ints of the example sizes (None if unknown)."""
    if isinstance(val, (list, tuple)):
        return type(val)(_plain_val(v) for v in val) if not hasattr(val, "_fields") else None
    if isinstance(val, torch.SymInt):
        return val.node.hint
    if isinstance(val, torch.Tensor):
        sizes = [s.node.hint if isinstance(s, torch.SymInt) else int(s) for s in val.shape]
        if any(s is None for s in sizes):
            return None
        return torch.empty(sizes, dtype=val.dtype, device="meta")
    return val


def _picklable(value: Any) -> bool:
    try:
        pickle.dumps(value)
    except Exception:  # noqa: BLE001 - any failure means "leave this meta entry out"
        return False
    return True


def _node_meta(node: Node) -> dict:
    meta = {}
    for key, value in node.meta.items():
        if key == "tensor_meta":  # derived from val, with SymInts
            continue
        value = _plain_val(value) if key == "val" else value
        if value is not None and _picklable(value):
            meta[key] = value
    return meta


def _graph_state(graph: Graph) -> dict:
    def enc(a: Any) -> Any:
        return _NodeRef(a.name) if isinstance(a, Node) else a

    nodes = []
    for n in graph.nodes:
        target = _Op(n.target) if isinstance(n.target, _OPS) else n.target
        nodes.append((n.op, n.name, target, torch.fx.node.map_aggregate(n.args, enc),
                      torch.fx.node.map_aggregate(n.kwargs, enc), n.type, _node_meta(n)))
    return {"nodes": nodes, "codegen": graph._codegen, "tracer_cls": graph._tracer_cls}


def _load_graph(state: dict) -> Graph:
    graph = Graph(tracer_cls=state["tracer_cls"])
    by_name: dict[str, Node] = {}

    def dec(a: Any) -> Any:
        return by_name[a.name] if isinstance(a, _NodeRef) else a

    for op, name, target, args, kwargs, type_, meta in state["nodes"]:
        target = target.resolve() if isinstance(target, _Op) else target
        node = graph.create_node(op, target, torch.fx.node.map_aggregate(args, dec),
                                 torch.fx.node.map_aggregate(kwargs, dec), name=name, type_expr=type_)
        node.meta.update(meta)
        by_name[name] = node
    graph._codegen = state["codegen"]
    return graph


# ---------------------------------------------------------------- the class overrides


def _is_per_instance(cls: type) -> bool:
    """Whether ``cls`` is GraphModule's per-instance ``GraphModuleImpl`` (its ``__name__`` is renamed)."""
    return cls.__qualname__.split(".")[-1] == "GraphModuleImpl"


def _base_class(gm: GraphModule) -> type:
    """The first class in ``gm``'s MRO that is not a per-instance ``GraphModuleImpl``."""
    return next(c for c in type(gm).__mro__ if not _is_per_instance(c))


def _rebuild(base: type, body: dict, graph: Graph | dict) -> GraphModule:
    """Inverse of :func:`_reduce`: a module of ``base``'s kind with ``body`` as its state."""
    gm = GraphModule.__new__(base)  # a fresh per-instance class, no __init__ (body holds all state)
    gm.__dict__.update(body)
    gm.graph = graph if isinstance(graph, Graph) else _load_graph(graph)  # the setter recompiles
    install(gm)
    # what torch's own GraphModule.__deepcopy__ runs on a copy (e.g. re-binding the entry points that
    # answer other keyword sets, peftfx.recapture): a rebuilt module is a copy too
    for hook in list(gm.__dict__.get("_deepcopy_hooks", ())):
        hook(gm)
    return gm


def _body(gm: GraphModule) -> dict:
    body = dict(gm.__dict__)
    del body["_graph"]
    return body


def _reduce(self: GraphModule):
    return _rebuild, (_base_class(self), _body(self), _graph_state(self.graph))


def _deepcopy(self: GraphModule, memo: dict) -> GraphModule:
    body = copy.deepcopy(_body(self), memo)
    return _rebuild(_base_class(self), body, copy.deepcopy(self.graph, memo))


def _cast_dtypes(module: nn.Module, fn: Callable) -> dict[str, tuple[torch.dtype, torch.dtype]]:
    """``{tensor name: (dtype, new dtype)}`` for the frozen floating tensors whose dtype ``fn`` would change.

    These are the model's own tensors, whose dtypes the graph was captured with. Trainable adapter
    parameters may follow a cast (fp32 LoRA on a bf16 model becomes bf16, as with PEFT), and tensors a
    module keeps through casts (its ``QUANT_STATE``) are left out. ``fn`` is probed on an empty tensor
    per (dtype, device), so nothing is cast.
    """
    probed: dict[tuple, torch.dtype] = {}
    changed = {}
    for prefix, mod in module.named_modules():
        kept = set(getattr(mod, "QUANT_STATE", ()))
        for name, t in [*mod._parameters.items(), *mod._buffers.items()]:
            if t is None or name in kept or not t.is_floating_point() or t.requires_grad:
                continue
            key = (t.dtype, t.device)
            if key not in probed:
                probed[key] = fn(torch.empty(0, dtype=t.dtype, device=t.device)).dtype
            if probed[key] != t.dtype:
                changed[f"{prefix}.{name}" if prefix else name] = (t.dtype, probed[key])
    return changed


def _apply(self: GraphModule, fn: Callable, recurse: bool = True):
    changed = _cast_dtypes(self, fn)
    if changed:
        name, (old, new) = next(iter(changed.items()))
        raise TraceError(
            f"cannot cast this compiled module to {new}: its graph was captured in {old} (e.g. {name}) and "
            f"torch.export baked that dtype into it. Cast the model before compiling "
            f"(model.to({new}); peftfx.compile(model, plan, ...)); nothing was cast")
    return super(type(self), self)._apply(fn, recurse)


def install(gm: GraphModule) -> GraphModule:
    """Make ``gm`` picklable and deep-copyable with graph, meta and hooks, and guard its dtype casts.

    Sets ``__reduce__``, ``__deepcopy__`` and ``_apply`` on ``gm``'s own per-instance class (as
    ``GraphModule.recompile`` sets ``forward`` there), so other modules are unaffected. Returns ``gm``.
    """
    _replace_export_lambdas(gm)
    cls = type(gm)
    if not _is_per_instance(cls):
        raise TypeError(f"install needs a GraphModule with its own per-instance class, got {cls.__qualname__}")
    cls.__reduce__ = _reduce
    cls.__deepcopy__ = _deepcopy
    cls._apply = _apply
    return gm
