"""freeze: only adapter parameters train; everything else is frozen.

A module declares its trainable parameters in a ``PEFTFX_TRAINABLE`` class attribute (LoRA's
``lora_A``/``lora_B``, a prefix's ``prefix``, ...); parameters whose leaf name starts with
``lora_`` count too. ``train_top_layers: k`` additionally unfreezes the top k blocks, found from
module names (the largest ``k`` indices under the repeated-block container), and
``train_modules`` the modules its patterns name (PEFT's ``modules_to_save``: a fresh task head).
"""
from __future__ import annotations

from torch.fx import GraphModule

from peftfx.errors import PlanError
from peftfx.pass_manager import PassContext, PassResult, register_pass
from peftfx.plan import match
from peftfx.targets import block_of

__all__ = ["freeze", "is_adapter_parameter", "top_block_prefixes"]


def is_adapter_parameter(gm: GraphModule, name: str) -> bool:
    """Whether parameter ``name`` belongs to an adapter the plan added."""
    owner, _, leaf = name.rpartition(".")
    module = gm.get_submodule(owner) if owner else gm
    return leaf in getattr(module, "PEFTFX_TRAINABLE", ()) or leaf.startswith("lora_")


def top_block_prefixes(names: list[str], k: int) -> list[str]:
    """Prefixes (``model.layers.7.``) of the top ``k`` blocks of the longest block stack in ``names``."""
    stacks: dict[str, set[int]] = {}
    for name in names:
        if (block := block_of(name)) is not None:
            stacks.setdefault(block[0], set()).add(block[1])
    if not stacks or k <= 0:
        return []
    container, indices = max(stacks.items(), key=lambda kv: len(kv[1]))
    return [f"{container}.{i}." for i in sorted(indices)[-k:]]


def _train_module_prefixes(names: list[str], patterns: tuple[str, ...]) -> list[str]:
    """``owner.`` prefixes of parameters whose owning module matches one of ``patterns``."""
    owners = {n.rpartition(".")[0] for n in names}
    prefixes = []
    for pattern in patterns:
        hit = [o for o in owners if o and match(pattern, o)]
        if not hit:
            raise PlanError(f"train_modules pattern {pattern!r} matches no module with parameters "
                            f"(e.g. {', '.join(sorted(owners)[-4:])})")
        prefixes += [h + "." for h in hit]
    return prefixes


# last: it decides requires_grad for every parameter, the adapters other passes created included
@register_pass("*", after=("swap_linear", "prefix_tuning", "prompt_tuning", "bottleneck", "fuse_activations"))
def freeze(gm: GraphModule, ctx: PassContext) -> PassResult:
    """Freeze every parameter except adapters (and the top-k blocks when the plan says so)."""
    names = [n for n, _ in gm.named_parameters()]
    top = top_block_prefixes(names, getattr(ctx.plan, "train_top_layers", None) or 0)
    top += _train_module_prefixes(names, ctx.plan.train_modules)
    trainable = 0
    for name, param in gm.named_parameters():
        train = is_adapter_parameter(gm, name) or any(name.startswith(p) for p in top)
        param.requires_grad_(train)
        trainable += param.numel() if train else 0
    ctx.note(trainable_parameters=trainable, top_blocks=top)
    return PassResult(gm, False)
