"""The production quantizer: dense weight -> :class:`QuantizedWeight` for every format.

NF4/FP4 (+ double quantization) reproduce ``bitsandbytes.functional.quantize_4bit`` byte for byte on
CPU: blockwise absmax over the row-major flattened weight (the partial last block gets its own scale,
clamped to 1e-38 like bitsandbytes), values scaled by ``1/absmax`` and bucketized against codebook
midpoints, two codes per byte with the even element in the high nibble. Double quantization
subtracts the mean of the absmax vector and 8-bit quantizes it in blocks of ``block_size2`` with the
dynamic map through bitsandbytes' CPU 65536-bin lookup table (``((v+1)*0.5)*65535+0.5`` truncated).

The inverse (dequantize) and the fused QLoRA math live in :mod:`peftfx.kernels.reference`, the oracle;
:mod:`peftfx.kernels.quant_triton` is the GPU quantizer, checked byte for byte against this file.
"""
from __future__ import annotations

import torch
from torch import Tensor

from peftfx.errors import KernelError
from peftfx.kernels.formats import (
    DYNAMIC_CODE, FORMATS, FP4_CODE, NF4_CODE, QuantizedWeight, check_block_size, layer_prefix, table_on,
)

__all__ = ["quantize", "storage_layout", "empty_quantized", "quantize_4bit", "quantize_int8", "quantize_int8_zeropoint", "quantize_llm_int8",
           "quantize_blockwise_8bit", "CODE_BOUNDS", "DYNAMIC_LUT"]


# ---------------------------------------------------------------------------------------------- tables
def _bounds(code: Tensor) -> tuple[Tensor, Tensor]:
    # Same construction as bitsandbytes' default backend (argsort order decides FP4's +0/-0 tie).
    order = torch.argsort(code)
    return (code[order[:-1]] + code[order[1:]]) / 2, order


CODE_BOUNDS = {"nf4": _bounds(NF4_CODE), "fp4": _bounds(FP4_CODE)}

# NF4 code search by table instead of ``bucketize`` (a scalar binary search, 2/3 of quantize time):
# v in [-1, 1] falls in bin j = trunc(H + H*v) of width 1/H; code = base[j] + (v > thr[j]) where base[j]
# counts the bounds below the bin and thr[j] is the one bound inside it (2.0 if none). Exact as long as
# every bin holds at most one bound and no bound sits within fp32 rounding of a bin edge (checked here;
# FP4's dyadic bounds sit on edges, so FP4 keeps ``bucketize``).
_LUT_HALF = 1024


def _code_lut(bounds: Tensor, half: int = _LUT_HALF) -> tuple[Tensor, Tensor]:
    u = bounds.double() * half + half
    j = u.floor().long()
    if len(set(j.tolist())) != len(j) or float((u - u.round()).abs().min()) < 1e-3:
        raise AssertionError("NF4 bounds too close to LUT bin edges")  # import-time self check
    edges = torch.arange(2 * half + 1, dtype=torch.float64) / half - 1
    base = (bounds.double().view(1, -1) < edges.view(-1, 1)).sum(1).to(torch.uint8)
    thr = torch.full((2 * half + 1,), 2.0)
    thr[j] = bounds
    return base, thr


_NF4_LUT = _code_lut(CODE_BOUNDS["nf4"][0])
_Q_CHUNK = 1 << 14  # elements per step of the table search (its ~13 bytes/element of temporaries stay in L2)


def _codes_nf4(scaled: Tensor) -> Tensor:
    """uint8 NF4 codes of ``scaled`` (1-D, values in [-1, 1]); equals ``bucketize(scaled, bounds)``."""
    base_t, thr_t = (table_on(f"nf4lut{i}", t, scaled.device) for i, t in enumerate(_NF4_LUT))
    n = scaled.numel()
    q = torch.empty(n, dtype=torch.uint8, device=scaled.device)
    c = min(n, _Q_CHUNK)
    u = torch.empty(c, device=scaled.device)
    j = torch.empty(c, dtype=torch.int32, device=scaled.device)
    thr = torch.empty(c, device=scaled.device)
    gt = torch.empty(c, dtype=torch.bool, device=scaled.device)
    half = torch.tensor(float(_LUT_HALF))
    for e0 in range(0, n, c):
        e1 = min(n, e0 + c)
        m = e1 - e0
        v = scaled[e0:e1]
        torch.add(half, v, alpha=_LUT_HALF, out=u[:m])  # H + H*v: H*v is exact (power of two)
        j[:m].copy_(u[:m])  # trunc == floor (u >= 0)
        torch.index_select(thr_t, 0, j[:m], out=thr[:m])
        torch.gt(v, thr[:m], out=gt[:m])
        torch.index_select(base_t, 0, j[:m], out=q[e0:e1])
        q[e0:e1].add_(gt[:m])
    return q


def _dynamic_lut() -> Tensor:
    """bitsandbytes' CPU quantize LUT: 65536 bins over [-1, 1] -> nearest dynamic-map index (fp32 math)."""
    mids = 0.5 * (DYNAMIC_CODE[:-1] + DYNAMIC_CODE[1:])
    vals = -1.0 + (2.0 * torch.arange(65536, dtype=torch.float32)) / 65535.0
    return torch.searchsorted(mids, vals, right=False).to(torch.uint8)


DYNAMIC_LUT = _dynamic_lut()

# ------------------------------------------------------------------------------------------- quantize
def quantize(w: Tensor, format: str, *, block_size: int = 64, double_quant: bool = False, block_size2: int = 256,
             threshold: float = 6.0, name: str | None = None) -> QuantizedWeight:
    """Quantize a 2-D weight ``[out, in]`` into ``format``.

    Example::

        >>> qw = quantize(torch.randn(64, 48), "nf4", block_size=64, double_quant=True)
        >>> dequantize(qw).shape
        torch.Size([64, 48])
    """
    where = layer_prefix(name)
    if format not in FORMATS or format == "none":
        raise KernelError(f"{where}unknown quantization format {format!r}; expected one of {FORMATS[1:]}")
    if not isinstance(w, Tensor) or w.dim() != 2:
        shape = list(w.shape) if isinstance(w, Tensor) else type(w).__name__
        raise KernelError(f"{where}can only quantize a 2-D weight [out, in], got {shape}")
    if not w.dtype.is_floating_point:
        raise KernelError(f"{where}weight must be floating point, got {w.dtype}")
    if w.numel() == 0:
        raise KernelError(f"{where}cannot quantize an empty weight {list(w.shape)}")
    if format != "llm-int8":
        check_block_size(block_size, name)
    if double_quant and format in ("nf4", "fp4"):
        check_block_size(block_size2, name)
    w = w.detach()
    # 4-bit formats check their absmax instead (amax propagates NaN/Inf): one pass less over w
    if format not in ("nf4", "fp4") and not bool(torch.isfinite(w).all()):
        _raise_nonfinite(w, name)
    shape = (w.shape[0], w.shape[1])
    if format in ("nf4", "fp4"):
        packed, absmax = quantize_4bit(w, block_size, format, name=name)
        scales2 = offset = None
        if double_quant:
            offset = absmax.mean()
            absmax, scales2 = quantize_blockwise_8bit(absmax - offset, block_size2)
        return QuantizedWeight(format, packed, absmax, scales2, offset, shape, block_size,
                               block_size2 if double_quant else 256, w.dtype, 0.0)
    if format == "int8":
        packed, scales = quantize_int8(w, block_size)
        return QuantizedWeight(format, packed, scales, None, None, shape, block_size, 256, w.dtype, 0.0)
    if format == "int8-zeropoint":
        packed, scales, zero = quantize_int8_zeropoint(w, block_size)
        return QuantizedWeight(format, packed, scales, None, zero, shape, block_size, 256, w.dtype, 0.0)
    packed, scales = quantize_llm_int8(w)
    return QuantizedWeight(format, packed, scales, None, None, shape, block_size, 256, w.dtype, float(threshold))


def storage_layout(format: str, shape: tuple[int, int], *, block_size: int = 64, double_quant: bool = True,
                   block_size2: int = 256) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """``{tensor name: (shape, dtype)}`` of what :func:`quantize` returns for a ``shape`` weight.

    4-bit codes two per byte, one scale per block (fp32, or uint8 codes + fp32 second-level scales
    per ``block_size2`` blocks + an fp32 scalar offset with double quantization); int8 one byte per
    weight; llm-int8 int8 ``[out, in]`` and one fp32 scale per row. ``double_quant`` only applies
    to nf4/fp4.
    """
    out_f, in_f = shape
    n = out_f * in_f
    blocks = -(-n // block_size)
    if format in ("nf4", "fp4"):
        if double_quant:
            return {"packed": ((-(-n // 2),), torch.uint8), "scales": ((blocks,), torch.uint8),
                    "scales2": ((-(-blocks // block_size2),), torch.float32), "offset": ((), torch.float32)}
        return {"packed": ((-(-n // 2),), torch.uint8), "scales": ((blocks,), torch.float32)}
    if format == "int8":
        return {"packed": ((n,), torch.int8), "scales": ((blocks,), torch.float32)}
    if format == "int8-zeropoint":
        return {"packed": ((n,), torch.uint8), "scales": ((blocks,), torch.float32),
                "offset": ((blocks,), torch.float32)}
    if format == "llm-int8":
        return {"packed": ((out_f, in_f), torch.int8), "scales": ((out_f,), torch.float32)}
    raise KernelError(f"quantization format {format!r} has no quantized storage; expected one of {FORMATS[1:]}")


def empty_quantized(format: str, shape: tuple[int, int], *, block_size: int = 64, double_quant: bool = False,
                    block_size2: int = 256, threshold: float = 6.0, dtype: torch.dtype = torch.float32,
                    device: torch.device | str = "cpu", name: str | None = None) -> QuantizedWeight:
    """A :class:`QuantizedWeight` with :func:`quantize`'s layout and uninitialized storage (as ``torch.empty``).

    For weights that hold no data (``meta`` tensors, fake tensors of a memory estimate): there is
    nothing to quantize, but the layer must have the real buffers' shapes, dtypes and bytes.
    """
    dq = bool(double_quant) and format in ("nf4", "fp4")
    layout = storage_layout(format, shape, block_size=block_size, double_quant=dq, block_size2=block_size2)
    tensors = {k: torch.empty(s, dtype=d, device=device) for k, (s, d) in layout.items()}
    return QuantizedWeight.from_tensors(format, tensors, shape, block_size=block_size,
                                        block_size2=block_size2 if dq else 256, dtype=dtype,
                                        threshold=float(threshold) if format == "llm-int8" else 0.0, name=name)


def _raise_nonfinite(w: Tensor, name: str | None) -> None:
    bad = (~torch.isfinite(w)).nonzero()[0].tolist()
    raise KernelError(f"{layer_prefix(name)}weight has NaN/Inf values (first at {bad}); cannot quantize")


_STEP_ELEMENTS = 1 << 15  # 4-bit quantization works on slices this long: temporaries stay ~0.5 MiB


def quantize_4bit(w: Tensor, block_size: int, format: str, *, name: str | None = None) -> tuple[Tensor, Tensor]:
    """bitsandbytes' ``quantize_4bit`` (default backend): packed uint8 [ceil(n/2)], fp32 absmax [n_blocks].

    Works through the flattened weight in slices of whole blocks (an even number of elements),
    so its fp32 temporaries (upcast, scaled values, codes) stay at one slice instead of 2-3x the
    weight: quantizing one layer while loading a big model costs the layer plus a few MiB. Every
    block is quantized on its own, so the bytes are those of one pass over the whole weight.

    Raises :class:`KernelError` (naming ``name``) when ``w`` has NaN/Inf values.
    """
    flat = w.reshape(-1)
    n = flat.numel()
    step = max(block_size, _STEP_ELEMENTS // block_size * block_size)  # whole blocks, even (block_size >= 16)
    if n <= step:
        return _quantize_4bit_slice(flat, w, block_size, format, name)
    packed = torch.empty(-(-n // 2), dtype=torch.uint8, device=w.device)
    absmax = []
    for e0 in range(0, n, step):
        q, am = _quantize_4bit_slice(flat[e0:e0 + step], w, block_size, format, name)
        packed[e0 // 2:e0 // 2 + q.numel()] = q
        absmax.append(am)
    return packed, torch.cat(absmax)


def _quantize_4bit_slice(flat: Tensor, w: Tensor, block_size: int, format: str,
                         name: str | None) -> tuple[Tensor, Tensor]:
    """:func:`quantize_4bit` of a 1-D slice starting on a block boundary (``w``: the whole weight, for errors)."""
    flat = flat.float()
    n = flat.numel()
    rem = n % block_size
    full = n - rem
    blocks = flat[:full].view(-1, block_size)
    absmax = blocks.abs().amax(dim=-1)
    tail = flat[full:].abs().max() if rem else absmax[:0]
    if not (bool(torch.isfinite(absmax).all()) and bool(torch.isfinite(tail).all())):
        _raise_nonfinite(w, name)
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38).view(-1, 1))).clamp_(-1, 1).reshape(-1)
    if rem:
        am = tail.clamp(min=1e-38)
        absmax = torch.cat([absmax, am.unsqueeze(0)])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / am, -1, 1)])
    if n % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    if format == "nf4":
        q8 = _codes_nf4(scaled)
    else:
        bounds, order = (table_on(f"{format}_{i}", t, w.device) for i, t in enumerate(CODE_BOUNDS[format]))
        q8 = order[torch.bucketize(scaled, bounds, out_int32=True)].to(torch.uint8)
    return (q8[::2] << 4) | q8[1::2], absmax


def quantize_blockwise_8bit(x: Tensor, block_size: int) -> tuple[Tensor, Tensor]:
    """bitsandbytes' CPU ``quantize_blockwise`` with the dynamic map: uint8 codes, fp32 absmax per block."""
    n = x.numel()
    nb = -(-n // block_size)
    padded = torch.nn.functional.pad(x.float().reshape(-1), (0, nb * block_size - n)).view(nb, block_size)
    am = padded.abs().amax(dim=1)
    inv = 1.0 / torch.where(am > 0, am, torch.ones_like(am))  # all-zero blocks store code 0, as bnb
    v = torch.clamp(padded * inv.view(-1, 1), -1.0, 1.0)
    idx = (((v + 1.0) * 0.5) * 65535.0 + 0.5).to(torch.int32)
    codes = table_on("dyn_lut", DYNAMIC_LUT, x.device)[idx]
    codes = codes.masked_fill((am == 0).view(-1, 1), 0)
    return codes.reshape(-1)[:n].contiguous(), am


def _blocked(w: Tensor, block_size: int) -> tuple[Tensor, int]:
    """Flatten row-major and zero-pad to whole blocks: ([n_blocks, block_size] fp32, numel)."""
    flat = w.reshape(-1).float()
    n = flat.numel()
    nb = -(-n // block_size)
    return torch.nn.functional.pad(flat, (0, nb * block_size - n)).view(nb, block_size), n


def quantize_int8(w: Tensor, block_size: int) -> tuple[Tensor, Tensor]:
    """Symmetric block-wise absmax int8: q = round(x / scale), scale = absmax / 127."""
    blocks, n = _blocked(w, block_size)
    scale = blocks.abs().amax(dim=1) / 127.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(blocks / safe.view(-1, 1)).clamp_(-127, 127).to(torch.int8)
    return q.reshape(-1)[:n].contiguous(), scale


def quantize_int8_zeropoint(w: Tensor, block_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Asymmetric block-wise uint8 over the full 0..255 range; the range always includes 0 so it is exact."""
    blocks, n = _blocked(w, block_size)
    lo = blocks.amin(dim=1).clamp(max=0.0)
    hi = blocks.amax(dim=1).clamp(min=0.0)
    scale = (hi - lo) / 255.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.round(-lo / safe).clamp_(0, 255)
    q = torch.round(blocks / safe.view(-1, 1) + zero.view(-1, 1)).clamp_(0, 255).to(torch.uint8)
    return q.reshape(-1)[:n].contiguous(), scale, zero


def quantize_llm_int8(w: Tensor) -> tuple[Tensor, Tensor]:
    """LLM.int8 weight: per-row absmax int8 (bitsandbytes' ``int8_vectorwise_quant`` without outliers)."""
    wf = w.float()
    absmax = wf.abs().amax(dim=1)
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    q = torch.round(wf * (127.0 / safe).unsqueeze(1)).clamp_(-127, 127).to(torch.int8)
    return q, absmax


