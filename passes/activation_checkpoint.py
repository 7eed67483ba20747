"""activation_checkpoint: blocks recompute their forward in backward; a budget picks what they save.

Runs last (after ``freeze``) when the plan has a ``[memory]`` section:

1. ``checkpoint = "blocks" | "selective"``: every transformer block is outlined into a called
   submodule (:func:`peftfx.distributed.blocks.outline_blocks`, same names and ops) and replaced by a
   :class:`~peftfx.kernels.checkpointed_block.CheckpointedBlock` with policy ``"full"`` (keep only the
   block inputs) or ``"selective"`` (also keep matmul / attention / QLoRA-linear outputs).
   ``offload = "cpu"`` parks the kept block inputs in pinned host memory (CUDA; a no-op on CPU,
   which the notes say).
2. A model whose blocks cannot be outlined (a tied weight read outside its block, blocks called
   out of order, no block stack) gets whole-graph selective recompute instead (torch's composable
   ``checkpoint`` on the root with the same save policy), with a warning that says why.
3. ``budget``: the step's peak is estimated on a fake-tensor twin of the compiled module
   (:mod:`peftfx.memory.twin`, AdamW, the module's device). With ``"selective"`` the first k
   blocks keep the selective policy and the rest recompute fully, k as large as fits; with any
   mode, a budget nothing reaches raises :class:`PlanError` naming the smallest reachable peak and
   the settings that reach it.

Outputs and gradients equal the un-checkpointed module's: the recompute runs the same ops on the
same inputs with the RNG state restored (dropout masks replay).
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import warnings

import torch
from torch.fx import GraphModule, Node

from peftfx.distributed.blocks import outline_blocks
from peftfx.errors import PlanError
from peftfx.kernels.checkpointed_block import CheckpointedBlock, save_policy
from peftfx.memory.storage import format_bytes
from peftfx.memory.twin import step_breakdown
from peftfx.pass_manager import PassContext, PassResult, register_pass

__all__ = ["activation_checkpoint", "checkpoint_blocks", "apply_policies", "saved_by_block", "planning_device"]

FALLBACK_KEY = "peftfx.recompute_fallback"
_SAVED_TARGETS = ("linear", "matmul", "mm", "addmm", "bmm", "baddbmm", "scaled_dot_product_attention")


_PLANNING_DEVICE: contextvars.ContextVar[str | None] = contextvars.ContextVar("peftfx_planning_device", default=None)


@contextlib.contextmanager
def planning_device(device: str):
    """Plan budgets for training on ``device`` ("cpu" | "cuda") instead of the module's own device.

    The memory estimate compiles fake CPU twins of models that will train on CUDA, where host
    offload takes effect and the optimizer step's temporaries differ.
    """
    token = _PLANNING_DEVICE.set(device)
    try:
        yield
    finally:
        _PLANNING_DEVICE.reset(token)


def _describe(node: Node) -> str:
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return f"{node.name} {list(val.shape)} {str(val.dtype).removeprefix('torch.')}"
    return node.name


def saved_by_block(block: GraphModule, policy: str) -> list[str]:
    """What ``block`` keeps for backward under ``policy``: its inputs, and with ``"selective"`` the
    outputs of its matmuls, attention calls and QLoRA linears (``name [shape] dtype``)."""
    kept = [_describe(n) for n in block.graph.nodes
            if n.op == "placeholder" and not isinstance(n.meta.get("val"), torch.SymInt)]
    if policy != "selective":
        return kept
    for n in block.graph.nodes:
        op = getattr(n.target, "__name__", "")
        expensive = n.op == "call_function" and op.split(".")[0] in _SAVED_TARGETS
        fused = n.op == "call_module" and type(block.get_submodule(n.target)).__name__ in ("QLoRALinear", "LoRALinear")
        if expensive or fused:
            kept.append(_describe(n))
    return kept


def apply_policies(gm: GraphModule, policies: dict[str, str], offload: bool) -> None:
    """Make block ``path`` of ``gm`` a CheckpointedBlock with ``policies[path]`` (idempotent)."""
    for path, policy in policies.items():
        block = gm.get_submodule(path)
        if isinstance(block, CheckpointedBlock):
            block.set_policy(policy, offload)
            continue
        parent, _, leaf = path.rpartition(".")
        gm.get_submodule(parent)._modules[leaf] = CheckpointedBlock(block, policy=policy, offload=offload)


def checkpoint_blocks(gm: GraphModule, checkpoint: str = "blocks", offload: str = "none") -> list[str]:
    """Make every block of a compiled module recompute in backward, in place; returns the block paths.

    Also for modules built outside ``peftfx.compile``'s pass list (``compile_multi``'s multi-adapter
    model). When no block can be outlined the whole graph gets selective recompute instead, with a
    warning saying why, and ``[]`` is returned.

    Args:
        gm: a compiled module.
        checkpoint: ``"blocks"`` (keep only block inputs) or ``"selective"`` (also keep matmul and
            attention outputs).
        offload: ``"cpu"`` to park the kept block inputs in pinned host memory (CUDA only).
    """
    if checkpoint not in ("blocks", "selective"):
        raise PlanError(f"memory.checkpoint must be 'blocks' or 'selective' to checkpoint blocks, got {checkpoint!r}")
    outlined = outline_blocks(gm)
    if outlined.blocks:
        policy = "selective" if checkpoint == "selective" else "full"
        apply_policies(gm, {b: policy for b in outlined.blocks}, offload == "cpu")
        return outlined.blocks
    _whole_graph_fallback(gm, outlined.reason)
    return []


def _whole_graph_fallback(gm: GraphModule, reason: str) -> None:
    from torch.distributed._composable import checkpoint as composable_checkpoint
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    warnings.warn(f"peftfx memory.checkpoint: blocks could not be outlined ({reason}); using whole-graph "
                  "selective recompute instead (matmul and attention outputs saved, the rest recomputed)",
                  stacklevel=3)
    composable_checkpoint(gm, context_fn=functools.partial(create_selective_checkpoint_contexts, save_policy))
    gm.meta[FALLBACK_KEY] = reason


def _peak(gm: GraphModule, ctx: PassContext, train_device: str) -> int:
    return step_breakdown(gm, ctx.example_inputs, optimizer="adamw", train_device=train_device).peak


def _fit(gm: GraphModule, ctx: PassContext, blocks: list[str], budget: int, train_device: str) -> dict:
    """Pick per-block policies (and offload) so the estimated peak fits ``budget``; raise if nothing does."""
    spec = ctx.plan.memory
    offload = spec.offload == "cpu"
    if spec.checkpoint == "selective":
        lo, hi, best = 0, len(blocks), None  # first k blocks selective, the rest full; peak grows with k
        while lo <= hi:
            k = (lo + hi) // 2
            apply_policies(gm, {b: "selective" if i < k else "full" for i, b in enumerate(blocks)}, offload)
            peak = _peak(gm, ctx, train_device)
            if peak <= budget:
                best, lo = (k, peak), k + 1
            else:
                hi = k - 1
        if best is not None:
            apply_policies(gm, {b: "selective" if i < best[0] else "full" for i, b in enumerate(blocks)}, offload)
            return {"selective_blocks": best[0], "full_blocks": len(blocks) - best[0], "estimated_peak": best[1]}
    else:
        peak = _peak(gm, ctx, train_device)
        if peak <= budget:
            return {"estimated_peak": peak}
    # nothing fits with the plan's settings: report the cheapest reachable one
    cheapest = "checkpoint = 'blocks'" + (", offload = 'cpu'" if train_device == "cuda" else "")
    if blocks:
        apply_policies(gm, {b: "full" for b in blocks}, train_device == "cuda")
        smallest = _peak(gm, ctx, train_device)
    else:
        smallest, cheapest = _peak(gm, ctx, train_device), f"checkpoint = {spec.checkpoint!r}"
    raise PlanError(f"memory.budget = {spec.budget!r} ({format_bytes(budget)}) cannot be reached: the smallest "
                    f"estimated peak of a training step (AdamW, {train_device}) is {format_bytes(smallest)}, with "
                    f"{cheapest}; raise the budget, or lower batch / sequence length")


# last: it wraps the outlined blocks of the final graph, adapters and fused ops included, and reads
# requires_grad as freeze left it to decide what recompute must reproduce
@register_pass("memory", after=("freeze",))
def activation_checkpoint(gm: GraphModule, ctx: PassContext) -> PassResult:
    """Recompute transformer blocks in backward (all or selectively), offload their inputs, fit a budget."""
    spec = ctx.plan.memory
    budget = spec.budget_bytes
    first = next(gm.parameters(), None)
    train_device = _PLANNING_DEVICE.get() or ("cuda" if first is not None and first.device.type == "cuda" else "cpu")
    blocks: list[str] = []
    if spec.checkpoint != "off":
        blocks = checkpoint_blocks(gm, spec.checkpoint, spec.offload)
        if not blocks:
            ctx.note(fallback="whole-graph selective recompute", reason=gm.meta[FALLBACK_KEY])
    if spec.offload == "cpu" and train_device != "cuda":
        ctx.note(offload="accepted, no effect: the model is on cpu (host offload moves CUDA tensors only)")
    fit = _fit(gm, ctx, blocks, budget, train_device) if budget is not None else {}
    if fit:
        ctx.note(budget=spec.budget, **fit)
    for b in blocks:
        block = gm.get_submodule(b)
        ctx.note(block=b, policy=block.policy, offload=block.offload, saves=saved_by_block(block, block.policy))
    return PassResult(gm, bool(blocks) or spec.checkpoint != "off")
