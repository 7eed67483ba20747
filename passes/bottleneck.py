"""bottleneck: Houlsby adapters after the attention output and/or the MLP of chosen blocks.

For each block the plan selects (``adapter.layers``, default all), the pass finds the module that
produces the attention sublayer's output (its output projection: ``o_proj``, ``attn.c_proj``,
``attention.output.dense``, T5's ``SelfAttention.o``) and the MLP's down projection
(``down_proj``, ``mlp.c_proj``, ``fc2``, ``wo``, BERT's ``layer.N.output.dense``), from the module
names export records in ``nn_module_stack``. The output node of that module (the node whose value
leaves it: GPT-2's Conv1D ends in a ``view`` after its ``addmm``) is fed through a
:class:`~peftfx.kernels.bottleneck_modules.Bottleneck` registered next to it as
``<module>_adapter`` (``model.layers.0.self_attn.o_proj_adapter``). ``up`` is zero-initialized,
so the compiled model's outputs are unchanged until training moves it.

Works before or after ``swap_linear`` (a swapped projection is a ``call_module`` that keeps the
original ``nn_module_stack``). Running the pass twice adds nothing the second time.
"""
from __future__ import annotations

import re

from torch.fx import GraphModule, Node

from peftfx.errors import PlanError
from peftfx.graph import set_submodule, stamp
from peftfx.kernels.bottleneck_modules import Bottleneck
from peftfx.pass_manager import PassContext, PassResult, register_pass, shared_module
from peftfx.targets import block_of
from peftfx.trace import owner_stack

__all__ = ["bottleneck", "find_sublayer_outputs", "block_index", "ATTN_OUT", "MLP_OUT"]

# Module names of the projection that ends each sublayer, per model family.
ATTN_OUT = re.compile(
    r"(?:^|.*\.)(?:attention\.output\.dense"  # BERT / RoBERTa
    r"|(?:self_attn|attn|attention|self_attention|SelfAttention|EncDecAttention)\.(?:o_proj|c_proj|out_proj|o|dense))"
)
MLP_OUT = re.compile(
    r"(?:^|.*\.)(?:(?:mlp|feed_forward|ffn|DenseReluDense)\.(?:down_proj|c_proj|fc2|wo|dense_4h_to_h)"
    r"|(?:layer|layers)\.\d+\.output\.dense"  # BERT / ViT-HF: encoder.layer.N.output.dense
    r"|(?:layers|layer|h|block|blocks)\.\d+\.fc2)"  # OPT-style blocks with fc1/fc2 directly inside
)
_WHERE = {"attn": ATTN_OUT, "mlp": MLP_OUT}


def block_index(fqn: str) -> int | None:
    """Index of the repeated block ``fqn`` lives in (``model.layers.3.mlp.down_proj`` -> 3)."""
    block = block_of(fqn)
    return None if block is None else block[1]


def _owners(node: Node) -> set[str]:
    owners = {fqn for fqn, _ in owner_stack(node)}
    if node.op == "call_module":
        owners.add(str(node.target))
    return owners


def find_sublayer_outputs(gm: GraphModule, where: str) -> dict[str, list[Node]]:
    """``{module fqn: [output nodes]}`` of the sublayer-ending projections of kind ``where``.

    An output node is owned by the module and has a user outside it (one per call of the module).
    """
    pattern = _WHERE[where]
    owners_of = {node: _owners(node) for node in gm.graph.nodes}
    out: dict[str, list[Node]] = {}
    for node, owners in owners_of.items():
        for fqn in owners:
            if not pattern.fullmatch(fqn):
                continue
            if any(fqn not in owners_of.get(user, set()) for user in node.users):
                out.setdefault(fqn, []).append(node)
    return out


def _adapter_name(fqn: str) -> str:
    return f"{fqn}_adapter"


# after swap_linear: the bottleneck's down/up projections are trained, never quantized
@register_pass("adapter", after=("swap_linear", "prompt_tuning"))
def bottleneck(gm: GraphModule, ctx: PassContext) -> PassResult:
    """Insert zero-initialized Houlsby bottleneck adapters after attention outputs and MLPs."""
    spec = ctx.plan.adapter
    graph = gm.graph
    found: dict[str, tuple[str, list[Node]]] = {}
    for where in spec.where:
        for fqn, nodes in find_sublayer_outputs(gm, where).items():
            found.setdefault(fqn, (where, nodes))
    blocks = sorted({i for f in found if (i := block_index(f)) is not None})
    if not found:
        raise PlanError(f"adapter.where = {list(spec.where)}: found no attention output / MLP down projection "
                        "in the model's module names (looked for o_proj, c_proj, out_proj, "
                        "attention.output.dense, down_proj, fc2, wo, output.dense)")
    if spec.layers is not None:
        missing = sorted(set(spec.layers) - set(blocks))
        if missing:
            raise PlanError(f"adapter.layers {missing} name no block of this model; blocks are {blocks}")
    added, modified = 0, False
    for fqn, (where, nodes) in found.items():
        index = block_index(fqn)
        if spec.layers is not None and index not in spec.layers:
            continue
        name = _adapter_name(fqn)
        if any(n.op == "call_module" and n.target == name for n in graph.nodes):
            continue  # already adapted (pass run twice)
        val = nodes[0].meta.get("val")
        if val is None:
            raise PlanError(f"adapter: no shape recorded for the output of {fqn}; cannot size its adapter")
        module = shared_module(ctx, name, lambda val=val, fqn=fqn: Bottleneck(
            val.shape[-1], spec.size, nonlinearity=spec.nonlinearity, dtype=val.dtype, device=val.device, name=fqn))
        set_submodule(gm, name, module)
        for node in nodes:
            with graph.inserting_after(node):
                new = graph.call_module(name, (node,))
            stamp(new, "bottleneck", fqn, like=node)
            node.replace_all_uses_with(new, delete_user_cb=lambda user, new=new: user is not new)
        params = sum(p.numel() for p in module.parameters())
        added += params
        modified = True
        ctx.note(target=fqn, where=where, block=index, adapter=name, size=spec.size, parameters=params)
    base = _base_parameters(gm, ctx)
    ctx.note(added_parameters=added, base_parameters=base,
             added_share=(added / base) if base else None)
    return PassResult(gm, modified)


def _base_parameters(gm: GraphModule, ctx: PassContext) -> int:
    """Parameter count of the source model (meta tensors of released weights still count)."""
    model = ctx.model if ctx.model is not None else gm
    return sum(p.numel() for p in model.parameters())
