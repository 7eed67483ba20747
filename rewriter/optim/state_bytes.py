"""What each optimizer keeps as state: the one place that arithmetic lives (``peftfx estimate`` calls it).

Per trainable tensor of ``n`` elements (``e`` bytes per element):

- ``adamw`` (torch): ``exp_avg`` and ``exp_avg_sq`` in the parameter's dtype: ``2 n e``.
- ``adamw-8bit`` (:class:`~peftfx.optim.AdamW8bit`): ``n >= 4096``: uint8 codes for both moments plus one fp32
  absmax per 256-element block each, ``2 n + 8 ceil(n / 256)`` (about 2.03 bytes/param); smaller tensors keep
  fp32 moments, ``8 n``.
- ``paged-adamw`` / ``paged-adamw-8bit``: the same bytes as ``adamw`` in fp32 (``8 n``) / ``adamw-8bit``, but
  when training on CUDA they live in pinned host memory: the device holds only the staging copies of the
  tensor being updated and the one being prefetched (twice the largest tensor's state).
- ``sgd``: nothing.

Every variant also keeps a 4-byte ``step`` counter per tensor on the host (not counted here).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

from peftfx.errors import PlanError

if TYPE_CHECKING:
    import torch

__all__ = ["OPTIMIZER_NAMES", "optimizer_state_bytes", "tensor_state_bytes"]

OPTIMIZER_NAMES = ("adamw", "sgd", "adamw-8bit", "paged-adamw", "paged-adamw-8bit")


def tensor_state_bytes(numel: int, name: str, element_size: int = 4, min_8bit_size: int | None = None) -> int:
    """State bytes of one tensor of ``numel`` elements under optimizer ``name`` (module docstring);
    ``min_8bit_size`` defaults to the optimizers' 4096."""
    from peftfx.kernels.blockwise8bit import MIN_8BIT_NUMEL, n_state_blocks  # torch: not at import time

    min_8bit_size = MIN_8BIT_NUMEL if min_8bit_size is None else min_8bit_size
    if name == "sgd" or numel == 0:
        return 0
    if name == "adamw":
        return 2 * numel * element_size
    if name == "paged-adamw":
        return 8 * numel
    if name in ("adamw-8bit", "paged-adamw-8bit"):
        return 2 * numel + 2 * 4 * n_state_blocks(numel) if numel >= min_8bit_size else 8 * numel
    raise PlanError(f"optimizer {name!r} is not one of {', '.join(OPTIMIZER_NAMES)}")


def optimizer_state_bytes(params: Iterable[torch.Tensor | int], name: str, device: str = "cpu") -> int:
    """Optimizer state bytes resident on ``device`` for the trainable ``params``.

    Args:
        params: tensors (real, fake or meta: only ``numel()`` and ``element_size()`` are read) or plain element
            counts (taken as fp32).
        name: one of :data:`OPTIMIZER_NAMES`.
        device: ``"cpu"`` or ``"cuda"``; paged variants on ``"cuda"`` count their two staging buffers only.
    """
    sizes = [(p, 4) if isinstance(p, int) else (p.numel(), p.element_size()) for p in params]
    per_tensor = [tensor_state_bytes(n, name, e) for n, e in sizes]
    if name.startswith("paged-") and device == "cuda":
        return 2 * max(per_tensor, default=0)
    return sum(per_tensor)

