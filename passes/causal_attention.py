"""causal_attention: SDPA calls use the causal kernel when their mask turns out to be the causal one.

Every ``aten.scaled_dot_product_attention`` node with a mask and ``is_causal=False`` becomes a call
of :func:`peftfx.kernels.causal_attention.scaled_dot_product_attention` with the same arguments,
which checks the mask on each call and drops it for ``is_causal=True`` when it is exactly the
lower triangle (see that module: a compiled decoder otherwise materializes a float ``[B, 1, S, S]``
mask per call and computes the masked half of the scores, which eager transformers does not).
Any other mask (padding, prefixes, sliding windows, decode steps) runs as before, so outputs and
gradients are unchanged. The node records whether its mask depends on input data or only on sizes
(``size_only_mask``), which decides the path on fake tensors (the memory estimate).

Runs for every plan (section ``*``) after the passes that edit attention (prefix and prompt
tuning) and before ``freeze``.
"""
from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from peftfx.kernels.causal_attention import scaled_dot_product_attention
from peftfx.pass_manager import PassContext, PassResult, register_pass

__all__ = ["causal_attention", "is_sdpa"]

_SDPA = torch.ops.aten.scaled_dot_product_attention.default


def is_sdpa(node: Node) -> bool:
    """``node`` calls scaled-dot-product attention (aten's, or this pass's stand-in)."""
    return node.op == "call_function" and node.target in (_SDPA, scaled_dot_product_attention)


def _size_only(mask: Node) -> bool:
    """No placeholder holding a tensor feeds ``mask``: it is computed from sizes alone."""
    seen, todo = set(), [mask]
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        val = n.meta.get("val")
        if isinstance(val, (torch.SymInt, int)) and n is not mask:
            continue  # a size (of the input ids, ...): sizes are allowed
        if n.op == "placeholder" and isinstance(val, torch.Tensor):
            return False
        todo.extend(n.all_input_nodes)
    return True


@register_pass("*", after=("swap_linear", "prefix_tuning", "prompt_tuning", "bottleneck"), before=("freeze",))
def causal_attention(gm: GraphModule, ctx: PassContext) -> PassResult:
    """SDPA with an exactly-causal mask runs as is_causal (checked per call; other masks as before)."""
    changed = 0
    for node in list(gm.graph.nodes):
        if not (node.op == "call_function" and node.target == _SDPA) or "peftfx.prefix" in node.meta:
            continue  # prefix tuning's calls attend over P more keys than queries: never causal-square
        pair = node.normalized_arguments(gm, normalize_to_only_use_kwargs=True)
        kwargs = dict(pair.kwargs) if pair is not None else None
        if not kwargs or not isinstance(kwargs.get("attn_mask"), Node) or kwargs.get("is_causal") is not False:
            continue
        kwargs["size_only_mask"] = _size_only(kwargs["attn_mask"])
        node.target, node.args, node.kwargs = scaled_dot_product_attention, (), kwargs
        changed += 1
        ctx.note(node=node.name, size_only_mask=kwargs["size_only_mask"])
    return PassResult(gm, changed > 0)
