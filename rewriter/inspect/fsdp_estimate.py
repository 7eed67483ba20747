"""Per-rank peak memory of a training step under FSDP2 (``peftfx estimate --world-size W``).

Running the fake-tensor estimate (:func:`peftfx.inspect.estimate.estimate`) on a 70B model at
sequence 2048 would trace 80 blocks; the per-rank arithmetic needs only what one block and the
rest of the model (embeddings, head, loss) cost. So the model's config is estimated twice, with
1 and with 2 blocks (same widths, built on meta), and the difference is one block:

* ``block`` = cost(2 blocks) - cost(1 block), ``root`` = cost(1 block) - ``block``, for weights,
  trainable parameters' gradients and optimizer state, and activations saved for backward;
* ``transient`` = the non-saved live bytes at the forward/backward peak (logits, loss buffers),
  taken from the 2-block run.

Under ``peftfx.distributed.shard`` (FSDP2: one group per block, then the root; the packed base
sharded too) each of W ranks holds, for N blocks:

* its shard of every weight, gradient and optimizer state: ``(root + N * block) / W`` (buffers
  such as RoPE tables are replicated);
* the all-gathered working set: the root group's full weights (the root is not resharded after
  forward) and two blocks' full weights (the running block and the one FSDP2 prefetches);
* activations: ``N * block + root`` saved tensors; with ``checkpoint="blocks"`` only each
  block's input hidden state (``batch * seq * hidden`` elements) plus one block's saved tensors
  while it is recomputed; with ``offload="cpu"`` as well, the inputs live on the host and two
  are on the device (the one in use, the one in flight);
* peak = shards + gathered + inputs + optimizer state + max(activations + transient,
  gradients + optimizer step temporaries).

``checkpoint`` / ``offload`` are read from the plan's ``[memory]`` section when the plan has one
(the activation-memory plan section), else from the arguments.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from peftfx.api import as_plan
from peftfx.errors import PlanError
from peftfx.inspect.estimate import estimate, format_bytes

__all__ = ["ShardedEstimate", "estimate_sharded"]

CHECKPOINT = ("none", "blocks")
OFFLOAD = ("none", "cpu")


@dataclass
class ShardedEstimate:
    """Per-rank bytes of one FSDP2 training step (see the module docstring for each term)."""

    world_size: int
    blocks: int
    checkpoint: str
    offload: str
    sharded_weights: int
    gathered_weights: int
    gradients: int
    optimizer_state: int
    activations: int
    transient: int
    optimizer_transient: int
    inputs: int
    peak: int
    block_weights: int
    root_weights: int

    def to_dict(self) -> dict:
        return {"schema": "peftfx.estimate.sharded", "schema_version": 1, **asdict(self)}

    def render(self) -> str:
        rows = [("sharded weights (1/W of base, adapters, head)", self.sharded_weights),
                ("all-gathered (root + 2 blocks)", self.gathered_weights),
                ("gradients (sharded)", self.gradients), ("optimizer state (sharded)", self.optimizer_state),
                ("activations", self.activations), ("forward/backward transients", self.transient),
                ("inputs", self.inputs)]
        head = (f"per rank, FSDP2 over {self.world_size} ranks, {self.blocks} blocks, "
                f"checkpoint={self.checkpoint}, offload={self.offload}")
        body = "\n".join(f"  {name:<48} {format_bytes(n):>12}" for name, n in rows)
        return f"{head}\n{body}\n  {'peak per rank':<48} {format_bytes(self.peak):>12}"


def _memory_setting(plan: Any, name: str, given: str | None, allowed: tuple[str, ...]) -> str:
    section = getattr(plan, "memory", None)
    value = given if given is not None else getattr(section, name, None) if section is not None else None
    value = "none" if value in (None, False) else str(value)
    if value not in allowed:
        raise PlanError(f"memory.{name} = {value!r} is not one of {', '.join(allowed)}")
    return value


def _with_blocks(model: nn.Module, n: int) -> nn.Module:
    """``model``'s class built on meta from its config with ``n`` blocks."""
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = n
    with torch.device("meta"):
        return type(model)(config)


def estimate_sharded(model: nn.Module, plan: Any, *, world_size: int, checkpoint: str | None = None,
                     offload: str | None = None, batch: int = 2, seq: int = 8, optimizer: str = "adamw",
                     dtype: torch.dtype | str | None = None, train_device: str = "cuda") -> ShardedEstimate:
    """Per-rank peak of one training step of ``model`` + ``plan`` under FSDP2 over ``world_size`` ranks.

    Args:
        model: a Hugging Face model (its ``config`` needs ``num_hidden_layers`` and
            ``hidden_size``); built on meta is best, its weights are not read.
        plan: the plan (dict, :class:`~peftfx.plan.Plan` or file).
        world_size: number of ranks FSDP2 shards over.
        checkpoint: ``none`` | ``blocks`` (default: the plan's ``memory.checkpoint``, else none).
        offload: ``none`` | ``cpu``: checkpointed block inputs kept on the host (default: the
            plan's ``memory.offload``, else none).
        batch, seq: per-rank input size. optimizer, dtype, train_device: as :func:`estimate`'s.

    Returns:
        A :class:`ShardedEstimate`; ``.peak`` is the predicted per-rank peak bytes.
    """

    if not isinstance(world_size, int) or world_size < 1:
        raise PlanError(f"world_size {world_size!r} must be an int >= 1")
    plan = as_plan(plan)
    checkpoint = _memory_setting(plan, "checkpoint", checkpoint, CHECKPOINT)
    offload = _memory_setting(plan, "offload", offload, OFFLOAD)
    config = getattr(model, "config", None)
    n_blocks, hidden = getattr(config, "num_hidden_layers", None), getattr(config, "hidden_size", None)
    if not n_blocks or not hidden:
        raise PlanError(f"{type(model).__name__}: the sharded estimate needs a config with num_hidden_layers "
                        "and hidden_size (a Hugging Face model)")
    runs = [estimate(_with_blocks(model, k), plan, batch=batch, seq=seq, optimizer=optimizer, dtype=dtype,
                     train_device=train_device).after for k in (1, 2)]
    one, two = runs

    def split(get) -> tuple[int, int]:  # (per block, root)
        block = get(two) - get(one)
        return block, get(one) - block

    buffers = two.weights.get("buffers", 0)
    w_blk, w_root = split(lambda b: b.weight_bytes - b.weights.get("buffers", 0))
    g_blk, g_root = split(lambda b: b.gradients)
    s_blk, s_root = split(lambda b: b.optimizer_state)
    a_blk, a_root = split(lambda b: b.activations)
    t_blk, t_root = split(lambda b: b.optimizer_transient)
    transient = max(two.forward_backward_peak - two.activations, 0)
    W, N = world_size, n_blocks
    act_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype or torch.float32
    hidden_state = batch * seq * hidden * torch.empty(0, dtype=act_dtype).element_size()
    if checkpoint == "blocks":
        kept_inputs = 2 * hidden_state if offload == "cpu" else N * hidden_state
        activations = kept_inputs + a_blk + a_root
    else:
        activations = N * a_blk + a_root
    sharded = -(-(w_root + N * w_blk) // W) + buffers
    gathered = w_root + 2 * w_blk if W > 1 else 0
    grads = -(-(g_root + N * g_blk) // W)
    state = -(-(s_root + N * s_blk) // W)
    opt_transient = -(-(t_root + N * t_blk) // W)
    peak = sharded + gathered + two.inputs + state + max(activations + transient, grads + opt_transient)
    return ShardedEstimate(world_size=W, blocks=N, checkpoint=checkpoint, offload=offload, sharded_weights=sharded,
                           gathered_weights=gathered, gradients=grads, optimizer_state=state, activations=activations,
                           transient=transient, optimizer_transient=opt_transient, inputs=two.inputs, peak=peak,
                           block_weights=w_blk, root_weights=w_root)
