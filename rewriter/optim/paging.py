"""Paged optimizer state on CUDA: the state lives in pinned host memory and visits the GPU one parameter at a time.

QLoRA's paged optimizers survive memory spikes by letting the optimizer state leave the GPU. Here the
placement is explicit instead of relying on unified memory: every parameter's state tensors are pinned host
tensors; :meth:`StatePager.run` copies parameter ``i + 1``'s state to the GPU on a side stream while
parameter ``i`` updates on the current stream, then copies ``i``'s updated state back on the side stream.
The GPU holds the state of at most three parameters at once (the one updating, the one arriving, the one
leaving) instead of all of them. ``run`` waits for the last copy back before it returns, so the host state
is complete whenever ``step()`` has returned (``state_dict()``, checkpointing).

Only used when a parameter is on CUDA; on the CPU the paged optimizers are the unpaged ones.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

__all__ = ["StatePager", "pinned_like"]


def pinned_like(t: Tensor) -> Tensor:
    """A zero-filled pinned host tensor with ``t``'s shape and dtype."""
    return torch.zeros(t.shape, dtype=t.dtype, device="cpu", pin_memory=True)


class StatePager:
    """Streams each parameter's state between pinned host memory and ``device`` around its update."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device)

    def _fetch(self, host: dict[str, Tensor]) -> tuple[dict[str, Tensor], torch.cuda.Event]:
        """Start copying ``host`` to the GPU on the side stream (after this stream's earlier write-backs)."""
        with torch.cuda.stream(self.stream):
            dev = {k: v.to(self.device, non_blocking=True) for k, v in host.items()}
            arrived = torch.cuda.Event()
            arrived.record(self.stream)
        return dev, arrived

    def run(self, jobs: list[tuple[dict[str, Tensor], Callable[[dict[str, Tensor]], None]]]) -> None:
        """For each ``(host_state, update)``: ``update(device_state)`` on the current stream, with ``device_state``
        a GPU copy of ``host_state`` that is written back into it afterwards."""
        if not jobs:
            return
        current = torch.cuda.current_stream(self.device)
        pending = self._fetch(jobs[0][0])
        for i, (host, update) in enumerate(jobs):
            dev, arrived = pending
            if i + 1 < len(jobs):  # prefetch the next parameter's state while this one updates
                pending = self._fetch(jobs[i + 1][0])
            current.wait_event(arrived)
            for t in dev.values():
                t.record_stream(current)  # allocated on the side stream, used on the current one
            update(dev)
            updated = torch.cuda.Event()
            updated.record(current)
            with torch.cuda.stream(self.stream):
                self.stream.wait_event(updated)
                for k, t in dev.items():
                    host[k].copy_(t, non_blocking=True)
        self.stream.synchronize()
