"""Pass-agnostic graph helpers: find nodes, swap in a submodule, stamp provenance."""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn
from torch.fx import GraphModule, Node

__all__ = [
    "PASS_KEY",
    "SOURCE_KEY",
    "stamp",
    "set_submodule",
    "get_attr_value",
    "delete_attr",
    "attr_users",
    "call_function_nodes",
    "unique_attr_name",
]

PASS_KEY = "peftfx.pass"
SOURCE_KEY = "peftfx.source_fqn"


def stamp(node: Node, pass_name: str, source_fqn: str | None, *, like: Node | None = None) -> Node:
    """Record which pass created ``node`` and for which source module; copy ``like``'s meta first."""
    if like is not None:
        for key, value in like.meta.items():
            node.meta.setdefault(key, value)
    node.meta[PASS_KEY] = pass_name
    node.meta[SOURCE_KEY] = source_fqn
    return node


def set_submodule(gm: GraphModule, fqn: str, module: nn.Module) -> None:
    """Install ``module`` at dotted ``fqn``, replacing whatever (module or placeholder) is there."""
    parent_name, _, leaf = fqn.rpartition(".")
    if parent_name:
        try:
            parent = gm.get_submodule(parent_name)
        except AttributeError:
            gm.add_submodule(fqn, module)
            return
    else:
        parent = gm
    if leaf in parent._modules:
        parent._modules[leaf] = module
    else:
        # an export placeholder module may hold the old weight as a parameter of that name
        if hasattr(parent, leaf):
            delattr(parent, leaf)
        parent.add_module(leaf, module)


def get_attr_value(gm: GraphModule, target: str) -> Any:
    """The tensor or module a ``get_attr`` target names."""
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def delete_attr(gm: GraphModule, target: str) -> None:
    """Remove a parameter/buffer/attribute at dotted ``target`` so its storage can be freed."""
    parent_name, _, leaf = target.rpartition(".")
    parent = gm.get_submodule(parent_name) if parent_name else gm
    if leaf in parent._parameters:
        del parent._parameters[leaf]
    elif leaf in parent._buffers:
        del parent._buffers[leaf]
    elif hasattr(parent, leaf):
        delattr(parent, leaf)


def attr_users(gm: GraphModule, target: str) -> list[Node]:
    """Every node that reads the ``get_attr`` ``target``."""
    users: list[Node] = []
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.target == target:
            users.extend(node.users)
    return users


def call_function_nodes(gm: GraphModule, targets: Iterable[Any]) -> list[Node]:
    """``call_function`` nodes whose target is one of ``targets``, in graph order."""
    wanted = set(targets)
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in wanted]


def unique_attr_name(gm: GraphModule, base: str) -> str:
    """``base`` or ``base_1``, ``base_2``... whichever names nothing on ``gm`` yet."""
    name, k = base, 1
    while True:
        try:
            get_attr_value(gm, name)
        except AttributeError:
            return name
        name, k = f"{base}_{k}", k + 1


def tensor_meta(node: Node) -> torch.Tensor | None:
    """The fake tensor export recorded for ``node`` (shape/dtype), if any."""
    val = node.meta.get("val")
    return val if isinstance(val, torch.Tensor) else None
