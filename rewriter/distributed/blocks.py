"""Outline each transformer block of a compiled graph into a submodule the root graph calls.

torch.export flattens a model into one graph: block ``model.layers.3``'s parameters are read by
``get_attr`` nodes of the *root* graph and its linears are ``call_module`` nodes of the root, so
the block module itself is never called. Tools that act on module calls (FSDP2's ``fully_shard``
per block, activation checkpointing, per-block hooks) then see nothing to hook.

:func:`outline_blocks` moves the nodes of each block into a ``GraphModule`` registered *at the
block's own path* (``model.layers.3``), holding the block's original children, and replaces them
in the root graph by one ``call_module`` node. The block graph reads its parameters by their
relative names (``self_attn.q_proj``, ``input_layernorm.weight``), so every parameter and buffer
keeps its fully qualified name (``model.layers.3.self_attn.q_proj.lora_A``) and the same tensor
object: state dicts, adapter files and optimizer names do not change. The ops are the same, in
the same order, so outputs and gradients are bitwise those of the flat graph. The root keeps its
pytree codegen (call signature and output structure), since only its graph body is edited.

A node belongs to block ``P`` (``model.layers.3``) when its ``get_attr``/``call_module`` target
lies under ``P.``, or, for other ops, when its owning module (``nn_module_stack``) does. Outlining
a block is only done when it is exact; otherwise nothing is changed and the reason is returned:

* a block parameter is read outside the block (a tied weight): the block could not own it;
* the block's nodes are not convex: some node between two of its nodes consumes one of its
  results and feeds it back (blocks interleaved or called out of order).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

from torch import nn
from torch.fx import Graph, GraphModule, Node

from peftfx.graph import set_submodule
from peftfx.targets import block_of
from peftfx.trace import owner_fqn

__all__ = ["OutlineResult", "block_prefixes", "outline_blocks", "owned_nodes", "check_region", "outline_region"]


@dataclass
class OutlineResult:
    """What :func:`outline_blocks` did.

    Attributes:
        blocks: block paths now called as submodules, in call order (``["model.layers.0", ...]``).
        reason: why nothing was outlined (empty when ``blocks`` is set or there are no blocks).
        found: block paths found in the parameter names, outlined or not.
    """

    blocks: list[str] = field(default_factory=list)
    reason: str = ""
    found: list[str] = field(default_factory=list)


def block_prefixes(gm: nn.Module) -> list[str]:
    """Paths of the blocks of every block stack (``model.layers.0`` .. ``model.layers.N``; T5's
    ``encoder.block.N`` and ``decoder.block.N``), outermost stacks only, sorted by stack and index."""
    stacks: dict[str, set[int]] = {}
    for name in [n for n, _ in gm.named_parameters()] + [n for n, _ in gm.named_buffers()]:
        if (block := block_of(name)) is not None:
            stacks.setdefault(block[0], set()).add(block[1])
    return [f"{stack}.{i}" for stack in sorted(stacks) for i in sorted(stacks[stack])]


def _under(name: str | None, prefix: str) -> bool:
    return name is not None and (name == prefix or name.startswith(prefix + "."))


def _block_of(node: Node, prefixes: list[str]) -> str | None:
    """The block ``node`` belongs to, or None (root code: embeddings, masks, RoPE tables, head)."""
    if node.op in ("placeholder", "output"):
        return None
    name = node.target if node.op in ("get_attr", "call_module") else owner_fqn(node)
    if not isinstance(name, str):
        return None
    for p in prefixes:
        if _under(name, p):
            return p
    return None


def owned_nodes(graph: Graph, prefix: str) -> list[Node]:
    """The nodes of ``graph`` that belong to module ``prefix`` (by target or owning module), in graph order."""
    return [n for n in graph.nodes if _block_of(n, [prefix]) is not None]


def check_region(graph: Graph, prefix: str, members: list[Node]) -> str:
    """Empty if ``members`` (graph order) can become one call of module ``prefix``, else why not."""
    member_set = set(members)
    for n in members:
        if n.op == "call_module" and n.target == prefix:
            return f"{prefix} is both called as a module and read piecewise by the graph"
        if n.op == "get_attr":
            outside = [u.name for u in n.users if u not in member_set]
            if outside:
                return f"{n.target} is read outside its block (by {', '.join(outside[:3])}; a tied weight?)"
    body = [n for n in members if n.op != "get_attr"]
    if not body:
        return f"{prefix} has no ops in the graph"
    order = {n: i for i, n in enumerate(graph.nodes)}
    first, last = order[body[0]], order[body[-1]]
    for n in graph.nodes:
        i = order[n]
        if first < i < last and n not in member_set:
            fed = [a.name for a in n.all_input_nodes if a in member_set]
            if fed:
                return (f"{prefix} is not contiguous: {n.name} (outside the block) uses its {', '.join(fed[:3])} "
                        f"between the block's own ops")
    return ""


def outline_region(gm: GraphModule, prefix: str, members: list[Node]) -> Node:
    """Replace ``members`` (graph order, checked by :func:`check_region`) by ``call_module(prefix, inputs)``.

    The members become a ``GraphModule`` registered at ``prefix`` that holds the module's original
    children, parameters and buffers; its placeholders are the members' outside inputs in first-use
    order (the call node's ``args``). Returns the call node.
    """
    graph = gm.graph
    member_set = set(members)
    inputs: list[Node] = []
    for n in members:
        for a in n.all_input_nodes:
            if a not in member_set and a not in inputs:
                inputs.append(a)
    outputs = [n for n in members if any(u not in member_set for u in n.users)]

    sub = Graph()
    env: dict[Node, Node] = {}
    for a in inputs:
        ph = sub.placeholder(a.name)
        ph.meta.update({k: v for k, v in a.meta.items() if k in ("val", "tensor_meta")})
        env[a] = ph
    cut = len(prefix) + 1
    for n in members:
        new = sub.node_copy(n, lambda x: env[x])
        if n.op in ("get_attr", "call_module"):
            new.target = n.target[cut:]  # relative to the block: the FQN through the root is unchanged
        env[n] = new
    sub.output(env[outputs[0]] if len(outputs) == 1 else tuple(env[o] for o in outputs))
    sub.lint()

    old = gm.get_submodule(prefix)
    block = GraphModule(old, sub, class_name=type(old).__name__ if type(old) is not nn.Module else "Block")
    # GraphModule copied only what the graph names, re-creating intermediate modules; put the
    # original children, parameters and buffers back (same objects, same order): nothing that
    # was in the state dict disappears and every tensor keeps its identity.
    for attr in ("_modules", "_parameters", "_buffers"):
        getattr(block, attr).clear()
        getattr(block, attr).update(getattr(old, attr))
    block._non_persistent_buffers_set = set(old._non_persistent_buffers_set)
    block.train(old.training)

    body = [n for n in members if n.op != "get_attr"]
    with graph.inserting_after(body[-1]):
        call = graph.call_module(prefix, tuple(inputs))
    call.meta["nn_module_stack"] = {prefix: (prefix, type(old))}
    vals = [o.meta.get("val") for o in outputs]  # shapes for whoever reads the root graph next
    call.meta["val"] = vals[0] if len(vals) == 1 else tuple(vals)
    call.meta["peftfx.pass"] = "outline_blocks"
    replacements = [call]
    if len(outputs) > 1:
        replacements = []
        for i in range(len(outputs)):
            with graph.inserting_after(replacements[-1] if replacements else call):
                replacements.append(graph.call_function(operator.getitem, (call, i)))
    for o, r in zip(outputs, replacements):
        o.replace_all_uses_with(r, delete_user_cb=lambda u: u not in member_set)
    for n in reversed(members):
        graph.erase_node(n)
    set_submodule(gm, prefix, block)
    return call


def outline_blocks(gm: GraphModule) -> OutlineResult:
    """Make every block of ``gm``'s block stack a called submodule, in place (all or nothing).

    Idempotent: blocks that are already ``GraphModule`` submodules called from the root are left
    as they are. Checks every block before editing anything, so on failure ``gm`` is unchanged.

    Args:
        gm: a compiled model (``peftfx.compile``'s GraphModule).

    Returns:
        :class:`OutlineResult`: the blocks now called as submodules, or the reason none are.
    """
    prefixes = block_prefixes(gm)
    result = OutlineResult(found=prefixes)
    if not prefixes:
        result.reason = "no block stack (model.layers.N, h.N, ...) in the parameter names"
        return result
    graph = gm.graph
    members: dict[str, list[Node]] = {p: [] for p in prefixes}
    for n in graph.nodes:
        p = _block_of(n, prefixes)
        if p is not None:
            members[p].append(n)
    # a block the root already calls as a whole (outlined before, or a leaf module such as a
    # swapped linear) and never reads otherwise needs nothing
    done = [p for p in prefixes if members[p] and all(n.op == "call_module" and n.target == p for n in members[p])]
    todo = [p for p in prefixes if p not in done]
    for p in todo:
        reason = check_region(graph, p, members[p])
        if reason:
            result.reason = reason
            return result
    for p in todo:
        outline_region(gm, p, members[p])
    graph.lint()
    gm.recompile()
    order = {n.target: i for i, n in enumerate(graph.nodes) if n.op == "call_module"}
    result.blocks = sorted(prefixes, key=lambda p: order.get(p, -1))
    return result
