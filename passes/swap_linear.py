"""swap_linear: targeted ``aten.linear`` / Conv1D ``aten.addmm`` nodes become calls to a
``QLoRALinear`` registered under the original module name, so state-dict keys read like PEFT's
(``model.layers.0.self_attn.q_proj.lora_A``).

The module variant comes from a dispatch table (first match wins, as PEFT's ``dispatch_*``):
dense base + LoRA, NF4/FP4 + LoRA, int8 / int8-zeropoint + LoRA, LLM.int8 + LoRA; a target with
``quant`` and no ``lora`` is quantized and frozen only. Quantization happens here, layer by layer,
and each quantized layer's full-precision weight is released as soon as its module exists, so the
peak is the model plus one layer's quantized copy.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.fx import GraphModule

from peftfx.graph import attr_users, delete_attr, get_attr_value, set_submodule, stamp, unique_attr_name
from peftfx.kernels import quantizer
from peftfx.kernels.modules import QLoRALinear
from peftfx.pass_manager import PassContext, PassResult, register_pass, shared_module
from peftfx.targets import Target, resolve_targets

__all__ = ["swap_linear", "build_module", "quantized_weight"]


def _dense_weight(gm: GraphModule, target: Target, materialize: Callable | None = None) -> torch.Tensor:
    """The site's weight as [out, in] (Conv1D stores it [in, out]).

    ``materialize`` (``peftfx.load``'s weight source) turns a placeholder weight into the real
    one read from disk, so only the layer being quantized is ever dense in memory.
    """
    weight = get_attr_value(gm, target.site.weight_attr).detach()
    if materialize is not None:
        weight = materialize(weight)
    return weight.t().contiguous() if target.site.kind == "addmm" else weight


def _lora_kwargs(target: Target, in_features: int, out_features: int) -> dict:
    lora = target.lora
    if lora is None:
        return {"r": None, "alpha": 1.0}
    lora.check_fits(in_features, out_features, target.site.fqn)
    return {"r": lora.r, "alpha": lora.alpha, "dropout": lora.dropout, "use_rslora": lora.use_rslora,
            "init": lora.init}


def _compute_dtype(target: Target) -> str | None:
    return getattr(target.quant, "compute_dtype", None) if target.quant is not None else None


def _build_dense(w: torch.Tensor, bias, target: Target) -> nn.Module:
    return QLoRALinear(w, bias, name=target.site.fqn, compute_dtype=_compute_dtype(target),
                       **_lora_kwargs(target, w.shape[1], w.shape[0]))


def _has_data(w: torch.Tensor) -> bool:
    """False for meta tensors and fake tensors (a memory estimate's twin): nothing to quantize."""
    from torch._subclasses.fake_tensor import is_fake

    return not (w.is_meta or is_fake(w))


def quantized_weight(w: torch.Tensor, target: Target) -> quantizer.QuantizedWeight:
    """``w`` quantized as the target's quant spec says; a weight without data gets the same layout, unfilled."""
    q = target.quant
    kwargs = {"block_size": q.block_size, "double_quant": bool(getattr(q, "double_quant", False)) and
              q.format in ("nf4", "fp4"), "block_size2": getattr(q, "block_size2", 256),
              "threshold": getattr(q, "threshold", 6.0), "name": target.site.fqn}
    if _has_data(w):
        return quantizer.quantize(w, q.format, **kwargs)
    return quantizer.empty_quantized(q.format, tuple(w.shape), dtype=w.dtype, device=w.device, **kwargs)


def _build_quantized(w: torch.Tensor, bias, target: Target) -> nn.Module:
    return QLoRALinear(quantized_weight(w, target), bias, name=target.site.fqn, compute_dtype=_compute_dtype(target),
                       **_lora_kwargs(target, w.shape[1], w.shape[0]))


def _is_dense(t: Target) -> bool:
    return t.quant is None or t.quant.format == "none"


# (predicate, builder): first match wins. The quantized variants share one module class whose
# op dispatches on the format, so they differ only in how the weight is quantized.
DISPATCH: tuple[tuple[Callable[[Target], bool], Callable], ...] = (
    (_is_dense, _build_dense),
    (lambda t: t.quant.format in ("nf4", "fp4"), _build_quantized),
    (lambda t: t.quant.format in ("int8", "int8-zeropoint"), _build_quantized),
    (lambda t: t.quant.format == "llm-int8", _build_quantized),
)


def build_module(gm: GraphModule, target: Target, materialize: Callable | None = None) -> nn.Module:
    """The replacement module for one target, chosen by :data:`DISPATCH`."""
    w = _dense_weight(gm, target, materialize)
    bias = get_attr_value(gm, target.site.bias_attr).detach() if target.site.bias_attr else None
    for predicate, builder in DISPATCH:
        if predicate(target):
            return builder(w, bias, target)
    raise AssertionError(f"no dispatch entry for {target.site.fqn}")  # the plan validates formats


def _release_in_model(model: nn.Module | None, attr: str, param: torch.Tensor) -> None:
    """Free ``param``'s storage; in the source model put a meta tensor of the same shape there.

    The model shares this storage with the graph. Emptying it frees the memory even if someone
    still holds the Parameter (an optimizer); the meta placeholder makes any later use of the
    consumed layer in the source model fail loudly instead of computing with garbage.
    """
    shape, dtype = param.shape, param.dtype
    with torch.no_grad():
        param.data = torch.empty(0, dtype=dtype, device=param.device)
    if model is None:
        return
    owner, _, leaf = attr.rpartition(".")
    try:
        module = model.get_submodule(owner) if owner else model
    except AttributeError:
        return
    if getattr(module, leaf, None) is param:
        placeholder = torch.empty(shape, dtype=dtype, device="meta")
        if isinstance(param, nn.Parameter):
            setattr(module, leaf, nn.Parameter(placeholder, requires_grad=False))
        else:
            setattr(module, leaf, placeholder)


def _release(gm: GraphModule, ctx: PassContext, attr: str, site_nodes: set, source_attr: str) -> str:
    """Drop ``attr`` from the graph once only the swapped nodes read it; free the source copy.

    Returns what happened, for the report. A weight other nodes still read (tied embeddings) is
    kept.
    """
    others = [u for u in attr_users(gm, attr) if u not in site_nodes]
    if others:  # already moved out of the new module's way by set_submodule_safe
        return f"kept (shared with {', '.join(sorted({o.name for o in others}))})"
    for node in list(gm.graph.nodes):
        if node.op == "get_attr" and node.target == attr and not node.users:
            gm.graph.erase_node(node)
    param = get_attr_value(gm, attr)
    delete_attr(gm, attr)
    if ctx.options.get("release_source_weights", True) and isinstance(param, torch.Tensor):
        _release_in_model(ctx.model, source_attr, param)
        return "released"
    return "dropped from graph"


@register_pass("quant|lora|rules")
def swap_linear(gm: GraphModule, ctx: PassContext) -> PassResult:
    """Replace targeted linears with QLoRALinear modules (quantize + LoRA), freeing dense weights."""
    targets = resolve_targets(gm, ctx.plan)
    ctx.targets = targets
    graph = gm.graph
    for target in targets:
        site = target.site
        weight_shape = tuple(get_attr_value(gm, site.weight_attr).shape)
        source = ctx.options.get("weight_source")
        materialize = source.materialize if source is not None else None
        module = shared_module(ctx, site.fqn, lambda target=target: build_module(gm, target, materialize))
        if source is not None:
            source.built(site.fqn, module)
        site_nodes = set(site.nodes)
        set_submodule_safe(gm, site, module)
        for node in site.nodes:
            x = node.args[1] if site.kind == "addmm" else node.args[0]
            with graph.inserting_before(node):
                new = graph.call_module(site.fqn, (x,))
            stamp(new, "swap_linear", site.fqn, like=node)
            node.replace_all_uses_with(new)
            graph.erase_node(node)
        released = "kept (dense base shares the model's storage)"
        if not _is_dense(target):
            released = _release(gm, ctx, site.weight_attr_moved, site_nodes, site.weight_attr)
        if site.bias_attr_moved:
            _release_bias(gm, site.bias_attr_moved)
        ctx.note(
            target=site.fqn,
            kind=site.kind,
            shape=list(weight_shape),
            format=getattr(module, "format", "none"),
            r=getattr(module, "r", None),
            kernel=type(module).__name__,
            bits_per_param=getattr(module, "bits_per_param", lambda: None)(),
            source_weight=released,
        )
    return PassResult(gm, bool(targets))


def set_submodule_safe(gm: GraphModule, site, module: nn.Module) -> None:
    """Install ``module`` at ``site.fqn`` after moving the old weight/bias out of its way.

    The export placeholder at ``fqn`` owns ``weight``/``bias``; our module defines buffers of the
    same names, so the originals move to private names first (and ``get_attr`` nodes follow).
    """
    site.weight_attr_moved = _move_attr(gm, site.weight_attr, site.fqn)
    site.bias_attr_moved = _move_attr(gm, site.bias_attr, site.fqn) if site.bias_attr else None
    set_submodule(gm, site.fqn, module)


def _move_attr(gm: GraphModule, attr: str, fqn: str) -> str:
    if not attr.startswith(fqn + "."):
        return attr  # lives elsewhere (tied weight owned by another module): untouched by the swap
    value = get_attr_value(gm, attr)
    new_name = unique_attr_name(gm, "peftfx_old_" + attr.replace(".", "_"))
    if isinstance(value, nn.Parameter):
        gm.register_parameter(new_name, value)
    else:
        gm.register_buffer(new_name, value)
    delete_attr(gm, attr)
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.target == attr:
            node.target = new_name
    return new_name


def _release_bias(gm: GraphModule, attr: str) -> None:
    """The bias now lives in the new module; drop the old attribute if nothing else reads it."""
    nodes = [n for n in gm.graph.nodes if n.op == "get_attr" and n.target == attr]
    if all(not n.users for n in nodes):
        for n in nodes:
            gm.graph.erase_node(n)
        delete_attr(gm, attr)
