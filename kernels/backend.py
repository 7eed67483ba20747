"""Which implementation runs a peftfx op: the one backend switch for every op.

========== =================================================== ==========================================
backend    what runs                                           chosen
========== =================================================== ==========================================
``cpu``    :mod:`cpu_gemm` (tiled dequantize -> GEMM; the      default for tensors not on CUDA
           engineered CPU path)
``triton`` the Triton kernels (:mod:`qlora_triton`,            default for CUDA tensors when Triton
           :mod:`quant_triton`, :mod:`multi_lora_triton`)      imports; on CPU only under
                                                               ``TRITON_INTERPRET=1``
``reference`` :mod:`reference`, the plain PyTorch oracle        only when forced (debugging, bisecting a
                                                               numerical difference)
========== =================================================== ==========================================

``PEFTFX_KERNELS=cpu|triton|reference`` forces one; it is read on every call so tests can switch it.
Ops with a single CPU implementation (the multi-LoRA gather, dequantize) run it for both ``cpu`` and
``reference``.
"""
from __future__ import annotations

import os

from torch import Tensor

from peftfx.errors import KernelError

__all__ = ["BACKENDS", "backend_for", "triton_importable"]

BACKENDS = ("cpu", "triton", "reference")


def triton_importable() -> bool:
    """Whether ``import triton`` works in this process."""
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def backend_for(t: Tensor) -> str:
    """``"cpu"``, ``"triton"`` or ``"reference"`` for an op whose inputs live where ``t`` does."""
    forced = os.environ.get("PEFTFX_KERNELS", "").strip().lower()
    if forced in BACKENDS:
        return forced
    if forced:
        raise KernelError(f"PEFTFX_KERNELS={forced!r}; expected one of {list(BACKENDS)} (or unset)")
    return "triton" if t.device.type == "cuda" and triton_importable() else "cpu"
