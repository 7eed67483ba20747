"""fuse_activations: gated-MLP products and the loss become ops that save less for backward.

Two rules over the aten graph, each matched exactly and otherwise left alone:

* ``mul(act(gate), up)`` (either operand order) with ``act`` = ``aten.silu`` or ``aten.gelu``
  (``approximate`` none or tanh), the activation's output read by this ``mul`` only, gate and up of
  one static shape and float dtype -> ``peftfx::act_mul(gate, up, act)``: saves gate and up, not
  act(gate) as well (one ``[tokens, intermediate]`` tensor less per gated MLP).
* ``aten.cross_entropy_loss(logits, target)`` with weight None, label_smoothing 0 and reduction
  mean or sum, and ``nll_loss_nd`` / ``nll_loss`` of ``log_softmax(logits, 1 | -1)`` (dtype None,
  read by the loss only) under the same conditions, logits ``[N, C]`` float, target ``[N]`` int64
  -> ``getitem(peftfx::cross_entropy(logits, target, ignore_index, reduction), 0)``: saves the
  logits, not log_softmax's ``[N, C]`` output, and its backward works in row chunks.

Both ops (:mod:`peftfx.kernels.fused_ops`) run the replaced aten ops themselves, so the compiled
module's outputs and gradients are bitwise those without this pass. A cross-entropy call refused
for an option the op does not implement (weights, label smoothing, reduction none, N-d logits) is
reported in the pass notes. The pass runs for every plan (section ``*``) after the adapter passes;
a second run finds nothing left to fuse.
"""
from __future__ import annotations

import operator
from typing import Callable, NamedTuple

import torch
from torch.fx import Graph, GraphModule, Node
from torch.fx.experimental.symbolic_shapes import statically_known_true

import peftfx.kernels.fused_ops  # noqa: F401  (registers peftfx::act_mul and peftfx::cross_entropy)
from peftfx.graph import stamp, tensor_meta
from peftfx.pass_manager import PassContext, PassResult, register_pass
from peftfx.trace import owner_fqn

__all__ = ["fuse_activations", "RULES"]

aten = torch.ops.aten
_PASS = "fuse_activations"
_REDUCTIONS = {1: "mean", 2: "sum"}  # aten's Reduction enum; 0 (none) is not fused
_LOG_SOFTMAX = (aten.log_softmax.int, aten._log_softmax.default)
_NLL = (aten.nll_loss_nd.default, aten.nll_loss.default)


def _kwargs(node: Node) -> dict | None:
    """``node``'s arguments by schema name, defaults filled in (None when they do not bind)."""
    pair = node.normalized_arguments(None, normalize_to_only_use_kwargs=True)
    return None if pair is None else dict(pair.kwargs)


def _same_static_shape(a: torch.Tensor, b: torch.Tensor) -> bool:
    # symbolic (dynamic batch/sequence) sizes compare without adding guards to export's shape env
    return a.dim() == b.dim() and all(statically_known_true(x == y) for x, y in zip(a.shape, b.shape))


# ------------------------------------------------------------------------------------------ act_mul
def _activation(node: object) -> tuple[str, object] | None:
    """``(name, input)`` when ``node`` is ``aten.silu`` / ``aten.gelu`` (none or tanh), else None."""
    if not isinstance(node, Node) or node.op != "call_function" \
            or node.target not in (aten.silu.default, aten.gelu.default):
        return None
    kw = _kwargs(node)
    if kw is None:
        return None
    if node.target == aten.silu.default:
        return "silu", kw["input"]
    name = {"none": "gelu", "tanh": "gelu_tanh"}.get(kw["approximate"])
    return None if name is None else (name, kw["input"])


def _fuse_act_mul(graph: Graph, node: Node) -> Node | str | None:
    """``mul(act(gate), up)`` -> ``peftfx::act_mul(gate, up, act)``."""
    if len(node.args) != 2 or node.kwargs:
        return None
    for act_node, up in (node.args, node.args[::-1]):
        found = _activation(act_node)
        if found is None or not isinstance(up, Node) or up is act_node or len(act_node.users) != 1:
            continue
        act, gate = found
        g, u = tensor_meta(gate) if isinstance(gate, Node) else None, tensor_meta(up)
        # no broadcasting and no dtype promotion: then act(gate) * up is exactly what the op computes
        if g is None or u is None or g.dtype != u.dtype or not g.dtype.is_floating_point \
                or not _same_static_shape(g, u):
            continue
        with graph.inserting_before(node):
            fused = graph.call_function(torch.ops.peftfx.act_mul.default, (gate, up, act))
        stamp(fused, _PASS, owner_fqn(node), like=node)
        node.replace_all_uses_with(fused)
        graph.erase_node(node)
        graph.erase_node(act_node)
        return fused
    return None


# ------------------------------------------------------------------------------------ cross_entropy
def _loss_operands(node: Node) -> tuple[Node, Node, dict, list[Node]] | str | None:
    """(logits, target, options, nodes to erase) of a cross-entropy loss node, a refusal, or None."""
    kw = _kwargs(node)
    if kw is None:
        return None
    if node.target == aten.cross_entropy_loss.default:
        logits, dead = kw["input"], [node]
        if kw.get("label_smoothing", 0.0) != 0.0:
            return f"label_smoothing={kw['label_smoothing']}"
    else:  # nll_loss(log_softmax(logits, class dim)): log_softmax must feed the loss only
        lsm = kw["input"]
        if not isinstance(lsm, Node) or lsm.op != "call_function" or lsm.target not in _LOG_SOFTMAX \
                or len(lsm.users) != 1:
            return None
        lkw = _kwargs(lsm)
        if lkw is None or lkw.get("dtype") is not None or lkw.get("half_to_float", False):
            return None
        logits, dead = lkw["input"], [node, lsm]
        val = tensor_meta(logits) if isinstance(logits, Node) else None
        if val is None or val.dim() != 2 or lkw["dim"] not in (1, -1):
            return "log_softmax not over the class dim of 2-D logits"
    if kw.get("weight") is not None:
        return "class weights"
    if kw.get("reduction") not in _REDUCTIONS:
        return f"reduction={kw.get('reduction')} (none)"
    if not isinstance(kw.get("ignore_index"), int):
        return f"ignore_index={kw.get('ignore_index')} (not a constant)"
    target = kw["target"]
    x = tensor_meta(logits) if isinstance(logits, Node) else None
    t = tensor_meta(target) if isinstance(target, Node) else None
    if x is None or t is None or x.dim() != 2 or not x.dtype.is_floating_point or t.dim() != 1 \
            or t.dtype != torch.long:
        return "logits not [N, C] float with int64 [N] targets"
    return logits, target, {"ignore_index": kw["ignore_index"], "reduction": _REDUCTIONS[kw["reduction"]]}, dead


def _fuse_cross_entropy(graph: Graph, node: Node) -> Node | str | None:
    """``cross_entropy_loss`` / ``nll_loss(log_softmax)`` -> ``peftfx::cross_entropy(...)[0]``."""
    found = _loss_operands(node)
    if not isinstance(found, tuple):
        return found
    logits, target, opts, dead = found
    with graph.inserting_before(node):
        call = graph.call_function(torch.ops.peftfx.cross_entropy.default,
                                   (logits, target, opts["ignore_index"], opts["reduction"]))
        loss = graph.call_function(operator.getitem, (call, 0))
    fqn = owner_fqn(node)
    stamp(loss, _PASS, fqn, like=node)
    stamp(call, _PASS, fqn, like=node)
    if tensor_meta(node) is not None:  # (loss, total_weight): two scalars of the logits' dtype
        call.meta["val"] = (node.meta["val"], node.meta["val"])
    node.replace_all_uses_with(loss)
    for n in dead:
        graph.erase_node(n)
    return loss


def _describe(node: Node) -> str:
    """``act_mul(silu)`` / ``cross_entropy(mean, ignore_index=-100)`` for a node the rules created."""
    if node.target is operator.getitem:
        _, _, ignore_index, reduction = node.args[0].args
        return f"cross_entropy({reduction}, ignore_index={ignore_index})"
    return f"act_mul({node.args[2]})"


# ------------------------------------------------------------------------------------------- rules
class Rule(NamedTuple):
    name: str
    anchors: tuple  # the op of the pattern's last node: the one the rewrite replaces
    rewrite: Callable[[Graph, Node], "Node | str | None"]  # new node, a refusal reason, or None


RULES = (
    Rule("act_mul", (aten.mul.Tensor,), _fuse_act_mul),
    Rule("cross_entropy", (aten.cross_entropy_loss.default, *_NLL), _fuse_cross_entropy),
)


# after every pass that inserts modules (their activations are fused too), before freeze
@register_pass("*", after=("swap_linear", "prefix_tuning", "prompt_tuning", "bottleneck"), before=("freeze",))
def fuse_activations(gm: GraphModule, ctx: PassContext) -> PassResult:
    """Fuse act(gate)*up into peftfx::act_mul and the cross-entropy loss into peftfx::cross_entropy."""
    graph = gm.graph
    counts = {rule.name: 0 for rule in RULES}
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        for rule in RULES:
            if node.target not in rule.anchors:
                continue
            result = rule.rewrite(graph, node)
            if isinstance(result, Node):
                counts[rule.name] += 1
                ctx.note(site=result.name, module=owner_fqn(result) or "<root>", fused=_describe(result))
            elif isinstance(result, str):
                ctx.note(site=node.name, module=owner_fqn(node) or "<root>", refused=rule.name, reason=result)
            break
    ctx.note(**{f"fused_{k}": v for k, v in counts.items()})
    return PassResult(gm, any(counts.values()))
