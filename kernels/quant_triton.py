"""Triton block-wise quantize / dequantize for every peftfx weight format.

Math (``w`` is the frozen weight ``[N, K]`` = ``[out_features, in_features]``, flattened row-major;
block ``b`` covers flat elements ``[b*bs, (b+1)*bs)``, so blocks may cross rows and a partial last
block gets its own scale):

- ``nf4`` / ``fp4``: ``absmax_b = max|w|`` (clamped to 1e-38); ``v = clamp(w * (1/absmax_b), -1, 1)``
  (the partial last block divides instead, as bitsandbytes' default backend does);
  ``code = order[bucketize(v, midpoints of the sorted codebook)]`` (ties go to the lower code);
  ``deq = CODE[code] * absmax_b``.
  Double quantization: ``offset = mean(absmax)``; ``absmax - offset`` is quantized in blocks of
  ``bs2`` to bitsandbytes' signed dynamic 8-bit map through its CPU 65536-bin lookup table, giving
  ``uint8`` codes plus fp32 second-level absmax; ``absmax_b = DYN[q_b] * absmax2_{b // bs2} + offset``.
- ``int8``: ``scale_b = absmax_b / 127``; ``q = clamp(round(w / scale_b), -127, 127)``; ``deq = q * scale_b``.
- ``int8-zeropoint``: ``lo = min(min_b, 0)``, ``hi = max(max_b, 0)``, ``scale_b = (hi - lo) / 255``;
  ``zp_b = clamp(round(-lo / scale_b), 0, 255)``; ``q = clamp(round(w / scale_b + zp_b), 0, 255)``;
  ``deq = (q - zp_b) * scale_b``.
- ``llm-int8``: row-wise: ``absmax_n = max_k |w[n, k]|``; ``q = round(w * (127 / absmax_n))``;
  ``deq = q * (absmax_n / 127)``. (The activation-side outlier split lives in the fused op.)

``round`` is round-half-to-even (``torch.round``); a block whose scale is zero quantizes to the
code of zero and dequantizes to exact zeros. These are ``reference.py``'s formulas, op for op.

Storage (see ``formats.QuantizedWeight``): nf4/fp4 ``packed`` uint8 ``[ceil(numel/2)]`` with the
even flat element in the high nibble (an odd tail leaves the low nibble 0); int8 int8 ``[numel]``;
int8-zeropoint uint8 ``[numel]`` with the zero point in ``offset``; llm-int8 int8 ``[N, K]``.

All arithmetic is fp32 and IEEE-exact (``div_rn``, no FMA contraction: launched with
``enable_fp_fusion=False``), so codes and scales equal ``reference.quantize`` bit for bit.

The dequantization of one element is the ``@triton.jit`` helper :func:`decode_triton.dequant_values`,
shared with the fused matmuls in ``qlora_triton.py`` so both read the storage the same way.
"""
from __future__ import annotations


import torch
import triton
import triton.language as tl

from peftfx.errors import KernelError
from peftfx.kernels import formats
from peftfx.kernels import quantizer
from peftfx.kernels.decode_triton import codebook_id, dequant_values, interpreting
from peftfx.kernels.formats import QuantizedWeight

__all__ = ["quantize_triton", "dequantize_triton", "dequant_values", "format_id", "kernel_tensors",
           "check_quantized", "interpreting"]

# FORMAT constexpr shared with qlora_triton: 0 dense, 1 nf4/fp4 (codebook), 2 int8, 3 int8-zeropoint,
# 4 llm-int8 (row scales).
_FORMAT_IDS = {"none": 0, "nf4": 1, "fp4": 1, "int8": 2, "int8-zeropoint": 3, "llm-int8": 4}
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_ELEMS_PER_PROG = 1024  # elements one quantize/dequantize program handles (several small blocks)
_ELEMS_PER_PROG_INTERPRET = 16384  # the interpreter pays per op, not per element: fewer, bigger programs


def _elems_per_prog() -> int:
    return _ELEMS_PER_PROG_INTERPRET if interpreting() else _ELEMS_PER_PROG


def format_id(fmt: str) -> int:
    """The FORMAT constexpr for ``fmt``."""
    return _FORMAT_IDS[fmt]


# ----------------------------------------------------------------------------- jit helpers

@triton.jit
def _round_half_even(x):
    """torch.round for |x| < 2**22: floor(x + 0.5), moved down on exact .5 ties to odd results."""
    r = tl.floor(x + 0.5)
    tie = (r - x) == 0.5
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    return tl.where(tie & odd, r - 1.0, r)


@triton.jit
def _bucketize(x, bounds_ptr, order_ptr, N_BOUNDS: tl.constexpr):
    """torch.bucketize(x, bounds) (count of bounds < x, ties go low), mapped through the sort order."""
    q = tl.zeros(x.shape, dtype=tl.int32)
    for i in tl.static_range(N_BOUNDS):
        q += (x > tl.load(bounds_ptr + i)).to(tl.int32)
    return tl.load(order_ptr + q)


# ----------------------------------------------------------------------------- kernels

@triton.jit
def _quantize_4bit_kernel(
    # pointers
    w_ptr, bounds_ptr, order_ptr, packed_ptr, absmax_ptr,
    # dims
    numel, n_blocks,
    # constexprs
    BLOCK_SIZE: tl.constexpr, BLOCKS_PER_PROG: tl.constexpr,
):
    """One program quantizes BLOCKS_PER_PROG blocks, as a [blocks, pairs] tile of (even, odd) elements."""
    HALF: tl.constexpr = BLOCK_SIZE // 2
    blk = tl.program_id(0) * BLOCKS_PER_PROG + tl.arange(0, BLOCKS_PER_PROG)
    pair = tl.arange(0, HALF)
    even = blk[:, None] * BLOCK_SIZE + 2 * pair[None, :]
    m_even = even < numel
    # masked elements load as 0.0: an odd numel's missing partner quantizes as 0, like the reference's pad
    x_even = tl.load(w_ptr + even, mask=m_even, other=0.0).to(tl.float32)
    x_odd = tl.load(w_ptr + even + 1, mask=(even + 1) < numel, other=0.0).to(tl.float32)
    absmax = tl.maximum(tl.max(tl.abs(x_even), axis=1), tl.max(tl.abs(x_odd), axis=1))
    # bitsandbytes' clamp(min=1e-38) makes an all-zero block scale 0 -> 0, not NaN. Written as selects:
    # a GPU may flush the subnormal 1e-38 to zero in arithmetic (ftz), a select keeps its bits.
    # (Only a nonzero subnormal absmax, below 1e-38, would differ from the reference.)
    nonzero = (absmax > 0.0)[:, None]
    safe = tl.where(absmax > 0.0, absmax, 1e-38)
    # The reference (bitsandbytes' default backend) multiplies full blocks by 1/absmax but divides the
    # partial last block by its absmax, and stores the clamped absmax only for that partial block.
    partial = ((blk == n_blocks - 1) & (numel % BLOCK_SIZE != 0))[:, None]
    inv = tl.math.div_rn(tl.full(safe.shape, 1.0, tl.float32), safe)[:, None]
    s_even = tl.where(partial, tl.math.div_rn(x_even, safe[:, None]), x_even * inv)
    s_odd = tl.where(partial, tl.math.div_rn(x_odd, safe[:, None]), x_odd * inv)
    s_even = tl.where(nonzero, s_even, 0.0)
    s_odd = tl.where(nonzero, s_odd, 0.0)
    q_even = _bucketize(tl.minimum(tl.maximum(s_even, -1.0), 1.0), bounds_ptr, order_ptr, 15)
    q_odd = _bucketize(tl.minimum(tl.maximum(s_odd, -1.0), 1.0), bounds_ptr, order_ptr, 15)
    byte = ((q_even << 4) | q_odd).to(tl.uint8)
    tl.store(packed_ptr + blk[:, None] * HALF + pair[None, :], byte, mask=m_even)
    tl.store(absmax_ptr + blk, tl.where(partial.reshape([BLOCKS_PER_PROG]), safe, absmax), mask=blk < n_blocks)


@triton.jit
def _quantize_dynamic8_kernel(
    # pointers
    x_ptr, offset_ptr, lut_ptr, q_ptr, absmax_ptr,
    # dims
    n,
    # constexprs
    BLOCK_SIZE: tl.constexpr,
):
    """Double quantization: one program quantizes one block of (absmax - offset) to dynamic-map codes."""
    blk = tl.program_id(0)
    offs = blk * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offs < n
    x = tl.where(mask, tl.load(x_ptr + offs, mask=mask, other=0.0) - tl.load(offset_ptr), 0.0)
    absmax = tl.max(tl.abs(x), axis=0)
    tl.store(absmax_ptr + blk, absmax)
    ok = absmax > 0.0
    inv = tl.math.div_rn(tl.full([], 1.0, tl.float32), tl.where(ok, absmax, 1.0))
    v = tl.minimum(tl.maximum(x * inv, -1.0), 1.0)
    # bitsandbytes' CPU path: a 65536-bin LUT over [-1, 1], bin = trunc(((v + 1) / 2) * 65535 + 0.5)
    bin_ = (((v + 1.0) * 0.5) * 65535.0 + 0.5).to(tl.int32)
    q = tl.where(ok, tl.load(lut_ptr + bin_, mask=mask, other=0), 0)  # an all-zero block gets code 0
    tl.store(q_ptr + offs, q.to(tl.uint8), mask=mask)


@triton.jit
def _quantize_int8_kernel(
    # pointers
    w_ptr, q_ptr, scale_ptr, zp_ptr,
    # dims
    numel, n_blocks,
    # constexprs
    BLOCK_SIZE: tl.constexpr, BLOCKS_PER_PROG: tl.constexpr, ZEROPOINT: tl.constexpr,
):
    """One program quantizes a [blocks, BLOCK_SIZE] tile: symmetric absmax or asymmetric min/max."""
    blk = tl.program_id(0) * BLOCKS_PER_PROG + tl.arange(0, BLOCKS_PER_PROG)
    offs = blk[:, None] * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)[None, :]
    mask = offs < numel
    x = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if ZEROPOINT:
        # the range always includes 0 (so 0 is exact); masked tail elements load as 0 and change nothing
        lo = tl.minimum(tl.min(x, axis=1), 0.0)
        hi = tl.maximum(tl.max(x, axis=1), 0.0)
        scale = tl.math.div_rn(hi - lo, tl.full(hi.shape, 255.0, tl.float32))
        safe = tl.where(scale > 0.0, scale, 1.0)
        zp = tl.minimum(tl.maximum(_round_half_even(tl.math.div_rn(-lo, safe)), 0.0), 255.0)
        q = _round_half_even(tl.math.div_rn(x, safe[:, None]) + zp[:, None])
        q = tl.minimum(tl.maximum(q, 0.0), 255.0)
        tl.store(zp_ptr + blk, zp, mask=blk < n_blocks)
        tl.store(q_ptr + offs, q.to(tl.int32).to(tl.uint8), mask=mask)
    else:
        absmax = tl.max(tl.abs(x), axis=1)
        scale = tl.math.div_rn(absmax, tl.full(absmax.shape, 127.0, tl.float32))
        q = _round_half_even(tl.math.div_rn(x, tl.where(scale > 0.0, scale, 1.0)[:, None]))
        q = tl.minimum(tl.maximum(q, -127.0), 127.0)
        tl.store(q_ptr + offs, q.to(tl.int8), mask=mask)
    tl.store(scale_ptr + blk, scale, mask=blk < n_blocks)


@triton.jit
def _quantize_rows_int8_kernel(
    # pointers
    w_ptr, q_ptr, absmax_ptr,
    # dims
    K,
    # strides
    stride_n,
    # constexprs
    BLOCK_K: tl.constexpr,
):
    """LLM.int8 weights: one program per row, two passes over K (row absmax, then quantize)."""
    row = tl.program_id(0)
    absmax = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(w_ptr + row * stride_n + offs, mask=offs < K, other=0.0).to(tl.float32)
        absmax = tl.maximum(absmax, tl.abs(x))
    amax = tl.max(absmax, axis=0)
    tl.store(absmax_ptr + row, amax)
    # torch evaluates `127.0 / t` as reciprocal(t) * 127 (two roundings); the reference writes it so
    mult = tl.math.div_rn(tl.full([], 1.0, tl.float32), tl.where(amax > 0.0, amax, 1.0)) * 127.0
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(w_ptr + row * stride_n + offs, mask=offs < K, other=0.0).to(tl.float32)
        q = tl.minimum(tl.maximum(_round_half_even(x * mult), -127.0), 127.0)
        tl.store(q_ptr + row * K + offs, q.to(tl.int8), mask=offs < K)


@triton.jit
def _dequantize_kernel(
    # pointers
    packed_ptr, scales_ptr, scales2_ptr, offset_ptr, code2_ptr, out_ptr,
    # dims
    numel, K,
    # constexprs
    FORMAT: tl.constexpr, DOUBLE_QUANT: tl.constexpr, CODEBOOK: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_SIZE2: tl.constexpr, BLOCK: tl.constexpr,
):
    """Flat elementwise dequantization into ``out`` (its dtype) through :func:`dequant_values`."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    w = dequant_values(offs, mask, packed_ptr, scales_ptr, scales2_ptr, offset_ptr, code2_ptr,
                       K, FORMAT, DOUBLE_QUANT, CODEBOOK, BLOCK_SIZE, BLOCK_SIZE2)
    tl.store(out_ptr + offs, w.to(out_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- host helpers

_TABLES: dict[tuple[str, torch.device], torch.Tensor] = {}


def _table(name: str, device: torch.device) -> torch.Tensor:
    """Lookup tables on ``device`` (cached). Bounds, sort order and the double-quant LUT are the
    reference's own tensors, so the kernels cannot drift from the oracle's tie-breaking."""
    key = (name, device)
    if key not in _TABLES:
        if name == "dynamic":
            t = formats.DYNAMIC_CODE.float()
        elif name == "dynamic_lut":
            t = quantizer.DYNAMIC_LUT
        else:  # "<fmt>_bounds" / "<fmt>_order"
            fmt, what = name.split("_")
            bounds, order = quantizer.CODE_BOUNDS[fmt]
            t = bounds.float() if what == "bounds" else order.to(torch.int32)
        _TABLES[key] = t.to(device).contiguous()
    return _TABLES[key]


def _check_block_size(value: int, what: str) -> None:
    if not isinstance(value, int) or value < 16 or value & (value - 1):
        raise KernelError(f"{what} must be a power of two >= 16, got {value!r}")


def _dummy(device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.zeros(1, device=device, dtype=dtype)


def kernel_tensors(qw: QuantizedWeight | torch.Tensor) -> tuple:
    """(packed, scales, scales2, offset, code2) pointers for :func:`dequant_values` (dummies unused).
    The 4-bit codebooks are compile-time constants of the kernels (``CODEBOOK``), not tensors."""
    if isinstance(qw, torch.Tensor):
        d = _dummy(qw.device)
        return qw, d, d, d, d
    dev = qw.packed.device
    code2 = _table("dynamic", dev) if qw.double_quant else _dummy(dev)
    scales2 = qw.scales2 if qw.scales2 is not None else _dummy(dev)
    offset = qw.offset.reshape(-1) if qw.offset is not None else _dummy(dev)
    return qw.packed, qw.scales, scales2, offset, code2


def check_quantized(qw: QuantizedWeight) -> None:
    """Raise KernelError when the storage of ``qw`` disagrees with its shape and block sizes."""
    qw.validate()
    for name, t in qw.tensors().items():
        if t.device != qw.packed.device:
            raise KernelError(f"{qw.format} weight: {name} is on {t.device}, packed on {qw.packed.device}")
        if not t.is_contiguous():
            raise KernelError(f"{qw.format} weight: {name} must be contiguous")


# ----------------------------------------------------------------------------- launchers

def quantize_triton(w: torch.Tensor, format: str, *, block_size: int = 64, double_quant: bool = False,
                    block_size2: int = 256, threshold: float = 6.0) -> QuantizedWeight:
    """Quantize a 2-D weight ``[out, in]`` on its device; byte-identical to ``reference.quantize``.

    Example::

        qw = quantize_triton(torch.randn(128, 64, device="cuda"), "nf4", double_quant=True)
    """
    if format not in _FORMAT_IDS or format == "none":
        raise KernelError(f"unknown quantization format {format!r}; expected one of {formats.FORMATS}")
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        raise KernelError(f"quantize expects a 2-D weight [out, in], got {getattr(w, 'shape', type(w))}")
    if w.dtype not in _FLOAT_DTYPES:
        raise KernelError(f"quantize expects a float32/float16/bfloat16 weight, got {w.dtype}")
    if format != "llm-int8":
        _check_block_size(block_size, "block_size")
    if double_quant:
        if format not in ("nf4", "fp4"):
            raise KernelError(f"double_quant applies to nf4/fp4 only, not {format!r}")
        _check_block_size(block_size2, "block_size2")
    if not bool(torch.isfinite(w).all()):
        raise KernelError(f"weight {tuple(w.shape)} contains NaN or Inf; refusing to quantize")
    if w.numel() >= 2**31 - 2 * block_size:
        raise KernelError(f"weight has {w.numel()} elements; the kernels index with int32")
    w = w.contiguous()  # strided weights (e.g. a transposed view) are copied, not rejected
    n_out, n_in = w.shape
    numel, dev = w.numel(), w.device
    n_blocks = -(-numel // block_size)
    bpp = max(1, _elems_per_prog() // block_size)
    grid = (triton.cdiv(n_blocks, bpp),)
    common = dict(format=format, shape=(n_out, n_in), block_size=block_size, dtype=w.dtype)

    if format in ("nf4", "fp4"):
        packed = torch.empty(-(-numel // 2), dtype=torch.uint8, device=dev)
        absmax = torch.empty(n_blocks, dtype=torch.float32, device=dev)
        _quantize_4bit_kernel[grid](w, _table(f"{format}_bounds", dev), _table(f"{format}_order", dev), packed, absmax, numel, n_blocks,
                                    BLOCK_SIZE=block_size, BLOCKS_PER_PROG=bpp, enable_fp_fusion=False)
        if not double_quant:
            return QuantizedWeight(packed=packed, scales=absmax, scales2=None, offset=None, threshold=0.0,
                                   block_size2=256, **common)
        # The mean is one scalar reduction: torch's, so its summation order (and bits) match the reference.
        offset = absmax.mean().reshape(1)
        n2 = -(-n_blocks // block_size2)
        codes = torch.empty(n_blocks, dtype=torch.uint8, device=dev)
        absmax2 = torch.empty(n2, dtype=torch.float32, device=dev)
        _quantize_dynamic8_kernel[(n2,)](absmax, offset, _table("dynamic_lut", dev), codes, absmax2, n_blocks,
                                         BLOCK_SIZE=block_size2, enable_fp_fusion=False)
        return QuantizedWeight(packed=packed, scales=codes, scales2=absmax2, offset=offset.reshape(()),
                               threshold=0.0, block_size2=block_size2, **common)

    if format in ("int8", "int8-zeropoint"):
        zp = format == "int8-zeropoint"
        q = torch.empty(numel, dtype=torch.uint8 if zp else torch.int8, device=dev)
        scale = torch.empty(n_blocks, dtype=torch.float32, device=dev)
        zero = torch.empty(n_blocks if zp else 1, dtype=torch.float32, device=dev)
        _quantize_int8_kernel[grid](w, q, scale, zero, numel, n_blocks, BLOCK_SIZE=block_size,
                                    BLOCKS_PER_PROG=bpp, ZEROPOINT=zp, enable_fp_fusion=False)
        return QuantizedWeight(packed=q, scales=scale, scales2=None, offset=zero if zp else None,
                               threshold=0.0, block_size2=256, **common)

    q = torch.empty(n_out, n_in, dtype=torch.int8, device=dev)
    absmax = torch.empty(n_out, dtype=torch.float32, device=dev)
    block_k = min(1024, triton.next_power_of_2(n_in))
    _quantize_rows_int8_kernel[(n_out,)](w, q, absmax, n_in, w.stride(0), BLOCK_K=block_k,
                                         enable_fp_fusion=False)
    return QuantizedWeight(packed=q, scales=absmax, scales2=None, offset=None, threshold=float(threshold),
                           block_size2=256, **common)


def dequantize_triton(qw: QuantizedWeight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Dequantize ``qw`` to a dense ``[out, in]`` tensor of ``dtype`` (default: the original dtype)."""
    if not isinstance(qw, QuantizedWeight):
        raise KernelError(f"dequantize expects a QuantizedWeight, got {type(qw).__name__}")
    check_quantized(qw)
    dtype = dtype or qw.dtype
    if dtype not in _FLOAT_DTYPES:
        raise KernelError(f"dequantize to {dtype} is not supported; use float32/float16/bfloat16")
    n_out, n_in = qw.shape
    numel = n_out * n_in
    # The interpreter's fp32 -> bf16 cast truncates instead of rounding: cast with torch there.
    bf16_via_fp32 = dtype == torch.bfloat16 and interpreting()
    out = torch.empty(n_out, n_in, dtype=torch.float32 if bf16_via_fp32 else dtype, device=qw.packed.device)
    packed, scales, scales2, offset, code2 = kernel_tensors(qw)
    grid = (triton.cdiv(numel, _elems_per_prog()),)
    _dequantize_kernel[grid](packed, scales, scales2, offset, code2, out, numel, n_in,
                             FORMAT=format_id(qw.format), DOUBLE_QUANT=qw.double_quant,
                             CODEBOOK=codebook_id(qw.format),
                             BLOCK_SIZE=qw.block_size if qw.format != "llm-int8" else 16,
                             BLOCK_SIZE2=qw.block_size2 if qw.double_quant else 16,
                             BLOCK=_elems_per_prog(), enable_fp_fusion=False)
    return out.to(dtype)
