"""fuse_linear_cross_entropy: the LM head and the loss become one op whose backward works in row chunks.

Runs after ``fuse_activations`` (whose ``cross_entropy`` rule it extends) and before ``freeze``,
for every plan. It anchors on the ``peftfx::cross_entropy`` calls that pass created (so the loss
options it accepts are exactly those: transformers' ``ForCausalLMLoss`` with its label shift,
``ignore_index``, mean or sum reduction) and walks up the loss's logits:

    logits2d = view(to(linear(hidden, weight, bias?), dtype)?, [-1, V])?     # the HF LM head + .float()
    loss     = getitem(peftfx::cross_entropy(logits2d, target, ignore_index, reduction), 0)

-> ``peftfx::linear_cross_entropy(hidden, weight, bias, target, ignore_index, reduction, dtype)``,
whose output 0 replaces the logits everywhere (the module still returns them) and output 1 the
loss. The op (:mod:`peftfx.kernels.fused_linear_ce`) saves the hidden states, not the
``[tokens, vocab]`` logits, and never materializes their gradient, so once the caller drops the
logits after the forward (``model(**batch).loss.backward()``) the largest tensors of a
small-model step are gone. Tied embeddings need nothing special: the weight is an input like any
other and its gradient accumulates into the shared parameter; a trainable head (``train_modules``)
gets its weight (and bias) gradient from the op.

Left on the ``peftfx::cross_entropy`` path, with a pass note saying why: logits that are not a
plain ``aten.linear`` (a quantized or LoRA head is a peftfx module call; soft-capped or scaled
logits), a head output read before the upcast, a view that is not a flatten to ``[N, V]``, and
logits read before the loss's targets are computed.
"""
from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule, Node
from torch.fx.experimental.symbolic_shapes import statically_known_true

import peftfx.kernels.fused_linear_ce  # noqa: F401  (registers peftfx::linear_cross_entropy)
from peftfx.graph import stamp, tensor_meta
from peftfx.pass_manager import PassContext, PassResult, register_pass
from peftfx.trace import owner_fqn

__all__ = ["fuse_linear_cross_entropy"]

aten = torch.ops.aten
_PASS = "fuse_linear_cross_entropy"
_FLATTEN = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)
_ASSERTS = (aten._assert_tensor_metadata.default,)


def _is_call(node: object, targets: tuple) -> bool:
    return isinstance(node, Node) and node.op == "call_function" and node.target in targets


def _upcast_dtype(node: Node) -> torch.dtype | None:
    """The dtype of ``aten.to.dtype(x, dtype)`` with every other option at its default, else None."""
    if not _is_call(node, (aten.to.dtype,)):
        return None
    pair = node.normalized_arguments(None, normalize_to_only_use_kwargs=True)
    if pair is None:
        return None
    kw = pair.kwargs
    if kw.get("non_blocking") or kw.get("copy") or kw.get("memory_format") is not None:
        return None
    return kw["dtype"]


def _head(ce: Node) -> dict | str:
    """The head chain under a ``peftfx::cross_entropy`` call, or why it is not fusable."""
    logits2d, target, ignore_index, reduction = ce.args
    node, flat = logits2d, None
    if _is_call(node, _FLATTEN):
        flat, node = node, node.args[0]
        src, out = tensor_meta(node) if isinstance(node, Node) else None, tensor_meta(flat)
        if src is None or out is None or src.dim() < 1 or out.dim() != 2 \
                or not statically_known_true(src.shape[-1] == out.shape[-1]):
            return "the logits' view is not a flatten of [..., V] to [N, V]"
        if len(flat.users) > 1:
            return "the flattened logits are read by more than the loss"
    upcast, dtype = None, None
    if isinstance(node, Node) and _upcast_dtype(node) is not None:
        upcast, dtype, node = node, _upcast_dtype(node), node.args[0]
    if isinstance(node, Node) and node.op == "call_module":
        return f"the logits come from module {node.target} (a quantized or LoRA head): they stay materialized"
    if not _is_call(node, (aten.linear.default,)):
        what = node.target if isinstance(node, Node) else type(node).__name__
        return f"the logits are not an LM head's aten.linear output ({getattr(what, '__name__', what)})"
    hidden, weight, *rest = node.args
    bias = rest[0] if rest else node.kwargs.get("bias")
    h = tensor_meta(hidden) if isinstance(hidden, Node) else None
    w = tensor_meta(weight) if isinstance(weight, Node) else None
    if h is None or w is None or w.dim() != 2 or h.dtype != w.dtype or not h.dtype.is_floating_point:
        return "the head's hidden states and weight are not float tensors of one dtype"
    readers = [u for u in node.users if u.target not in _ASSERTS]
    if upcast is not None and readers != [upcast]:
        return "the head's output is read before the upcast"
    if dtype == h.dtype:
        dtype = None  # a no-op .to(): the op returns the linear's output itself
    logits = upcast or node
    return {"linear": node, "upcast": upcast, "flat": flat, "logits": logits, "hidden": hidden, "weight": weight,
            "bias": bias, "target": target, "ignore_index": ignore_index, "reduction": reduction, "dtype": dtype}


def _fuse(gm: GraphModule, ce: Node, order: dict[Node, int]) -> Node | str:
    found = _head(ce)
    if isinstance(found, str):
        return found
    graph, logits, flat = gm.graph, found["logits"], found["flat"]
    # the op goes where the loss was (its targets are ready there): no other reader may come earlier
    if any(u is not flat and u.op != "output" and order[u] < order[ce] for u in logits.users):
        return "the logits are read before the loss's targets are computed"
    args = (found["hidden"], found["weight"], found["bias"], found["target"], found["ignore_index"],
            found["reduction"], found["dtype"])
    fqn = owner_fqn(found["linear"])
    with graph.inserting_before(ce):
        call = graph.call_function(torch.ops.peftfx.linear_cross_entropy.default, args)
        new_logits = graph.call_function(operator.getitem, (call, 0))
    stamp(call, _PASS, fqn, like=logits)
    stamp(new_logits, _PASS, fqn, like=logits)
    outs = {0: new_logits}
    for user in list(ce.users):  # getitem(cross_entropy, i): loss (0), total_weight (1)
        with graph.inserting_before(user):
            outs[user.args[1] + 1] = graph.call_function(operator.getitem, (call, user.args[1] + 1))
        stamp(outs[user.args[1] + 1], _PASS, fqn, like=user)
        user.replace_all_uses_with(outs[user.args[1] + 1])
        graph.erase_node(user)
    call.meta.pop("val", None)  # stamp copied the logits' value; the op returns three
    if "val" in logits.meta and isinstance(ce.meta.get("val"), tuple):
        call.meta["val"] = (logits.meta["val"], *ce.meta["val"])
    logits.replace_all_uses_with(new_logits)
    graph.erase_node(ce)
    if flat is not None and not flat.users:
        graph.erase_node(flat)
    if found["upcast"] is not None:
        graph.erase_node(found["upcast"])
    for user in list(found["linear"].users):  # export's dtype asserts on the head's output
        graph.erase_node(user)
    graph.erase_node(found["linear"])
    return call


def _describe(call: Node) -> str:
    _, _, bias, _, ignore_index, reduction, dtype = call.args
    upcast = "" if dtype is None else f", logits {str(dtype).removeprefix('torch.')}"
    return f"linear_cross_entropy({reduction}, ignore_index={ignore_index}, bias={bias is not None}{upcast})"


@register_pass("*", after=("fuse_activations",), before=("freeze",))
def fuse_linear_cross_entropy(gm: GraphModule, ctx: PassContext) -> PassResult:
    """Fuse the LM head into the loss: peftfx::linear_cross_entropy saves no [tokens, vocab] tensor."""
    fused = 0
    for ce in [n for n in gm.graph.nodes if _is_call(n, (torch.ops.peftfx.cross_entropy.default,))]:
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        result = _fuse(gm, ce, order)
        site = ce.name if isinstance(result, str) else result.name
        module = owner_fqn(result if isinstance(result, Node) else ce) or "<root>"
        if isinstance(result, Node):
            fused += 1
            ctx.note(site=site, module=module, fused=_describe(result))
        else:
            ctx.note(site=site, module=module, refused="linear_cross_entropy", reason=result)
    ctx.note(fused_linear_cross_entropy=fused)
    return PassResult(gm, bool(fused))
