"""tile_mlp: each block's MLP runs in token chunks and keeps only its input (``[memory] tile_mlp``).

Runs before ``activation_checkpoint`` when the plan has a ``[memory]`` section. For every block
(``model.layers.3``) with a child MLP module (``mlp`` or ``feed_forward``), the MLP's ops in the graph
(by owning module: ``gate_proj``/``up_proj``/``act_mul``/``down_proj`` on a Llama; ``c_fc``, the
GELU's elementwise ops and ``c_proj`` with their reshapes on GPT-2) are outlined into a
``GraphModule`` at the MLP's own path (:func:`peftfx.distributed.blocks.outline_region`: same
parameter names and tensors) wrapped as a :class:`~peftfx.kernels.tiled_mlp.TiledMLP`.
``activation_checkpoint`` then outlines the blocks around it.

An MLP is tiled only when chunking its rows is exact, which the pass proves from the graph:

* one tensor input ``x`` (the normed hidden state) and one output; its other inputs are sizes
  of ``x`` (GPT-2's reshapes), which each chunk replaces by its own; in a static-shape graph (the
  memory estimate's capture) reshapes of token-dependent values hold literal sizes, so an MLP with
  them (GPT-2's) is left untiled there;
* every op that depends on ``x`` is row-wise: linears (swapped QLoRA/LoRA layers, ``aten.linear``
  / ``addmm`` / ``mm`` with ``x`` on the row side), ``act_mul``, elementwise math, dtype casts,
  dropout, and reshapes whose results keep the token dims in front (as ``x``'s leading dims or
  their product); ops on weights alone are free;
* a dropout at the MLP's end (GPT-2's residual dropout) stays outside, so its mask is the
  untiled graph's.

MLPs that fail a check stay as they are, with a note saying why (BERT/ViT/T5 name their MLPs
otherwise and are left untiled). ``tile_mlp = "auto"`` tiles under ``checkpoint = "blocks"`` only:
there the MLP's backward is the step's peak and tiling costs no extra compute (the block's
recompute stops before the MLP, see :mod:`peftfx.kernels.tiled_mlp`); under ``"off"`` and
``"selective"`` it would add an MLP recompute, so only ``tile_mlp = true`` asks for that.
"""
from __future__ import annotations

import operator

import torch
from torch import nn
from torch.fx import GraphModule, Node

from peftfx.distributed.blocks import block_prefixes, check_region, outline_region, owned_nodes
from peftfx.graph import set_submodule
from peftfx.kernels.fused_ops import act_mul  # noqa: F401  (registers peftfx::act_mul, a row-wise op)
from peftfx.kernels.tiled_mlp import TiledMLP
from peftfx.pass_manager import PassContext, PassResult, register_pass

__all__ = ["tile_mlp", "tile_mlps", "set_mlp_tiling", "MLP_NAMES"]

MLP_NAMES = ("mlp", "feed_forward")
_aten = torch.ops.aten
_ROWWISE = {getattr(_aten, n) for n in (
    "mul", "add", "sub", "div", "pow", "neg", "tanh", "sigmoid", "silu", "gelu", "relu", "exp", "erf", "rsqrt",
    "to", "_to_copy", "clone", "contiguous", "view", "reshape", "_unsafe_view", "alias", "detach",
    "dropout", "native_dropout", "_assert_tensor_metadata", "sym_size")}
_MATMULS = {_aten.linear: 0, _aten.mm: 0, _aten.matmul: 0, _aten.addmm: 1}  # packet -> the row operand's index
_RESHAPES = {_aten.view, _aten.reshape, _aten._unsafe_view, _aten.expand}
_ROW_MODULES = ("QLoRALinear", "LoRALinear", "Dropout", "Linear")


def _packet(node: Node):
    return getattr(node.target, "overloadpacket", node.target)


def _val(node) -> object:
    return node.meta.get("val") if isinstance(node, Node) else node


def _same(a, b) -> bool:
    """Two sizes are the same symbol/expression (or the same int)."""
    if isinstance(a, torch.SymInt) or isinstance(b, torch.SymInt):
        ea = a.node.expr if isinstance(a, torch.SymInt) else a
        eb = b.node.expr if isinstance(b, torch.SymInt) else b
        return bool(ea == eb)
    return a == b


def _rows_kept(shape, lead) -> bool:
    """``shape`` keeps the token dims ``lead`` in front (as they are, or flattened into one)."""
    if len(shape) > len(lead) and all(_same(s, d) for s, d in zip(shape, lead)):
        return True
    if len(lead) > 1 and len(shape) >= 2:
        prod = lead[0]
        for d in lead[1:]:
            prod = prod * d
        return _same(shape[0], prod)
    return False


def _why_not_tileable(gm: GraphModule, prefix: str, members: list[Node]) -> tuple[str, dict]:
    """Empty reason and ``{"x": node, "sym_dims": {input node: dim}}`` if the MLP can be tiled."""
    member_set = set(members)
    outside = []
    for n in members:
        for a in n.all_input_nodes:
            if a not in member_set and a not in outside:
                outside.append(a)
    tensors = [a for a in outside if isinstance(_val(a), torch.Tensor)]
    if len(tensors) != 1:
        return f"{prefix} reads {len(tensors)} tensors from outside ({', '.join(a.name for a in tensors[:3])})", {}
    x = tensors[0]
    xv = _val(x)
    if xv.dim() < 2:
        return f"{prefix}'s input {list(xv.shape)} has no token dims", {}
    static = not any(isinstance(d, torch.SymInt) for d in xv.shape[:-1])
    lead = list(xv.shape[:-1])
    sym_dims = {}
    for a in outside:
        if a is x:
            continue
        v = _val(a)
        dims = [d for d, s in enumerate(xv.shape) if isinstance(v, torch.SymInt) and _same(v, s)]
        if not dims:
            return f"{prefix} reads {a.name} from outside, which is not a size of its input", {}
        sym_dims[a] = dims[0]
    outputs = [n for n in members if any(u not in member_set for u in n.users)]
    if len(outputs) != 1:
        return f"{prefix} has {len(outputs)} outputs", {}
    depends = {x, *sym_dims}
    for n in members:
        if not any(a in depends for a in n.all_input_nodes):
            continue  # weights only (a transposed weight): independent of the tokens
        depends.add(n)
        if n.op == "call_module":
            kind = type(gm.get_submodule(n.target)).__name__
            if kind not in _ROW_MODULES or len(n.all_input_nodes) != 1:
                return f"{prefix} calls {n.target} ({kind}), not a row-wise module", {}
            if getattr(gm.get_submodule(n.target), "format", None) == "llm-int8":
                return (f"{n.target} is llm-int8, which picks its outlier columns over all tokens of a "
                        "call: chunks would pick others"), {}
        elif n.op == "call_function":
            packet = _packet(n)
            if static and packet in _RESHAPES:
                return (f"{prefix}: {n.name} reshapes to fixed sizes (a static-shape graph: the chunks would not "
                        "fit them)"), {}
            if packet in _MATMULS:
                rows = _MATMULS[packet]
                side = [a for i, a in enumerate(n.args) if isinstance(a, Node) and a in depends and i != rows]
                if side:
                    return f"{prefix}: {n.name} multiplies two token-dependent operands", {}
            elif packet not in _ROWWISE and packet is not torch.ops.peftfx.act_mul \
                    and n.target is not operator.getitem:
                return f"{prefix}: {n.name} ({n.target}) is not a known row-wise op", {}
        v = _val(n)
        if isinstance(v, torch.Tensor) and not _rows_kept(v.shape, lead):
            return f"{prefix}: {n.name} {list(v.shape)} does not keep the token dims {lead} in front", {}
    return "", {"x": x, "sym_dims": sym_dims}


def _last_linear(gm: GraphModule, prefix: str, members: list[Node]) -> str | None:
    """The QLoRA/LoRA linear whose output, through reshapes only (each read once), is the MLP's output:
    its path relative to the MLP (``down_proj``), or None."""
    member_set = set(members)
    node = next(n for n in reversed(members) if any(u not in member_set for u in n.users))
    while node.op == "call_function" and _packet(node) in _RESHAPES and len(node.users) == 1 \
            and isinstance(node.args[0], Node) and node.args[0] in member_set:
        node = node.args[0]
        if len(node.users) != 1:
            return None
    if node.op == "call_module" and type(gm.get_submodule(node.target)).__name__ in ("QLoRALinear", "LoRALinear"):
        return node.target[len(prefix) + 1:]
    return None


def _intermediate(members: list[Node]) -> int:
    sizes = [v.shape[-1] for n in members if isinstance(v := _val(n), torch.Tensor) and v.dim()
             and isinstance(v.shape[-1], int)]
    return max(sizes, default=1)


def _mlp_prefixes(gm: GraphModule) -> list[str]:
    names = dict(gm.named_modules())
    return [f"{b}.{m}" for b in block_prefixes(gm) for m in MLP_NAMES if f"{b}.{m}" in names]


def tile_mlps(gm: GraphModule, enabled: bool = True, min_tokens: int | None = None) -> tuple[list[str], dict[str, str]]:
    """Make each block's MLP a :class:`TiledMLP`, in place; returns (tiled paths, {path: why not}).

    Idempotent: an MLP that is already a ``TiledMLP`` is switched to ``enabled`` and listed.
    ``min_tokens``: fewest tokens per chunk (default :data:`~peftfx.kernels.tiled_mlp.MIN_TILE_TOKENS`).
    """
    tiled, skipped = [], {}
    for prefix in _mlp_prefixes(gm):
        module = gm.get_submodule(prefix)
        if isinstance(module, TiledMLP):
            module.set_tiling(enabled, min_tokens)
            tiled.append(prefix)
            continue
        members = owned_nodes(gm.graph, prefix)
        while members and members[-1].op == "call_module" and \
                isinstance(gm.get_submodule(members[-1].target), nn.Dropout):
            members.pop()  # a trailing dropout stays outside: its mask is the untiled graph's
        reason = check_region(gm.graph, prefix, members) if members else f"{prefix} has no ops in the graph"
        found = {}
        if not reason:
            reason, found = _why_not_tileable(gm, prefix, members)
        if reason:
            skipped[prefix] = reason
            continue
        width, last = _intermediate(members), _last_linear(gm, prefix, members)
        call = outline_region(gm, prefix, members)
        call.meta["peftfx.pass"] = "tile_mlp"
        inputs = list(call.args)  # the outlined graph's placeholders, in order
        set_submodule(gm, prefix, TiledMLP(
            gm.get_submodule(prefix), x_index=inputs.index(found["x"]),
            sym_dims={inputs.index(a): d for a, d in found["sym_dims"].items()}, intermediate=width,
            enabled=enabled, last_linear=last))
        gm.get_submodule(prefix).set_tiling(enabled, min_tokens)
        tiled.append(prefix)
    if tiled:
        gm.graph.lint()
        gm.recompile()
    return tiled, skipped


def set_mlp_tiling(gm: nn.Module, enabled: bool) -> int:
    """Switch every :class:`TiledMLP` of ``gm`` on or off (the estimate's ``--fit`` tries settings);
    returns how many there are."""
    mlps = [m for m in gm.modules() if isinstance(m, TiledMLP)]
    for m in mlps:
        m.set_tiling(enabled)
    return len(mlps)


# before activation_checkpoint, which outlines the blocks around the tiled MLPs
@register_pass("memory", after=("freeze",), before=("activation_checkpoint",))
def tile_mlp(gm: GraphModule, ctx: PassContext) -> PassResult:
    """Run each block's MLP in token chunks that keep only its input for backward (``memory.tile_mlp``)."""
    spec = ctx.plan.memory
    if not spec.tiles_mlp:
        ctx.note(tile_mlp=f"off (tile_mlp = {spec.tile_mlp!r}, checkpoint = {spec.checkpoint!r})")
        return PassResult(gm, False)
    tiled, skipped = tile_mlps(gm, min_tokens=spec.tile_tokens)
    for prefix in tiled:
        mlp = gm.get_submodule(prefix)
        ctx.note(mlp=prefix, tiled=True, min_tokens=mlp.min_tokens, intermediate=mlp.intermediate,
                 output_skipped_in_backward=mlp.last_linear)
    for prefix, reason in skipped.items():
        ctx.note(mlp=prefix, tiled=False, reason=reason)
    if not tiled and not skipped:
        ctx.note(tile_mlp="no MLP module (mlp / feed_forward) under the blocks: nothing tiled")
    return PassResult(gm, bool(tiled))
