"""The oracle: pure-PyTorch dequantize for every format and the fused QLoRA math.

Every other backend (:mod:`cpu_gemm`, the Triton kernels, the native CPU decoder) is tested against
this file. The quantizer (dense -> packed) lives in :mod:`peftfx.kernels.quantizer`.

Fused math (s = scaling, xl = x_lora if given else x)::

    y        = x @ deq(W).T + b + s * (xl @ A.T) @ B.T           x [M, K], A [r, K], B [N, r]
    dx       = dy @ deq(W)  (+ s * (dy @ B) @ A when x_lora is None)
    dx_lora  = s * (dy @ B) @ A
    dA       = s * (dy @ B).T @ xl
    dB       = s * dy.T @ (xl @ A.T)

Half-precision CPU inputs accumulate in fp32 (:func:`~peftfx.kernels.dtypes.accumulate_dtype`); the base product may run in a
lower ``compute`` dtype. This file is the plain oracle: :mod:`peftfx.kernels.cpu_gemm` is the tiled,
fast CPU path that ``peftfx::qlora_linear`` runs, checked against it.
"""
from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch import Tensor

from peftfx.kernels.dtypes import accumulate_dtype
from peftfx.kernels.formats import DYNAMIC_CODE, FP4_CODE, NF4_CODE, QuantizedWeight, table_on

__all__ = [
    "dequantize", "dequantize_4bit", "decode_scales", "iter_dequantized_rows", "llm_int8_matmul",
    "base_product", "base_grad", "qlora_forward_ref", "qlora_backward_ref", "pair_table64",
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
    return table_on(f"pairs64_{format}", _PAIRS[format].view(torch.float64).view(-1), device)


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
    code = table_on("dyn", DYNAMIC_CODE, qw.scales.device)
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
    :func:`~peftfx.kernels.dtypes.accumulate_dtype`); LoRA, bias and the sum in :func:`~peftfx.kernels.dtypes.accumulate_dtype`. With the default ``base``
    this is the plain oracle; :mod:`peftfx.kernels.cpu_gemm` passes its tiled product.
    """
    k = x.shape[-1]
    acc = accumulate_dtype(x)
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
    acc = accumulate_dtype(x)
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
        dx = base_grad(dy2, weight, compute or acc)
        if has_lora and x_lora is None:
            # lora_dx + base in place (a bf16 base widened exactly inside the add): the same sum as casting
            # the base to acc first and adding, without the cast's copy and a third [M, K] tensor
            dx = lora_dx.add_(dx) if torch.promote_types(dx.dtype, acc) == acc else dx.to(acc) + lora_dx
        dx = dx.to(acc).to(x.dtype).reshape(x.shape)
    if has_lora and x_lora is not None and need_dxl:
        dx_lora = lora_dx.to(x_lora.dtype).reshape(x_lora.shape)
    return dx, dx_lora, dA, dB
