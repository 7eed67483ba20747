"""peftfx.optim: AdamW with block-wise 8-bit state and paged variants, drop-in ``torch.optim.Optimizer``s.

- :class:`AdamW8bit`: both moments quantized block-wise (256 elements per fp32 absmax) with Dettmers et
  al.'s dynamic maps, signed for the first moment and unsigned for the second (bitsandbytes' maps, byte
  for byte); tensors under 4096 elements keep fp32 state. ~2.03 bytes/param of state instead of 8.
- :class:`PagedAdamW` / :class:`PagedAdamW8bit`: the same updates with the state in pinned host memory,
  prefetched to the GPU one parameter at a time on a side stream, when parameters are on CUDA. On the CPU
  they behave as the unpaged versions, with the same state dict.
- :func:`optimizer_state_bytes`: what each optimizer allocates (``peftfx estimate`` uses it).

The update kernels live in ``peftfx.kernels.blockwise8bit`` (CPU, the reference) and
``peftfx.kernels.adam8bit_triton`` (CUDA).
"""
from __future__ import annotations

from peftfx.optim.adamw import AdamW8bit, PagedAdamW, PagedAdamW8bit
from peftfx.optim.state_bytes import OPTIMIZER_NAMES, optimizer_state_bytes, tensor_state_bytes

__all__ = ["AdamW8bit", "PagedAdamW", "PagedAdamW8bit", "OPTIMIZER_NAMES", "optimizer_state_bytes",
           "tensor_state_bytes"]
