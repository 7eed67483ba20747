"""Fused dequantize-matmul + LoRA: forward, backward dX, and dA / dB.

Math (``s`` = scaling, ``xl`` = ``x_lora`` if given else ``x``; W is ``[N, K]`` = ``[out, in]``)::

    forward   y  = x·deq(W)ᵀ + b + s·(xl·Aᵀ)·Bᵀ               x [M, K], A [r, K], B [N, r], y [M, N]
    backward  dx = dy·deq(W)  (+ s·(dy·B)·A when x_lora is None)
              dx_lora = s·(dy·B)·A ;  dA = s·(dy·B)ᵀ·xl ;  dB = s·dyᵀ·(xl·Aᵀ)

Kernels:

- ``_qlora_forward_kernel`` tiles y over (M, N). Inside the K loop it gathers the W tile
  ``[BLOCK_K, BLOCK_N]`` straight from the packed storage (codes, block scales, double-quant scales:
  ``quant_triton.dequant_values``), dequantizes it in registers, casts it to x's dtype and feeds
  ``tl.dot`` with an fp32 accumulator. deq(W) is never written to global memory. The epilogue adds
  the bias and the rank-r term ``s·xa·Bᵀ`` (xa = xl·Aᵀ ``[M, r]``, one skinny torch matmul before
  launch; r is padded to a power of two >= 16 for ``tl.dot``).
- ``_qlora_dx_kernel`` tiles dx over (M, K) and loops over N, reading W tiles ``[BLOCK_N, BLOCK_K]``
  in storage order (W "transposed-wise" relative to the forward) and, when x_lora is None, adds
  ``s·(dy·B)·A`` in the epilogue.
- dA, dB, dx_lora are torch matmuls on the small ``[M, r]`` intermediates: each is one pass over
  dy or x with a rank-r side, which cuBLAS already runs at bandwidth, while a fused version would
  need a cross-program reduction over M (atomics or a second pass) for no saved traffic.

Storage indexing: W element (n, k) is flat index ``n*K + k`` (row-major); its quant block is
``flat // block_size``, so blocks may cross rows and K need not be a multiple of any block size.
Every tail (M, N, K, r) is masked. llm-int8 weights are dequantized in-tile from the int8 rows and
fp32 row absmax (``q * absmax_n / 127``); the activation-side outlier split of LLM.int8 is done by
the host (see ``_llm_int8_split``) with torch ops on the few outlier columns.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from peftfx.errors import KernelError
from peftfx.kernels.formats import QuantizedWeight
from peftfx.kernels.quant_triton import check_quantized, dequant_values, format_id, interpreting, kernel_tensors

__all__ = ["qlora_forward_triton", "qlora_backward_triton"]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _configs() -> list[triton.Config]:
    """Hopper-sized tiles; a single small one under the interpreter (autotuning there is numpy-slow).

    ``PEFTFX_TRITON_AUTOTUNE=0`` keeps one mid-sized config on a GPU: property tests hit dozens of
    constexpr specializations, and compiling ten configs for each would take minutes.
    """
    if interpreting():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}, num_warps=4,
                              num_stages=1)]
    if os.environ.get("PEFTFX_TRITON_AUTOTUNE", "1") == "0":
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4,
                              num_stages=3)]
    shapes = [  # (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
        (128, 256, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 128, 8, 3), (64, 128, 64, 4, 4),
        (128, 64, 64, 4, 4), (64, 64, 128, 4, 4),
        # small M (decode / GEMV-like): narrow N tiles so N/BLOCK_N programs fill 132 SMs
        (16, 64, 128, 4, 4), (16, 32, 256, 4, 3), (16, 128, 128, 4, 4), (32, 64, 128, 4, 4),
    ]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w,
                          num_stages=s) for bm, bn, bk, w, s in shapes]


# M varies with every batch/sequence length in training: tune per power-of-two bucket, not per M.
_KEY = ["M_KEY", "N", "K", "FORMAT", "IEEE"]


@triton.jit
def _grouped_tile(pid, num_m, num_other, GROUP_M: tl.constexpr):
    """(row tile, column tile) of program ``pid`` in grouped launch order (Triton tutorial 03):
    GROUP_M row tiles sweep each column tile together, so programs sharing W tiles run close in time
    and hit L2."""
    first_m = (pid // (GROUP_M * num_other)) * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    return first_m + (pid % (GROUP_M * num_other)) % size_m, (pid % (GROUP_M * num_other)) // size_m


@triton.autotune(configs=_configs(), key=_KEY)
@triton.jit
def _qlora_forward_kernel(
    # pointers
    x_ptr, packed_ptr, scales_ptr, scales2_ptr, offset_ptr, code_ptr, code2_ptr,
    bias_ptr, xa_ptr, lora_b_ptr, xs_ptr, extra_ptr, y_ptr,
    # dims
    M, N, K, R, M_KEY, scaling,
    # strides
    stride_xm, stride_xk, stride_xam, stride_bn, stride_ym,
    # constexprs
    FORMAT: tl.constexpr, DOUBLE_QUANT: tl.constexpr, QBLOCK: tl.constexpr, QBLOCK2: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, HAS_EXTRA: tl.constexpr, BLOCK_R: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """y[BLOCK_M, BLOCK_N] = x·deq(W)ᵀ + b + s·xa·Bᵀ, W tiles dequantized in registers."""
    pid_m, pid_n = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    if FORMAT == 4:
        # LLM.int8: x arrives quantized per token (int8, row scale xs); int8 x int8 -> int32 on tensor cores
        acc_i = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            xq = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                         mask=m_mask[:, None] & k_mask[None, :], other=0)
            wq = tl.load(packed_ptr + offs_n[None, :] * K + offs_k[:, None],
                         mask=k_mask[:, None] & n_mask[None, :], other=0)
            acc_i = tl.dot(xq, wq, acc_i)
        xs = tl.load(xs_ptr + offs_m, mask=m_mask, other=0.0)
        w_absmax = tl.load(scales_ptr + offs_n, mask=n_mask, other=0.0)
        ws = tl.math.div_rn(w_absmax, tl.full(w_absmax.shape, 127.0, tl.float32))
        acc = acc_i.to(tl.float32) * xs[:, None] * ws[None, :]
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                        mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            w_idx = offs_n[None, :] * K + offs_k[:, None]  # [BLOCK_K, BLOCK_N]: Wᵀ tile
            w = dequant_values(w_idx, k_mask[:, None] & n_mask[None, :], packed_ptr, scales_ptr, scales2_ptr,
                               offset_ptr, code_ptr, code2_ptr, K, FORMAT, DOUBLE_QUANT, QBLOCK, QBLOCK2)
            if IEEE:
                acc = tl.dot(x, w.to(x.dtype), acc, input_precision="ieee")
            else:
                acc = tl.dot(x, w.to(x.dtype), acc)

    if HAS_EXTRA:  # LLM.int8 outlier columns, multiplied in fp32 by the host
        acc += tl.load(extra_ptr + offs_m[:, None] * N + offs_n[None, :],
                       mask=m_mask[:, None] & n_mask[None, :], other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_LORA:
        offs_r = tl.arange(0, BLOCK_R)
        r_mask = offs_r < R
        xa = tl.load(xa_ptr + offs_m[:, None] * stride_xam + offs_r[None, :],
                     mask=m_mask[:, None] & r_mask[None, :], other=0.0).to(tl.float32)
        bt = tl.load(lora_b_ptr + offs_n[None, :] * stride_bn + offs_r[:, None],
                     mask=r_mask[:, None] & n_mask[None, :], other=0.0).to(tl.float32)
        acc += scaling * tl.dot(xa, bt, input_precision="ieee")
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


@triton.autotune(configs=_configs(), key=_KEY)
@triton.jit
def _qlora_dx_kernel(
    # pointers
    dy_ptr, packed_ptr, scales_ptr, scales2_ptr, offset_ptr, code_ptr, code2_ptr,
    dyb_ptr, lora_a_ptr, dx_ptr,
    # dims
    M, N, K, R, M_KEY, scaling,
    # strides
    stride_dym, stride_dyn, stride_dybm, stride_ar, stride_dxm,
    # constexprs
    FORMAT: tl.constexpr, DOUBLE_QUANT: tl.constexpr, QBLOCK: tl.constexpr, QBLOCK2: tl.constexpr,
    HAS_LORA: tl.constexpr, BLOCK_R: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """dx[BLOCK_M, BLOCK_K] = dy·deq(W) (+ s·(dy·B)·A); the reduction runs over N in BLOCK_N steps."""
    pid_m, pid_k = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_K), GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    k_mask = offs_k < K
    acc = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        dy = tl.load(dy_ptr + offs_m[:, None] * stride_dym + offs_n[None, :] * stride_dyn,
                     mask=m_mask[:, None] & n_mask[None, :], other=0.0)
        w_idx = offs_n[:, None] * K + offs_k[None, :]  # [BLOCK_N, BLOCK_K]: W tile in storage order
        w = dequant_values(w_idx, n_mask[:, None] & k_mask[None, :], packed_ptr, scales_ptr, scales2_ptr,
                           offset_ptr, code_ptr, code2_ptr, K, FORMAT, DOUBLE_QUANT, QBLOCK, QBLOCK2)
        if IEEE:
            acc = tl.dot(dy, w.to(dy.dtype), acc, input_precision="ieee")
        else:
            acc = tl.dot(dy, w.to(dy.dtype), acc)

    if HAS_LORA:
        offs_r = tl.arange(0, BLOCK_R)
        r_mask = offs_r < R
        dyb = tl.load(dyb_ptr + offs_m[:, None] * stride_dybm + offs_r[None, :],
                      mask=m_mask[:, None] & r_mask[None, :], other=0.0).to(tl.float32)
        a = tl.load(lora_a_ptr + offs_r[:, None] * stride_ar + offs_k[None, :],
                    mask=r_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
        acc += scaling * tl.dot(dyb, a, input_precision="ieee")
    tl.store(dx_ptr + offs_m[:, None] * stride_dxm + offs_k[None, :], acc.to(dx_ptr.dtype.element_ty),
             mask=m_mask[:, None] & k_mask[None, :])


# ----------------------------------------------------------------------------- host side

def _mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b in a's dtype; fp32 on CPU, where half-precision matmuls are slow or unsupported."""
    if a.device.type == "cpu" and a.dtype != torch.float32:
        return (a.float() @ b.float()).to(a.dtype)
    return a @ b.to(a.dtype)


def _m_key(m: int) -> int:
    return min(triton.next_power_of_2(max(m, 1)), 4096)


def _weight_meta(qw: QuantizedWeight | torch.Tensor, x: torch.Tensor) -> tuple[int, int, dict]:
    """(N, K, kernel kwargs) for qw, after checking it against x."""
    if isinstance(qw, torch.Tensor):
        if qw.dim() != 2 or qw.dtype not in _FLOAT_DTYPES:
            raise KernelError(f"dense weight must be a 2-D float tensor, got {qw.dtype} {list(qw.shape)}")
        n, k = qw.shape
        meta = dict(FORMAT=0, DOUBLE_QUANT=False, QBLOCK=16, QBLOCK2=16)
        dev = qw.device
    elif isinstance(qw, QuantizedWeight):
        check_quantized(qw)
        n, k = qw.shape
        meta = dict(FORMAT=format_id(qw.format), DOUBLE_QUANT=qw.double_quant,
                    QBLOCK=qw.block_size if qw.format != "llm-int8" else 16,
                    QBLOCK2=qw.block_size2 if qw.double_quant else 16)
        dev = qw.packed.device
    else:
        raise KernelError(f"weight must be a QuantizedWeight or a dense Tensor, got {type(qw).__name__}")
    if dev != x.device:
        raise KernelError(f"weight is on {dev} but the input is on {x.device}")
    if n * k >= 2**31:
        raise KernelError(f"weight {n}x{k} is too large for the int32 indexing of the fused kernels")
    return n, k, meta


def _check_input(t: torch.Tensor, name: str, k: int) -> None:
    if not isinstance(t, torch.Tensor) or t.dim() != 2:
        raise KernelError(f"{name} must be a 2-D tensor [M, {k}], got {getattr(t, 'shape', type(t))}")
    if t.dtype not in _FLOAT_DTYPES:
        raise KernelError(f"{name} must be float32/float16/bfloat16, got {t.dtype}")
    if t.shape[1] != k:
        raise KernelError(f"{name} has {t.shape[1]} features but the weight expects {k}")


def _check_lora(lora_A, lora_B, n: int, k: int) -> int:
    """Rank r (0 when LoRA is absent) after checking A [r, K] and B [N, r]."""
    if lora_A is None or lora_B is None:
        if (lora_A is None) != (lora_B is None):
            raise KernelError("lora_A and lora_B must both be given or both be None")
        return 0
    r = lora_A.shape[0]
    if lora_A.dim() != 2 or lora_B.dim() != 2 or lora_A.shape[1] != k or tuple(lora_B.shape) != (n, r):
        raise KernelError(f"LoRA shapes A {list(lora_A.shape)}, B {list(lora_B.shape)} do not fit a "
                          f"[{n}, {k}] weight (want A [r, {k}], B [{n}, r])")
    return r


def _block_r(r: int) -> int:
    return max(16, triton.next_power_of_2(max(r, 1)))


def _llm_int8_split(x: torch.Tensor, qw: QuantizedWeight):
    """LLM.int8 activation side, as ``reference.llm_int8_matmul``: (int8 x, fp32 row scale [M], fp32 outlier
    product [M, N] or None). Columns with any ``|x| >= threshold`` are zeroed before per-token absmax
    quantization and multiplied in fp32 with the dequantized int8 weight columns instead: elementwise
    passes plus a rank-(#outliers) matmul, cheap next to the int8 GEMM, so they stay in torch."""
    xf = x.float()
    extra = None
    if qw.threshold > 0:
        outl = (xf.abs() >= qw.threshold).any(dim=0)
        if bool(outl.any()):
            cols = outl.nonzero().view(-1)
            w_cols = qw.packed[:, cols].float() * (qw.scales / 127.0).view(-1, 1)
            extra = (xf[:, cols] @ w_cols.t()).contiguous()
            xf = xf.masked_fill(outl.view(1, -1), 0.0)
    rmax = xf.abs().amax(dim=1, keepdim=True)
    rs = torch.where(rmax > 0, rmax, torch.ones_like(rmax))
    xq = torch.round(xf * (127.0 / rs)).to(torch.int8)
    return xq, (rs / 127.0).view(-1).contiguous(), extra


def _fp32_in_interpreter(*ts):
    """The interpreter's bf16 is broken (tl.dot returns garbage, casts truncate): run bf16 as fp32 there."""
    if interpreting() and any(t is not None and t.dtype == torch.bfloat16 for t in ts):
        return tuple(None if t is None else t.float() for t in ts), True
    return ts, False


def qlora_forward_triton(x2d: torch.Tensor, qw: QuantizedWeight | torch.Tensor, bias: torch.Tensor | None,
                         lora_A: torch.Tensor | None, lora_B: torch.Tensor | None, scaling: float,
                         x_lora2d: torch.Tensor | None = None) -> torch.Tensor:
    """y [M, N] = x2d·deq(qw)ᵀ + bias + scaling·(x_lora2d or x2d)·Aᵀ·Bᵀ with W dequantized in-tile."""
    n, k, meta = _weight_meta(qw, x2d)
    _check_input(x2d, "x", k)
    r = _check_lora(lora_A, lora_B, n, k)
    m = x2d.shape[0]
    if bias is not None and (bias.numel() != n or bias.dim() != 1):
        raise KernelError(f"bias must be [{n}], got {list(bias.shape)}")
    if x_lora2d is not None:
        _check_input(x_lora2d, "x_lora", k)
        if x_lora2d.shape[0] != m:
            raise KernelError(f"x_lora has {x_lora2d.shape[0]} rows but x has {m}")
    out_dtype = x2d.dtype
    dense = qw if isinstance(qw, torch.Tensor) else None
    (x2d, x_lora2d, bias, lora_A, lora_B, dense), upcast = _fp32_in_interpreter(
        x2d, x_lora2d, bias, lora_A, lora_B, dense)
    y = torch.empty(m, n, dtype=x2d.dtype, device=x2d.device)
    if m == 0:
        return y.to(out_dtype)
    if dense is not None:
        qw = dense.contiguous()
    xa = _mm(x_lora2d if x_lora2d is not None else x2d, lora_A.t()).contiguous() if r else None
    x_in, xs, extra = x2d, y, None
    if meta["FORMAT"] == 4:
        x_in, xs, extra = _llm_int8_split(x2d, qw)
    packed, scales, scales2, offset, code, code2 = kernel_tensors(qw)
    dummy = y
    bias_c = bias.contiguous() if bias is not None else dummy
    lora_b = lora_B.contiguous() if r else dummy
    grid = lambda META: (triton.cdiv(m, META["BLOCK_M"]) * triton.cdiv(n, META["BLOCK_N"]),)  # noqa: E731
    _qlora_forward_kernel[grid](
        x_in, packed, scales, scales2, offset, code, code2, bias_c, xa if r else dummy, lora_b, xs,
        extra if extra is not None else dummy, y,
        m, n, k, r, _m_key(m), float(scaling),
        x_in.stride(0), x_in.stride(1), xa.stride(0) if r else 0, lora_b.stride(0) if r else 0, y.stride(0),
        HAS_BIAS=bias is not None, HAS_LORA=r > 0, HAS_EXTRA=extra is not None, BLOCK_R=_block_r(r),
        IEEE=x2d.dtype == torch.float32, **meta)
    return y.to(out_dtype) if upcast else y


def qlora_backward_triton(dy2d: torch.Tensor, x2d: torch.Tensor, qw: QuantizedWeight | torch.Tensor,
                          lora_A: torch.Tensor | None, lora_B: torch.Tensor | None, scaling: float,
                          x_lora2d: torch.Tensor | None = None, needs: Sequence[bool] | None = None):
    """(dx, dx_lora, dA, dB) of :func:`qlora_forward_triton`; ``needs`` masks them in that order.

    dx_lora is None when x_lora2d is None (its LoRA term is then folded into dx); entries not needed
    (or without LoRA) are None.
    """
    n, k, meta = _weight_meta(qw, dy2d if dy2d is not None else x2d)
    _check_input(x2d, "x", k)
    r = _check_lora(lora_A, lora_B, n, k)
    m = x2d.shape[0]
    if not isinstance(dy2d, torch.Tensor) or dy2d.dim() != 2 or tuple(dy2d.shape) != (m, n):
        raise KernelError(f"grad_output must be [{m}, {n}], got {list(getattr(dy2d, 'shape', []))}")
    need_dx, need_dxl, need_da, need_db = (tuple(needs) + (True,) * 4)[:4] if needs is not None else (True,) * 4
    if x_lora2d is not None:
        _check_input(x_lora2d, "x_lora", k)
    dtypes = [t.dtype if t is not None else None for t in (x2d, x_lora2d, lora_A, lora_B)]
    dense = qw if isinstance(qw, torch.Tensor) else None
    (dy2d, x2d, x_lora2d, lora_A, lora_B, dense), _ = _fp32_in_interpreter(dy2d, x2d, x_lora2d, lora_A, lora_B, dense)
    if dense is not None:
        qw = dense.contiguous()
    xl = x_lora2d if x_lora2d is not None else x2d
    fold_lora = r > 0 and x_lora2d is None
    dyb = _mm(dy2d, lora_B).contiguous() if r and (need_da or need_dxl or (need_dx and fold_lora)) else None

    dx = None
    if need_dx:
        dx = torch.empty(m, k, dtype=x2d.dtype, device=x2d.device)
        if m:
            packed, scales, scales2, offset, code, code2 = kernel_tensors(qw)
            lora_a = lora_A.contiguous() if fold_lora else dx
            grid = lambda META: (triton.cdiv(m, META["BLOCK_M"]) * triton.cdiv(k, META["BLOCK_K"]),)  # noqa: E731
            _qlora_dx_kernel[grid](
                dy2d, packed, scales, scales2, offset, code, code2, dyb if fold_lora else dx, lora_a, dx,
                m, n, k, r, _m_key(m), float(scaling),
                dy2d.stride(0), dy2d.stride(1), dyb.stride(0) if fold_lora else 0,
                lora_a.stride(0) if fold_lora else 0, dx.stride(0),
                HAS_LORA=fold_lora, BLOCK_R=_block_r(r), IEEE=dy2d.dtype == torch.float32, **meta)
    dx = dx.to(dtypes[0]) if dx is not None else None
    if not r:
        return dx, None, None, None
    dx_lora = (_mm(dyb, lora_A) * scaling).to(dtypes[1]) if need_dxl and x_lora2d is not None else None
    d_a = (_mm(dyb.t(), xl) * scaling).to(dtypes[2]) if need_da else None
    d_b = (_mm(dy2d.t(), _mm(xl, lora_A.t())) * scaling).to(dtypes[3]) if need_db else None
    return dx, dx_lora, d_a, d_b
