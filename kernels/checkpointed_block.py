"""A transformer block that recomputes its forward during backward, and keeps its inputs on the host.

:class:`CheckpointedBlock` takes the place of an outlined block (a ``GraphModule`` at
``model.layers.3``, see :mod:`peftfx.distributed.blocks`) and runs it under
``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``:

* ``policy = "none"``: no recompute, the block runs as it is (a planner's per-block choice).
* ``policy = "full"``: nothing inside the block is saved for backward; the block's inputs are
  (non-reentrant checkpoint saves them through autograd's saved-tensor hooks), and backward
  re-runs the block's forward first. RNG state (dropout) is restored before the recompute, so the
  recomputed masks are the forward's.
* ``policy = "selective"``: torch's selective activation checkpointing
  (``create_selective_checkpoint_contexts``) saves the outputs of the ops in :data:`SAVE_OPS`
  (matmuls, attention, the fused QLoRA linear: the expensive ones) and recomputes the rest
  (norms, rotary embeddings, activations, residual adds).

The block's graph, children, parameters and buffers move into the checkpointed block, so every
parameter keeps its fully qualified name (``model.layers.3.self_attn.q_proj.lora_A``) and tensor
identity: state dicts, adapter files, PEFT export and optimizers see no difference, and FSDP2's
``fully_shard`` on it swaps the same parameters the block graph reads.

``offload = True`` moves the saved block inputs to pinned host memory as they are saved (a copy on
a side stream, so the forward continues meanwhile) and back to the device when backward unpacks
them. Only CUDA tensors move; on CPU there is nowhere to offload to, and tensors stay as they are.
:func:`offload_hooks` swaps the pack/unpack pair, which is how the memory estimate simulates a
CUDA offload on fake CPU tensors.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Any, Callable

import torch
from torch.fx import GraphModule
from torch.fx.graph_module import _USER_PRESERVED_ATTRIBUTES_KEY as _PRESERVED
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

import peftfx.kernels.ops  # noqa: F401  (registers peftfx::qlora_linear, which the selective policy saves)
from peftfx.kernels.tiled_mlp import in_tiled_forward

__all__ = ["CheckpointedBlock", "SAVE_OPS", "POLICIES", "save_policy", "HostOffload", "offload_hooks"]

POLICIES = ("none", "full", "selective")
_aten = torch.ops.aten


def _ops(*names: str) -> tuple:
    """The aten overload packets that exist in this torch (attention kernels vary by version)."""
    return tuple(getattr(_aten, n) for n in names if hasattr(_aten, n))


SAVE_OPS = _ops("mm", "addmm", "bmm", "baddbmm", "_scaled_dot_product_flash_attention",
                "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_efficient_attention",
                "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_fused_attention_overrideable")
"""Op packets whose outputs the selective policy saves; ``peftfx::qlora_linear`` is added at import."""


def _custom_save_ops() -> tuple:
    return (torch.ops.peftfx.qlora_linear,)


def save_policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    """Selective checkpointing: save matmul / attention / QLoRA-linear outputs, recompute the rest.

    Nothing is saved from inside a tiled MLP's forward: its backward recomputes its chunks itself."""
    if in_tiled_forward():
        return CheckpointPolicy.PREFER_RECOMPUTE
    packet = getattr(op, "overloadpacket", op)
    return CheckpointPolicy.MUST_SAVE if packet in _SAVED else CheckpointPolicy.PREFER_RECOMPUTE


_SAVED = frozenset(SAVE_OPS + _custom_save_ops())


class HostOffload:
    """Saved-tensor hooks that park CUDA tensors in pinned host memory until backward needs them.

    ``pack`` starts a device-to-host copy on a side stream (the compute stream does not wait for
    it) and returns a handle; ``unpack`` makes the compute stream wait for that copy, then copies
    back. Tensors smaller than ``min_bytes`` and non-CUDA tensors are kept as they are.
    """

    def __init__(self, min_bytes: int = 1 << 16) -> None:
        self.min_bytes = min_bytes
        self._streams: dict[torch.device, Any] = {}

    def _stream(self, device: torch.device):
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    def pack(self, t: torch.Tensor) -> Any:
        if t.device.type != "cuda" or t.numel() * t.element_size() < self.min_bytes:
            return t
        stream = self._stream(t.device)
        stream.wait_stream(torch.cuda.current_stream(t.device))
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        with torch.cuda.stream(stream):
            host.copy_(t, non_blocking=True)
        t.record_stream(stream)  # the device memory is not reused before the copy has read it
        return t.device, host, stream.record_event()

    def unpack(self, packed: Any) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        device, host, copied = packed
        torch.cuda.current_stream(device).wait_event(copied)
        return host.to(device, non_blocking=True)


_OFFLOAD: contextvars.ContextVar[Any] = contextvars.ContextVar("peftfx_offload", default=None)
_DEFAULT_OFFLOAD = HostOffload()


@contextlib.contextmanager
def offload_hooks(pack: Callable[[torch.Tensor], Any], unpack: Callable[[Any], torch.Tensor]):
    """Use ``pack``/``unpack`` instead of :class:`HostOffload` for offloading blocks run inside."""
    token = _OFFLOAD.set((pack, unpack))
    try:
        yield
    finally:
        _OFFLOAD.reset(token)


class CheckpointedBlock(GraphModule):
    """An outlined block's graph, run under non-reentrant activation checkpointing.

    Args:
        block: the outlined block (a ``GraphModule``); its graph, children, parameters and buffers
            move over unchanged (same names, same tensor objects).
        policy: ``"full"`` (recompute everything; keep only the inputs), ``"selective"`` or
            ``"none"`` (no recompute).
        offload: park the saved inputs in pinned host memory (CUDA only; not with ``"none"``).

    Shapes: whatever ``block`` takes and returns (``[batch, seq, hidden]`` hidden states and the
    position embeddings / masks the root computes); outputs and gradients are bitwise ``block``'s.
    A subclass of ``GraphModule`` so that copies and pickles stay checkpointed blocks (the policy
    travels in ``meta``, which ``GraphModule.__deepcopy__`` restores as attributes).
    """

    def __init__(self, block: GraphModule, *, policy: str = "full", offload: bool = False) -> None:
        super().__init__(block, block.graph, class_name=f"Checkpointed{type(block).__name__}")
        # GraphModule.__init__ copied only what the graph names; keep the block's own children and
        # tensors (same objects, same order) so nothing in the state dict changes
        for attr in ("_modules", "_parameters", "_buffers"):
            getattr(self, attr).clear()
            getattr(self, attr).update(getattr(block, attr))
        self._non_persistent_buffers_set = set(block._non_persistent_buffers_set)
        self.train(block.training)
        self.meta = dict(getattr(block, "meta", {}))
        self.set_policy(policy, offload)

    def set_policy(self, policy: str, offload: bool) -> None:
        """Switch what the block keeps (``"full"`` / ``"selective"``) and whether it offloads."""
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        self.policy, self.offload = policy, bool(offload)
        self.meta[_PRESERVED] = {"policy": policy, "offload": bool(offload)}

    def _context(self):
        if self.policy == "selective":
            return create_selective_checkpoint_contexts(save_policy)
        return contextlib.nullcontext(), contextlib.nullcontext()

    def recompile(self):
        # GraphModule puts the generated forward on this instance's own class; keep it as
        # _graph_forward and make forward the checkpointed call of it. Module hooks (FSDP2's
        # unshard/reshard) stay outside the checkpoint, so the recompute does not re-run them.
        code = super().recompile()
        cls = type(self)
        cls._graph_forward = cls.__dict__["forward"]  # just generated by GraphModule.recompile
        cls.forward = CheckpointedBlock._checkpointed_forward
        return code

    def _checkpointed_forward(self, *args: Any) -> Any:
        run = functools.partial(type(self)._graph_forward, self)
        if not torch.is_grad_enabled() or self.policy == "none":
            return run(*args)
        ckpt = functools.partial(checkpoint, run, use_reentrant=False, context_fn=self._context)
        if not self.offload:
            return ckpt(*args)
        pack, unpack = _OFFLOAD.get() or (_DEFAULT_OFFLOAD.pack, _DEFAULT_OFFLOAD.unpack)
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            return ckpt(*args)

    def __reduce__(self) -> tuple[Any, ...]:
        rebuild, args = super().__reduce__()
        return _rebuild, (rebuild, args, self.policy, self.offload)

    def extra_repr(self) -> str:
        return f"policy={self.policy!r}, offload={self.offload}"


def _rebuild(rebuild: Callable, args: tuple, policy: str, offload: bool) -> CheckpointedBlock:
    """Unpickle: GraphModule's own rebuild of the graph code, wrapped again."""
    return CheckpointedBlock(rebuild(*args), policy=policy, offload=offload)
