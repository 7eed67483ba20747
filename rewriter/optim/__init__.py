"""peftfx.optim: AdamW with block-wise 8-bit state and paged variants, drop-in ``torch.optim.Optimizer``s.

- :class:`AdamW8bit`: both moments quantized block-wise (256 elements per fp32 absmax) with Dettmers et
  al.'s dynamic maps, signed for the first moment and unsigned for the second (bitsandbytes' maps, byte
  for byte); tensors under 4096 elements keep fp32 state. ~2.03 bytes/param of state instead of 8.
- :class:`PagedAdamW` / :class:`PagedAdamW8bit`: the same updates with the state in pinned host memory,
  prefetched to the GPU one parameter at a time on a side stream, when parameters are on CUDA. On the CPU
  they behave as the unpaged versions, with the same state dict.
- :func:`optimizer_state_bytes` / :func:`optimizer_step_bytes`: what each optimizer keeps and what its step
  allocates (``peftfx estimate`` uses them).

The update kernels live in ``peftfx.kernels.blockwise8bit`` (the reference and the eager CPU path),
``peftfx.kernels.adam8bit_compiled`` (CPU: the reference's ops compiled by inductor; ``PEFTFX_OPTIM_COMPILE=0``
selects the eager path) and ``peftfx.kernels.adam8bit_triton`` (CUDA).
"""
from __future__ import annotations

import importlib
from typing import Any

# Lazy, as peftfx's own names: ``peftfx --help`` reads OPTIMIZER_NAMES without importing torch.
_LAZY = {"AdamW8bit": "peftfx.optim.adamw", "PagedAdamW": "peftfx.optim.adamw", "PagedAdamW8bit": "peftfx.optim.adamw",
         "OPTIMIZER_NAMES": "peftfx.optim.state_bytes", "optimizer_state_bytes": "peftfx.optim.state_bytes",
         "optimizer_step_bytes": "peftfx.optim.state_bytes", "tensor_state_bytes": "peftfx.optim.state_bytes"}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'peftfx.optim' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
