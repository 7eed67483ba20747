"""``peftfx.distributed``: compiled models under DDP and FSDP2, only where PyTorch lacks a piece.

A compiled model is a ``torch.fx.GraphModule`` (torch.export's ``ep.module()``) whose frozen base
lives in *buffers* (packed uint8/int8 NF4/int8 codes and their scales) and whose only trainable
tensors are adapter *parameters*. That split is what makes data parallelism safe:

* DDP all-reduces only parameters that require grad, so only adapters travel; buffers are
  broadcast once at construction (identical, byte-exact) and never again: re-broadcasting them
  every forward (DDP's default) would send the whole quantized model each step.
* FSDP2 shards parameters only. :func:`shard` makes the packed base frozen parameters whose
  data is a :class:`~peftfx.distributed.base_sharding.FrozenStorage` (FSDP2's all-gather
  extension), so it is sharded across ranks but gathered as raw bytes: a mixed-precision policy
  never casts it (FSDP+QLoRA stacks that store 4-bit codes in a float "quant_storage" parameter
  are exposed to exactly that cast, and to NaN-canonicalizing copies of the bytes).

Three things PyTorch does not do for us, and this module does:

1. **Unused adapters.** DDP and FSDP2 assume every rank produces a gradient for the same
   parameters. If a step's loss does not reach some adapter on one rank (an auxiliary head
   used only for some batches), DDP stops with "Expected to have finished reduction" (and
   the peer blocks in its all-reduce), and FSDP2 reduce-scatters different parameter sets on
   different ranks. :func:`keep_adapters_in_graph` adds ``0 * sum(adapter params)`` to every
   floating output, so every adapter always gets a (possibly zero) gradient on every rank; the
   all-reduced gradient is then exactly the one of single-process training on the global batch.
2. **FSDP2 sharding of an exported graph.** The graph reads block parameters with ``get_attr``
   instead of calling the block modules, so ``fully_shard`` on ``model.layers.N`` alone would
   never fire its hooks. :func:`shard` first outlines each block into a submodule the root graph
   calls (``peftfx.distributed.blocks.outline_blocks``: same names, same ops), then shards each block and
   then the root, after broadcasting rank 0's tensors (FSDP2 has no ``sync_module_states``:
   LoRA A is randomly initialized on each rank).
3. **Saving from FSDP2.** :func:`full_adapter_state_dict` gathers the trainable parameters
   (DTensor shards) into full CPU tensors on rank 0, under the compiled model's own names;
   :func:`save_adapters` is ``peftfx.save_adapters`` (which gathers shards itself) written by
   rank 0 only (loadable by ``peftfx.load_adapters`` in a single process).

:func:`check_in_sync` compares byte fingerprints of every parameter and buffer across ranks and
names the first tensor that differs: a cheap guard against silent divergence.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils.hooks import RemovableHandle

from peftfx.distributed.base_sharding import FrozenStorage, is_sharded, make_base_shardable
from peftfx.distributed.blocks import outline_blocks
from peftfx.errors import PeftfxError
from peftfx.io.checkpoint import save_adapters as save_file

__all__ = [
    "ddp",
    "shard",
    "keep_adapters_in_graph",
    "full_adapter_state_dict",
    "save_adapters",
    "check_in_sync",
    "unwrap",
    "ANCHOR_ATTR",
]

ANCHOR_ATTR = "_peftfx_adapter_anchor"


def unwrap(model: nn.Module) -> nn.Module:
    """The compiled module inside a ``DistributedDataParallel`` wrapper (or ``model`` itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _check_storage(gm: nn.Module) -> None:
    """Refuse integer *parameters*: DDP/FSDP treat parameters as float weights (cast, shard, reduce).

    The exception is peftfx's own frozen base storage (:class:`~peftfx.distributed.base_sharding.FrozenStorage`,
    made by :func:`shard`), which FSDP2 gathers as raw bytes and never casts or reduces."""
    from torch.distributed.tensor import DTensor


    for name, p in gm.named_parameters():
        if isinstance(p._local_tensor if isinstance(p, DTensor) else p, FrozenStorage) and not p.requires_grad:
            continue
        if not (p.is_floating_point() or p.is_complex()):
            raise PeftfxError(
                f"parameter {name!r} has dtype {p.dtype}: packed quantized storage must be a buffer, "
                "not an nn.Parameter, or DDP/FSDP would broadcast, shard or cast it as a weight; "
                "register it with register_buffer (as peftfx.kernels.modules.QLoRALinear does)"
            )


def keep_adapters_in_graph(module: nn.Module, *, skip: tuple[str, ...] = ()) -> RemovableHandle:
    """Give every trainable parameter a gradient in every step, on every rank.

    Registers a forward hook that adds ``0 * sum_p p.sum()`` (``p`` over the parameters that
    require grad, read at call time so FSDP2's unsharded parameters are used) to every floating
    output tensor that requires grad. Values are unchanged (``x + 0.0 == x``) and so are
    gradients (each adapter's gradient gains an exact ``+ 0``), but an adapter the loss does not
    reach gets a zero gradient instead of none, so DDP's and FSDP2's reductions see the same
    parameters on every rank. Call it before ``fully_shard`` (the hook must run while FSDP2 still
    holds unsharded parameters); :func:`ddp` and :func:`shard` do.

    Args:
        module: the compiled GraphModule (any ``nn.Module`` works).
        skip: submodule paths whose parameters are left out (blocks that anchor their own
            parameters with their own hook: under per-block FSDP2 they are resharded, hence
            DTensor shards, by the time the root's forward ends).

    Returns:
        The hook handle (``handle.remove()`` undoes it).
    """
    handle = getattr(module, ANCHOR_ATTR, None)
    if handle is not None and handle.id in module._forward_hooks:
        return handle

    def hook(mod: nn.Module, args: Any, output: Any) -> Any:
        params = [p for n, p in mod.named_parameters()
                  if p.requires_grad and not any(n.startswith(s + ".") for s in skip)]
        if not params or not torch.is_grad_enabled():
            return output
        anchor = torch.stack([p.sum().to(torch.float32) for p in params]).sum() * 0.0

        def add(t: torch.Tensor) -> torch.Tensor:
            if t.is_floating_point() and t.requires_grad:
                return t + anchor.to(t.dtype)
            return t

        return pytree.tree_map_only(torch.Tensor, add, output)

    handle = module.register_forward_hook(hook)
    object.__setattr__(module, ANCHOR_ATTR, handle)  # plain attribute: not a submodule or state
    return handle


def ddp(gm: nn.Module, *, device_ids: list[int] | None = None, process_group: Any = None,
        keep_adapters: bool = True, **ddp_kwargs: Any) -> nn.parallel.DistributedDataParallel:
    """Wrap a compiled model in ``DistributedDataParallel`` with settings safe for packed weights.

    * ``forward_sync_buffers=False``: buffers (the packed base) are broadcast once from rank 0 at
      construction, byte-exact, then never again; DDP's default re-broadcasts all buffers every
      forward, i.e. the whole quantized model each step, for bytes that never change.
    * Only parameters requiring grad are all-reduced: adapters (DDP skips frozen parameters).
    * :func:`keep_adapters_in_graph` (``keep_adapters=True``) so a step in which the loss misses
      an adapter on some rank still reduces identical parameter sets: no error, no divergence,
      and ``find_unused_parameters`` (an autograd-graph walk per step) is not needed.

    Args:
        gm: the compiled model, already on its device (``gm.to(device)`` before wrapping).
        device_ids: as DDP's (``[local_rank]`` on CUDA, None on CPU).
        process_group: as DDP's.
        keep_adapters: install :func:`keep_adapters_in_graph`.
        **ddp_kwargs: passed to ``DistributedDataParallel`` (override anything above).

    Returns:
        The DDP-wrapped model; ``peftfx.distributed.unwrap(model)`` is ``gm``.

    Example::

        >>> model = peftfx.distributed.ddp(gm)              # inside torchrun, after init_process_group
        >>> loss = model(**batch).loss; loss.backward(); opt.step()
    """
    _check_storage(gm)
    if not any(p.requires_grad for p in gm.parameters()):
        raise PeftfxError("ddp: the model has no trainable parameters (a quantize-only plan?); "
                          "there is nothing to all-reduce: run it without DDP")
    if keep_adapters:
        keep_adapters_in_graph(gm)
    ddp_kwargs.setdefault("forward_sync_buffers", False)
    return nn.parallel.DistributedDataParallel(gm, device_ids=device_ids, process_group=process_group,
                                               **ddp_kwargs)


def _broadcast_state(module: nn.Module, group: Any = None) -> None:
    """Copy rank 0's parameters and buffers to every rank (FSDP2 has no ``sync_module_states``).

    Meta tensors (a sharded ``peftfx.load`` fills each rank's shard after sharding) are skipped."""
    src = dist.get_global_rank(group, 0) if group is not None else 0
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            if t.device.type != "meta":
                dist.broadcast(t.data, src=src, group=group)


def shard(gm: nn.Module, *, mesh: Any = None, mp_policy: Any = None, reshard_after_forward: bool | None = None,
          offload_policy: Any = None, sync: bool = True, keep_adapters: bool = True,
          per_block: bool = True, shard_base: bool = True) -> nn.Module:
    """Apply FSDP2 (``fully_shard``) to a compiled model, in place: each block, then the root.

    The exported graph reads every block's parameters directly (``get_attr``) rather than calling
    the block, so the blocks are first outlined into submodules the root graph calls, registered
    at their own paths (``peftfx.distributed.blocks.outline_blocks``: parameter names, tensors, ops and
    results are unchanged). Each block (``model.layers.N``) then becomes its own FSDP group,
    gathered just before it runs and resharded after, and the root group holds the rest
    (embeddings, final norm, head). Adapter gradients are reduce-scattered, so optimizer state is
    sharded too. The frozen packed base (codes, block scales, double-quant scales, zero points,
    bias) is sharded too (``shard_base``): each layer's storage becomes frozen parameters that
    FSDP2 splits along dim 0 and all-gathers per block as raw bytes, never cast by ``mp_policy``
    (fp32 scales stay fp32 under bf16) and never given gradients
    (:mod:`peftfx.distributed.base_sharding`); each rank then holds ~1/W of the packed model
    between uses. If the blocks cannot be outlined exactly
    (a tied weight read outside its block, interleaved blocks), the whole model is one group and
    a warning says why. ``gm.meta["peftfx.fsdp_groups"]`` lists the groups (root last, as ``""``).

    Args:
        gm: the compiled model on its device (CPU with gloo, or ``cuda:local_rank``).
        mesh: a 1-D ``DeviceMesh`` (default: all ranks on the model's device type).
        mp_policy: ``torch.distributed.fsdp.MixedPrecisionPolicy`` (parameters only).
        reshard_after_forward: as ``fully_shard``'s.
        offload_policy: as ``fully_shard``'s.
        sync: broadcast rank 0's parameters and buffers first, so every rank shards the same
            values (randomly initialized LoRA A differs per rank otherwise).
        keep_adapters: install :func:`keep_adapters_in_graph` (before sharding, as it must be),
            on each block for its own parameters and on the root for the rest.
        per_block: one group per block (False: one group for the whole model).
        shard_base: shard the frozen packed base across ranks (False: replicate it on every
            rank as plain buffers, each rank holding the whole packed model).

    Returns:
        ``gm``, now also an ``FSDPModule`` (``gm.unshard()``, ``gm.reshard()``, ...); so is each block.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, OffloadPolicy, fully_shard


    _check_storage(gm)
    if sync:
        _broadcast_state(gm, mesh.get_group() if mesh is not None else None)
    if shard_base:
        make_base_shardable(gm)
    blocks: list[str] = []
    if per_block and isinstance(gm, torch.fx.GraphModule):
        outlined = outline_blocks(gm)
        blocks = outlined.blocks
        if not blocks and outlined.found:
            warnings.warn(f"peftfx.distributed.shard: one FSDP2 group for the whole model, not one per block "
                          f"({len(outlined.found)} blocks found): {outlined.reason}", stacklevel=2)
    if keep_adapters:
        for b in blocks:
            keep_adapters_in_graph(gm.get_submodule(b))
        previous = getattr(gm, ANCHOR_ATTR, None)
        if previous is not None and blocks:
            previous.remove()  # it would read the blocks' parameters after they are resharded
        keep_adapters_in_graph(gm, skip=tuple(blocks))
    kwargs: dict[str, Any] = {"mp_policy": mp_policy or MixedPrecisionPolicy(),
                              "offload_policy": offload_policy or OffloadPolicy()}
    if mesh is not None:
        kwargs["mesh"] = mesh
    if reshard_after_forward is not None:
        kwargs["reshard_after_forward"] = reshard_after_forward
    for b in blocks:
        fully_shard(gm.get_submodule(b), **kwargs)
    if isinstance(getattr(gm, "meta", None), dict):
        gm.meta["peftfx.fsdp_groups"] = [*blocks, ""]
    return fully_shard(gm, **kwargs)


def full_adapter_state_dict(model: nn.Module, *, rank0_only: bool = True) -> dict[str, torch.Tensor]:
    """The full trainable-parameter state dict, on CPU, from a plain, DDP or FSDP2 model.

    Collective under FSDP2: every rank must call it (each DTensor shard is all-gathered). Names
    are the compiled model's own (``model.layers.0.self_attn.q_proj.lora_A``), without DDP's
    ``module.`` prefix, so the result loads into a single-process compiled model.

    Args:
        model: the compiled model, its DDP wrapper, or the compiled model after :func:`shard`.
        rank0_only: return an empty dict on ranks other than 0 (the saving rank).

    Returns:
        ``{name: tensor}`` (full shapes, detached, on CPU) for every parameter requiring grad.
    """
    from torch.distributed.tensor import DTensor

    gm = unwrap(model)
    is_rank0 = not dist.is_initialized() or dist.get_rank() == 0
    out: dict[str, torch.Tensor] = {}
    for name, p in gm.named_parameters():
        if not p.requires_grad:
            continue
        t = p.detach()
        if isinstance(t, DTensor):
            t = t.full_tensor()  # collective: all ranks take part, only rank 0 keeps the result
        if is_rank0 or not rank0_only:
            out[name] = t.cpu().clone()
    return out


def save_adapters(model: nn.Module, directory: str | os.PathLike) -> Path | None:
    """``peftfx.save_adapters`` for a DDP or FSDP2 model: one file, written by rank 0.

    Collective: every rank must call it. It is ``peftfx.save_adapters`` itself (the same file a
    single process writes: names, plan, layer facts, base fingerprint), which gathers FSDP2 shards
    (adapters and the sharded packed base) tensor by tensor; for a DDP replica only rank 0
    writes. Ranks meet at a barrier after the write, so the file exists when any rank returns.

    Returns:
        The file path on rank 0, None on the other ranks.
    """
    gm = unwrap(model)
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    if is_sharded(gm):
        path = save_file(gm, directory)  # collective: gathers, rank 0 writes, all meet at a barrier
    else:
        path = save_file(gm, directory) if rank0 else None
        if dist.is_initialized():
            dist.barrier()
    return path if rank0 else None


def _fingerprint(t: torch.Tensor) -> torch.Tensor:
    """Two int64 checksums of ``t``'s bytes (plain sum and position-weighted sum)."""
    b = t.detach().contiguous().view(-1).view(torch.uint8).to(torch.int64)
    w = torch.arange(b.numel(), device=b.device, dtype=torch.int64) % 65521 + 1
    return torch.stack([b.sum(), (b * w).sum(), torch.tensor(b.numel(), device=b.device)])


def check_in_sync(model: nn.Module, *, group: Any = None, buffers: bool = True) -> None:
    """Raise if any replicated parameter or buffer differs between ranks (collective).

    Compares byte fingerprints (all-gathered, 3 int64 per tensor), so it is cheap enough to call
    every few hundred steps. FSDP2-sharded parameters (DTensors) differ by design and are skipped.

    Raises:
        PeftfxError: naming the first differing tensors and the ranks holding them.
    """
    from torch.distributed.tensor import DTensor

    gm = unwrap(model)
    named = [(n, t) for n, t in gm.named_parameters() if not isinstance(t, DTensor)]
    if buffers:
        named += list(gm.named_buffers())
    if not named:
        return
    local = torch.stack([_fingerprint(t) for _, t in named]).cpu()
    backend = dist.get_backend(group)
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    gathered = [torch.empty_like(local, device=device) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, local.to(device), group=group)
    gathered = [g.cpu() for g in gathered]
    bad = [named[i][0] for i in range(len(named)) if any(not torch.equal(g[i], gathered[0][i]) for g in gathered)]
    if bad:
        raise PeftfxError(f"ranks diverged: {len(bad)} tensor(s) differ from rank 0's, e.g. {', '.join(bad[:5])}; "
                          "replicas must be built from the same weights and plan (seed before peftfx.compile) "
                          "and trained with peftfx.distributed.ddp/shard")
