"""A simulated allocator: the live-bytes peak of a training step run on fake tensors, and the real one.

:class:`Allocations` is a ``TorchDispatchMode`` that adds each new output storage's bytes when an op
creates it and subtracts them when the storage dies (a weakref finalizer on the storage; torch keeps
one Python object per storage), giving the live-bytes peak of forward + backward (activations,
transients, recomputed blocks, gradients). A ``saved_tensors_hooks`` pair sums the bytes autograd
saves for backward (deduplicated by storage, parameters and buffers excluded): the "activations" line.
With ``train_device = "cuda"``, blocks that offload (``memory.offload = "cpu"``) hand their saved
inputs to :meth:`Allocations.to_host`, which counts them as host bytes, not device bytes, until
backward copies them back.

The optimizer is analytic: AdamW state = 2 x trainable bytes; ``adamw-8bit`` (bitsandbytes
blockwise, 256-element blocks, fp32 state below 4096 elements) ~2 bytes/param; SGD none. The step's
temporaries: torch's single-tensor AdamW (the CPU default) holds two temporaries the size of one
parameter; the foreach AdamW (CUDA default) one copy of all of them. The peak of a steady-state step
(state exists, grads set to None before the forward) is
``weights + buffers + inputs + optimizer state + max(forward/backward peak, grads + step temporaries)``.

:func:`measure_peak` measures a real step the same way from the torch profiler's allocator events.
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Any, Callable

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from peftfx.errors import PlanError
from peftfx.kernels.checkpointed_block import HostOffload, offload_hooks
from peftfx.memory.breakdown import Breakdown
from peftfx.optim.state_bytes import OPTIMIZER_NAMES, optimizer_state_bytes, optimizer_step_bytes

__all__ = ["Allocations", "OPTIMIZERS", "loss_of", "call", "measure", "measure_peak"]

OPTIMIZERS = OPTIMIZER_NAMES  # the one list lives with the optimizers (peftfx.optim)


class Allocations(TorchDispatchMode):
    """Live bytes of storages created by ops (not in ``baseline``); freed when the storage dies."""

    def __init__(self, baseline: set[int]) -> None:
        super().__init__()
        self.baseline = baseline
        self.live: dict[int, int] = {}
        self.current = self.peak = 0
        self.largest = (0, "")
        self.host_bytes = 0
        self._on_host = False

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def to_host(self, t: torch.Tensor) -> torch.Tensor:
        """A host-memory stand-in for ``t`` (its bytes count as offloaded, not as device bytes)."""
        self._on_host = True
        try:
            host = torch.empty_like(t)
        finally:
            self._on_host = False
        self.host_bytes += host.untyped_storage().nbytes()
        return host

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self._on_host:
            return out
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage._cdata
            if key in self.baseline or key in self.live:
                continue  # a view, an in-place result, or a weight
            n = storage.nbytes()
            self.live[key] = n
            self.current += n
            self.peak = max(self.peak, self.current)
            if n > self.largest[0]:
                self.largest = (n, f"{func.__name__} output {list(t.shape)} {str(t.dtype).removeprefix('torch.')}")
            weakref.finalize(storage, self._free, key)
        return out


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def loss_of(out: Any) -> torch.Tensor:
    """The scalar a training step backpropagates: ``out.loss`` if present, else the sum of the first tensor."""
    loss = getattr(out, "loss", None)
    if loss is None and isinstance(out, dict):
        loss = out.get("loss")
    if loss is not None:
        return loss
    for t in tree_flatten(out.to_tuple() if hasattr(out, "to_tuple") else out)[0]:
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            return t.float().sum() if t.dim() else t
    raise PlanError(f"the model returned no floating-point tensor to backpropagate ({type(out).__name__})")


def call(model: nn.Module, inputs: Any) -> Any:
    """``model(**inputs)`` / ``model(*inputs)`` / ``model(inputs)``."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def _unique(tensors) -> list[torch.Tensor]:
    seen, out = set(), []
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _weights_by_kind(twin: nn.Module, params: list, buffers: list) -> dict[str, int]:
    """Bytes of parameters and buffers by kind: dtype (trainable), ``frozen <dtype>``, ``lora (<dtype>)``,
    a quantized format (packed codes + scales), or ``buffers`` (rotary tables and the like)."""
    dtype = lambda t: str(t.dtype).removeprefix("torch.")  # noqa: E731
    kinds: dict[int, str] = {}
    for m in twin.modules():
        if hasattr(m, "quantized_weight") and hasattr(m, "format"):  # QLoRALinear: weight buffers
            for name, b in m.named_buffers(recurse=False):
                kinds[id(b)] = f"frozen {dtype(b)}" if m.format == "none" or name == "bias" else m.format
    for name, p in twin.named_parameters():
        lora = name.rsplit(".", 1)[-1].startswith("lora_")
        kinds[id(p)] = f"lora ({dtype(p)})" if lora else dtype(p) if p.requires_grad else f"frozen {dtype(p)}"
    out: dict[str, int] = {}
    for t in params + buffers:
        kind = kinds.get(id(t), "buffers")
        out[kind] = out.get(kind, 0) + _nbytes(t)
    return out


def measure(twin: nn.Module, inputs: Any, mode, optimizer: str, train_device: str) -> Breakdown:
    """Run one forward + backward of the fake ``twin`` under the simulated allocator."""
    params = _unique(twin.parameters())
    buffers = _unique(twin.buffers())
    flat_inputs = [t for t in tree_flatten(inputs)[0] if isinstance(t, torch.Tensor)]
    baseline = {_storage_key(t) for t in params + buffers + flat_inputs}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key not in baseline:
            saved[key] = t.untyped_storage().nbytes()
        return t

    alloc = Allocations(baseline)
    min_bytes = HostOffload().min_bytes

    def offload(t: torch.Tensor) -> Any:  # what HostOffload does on CUDA, on fake CPU tensors
        if _storage_key(t) in baseline or _nbytes(t) < min_bytes:
            return t
        return ("host", alloc.to_host(t))

    def reload(packed: Any) -> torch.Tensor:
        return packed[1].clone() if isinstance(packed, tuple) else packed

    offloading = offload_hooks(offload, reload) if train_device == "cuda" else contextlib.nullcontext()
    with mode, alloc, offloading:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = call(twin, inputs)
        loss = loss_of(out)
        # a training loop keeps the loss, not the outputs: the logits live on during backward only
        # where the loss saved them (with recompute, the peak comes after the loss's backward)
        del out
        if loss.requires_grad:
            loss.backward()
        del loss
        for p in params:
            p.grad = None
    weights = _weights_by_kind(twin, params, buffers)
    trainable = [p for p in params if p.requires_grad]
    grads = sum(_nbytes(p) for p in trainable)
    state, transient = (optimizer_state_bytes(trainable, optimizer, train_device),
                        optimizer_step_bytes(trainable, optimizer, train_device))
    input_bytes = sum(_nbytes(t) for t in flat_inputs)
    named = [(n, t) for n, t in list(twin.named_parameters()) + list(twin.named_buffers())]
    big_name, big = max(named, key=lambda nt: _nbytes(nt[1]), default=("-", torch.empty(0)))
    largest = (_nbytes(big), f"{big_name} {list(big.shape)} {str(big.dtype).removeprefix('torch.')}")
    if alloc.largest[0] > largest[0]:
        largest = alloc.largest
    peak = sum(weights.values()) + input_bytes + state + max(alloc.peak, grads + transient)
    return Breakdown(weights=weights, gradients=grads, optimizer_state=state, activations=sum(saved.values()),
                     forward_backward_peak=alloc.peak, optimizer_transient=transient, inputs=input_bytes, peak=peak,
                     total_params=sum(p.numel() for p in params), trainable_params=sum(p.numel() for p in trainable),
                     largest_tensor=largest[1], largest_tensor_bytes=largest[0], offloaded=alloc.host_bytes)


def measure_peak(step: Callable[[], None], *, resident: int = 0) -> int:
    """Measured peak CPU bytes of ``step()``: ``resident`` + the max of the profiler's live allocations.

    ``torch.profiler.profile(profile_memory=True)`` records each CPU allocator allocation and free
    as a ``[memory]`` event with a signed byte count; their running sum in time order is the
    memory allocated since the profiler started, and its maximum the peak of ``step``. Pass the
    bytes already alive (parameters, buffers, inputs, optimizer state) as ``resident``. The cyclic
    garbage collector is run before and paused during ``step`` so that freeing unrelated garbage
    does not offset the count.
    """
    import gc

    from torch.profiler import ProfilerActivity, profile

    # Garbage from earlier work freed by a cyclic collection mid-step would read as negative
    # allocations and hide part of the peak: collect first, and keep the collector off meanwhile.
    gc.collect()
    gc.disable()
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            step()
    finally:
        gc.enable()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    live = peak = 0
    for _, n in events:
        live += n
        peak = max(peak, live)
    return resident + peak
