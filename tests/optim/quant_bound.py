"""The per-element error bound of nearest-code block quantization, shared by the optim tests."""
from __future__ import annotations

import torch


def quantization_bound(x: torch.Tensor, scale: torch.Tensor, qmap: torch.Tensor) -> torch.Tensor:
    """Largest ``|deq - x|`` nearest rounding allows: ``scale * (q_{k+1} - q_k) / 2`` for ``x / scale`` between map
    values ``q_k <= x / scale <= q_{k+1}``; below the map's smallest value (the signed map ends at -0.993, not -1)
    the distance to it. ``x`` and ``scale`` elementwise (``scale`` = the element's block absmax)."""
    r = x / scale
    k = torch.searchsorted(qmap, r.clamp(float(qmap[0]), float(qmap[-1]))).clamp(1, qmap.numel() - 1)
    half_gap = (qmap[k] - qmap[k - 1]) / 2
    return scale * torch.maximum(half_gap, qmap[0] - r)
