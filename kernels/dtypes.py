"""Which dtype a computation runs in: the one place that decides it for every backend.

Three questions, three functions:

* :func:`resolve_compute_dtype` — a plan's ``quant.compute_dtype`` (``None`` | ``"auto"`` | a name) as a
  torch dtype for a device. ``"auto"`` is bf16 where :func:`fast_bf16` holds (AMX-BF16/AVX512-BF16 CPUs,
  sm80+ GPUs), else ``None`` (the input's dtype). This is bitsandbytes' ``bnb_4bit_compute_dtype``.
* :func:`gemm_dtype` — the dtype the frozen base GEMM runs in for an input ``x``: the resolved request,
  else x's dtype where the device multiplies it fast, else fp32.
* :func:`accumulate_dtype` — the dtype LoRA terms, bias and sums are computed in: fp32 for half-precision
  CPU tensors (CPU half GEMMs without bf16 units are several times slower than fp32), else x's own.
"""
from __future__ import annotations

import torch
from torch import Tensor

from peftfx.errors import KernelError
from peftfx.kernels.choices import COMPUTE_DTYPE_CHOICES, COMPUTE_DTYPE_NAMES

__all__ = ["COMPUTE_DTYPES", "COMPUTE_DTYPE_CHOICES", "fast_bf16", "resolve_compute_dtype", "gemm_dtype",
           "accumulate_dtype", "check_compute_dtype"]

COMPUTE_DTYPES = {name: getattr(torch, name) for name in COMPUTE_DTYPE_NAMES}

# Probed once per process (the CPU does not change); tests patch the "cpu" entry.
_FAST_BF16: dict[str, bool] = {}


def fast_bf16(device: torch.device | str = "cpu") -> bool:
    """Whether ``device`` runs bf16 GEMMs faster than fp32 (CPU: AMX-BF16 or AVX512-BF16; CUDA: sm80+)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if dev.type != "cpu":
        return False
    if "cpu" not in _FAST_BF16:
        cpu = getattr(torch, "cpu", None)
        checks = [getattr(cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
        _FAST_BF16["cpu"] = torch.backends.mkldnn.is_available() and any(c is not None and c() for c in checks)
    return _FAST_BF16["cpu"]


def check_compute_dtype(spec: object, where: str = "") -> None:
    """Raise :class:`KernelError` unless ``spec`` is None, ``"auto"``, a name in COMPUTE_DTYPES or one of
    their torch dtypes. ``where`` prefixes the message (e.g. ``"layer 'q_proj': "``)."""
    if spec is None or spec in COMPUTE_DTYPE_CHOICES or spec in COMPUTE_DTYPES.values():
        return
    raise KernelError(f"{where}compute_dtype {spec!r} must be None, 'auto' or one of {list(COMPUTE_DTYPES)} "
                      f"(or the matching torch dtype)")


def resolve_compute_dtype(spec: str | torch.dtype | None, device: torch.device | str) -> torch.dtype | None:
    """A plan's ``quant.compute_dtype`` as a dtype for ``device`` (None: the input's dtype)."""
    check_compute_dtype(spec)
    if spec is None or isinstance(spec, torch.dtype):
        return spec
    if spec == "auto":
        return torch.bfloat16 if fast_bf16(device) else None
    return COMPUTE_DTYPES[spec]


def accumulate_dtype(t: Tensor) -> torch.dtype:
    """fp32 for half-precision CPU tensors (slow half GEMMs), else the tensor's own dtype."""
    if t.device.type == "cpu" and t.dtype in (torch.bfloat16, torch.float16):
        return torch.float32
    return t.dtype


def gemm_dtype(x: Tensor, requested: torch.dtype | None = None) -> torch.dtype:
    """dtype of the base GEMM for input ``x``: ``requested``, else x's dtype where it is fast."""
    if requested is not None:
        return requested
    if x.dtype == torch.bfloat16 and fast_bf16(x.device):
        return torch.bfloat16
    return accumulate_dtype(x)
