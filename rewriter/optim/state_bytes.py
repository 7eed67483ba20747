"""What each optimizer keeps, and what its step allocates: the one place that arithmetic lives
(``peftfx estimate`` calls :func:`optimizer_state_bytes` and :func:`optimizer_step_bytes`).

State per trainable tensor of ``n`` elements (``e`` bytes per element):

- ``adamw`` (torch): ``exp_avg`` and ``exp_avg_sq`` in the parameter's dtype: ``2 n e``.
- ``adamw-8bit`` (:class:`~peftfx.optim.AdamW8bit`): ``n >= 4096``: uint8 codes for both moments plus one fp32
  absmax per 256-element block each, ``2 n + 8 ceil(n / 256)`` (about 2.03 bytes/param); smaller tensors keep
  fp32 moments, ``8 n``.
- ``paged-adamw`` / ``paged-adamw-8bit``: the bytes of ``adamw`` in fp32 (``8 n``) / of ``adamw-8bit``; when
  training on CUDA they live in pinned host memory, so none of it is resident on the device.
- ``sgd``: nothing.

Step temporaries: torch's single-tensor AdamW (the CPU default) two parameter-sized tensors, its foreach
AdamW (the CUDA default) one copy of all of them; peftfx's fused updates none, except that the paged
variants on CUDA stage at most three tensors' state on the device (updating, arriving, leaving).
Every variant also keeps a 4-byte ``step`` counter per tensor on the host (not counted).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

from peftfx.errors import PlanError

if TYPE_CHECKING:
    import torch

__all__ = ["OPTIMIZER_NAMES", "optimizer_state_bytes", "optimizer_step_bytes", "tensor_state_bytes"]

OPTIMIZER_NAMES = ("adamw", "sgd", "adamw-8bit", "paged-adamw", "paged-adamw-8bit")


def tensor_state_bytes(numel: int, name: str, element_size: int = 4, min_8bit_size: int | None = None) -> int:
    """State bytes of one tensor of ``numel`` elements under optimizer ``name`` (module docstring);
    ``min_8bit_size`` defaults to the optimizers' 4096."""
    from peftfx.kernels.blockwise8bit import MIN_8BIT_NUMEL, n_state_blocks  # torch: not at import time

    _check_name(name)
    min_8bit_size = MIN_8BIT_NUMEL if min_8bit_size is None else min_8bit_size
    if name == "sgd" or numel == 0:
        return 0
    if name == "adamw":
        return 2 * numel * element_size
    if name == "paged-adamw":
        return 8 * numel
    return 2 * numel + 2 * 4 * n_state_blocks(numel) if numel >= min_8bit_size else 8 * numel  # (paged-)adamw-8bit


def _check_name(name: str) -> None:
    if name not in OPTIMIZER_NAMES:
        raise PlanError(f"optimizer {name!r} is not one of {', '.join(OPTIMIZER_NAMES)}")


def _sizes(params: Iterable[torch.Tensor | int]) -> list[tuple[int, int]]:
    return [(p, 4) if isinstance(p, int) else (p.numel(), p.element_size()) for p in params]


def optimizer_state_bytes(params: Iterable[torch.Tensor | int], name: str, device: str = "cpu") -> int:
    """Optimizer state bytes resident on ``device`` for the trainable ``params``.

    Args:
        params: tensors (real, fake or meta: only ``numel()`` and ``element_size()`` are read) or plain element
            counts (taken as fp32).
        name: one of :data:`OPTIMIZER_NAMES`.
        device: ``"cpu"`` or ``"cuda"``; the paged variants keep nothing on ``"cuda"``.
    """
    per_tensor = [tensor_state_bytes(n, name, e) for n, e in _sizes(params)]
    return 0 if name.startswith("paged-") and device == "cuda" else sum(per_tensor)


def optimizer_step_bytes(params: Iterable[torch.Tensor | int], name: str, device: str = "cpu") -> int:
    """Peak bytes ``optimizer.step()`` allocates on ``device`` on top of the state (module docstring)."""
    _check_name(name)
    sizes = _sizes(params)
    if not sizes:
        return 0
    if name == "adamw":
        nbytes = [n * e for n, e in sizes]
        return sum(nbytes) if device == "cuda" else 2 * max(nbytes)
    if name.startswith("paged-") and device == "cuda":
        return 3 * max(tensor_state_bytes(n, name, e) for n, e in sizes)
    return 0
