"""Pure-PyTorch quantize / dequantize for every format and the fused QLoRA math.

This is both the CPU product path and the oracle the Triton kernels are tested against.

NF4/FP4 (+ double quantization) reproduce ``bitsandbytes.functional.quantize_4bit`` byte for byte on
CPU: blockwise absmax over the row-major flattened weight (the partial last block gets its own scale,
clamped to 1e-38 like bitsandbytes), values scaled by ``1/absmax`` and bucketized against codebook
midpoints, two codes per byte with the even element in the high nibble. Double quantization
subtracts the mean of the absmax vector and 8-bit quantizes it in blocks of ``block_size2`` with the
dynamic map through bitsandbytes' CPU 65536-bin lookup table (``((v+1)*0.5)*65535+0.5`` truncated).

Fused math (s = scaling, xl = x_lora if given else x)::

    y        = x @ deq(W).T + b + s * (xl @ A.T) @ B.T           x [M, K], A [r, K], B [N, r]
    dx       = dy @ deq(W)  (+ s * (dy @ B) @ A when x_lora is None)
    dx_lora  = s * (dy @ B) @ A
    dA       = s * (dy @ B).T @ xl
    dB       = s * dy.T @ (xl @ A.T)

Half-precision CPU inputs accumulate in fp32 (:func:`compute_dtype`); the base product may run in a
lower ``compute`` dtype. This file is the plain oracle: :mod:`peftfx.kernels.cpu_gemm` is the tiled,
fast CPU path that ``peftfx::qlora_linear`` runs, checked against it.
"""
from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch import Tensor

from peftfx.errors import KernelError
from peftfx.kernels.formats import (
    DYNAMIC_CODE, FORMATS, FP4_CODE, NF4_CODE, QuantizedWeight, check_block_size, code_for, layer_prefix,
)

__all__ = [
    "quantize", "dequantize", "quantize_4bit", "dequantize_4bit", "quantize_int8", "quantize_int8_zeropoint",
    "quantize_llm_int8", "quantize_blockwise_8bit", "decode_scales", "iter_dequantized_rows",
    "llm_int8_matmul", "base_product", "base_grad", "qlora_forward_ref", "qlora_backward_ref", "compute_dtype",
    "pair_table64",
]

# Rows of deq(W) materialized at once in the fused reference (fp32 elements).
CHUNK_ELEMS = 1 << 22


# ---------------------------------------------------------------------------------------------- tables
def _pair_table(code: Tensor) -> Tensor:
    """[256, 2] fp32: byte -> (code[hi nibble], code[lo nibble])."""
    b = torch.arange(256)
    return torch.stack([code[b >> 4], code[b & 15]], dim=1).contiguous()


_PAIRS = {"nf4": _pair_table(NF4_CODE), "fp4": _pair_table(FP4_CODE)}


def pair_table64(format: str, device: torch.device) -> Tensor:
    """``[256]`` float64 view of the byte -> (hi, lo) table: one 8-byte lookup yields both fp32 values."""
    return _on(f"pairs64_{format}", _PAIRS[format].view(torch.float64).view(-1), device)


def _bounds(code: Tensor) -> tuple[Tensor, Tensor]:
    # Same construction as bitsandbytes' default backend (argsort order decides FP4's +0/-0 tie).
    order = torch.argsort(code)
    return (code[order[:-1]] + code[order[1:]]) / 2, order


_BOUNDS = {"nf4": _bounds(NF4_CODE), "fp4": _bounds(FP4_CODE)}

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


_NF4_LUT = _code_lut(_BOUNDS["nf4"][0])
_Q_CHUNK = 1 << 16  # elements per step of the table search (temporaries stay in L2)


def _codes_nf4(scaled: Tensor) -> Tensor:
    """uint8 NF4 codes of ``scaled`` (1-D, values in [-1, 1]); equals ``bucketize(scaled, bounds)``."""
    base_t, thr_t = (_on(f"nf4lut{i}", t, scaled.device) for i, t in enumerate(_NF4_LUT))
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


_DYN_LUT = _dynamic_lut()
_device_cache: dict[tuple[str, torch.device], Tensor] = {}


def _on(name: str, t: Tensor, device: torch.device) -> Tensor:
    if device.type == "cpu":
        return t
    key = (name, device)
    if key not in _device_cache:
        _device_cache[key] = t.to(device)
    return _device_cache[key]


def compute_dtype(t: Tensor) -> torch.dtype:
    """fp32 for half-precision CPU tensors (slow bf16 GEMMs), else the tensor's own dtype."""
    if t.device.type == "cpu" and t.dtype in (torch.bfloat16, torch.float16):
        return torch.float32
    return t.dtype


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


def _raise_nonfinite(w: Tensor, name: str | None) -> None:
    bad = (~torch.isfinite(w)).nonzero()[0].tolist()
    raise KernelError(f"{layer_prefix(name)}weight has NaN/Inf values (first at {bad}); cannot quantize")


def quantize_4bit(w: Tensor, block_size: int, format: str, *, name: str | None = None) -> tuple[Tensor, Tensor]:
    """bitsandbytes' ``quantize_4bit`` (default backend): packed uint8 [ceil(n/2)], fp32 absmax [n_blocks].

    Raises :class:`KernelError` (naming ``name``) when ``w`` has NaN/Inf values.
    """
    flat = w.reshape(-1).float()
    n = flat.numel()
    rem = n % block_size
    full = n - rem
    blocks = flat[:full].view(-1, block_size)
    absmax = blocks.abs().amax(dim=-1)
    tail = flat[full:].abs().max() if rem else absmax[:0]
    if not (bool(torch.isfinite(absmax).all()) and bool(torch.isfinite(tail).all())):
        _raise_nonfinite(w, name)
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38).view(-1, 1)), -1, 1).reshape(-1)
    if rem:
        am = tail.clamp(min=1e-38)
        absmax = torch.cat([absmax, am.unsqueeze(0)])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / am, -1, 1)])
    if n % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    if format == "nf4":
        q8 = _codes_nf4(scaled)
    else:
        bounds, order = (_on(f"{format}_{i}", t, w.device) for i, t in enumerate(_BOUNDS[format]))
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
    codes = _on("dyn_lut", _DYN_LUT, x.device)[idx]
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


# ----------------------------------------------------------------------------------------- dequantize
def decode_scales(qw: QuantizedWeight) -> Tensor:
    """fp32 per-block scale (absmax for 4-bit, absmax/127 for int8, ...), undoing double quantization.

    Decoded on every call, not cached: the decode is ~5 ops over n_blocks (n/64) elements, ~2 ms per
    training step of a 50 M-parameter model, while a cache would keep 0.5 bit/param resident (3 MiB
    there), 12% on top of the 4.127 bits/param the format stores.
    """
    if not qw.double_quant:
        return qw.scales
    return _decode_double(qw)


def _decode_double(qw: QuantizedWeight) -> Tensor:
    code = _on("dyn", DYNAMIC_CODE, qw.scales.device)
    s = code[qw.scales.long()].view(-1)
    nb = s.numel()
    s2 = qw.scales2.repeat_interleave(qw.block_size2)[:nb]
    return s * s2 + qw.offset


# Packed bytes handled per step: the int32 indices (1 MB) and the fp32 values (2 MB) stay about in L2, so
# the gather, the scale multiply and the cast each read what the previous op just wrote (64 KB steps ran
# as fast but cost ~8 Python-dispatched ops each: 2x the per-layer overhead in training). Page faults of
# freshly allocated outputs, not the lookup, dominate large dequantizations: callers that loop pass
# ``out`` (a reused workspace).
_DEQ_CHUNK_BYTES = 1 << 18


def dequantize_4bit(packed: Tensor, absmax: Tensor, block_size: int, n: int, format: str,
                    dtype: torch.dtype = torch.float32, out: Tensor | None = None) -> Tensor:
    """``[n]`` in ``dtype`` from packed bytes and fp32 absmax (written into ``out`` [>= n] when given).

    One gather per byte from a 256-entry byte -> (hi, lo) table viewed as float64 (8 bytes = the two
    fp32 values; ``index_select`` on int32 indices is the fastest eager lookup, ~10x ``take``/``embedding``),
    then an in-place multiply by the block scales, chunk by chunk.
    """
    dev = packed.device
    table = pair_table64(format, dev)
    packed = packed.reshape(-1)
    nbytes = packed.numel()
    if out is None:
        out = torch.empty(2 * nbytes, dtype=dtype, device=dev)
    direct = dtype == torch.float32 and out.numel() >= 2 * nbytes and out.data_ptr() % 8 == 0
    vals = out[: 2 * nbytes].view(torch.float64) if direct else None
    step = max(1, _DEQ_CHUNK_BYTES // block_size) * block_size // 2  # bytes per chunk, block aligned
    idx = torch.empty(min(step, nbytes), dtype=torch.int32, device=dev)
    scratch = None if direct else torch.empty(min(step, nbytes), dtype=torch.float64, device=dev)
    full_blocks = n // block_size
    for b0 in range(0, nbytes, step):
        b1 = min(nbytes, b0 + step)
        ii = idx[: b1 - b0]
        ii.copy_(packed[b0:b1])
        chunk = vals[b0:b1] if direct else scratch[: b1 - b0]
        torch.index_select(table, 0, ii, out=chunk)
        c32 = chunk.view(torch.float32)
        e0 = 2 * b0
        k0, k1 = e0 // block_size, min(full_blocks, (2 * b1) // block_size)
        if k1 > k0:
            c32[: (k1 - k0) * block_size].view(-1, block_size).mul_(absmax[k0:k1].view(-1, 1))
        if 2 * b1 >= n and n % block_size:  # the partial last block has its own scale
            c32[full_blocks * block_size - e0: n - e0].mul_(absmax[full_blocks])
        if not direct:
            e1 = min(n, 2 * b1)
            out[e0:e1].copy_(c32[: e1 - e0])
    return out[:n]


def _dequant_flat(qw: QuantizedWeight, scales: Tensor, e0: int, e1: int,
                  dtype: torch.dtype = torch.float32, out: Tensor | None = None) -> Tensor:
    """Flat elements [e0, e1) of deq(W) (``dtype`` for 4-bit, else fp32); e0 is block aligned."""
    bs = qw.block_size
    b0, b1 = e0 // bs, -(-e1 // bs)
    n = e1 - e0
    if qw.format in ("nf4", "fp4"):
        return dequantize_4bit(qw.packed[e0 // 2: (e1 + 1) // 2], scales[b0:b1], bs, n, qw.format, dtype, out)
    q = qw.packed.reshape(-1)[e0:e1].float()
    full = (n // bs) * bs
    res = torch.empty_like(q)
    if qw.format == "int8-zeropoint":
        zero = qw.offset[b0:b1]
        if full:
            torch.mul(q[:full].view(-1, bs) - zero[: full // bs].view(-1, 1), scales[b0:b0 + full // bs].view(-1, 1),
                      out=res[:full].view(-1, bs))
        if full < n:
            torch.mul(q[full:] - zero[-1], scales[b1 - 1], out=res[full:])
        return res
    if full:
        torch.mul(q[:full].view(-1, bs), scales[b0:b0 + full // bs].view(-1, 1), out=res[:full].view(-1, bs))
    if full < n:
        torch.mul(q[full:], scales[b1 - 1], out=res[full:])
    return res


def _dequant_rows(qw: QuantizedWeight, scales: Tensor, r0: int, r1: int,
                  dtype: torch.dtype = torch.float32, out: Tensor | None = None) -> Tensor:
    k = qw.shape[1]
    if qw.format == "llm-int8":
        res = qw.packed[r0:r1].float() * (scales[r0:r1] / 127.0).view(-1, 1)
    else:
        res = _dequant_flat(qw, scales, r0 * k, r1 * k, dtype, out).view(r1 - r0, k)
    return res.to(dtype)


def dequantize(qw: QuantizedWeight, dtype: torch.dtype | None = None) -> Tensor:
    """deq(W) as ``[out, in]`` in ``dtype`` (default: the original weight dtype)."""
    return _dequant_rows(qw, decode_scales(qw), 0, qw.shape[0], dtype or qw.dtype)


def _row_step(qw: QuantizedWeight) -> int:
    """Smallest row count whose element count is a multiple of the block size (chunk alignment)."""
    if qw.format == "llm-int8":
        return 1
    k, bs, step = qw.shape[1], qw.block_size, 1
    while (step * k) % bs:
        step *= 2
    return step


def iter_dequantized_rows(qw: QuantizedWeight, dtype: torch.dtype = torch.float32, max_elems: int = CHUNK_ELEMS,
                          *, reuse: bool = False) -> Iterator[tuple[int, int, Tensor]]:
    """Yield ``(r0, r1, deq(W)[r0:r1])`` chunks of at most ~``max_elems`` elements, block aligned.

    With ``reuse`` every chunk is written into one buffer: consume each chunk before the next.
    """
    out_f, k = qw.shape
    step = _row_step(qw)
    rows = max(step, (max_elems // max(k, 1)) // step * step)
    scales = decode_scales(qw)
    buf = torch.empty(min(rows, out_f) * k + 1, dtype=dtype, device=qw.device) if reuse else None
    for r0 in range(0, out_f, rows):
        r1 = min(out_f, r0 + rows)
        yield r0, r1, _dequant_rows(qw, scales, r0, r1, dtype, buf)


# ------------------------------------------------------------------------------------------ fused math
def llm_int8_matmul(x: Tensor, qw: QuantizedWeight) -> Tensor:
    """LLM.int8 mixed-precision decomposition: int8 x int8 for regular columns, fp for outlier columns.

    Columns of ``x`` with any ``|x| >= threshold`` are multiplied in ``x``'s precision by the dequantized
    weight columns; the rest are quantized per token (row absmax) to int8. ``x`` is [M, K], fp32/fp64.
    """
    wq = qw.packed.to(x.dtype)
    wscale = (qw.scales / 127.0).to(x.dtype)
    cols = None
    xin = x
    if qw.threshold > 0:
        outl = (x.abs() >= qw.threshold).any(dim=0)
        if bool(outl.any()):
            cols = outl.nonzero().view(-1)
            xin = x.masked_fill(outl.view(1, -1), 0.0)
    rmax = xin.abs().amax(dim=1, keepdim=True)
    rs = torch.where(rmax > 0, rmax, torch.ones_like(rmax))
    xq = torch.round(xin * (127.0 / rs))
    y = (xq @ wq.t()) * (rs / 127.0) * wscale.view(1, -1)
    if cols is not None:
        y = y + x[:, cols] @ (wq[:, cols] * wscale.view(-1, 1)).t()
    return y


def base_product(x2: Tensor, weight: QuantizedWeight | Tensor, dtype: torch.dtype) -> Tensor:
    """``x2 @ deq(W).T`` with both operands rounded to ``dtype`` (fp32 accumulation where BLAS does it)."""
    if isinstance(weight, Tensor):
        return x2.to(dtype) @ weight.to(dtype).t()
    if weight.format == "llm-int8":
        return llm_int8_matmul(x2.float() if x2.dtype != torch.float64 else x2, weight).to(dtype)
    return x2.to(dtype) @ dequantize(weight, torch.float32).to(dtype).t()


def base_grad(dy2: Tensor, weight: QuantizedWeight | Tensor, dtype: torch.dtype) -> Tensor:
    """``dy2 @ deq(W)`` with both operands rounded to ``dtype``."""
    w = weight if isinstance(weight, Tensor) else dequantize(weight, torch.float32)
    return dy2.to(dtype) @ w.to(dtype)


def qlora_forward_ref(x: Tensor, weight: QuantizedWeight | Tensor, bias: Tensor | None, lora_A: Tensor | None,
                      lora_B: Tensor | None, scaling: float, x_lora: Tensor | None = None,
                      compute: torch.dtype | None = None, *, base: Callable = base_product) -> Tensor:
    """``y = x @ deq(W).T + b + s * (xl @ A.T) @ B.T`` for x ``[..., in]``; returns ``[..., out]`` in x.dtype.

    The base product ``base(x2 [M, K], weight, dtype) -> [M, N]`` runs in ``compute`` (default:
    :func:`compute_dtype`); LoRA, bias and the sum in :func:`compute_dtype`. With the default ``base``
    this is the plain oracle; :mod:`peftfx.kernels.cpu_gemm` passes its tiled product.
    """
    k = x.shape[-1]
    acc = compute_dtype(x)
    x2 = x.reshape(-1, k)
    y = base(x2, weight, compute or acc).to(acc)
    if bias is not None:
        y = y + bias.to(acc)
    if lora_A is not None and lora_B is not None:
        xl = (x2 if x_lora is None else x_lora.reshape(-1, k)).to(acc)
        y = y.addmm_(xl @ lora_A.to(acc).t(), lora_B.to(acc).t(), alpha=scaling)
    return y.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])


def qlora_backward_ref(dy: Tensor, x: Tensor, weight: QuantizedWeight | Tensor, lora_A: Tensor | None,
                       lora_B: Tensor | None, scaling: float, x_lora: Tensor | None = None,
                       needs: tuple[bool, bool, bool, bool] = (True, True, True, True),
                       compute: torch.dtype | None = None, *, base_grad: Callable = base_grad,
                       ) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """``(dx, dx_lora, dA, dB)``; ``dx_lora`` is None when ``x_lora`` is None (its term is folded into dx).

    ``base_grad(dy2 [M, N], weight, dtype) -> [M, K]`` is ``dy2 @ deq(W)`` (see :func:`qlora_forward_ref`).
    """
    k = x.shape[-1]
    acc = compute_dtype(x)
    dy2 = dy.reshape(-1, dy.shape[-1]).to(acc)
    has_lora = lora_A is not None and lora_B is not None
    need_dx, need_dxl, need_dA, need_dB = needs
    dx = dx_lora = dA = dB = None
    if has_lora:
        A, B = lora_A.to(acc), lora_B.to(acc)
        xl = (x if x_lora is None else x_lora).reshape(-1, k).to(acc)
        dyB = dy2 @ B  # [M, r]
        if need_dA:
            dA = torch.mm(dyB.t(), xl).mul_(scaling).to(lora_A.dtype)
        if need_dB:
            dB = torch.mm(dy2.t(), xl @ A.t()).mul_(scaling).to(lora_B.dtype)
        lora_dx = torch.mm(dyB, A).mul_(scaling) if (need_dx and x_lora is None) or (need_dxl and x_lora is not None) \
            else None
    if need_dx:
        dx = base_grad(dy2, weight, compute or acc).to(acc)
        if has_lora and x_lora is None:
            dx = dx + lora_dx
        dx = dx.to(x.dtype).reshape(x.shape)
    if has_lora and x_lora is not None and need_dxl:
        dx_lora = lora_dx.to(x_lora.dtype).reshape(x_lora.shape)
    return dx, dx_lora, dA, dB
