"""Storage arithmetic: bytes and bits per weight of quantized layers, and byte formatting.

The layout itself is the quantizer's (:func:`peftfx.kernels.quantizer.storage_layout`, which
``swap_linear`` also uses to give data-less weights their buffers); this module only sums it.
"""
from __future__ import annotations

from typing import Any

import torch

from peftfx.errors import KernelError, PlanError
from peftfx.kernels.quantizer import storage_layout

__all__ = ["quant_storage", "quantized_nbytes", "bits_per_param", "format_bytes"]


def quant_storage(format: str, shape: tuple[int, int], *, block_size: int = 64, double_quant: bool = True,
                  block_size2: int = 256) -> dict[str, tuple[int, torch.dtype]]:
    """``{tensor name: (numel, dtype)}`` of a :class:`~peftfx.kernels.formats.QuantizedWeight` of ``shape``."""
    try:
        layout = storage_layout(format, shape, block_size=block_size, double_quant=double_quant,
                                block_size2=block_size2)
    except KernelError as exc:
        raise PlanError(f"quant.format {format!r} has no quantized storage") from exc
    return {name: (int(torch.Size(s).numel()), dtype) for name, (s, dtype) in layout.items()}


def quantized_nbytes(format: str, shape: tuple[int, int], **kw: Any) -> int:
    """Exact storage bytes of a quantized ``[out, in]`` weight (packed codes and all scales)."""
    return sum(n * torch.empty(0, dtype=d).element_size() for n, d in quant_storage(format, shape, **kw).values())


def bits_per_param(format: str, shape: tuple[int, int], **kw: Any) -> float:
    """Storage bits per weight, e.g. 4.127 for NF4 with double quantization on large layers."""
    return 8.0 * quantized_nbytes(format, shape, **kw) / (shape[0] * shape[1])


def format_bytes(n: float) -> str:
    """``1536 -> '1.50 KiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} B" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"  # pragma: no cover
