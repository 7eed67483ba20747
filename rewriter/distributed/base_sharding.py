"""Shard the frozen (packed) base across ranks under FSDP2, byte-exact and never cast.

A compiled model keeps each swapped layer's frozen base in buffers of its ``QLoRALinear``:
packed NF4/FP4 codes (uint8 ``[ceil(numel/2)]``), int8 codes (``[numel]`` or LLM.int8's
``[out, in]``), fp32 block scales ``[n_blocks]``, double-quant uint8 scale codes + fp32
``scales2``, int8-zeropoint's fp32 zero points, a dense frozen weight for format ``"none"``,
and the bias. FSDP2 shards parameters only, so replicated buffers cost every rank the whole
packed model (33 GiB for Llama-2-70B in NF4).

:func:`make_base_shardable` turns those buffers into *frozen parameters* (``requires_grad=False``,
same names, same bytes) whose data is a :class:`FrozenStorage`, a plain ``torch.Tensor``
subclass implementing FSDP2's all-gather extension (as torchao's ``NF4Tensor`` does):

* ``fsdp_pre_all_gather`` hands FSDP2 the local shard *as it is*: FSDP2's mixed-precision cast
  (``param_dtype``) is applied only on its default path, so fp32 scales stay fp32 under a bf16
  policy (integer codes are never cast anyway). A group mixing dtypes is gathered as raw uint8
  bytes by FSDP2, so what arrives is bit-for-bit what was sharded.
* ``fsdp_post_all_gather`` returns the gathered bytes as a plain tensor (a view of FSDP2's
  all-gather buffer, freed again after the block runs), so ``QLoRALinear.forward`` and the
  kernels see the same plain uint8/int8/fp32 tensors as without FSDP2.
* No gradient: the parameters never require grad, so nothing is reduce-scattered for them and
  the optimizer never sees them.

FSDP2 shards every tensor along dim 0 (flattened 1-D storage, or LLM.int8's rows), padding the
last rank's shard, so each rank holds ``~1/W`` of the packed model between uses. 0-d tensors
(the double-quant scalar offset) stay replicated buffers: FSDP2 cannot shard a scalar.

:func:`gathered_state_dict` all-gathers a sharded model's state into full CPU tensors (one tensor
at a time, ties kept), which the checkpoint writers take instead of reading the module.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from peftfx.kernels.modules import QLoRALinear

__all__ = ["FrozenStorage", "BASE_TENSORS", "local_tensor", "make_base_shardable", "base_storage_names",
           "gathered_state_dict", "full_tensor", "rank_chunk", "local_slice", "is_sharded", "local_bytes"]

# QLoRALinear attributes holding the frozen base (the packed weight and what decodes it).
BASE_TENSORS = ("weight", "weight_scales", "weight_scales2", "weight_offset", "bias")


class FrozenStorage(Tensor):
    """Frozen base storage that FSDP2 all-gathers as raw bytes, never casting it.

    A wrapper tensor subclass around a plain tensor (``_data``): every op runs on the wrapped
    tensor and tensor results are wrapped again (in-place ops return the wrapper they changed),
    so FSDP2's sharding code (chunk, pad, copy, view) works unchanged and the local shard stays a
    ``FrozenStorage`` inside the ``DTensor`` (a plain subclass would be stripped by DTensor's
    dispatch). Only the two all-gather extension hooks differ from a plain tensor.
    """

    _data: Tensor

    @staticmethod
    def __new__(cls, data: Tensor) -> "FrozenStorage":
        data = data.detach()
        out = Tensor._make_wrapper_subclass(cls, data.shape, strides=data.stride(),
                                            storage_offset=data.storage_offset(), dtype=data.dtype,
                                            device=data.device, requires_grad=False)
        out._data = data
        return out

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        plain_args, plain_kwargs = pytree.tree_map_only(FrozenStorage, lambda t: t._data, (args, kwargs or {}))
        out = func(*plain_args, **plain_kwargs)
        if plain_args and out is plain_args[0]:  # in-place (copy_, zero_): the wrapper it changed
            return args[0]
        return pytree.tree_map_only(Tensor, FrozenStorage, out)

    def __tensor_flatten__(self) -> tuple[list[str], None]:
        return ["_data"], None

    @staticmethod
    def __tensor_unflatten__(inner: dict[str, Tensor], meta: None, outer_size: Any,
                             outer_stride: Any) -> "FrozenStorage":
        return FrozenStorage(inner["_data"])

    def __repr__(self) -> str:
        return f"FrozenStorage({self._data!r})"

    def fsdp_pre_all_gather(self, mesh: Any, outer_size: torch.Size, outer_stride: tuple[int, ...],
                            module: nn.Module, mp_policy: Any) -> tuple[tuple[Tensor, ...], None]:
        """The local shard, padded to FSDP2's padded shard size, in its own dtype (no cast)."""
        local = self._data
        padded_rows = -(-outer_size[0] // mesh.size())  # torch.chunk's chunk size: pad to it
        if local.size(0) != padded_rows:
            pad = local.new_zeros((padded_rows - local.size(0), *local.shape[1:]))
            local = torch.cat([local, pad])
        return (local,), None

    def fsdp_post_all_gather(self, all_gather_outputs: tuple[Tensor, ...], metadata: None, param_dtype: Any, *,
                             out: Tensor | None = None) -> tuple[Tensor, tuple[Tensor, ...]] | None:
        """The gathered bytes as a plain tensor (FSDP2 trims the padding with ``as_strided``).

        ``out`` is set from the second all-gather on: the unsharded tensor is then already a
        view of the all-gather buffer FSDP2 just refilled, so there is nothing to do.
        """
        (gathered,) = all_gather_outputs
        if out is not None:
            return None
        return gathered, ()


def local_tensor(t: Tensor) -> Tensor:
    """The plain tensor behind ``t``: a DTensor's local shard, unwrapped from :class:`FrozenStorage`."""
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        t = t._local_tensor
    return t._data if isinstance(t, FrozenStorage) else t


def base_storage_names(module: nn.Module) -> list[str]:
    """Names of ``module``'s frozen base tensors FSDP2 can shard (non-empty, at least 1-D)."""
    out = []
    for name in BASE_TENSORS:
        t = module._buffers.get(name)
        if t is not None and t.dim() >= 1 and t.numel() > 0 and name not in module._non_persistent_buffers_set:
            out.append(name)
    return out


def make_base_shardable(gm: nn.Module) -> list[str]:
    """Turn every swapped layer's frozen base buffers into frozen :class:`FrozenStorage` parameters.

    In place and idempotent; names, dtypes, shapes and bytes are unchanged (the same storage is
    reused), so state dicts and checkpoints keep their keys. Call it before ``fully_shard``
    (:func:`peftfx.distributed.shard` does).

    Returns:
        The fully qualified names converted (``model.layers.0.self_attn.q_proj.weight``, ...).
    """
    converted = []
    for fqn, m in gm.named_modules():
        if not isinstance(m, QLoRALinear):
            continue
        for name in base_storage_names(m):
            t = m._buffers.pop(name)
            m.register_parameter(name, nn.Parameter(FrozenStorage(t), requires_grad=False))
            converted.append(f"{fqn}.{name}" if fqn else name)
    return converted


def full_tensor(t: Tensor) -> Tensor:
    """``t`` whole, as a plain tensor: a DTensor is all-gathered (collective: every rank must call
    it, for the same tensors in the same order); a :class:`FrozenStorage` is unwrapped."""
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        local = local_tensor(t)
        if local is not t._local_tensor:  # gather the plain bytes, not the wrapper
            t = DTensor.from_local(local, t.device_mesh, t.placements, run_check=False, shape=t.shape,
                                   stride=t.stride())
        t = t.full_tensor()
    return local_tensor(t.detach())


def gathered_state_dict(model: nn.Module, *, rank0_only: bool = True) -> dict[str, Tensor]:
    """``model.state_dict()`` with every FSDP2 shard gathered into a full CPU tensor (collective).

    Every rank must call it; tensors are gathered one at a time (host peak: the kept tensors
    plus one), in the same order on every rank. Tied entries (one tensor under two names) stay
    one tensor, so the checkpoint writers store them once as a single process does.

    Args:
        model: the compiled model (plain, DDP-wrapped or sharded by :func:`peftfx.distributed.shard`).
        rank0_only: keep the tensors on rank 0 only (other ranks return ``{}``).

    Returns:
        ``{name: tensor}``: full shapes, plain tensors, detached, on CPU.
    """
    gm = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    keep = not rank0_only or not dist.is_initialized() or dist.get_rank() == 0
    seen: dict[int, Tensor] = {}
    out: dict[str, Tensor] = {}
    for name, t in gm.state_dict(keep_vars=True).items():
        if id(t) not in seen:
            full = full_tensor(t)
            seen[id(t)] = full.cpu().clone() if keep else full.new_empty(0)
        if keep:
            out[name] = seen[id(t)]
    return out


def is_sharded(gm: nn.Module) -> bool:
    """Whether any parameter of ``gm`` is an FSDP2 shard (a DTensor)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in gm.parameters())


def rank_chunk(full: Tensor, world_size: int, rank: int) -> Tensor:
    """Rank ``rank``'s dim-0 chunk of ``full`` as FSDP2 cuts it (``torch.chunk``: equal chunks,
    the last ones shorter or empty); a view."""
    chunks = torch.chunk(full, world_size, dim=0)
    return chunks[rank] if rank < len(chunks) else full.narrow(0, 0, 0)


def local_slice(full: Tensor, like: Tensor) -> Tensor:
    """This rank's dim-0 chunk of ``full`` for the FSDP2 shard ``like`` (a DTensor)."""
    return rank_chunk(full, like.device_mesh.size(), like.device_mesh.get_local_rank())


def local_bytes(gm: nn.Module, names: list[str] | None = None) -> int:
    """Bytes this rank holds for the frozen base storage (sharded parameters count their local,
    padded shard; replicated buffers their whole size). ``names``: the tensors to count
    (default: every :data:`BASE_TENSORS` entry of every swapped layer)."""
    from torch.distributed.tensor import DTensor


    total = 0
    for fqn, m in gm.named_modules():
        if not isinstance(m, QLoRALinear):
            continue
        for name in BASE_TENSORS:
            key = f"{fqn}.{name}" if fqn else name
            t = m._parameters.get(name, m._buffers.get(name))
            if t is None or (names is not None and key not in names):
                continue
            if isinstance(t, DTensor):  # the local shard's storage: FSDP2's padded shard
                total += local_tensor(t).untyped_storage().nbytes()
            else:
                total += t.numel() * t.element_size()
    return total
