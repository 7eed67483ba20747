"""Turn a plan's globs / regexes / rules into the graph's linear sites, with near-miss reporting.

A *linear site* is every graph node that computes one module's linear map:

* ``aten.linear(x, W[out,in], b)`` for ``nn.Linear``;
* ``aten.addmm(b, x2d, W[in,out])`` for GPT-2's ``Conv1D`` (weight stored transposed).

Sites are grouped by the owning module's name (from export's ``nn_module_stack``), so a module
called twice is swapped once and both calls go through the new module.
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field

import torch
from torch.fx import GraphModule, Node

from peftfx.errors import PlanError
from peftfx.plan import match
from peftfx.trace import owner_stack

__all__ = ["LINEAR_TYPES", "BLOCK_PATTERN", "block_of", "LinearSite", "Target", "find_linear_sites", "resolve_targets"]

aten = torch.ops.aten
# Class names of the modules whose weight is a linear map peftfx can quantize and adapt (GPT-2's
# Conv1D stores it transposed; MultiheadAttention's out_proj is a NonDynamicallyQuantizableLinear).
LINEAR_TYPES = ("Linear", "Conv1D", "NonDynamicallyQuantizableLinear")
# A repeated transformer block in a parameter/module name: ``<stack>.<index>.`` where the stack is
# ``layers`` / ``layer`` / ``h`` / ``block`` / ``blocks``. The prefix before the stack is matched
# lazily from the left, so the OUTERMOST stack wins (``h.0.attn.layers.1.`` is block 0 of ``h``).
BLOCK_PATTERN = re.compile(r"^((?:.*?\.)??(?:layers|layer|h|block|blocks))\.(\d+)\.")


def block_of(name: str) -> tuple[str, int] | None:
    """``(stack, index)`` of the outermost block ``name`` lives in, e.g. ``("model.layers", 3)`` for
    ``model.layers.3.mlp.down_proj`` (a trailing ``.`` is implied), or None outside any block."""
    m = BLOCK_PATTERN.match(name if name.endswith(".") else name + ".")
    return (m.group(1), int(m.group(2))) if m else None


@dataclass
class LinearSite:
    """One module's linear map as it appears in the graph.

    Attributes:
        fqn: module name as PEFT spells it (``model.layers.0.self_attn.q_proj``).
        nodes: the ``aten.linear`` / ``aten.addmm`` nodes computing it (several if called twice).
        kind: ``"linear"`` (weight [out, in]) or ``"addmm"`` (Conv1D, weight [in, out]).
        weight_attr / bias_attr: ``get_attr`` targets of the weight and bias (bias may be None).
    """

    fqn: str
    kind: str
    weight_attr: str
    bias_attr: str | None
    nodes: list[Node] = field(default_factory=list)


@dataclass
class Target:
    """A site the plan selected, with the quant / LoRA specs that apply to it after rules."""

    site: LinearSite
    quant: object | None
    lora: object | None


def _owner_linear(node: Node) -> str | None:
    for fqn, typ in reversed(owner_stack(node)):
        if typ.rsplit(".", 1)[-1] in LINEAR_TYPES:
            return fqn
    return None


def _attr_target(arg: object) -> str | None:
    return arg.target if isinstance(arg, Node) and arg.op == "get_attr" else None


def find_linear_sites(gm: GraphModule) -> dict[str, LinearSite]:
    """Every linear/Conv1D computation with a frozen-able weight, keyed by module name."""
    sites: dict[str, LinearSite] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target == aten.linear.default:
            weight = _attr_target(node.args[1])
            bias_arg = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
            bias = _attr_target(bias_arg)
            if weight is None or (bias_arg is not None and bias is None):
                continue  # weight computed in-graph (e.g. tied + transformed): not a frozen linear
            kind = "linear"
        elif node.target == aten.addmm.default and not node.kwargs:
            weight, bias = _attr_target(node.args[2]), _attr_target(node.args[0])
            if weight is None or bias is None:
                continue
            kind = "addmm"
        else:
            continue
        fqn = _owner_linear(node) or weight.rsplit(".", 1)[0]
        site = sites.get(fqn)
        if site is None:
            site = sites[fqn] = LinearSite(fqn=fqn, kind=kind, weight_attr=weight, bias_attr=bias)
        elif site.weight_attr != weight or site.kind != kind:
            continue  # same owner, different weight: leave the odd one alone
        site.nodes.append(node)
    return sites


def _closest(pattern: str, names: list[str], n: int = 3) -> list[str]:
    """Module names closest to ``pattern`` (whole names and last components both tried)."""
    core = pattern[3:] if pattern.startswith("re:") else pattern.replace("*", "").strip(".")
    last = {name.rsplit(".", 1)[-1]: name for name in names}
    close = difflib.get_close_matches(core, list(last), n=n, cutoff=0.4)
    close_full = difflib.get_close_matches(pattern, names, n=n, cutoff=0.3)
    out = [last[c] for c in close] + close_full
    return list(dict.fromkeys(out))[:n] or names[:n]


def resolve_targets(gm: GraphModule, plan) -> list[Target]:
    """Apply the plan's patterns and rules to the graph's linear sites.

    Raises:
        PlanError: the plan selects no linear layer while it has quant/lora sections, or some
            pattern matches nothing (naming the pattern and the closest module names).
    """
    if plan.quant is None and plan.lora is None and not plan.rules:
        return []
    sites = find_linear_sites(gm)
    names = list(sites)
    if not names:
        raise PlanError("the model has no linear layers (aten.linear / Conv1D addmm) to quantize or adapt")
    unmatched = []
    for pattern, where in plan.all_patterns():
        if not any(match(pattern, name) for name in names):
            unmatched.append((pattern, where))
    targets = []
    for name, site in sites.items():
        resolved = plan.resolve(name)
        if resolved is None or (resolved.quant is None and resolved.lora is None):
            continue
        targets.append(Target(site=site, quant=resolved.quant, lora=resolved.lora))
    if unmatched:
        lines = [
            f"  {pattern!r} (from {where}) matched no linear layer; closest: {', '.join(_closest(pattern, names))}"
            for pattern, where in unmatched
        ]
        head = "the plan matches no linear layer" if not targets else "some plan patterns match nothing"
        raise PlanError(
            f"{head}:\n" + "\n".join(lines) + f"\n  ({len(names)} linear layers, e.g. {', '.join(names[:4])}); "
            "fix the pattern (fnmatch glob like '*.q_proj', a bare name like 'q_proj', or 're:<regex>')"
        )
    if not targets:
        raise PlanError(f"the plan matches no linear layer; linear layers are e.g. {', '.join(names[:6])}")
    return targets
