"""Fused dequantize-matmul + LoRA: forward, backward dX, and dA / dB.

Math (``s`` = scaling, ``xl`` = ``x_lora`` if given else ``x``; W is ``[N, K]`` = ``[out, in]``)::

    forward   y  = x·deq(W)ᵀ + b + s·(xl·Aᵀ)·Bᵀ               x [M, K], A [r, K], B [N, r], y [M, N]
    backward  dx = dy·deq(W)  (+ s·(dy·B)·A when x_lora is None)
              dx_lora = s·(dy·B)·A ;  dA = s·(dy·B)ᵀ·xl ;  dB = s·dyᵀ·(xl·Aᵀ)

Kernels (chosen by M at launch):

- M <= 16: ``gemv_triton._qlora_gemv_kernel`` (W streamed once, split over K, epilogue fused).
- ``_qlora_forward_kernel`` tiles y over (M, N). Its K loop (``decode_triton.dequant_matmul_tile``)
  loads the packed W tile ``[BLOCK_N, BLOCK_K/2]`` as wide row vectors, decodes it in registers
  (shift/mask, then ``prmt`` table lookups in inline PTX on GPUs or a select tree under the
  interpreter, one scale load per quantization block), casts
  it to x's dtype and feeds ``tl.dot`` with an fp32 accumulator (fp32 x: tf32x3). deq(W) is never
  written to global memory. The epilogue (``decode_triton.lora_epilogue``) adds the bias and the
  rank-r term ``s·xa·Bᵀ`` (xa = xl·Aᵀ ``[M, r]``, one skinny torch matmul before launch; r is padded
  to a power of two >= 16 for ``tl.dot``).
- ``_qlora_dx_kernel`` tiles dx over (M, K) and loops over N, decoding W tiles ``[BLOCK_N, BLOCK_K]``
  in storage order and, when x_lora is None, adds ``s·(dy·B)·A`` in the epilogue.

Autotuning: at most 3 configs per key survive ``triton_configs``' resource-model pruning (the
fallback config always among them), so every launch on sm80+ has a config that fits and the first
step compiles <= 3 configs per kernel and key. FP fusion is set explicitly (``FP_FUSION``).
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

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from peftfx.errors import KernelError
from peftfx.kernels.formats import QuantizedWeight
from peftfx.kernels.decode_triton import (codebook_id, decode_heuristics, dequant_matmul_tile, int8_matmul_tile,
                                          load_weight_tile, lora_epilogue)
from peftfx.kernels.gemv_triton import launch_gemv, use_gemv
from peftfx.kernels.quant_triton import check_quantized, format_id, interpreting, kernel_tensors
from peftfx.kernels.triton_configs import FP_FUSION, configs_for, early_prune

__all__ = ["qlora_forward_triton", "qlora_backward_triton"]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# M varies with every batch/sequence length in training: tune per power-of-two bucket, not per M.
_KEY = ["M_KEY", "N", "K", "FORMAT", "DOUBLE_QUANT", "QBLOCK", "BLOCK_R", "PRECISION"]


@triton.jit
def _grouped_tile(pid, num_m, num_other, GROUP_M: tl.constexpr):
    """(row tile, column tile) of program ``pid`` in grouped launch order (Triton tutorial 03):
    GROUP_M row tiles sweep each column tile together, so programs sharing W tiles run close in time
    and hit L2."""
    first_m = (pid // (GROUP_M * num_other)) * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    return first_m + (pid % (GROUP_M * num_other)) % size_m, (pid % (GROUP_M * num_other)) // size_m


@triton.autotune(configs=configs_for("forward"), key=_KEY,
                 prune_configs_by={"early_config_prune": early_prune("forward", "x_ptr")})
@triton.heuristics(decode_heuristics())
@triton.jit
def _qlora_forward_kernel(
    # pointers
    x_ptr, packed_ptr, scales_ptr, scales2_ptr, offset_ptr, code2_ptr,
    bias_ptr, xa_ptr, lora_b_ptr, xs_ptr, extra_ptr, y_ptr,
    # dims
    M, N, K, R, M_KEY, scaling,
    # strides
    stride_xm, stride_xk, stride_xam, stride_bn, stride_ym,
    # constexprs
    FORMAT: tl.constexpr, DOUBLE_QUANT: tl.constexpr, CODEBOOK: tl.constexpr, QBLOCK: tl.constexpr,
    QBLOCK2: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, HAS_EXTRA: tl.constexpr,
    BLOCK_R: tl.constexpr, PRECISION: tl.constexpr, SUB: tl.constexpr, ASM_DECODE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """y[BLOCK_M, BLOCK_N] = x·deq(W)ᵀ + b + s·xa·Bᵀ, W tiles dequantized in registers."""
    pid_m, pid_n = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    if FORMAT == 4:
        acc = int8_matmul_tile(x_ptr, stride_xm, stride_xk, xs_ptr, offs_m, M, offs_n, N, K, 0, K,
                               packed_ptr, scales_ptr, BLOCK_M, BLOCK_N, BLOCK_K)
    else:
        acc = dequant_matmul_tile(tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), x_ptr, stride_xm, stride_xk,
                                  offs_m, M, offs_n, N, K, 0, K, packed_ptr, scales_ptr, scales2_ptr, offset_ptr,
                                  code2_ptr, FORMAT, DOUBLE_QUANT, CODEBOOK, QBLOCK, QBLOCK2, SUB, PRECISION,
                                  BLOCK_N, BLOCK_K, ASM_DECODE)
    acc = lora_epilogue(acc, offs_m, m_mask, offs_n, n_mask, N, R, scaling, bias_ptr, xa_ptr, stride_xam,
                        lora_b_ptr, stride_bn, extra_ptr, HAS_BIAS, HAS_LORA, HAS_EXTRA, BLOCK_R,
                        PRECISION)
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


@triton.autotune(configs=configs_for("dx"), key=_KEY,
                 prune_configs_by={"early_config_prune": early_prune("dx", "dy_ptr")})
@triton.heuristics(decode_heuristics())
@triton.jit
def _qlora_dx_kernel(
    # pointers
    dy_ptr, packed_ptr, scales_ptr, scales2_ptr, offset_ptr, code2_ptr,
    dyb_ptr, lora_a_ptr, dx_ptr,
    # dims
    M, N, K, R, M_KEY, scaling,
    # strides
    stride_dym, stride_dyn, stride_dybm, stride_ar, stride_dxm,
    # constexprs
    FORMAT: tl.constexpr, DOUBLE_QUANT: tl.constexpr, CODEBOOK: tl.constexpr, QBLOCK: tl.constexpr,
    QBLOCK2: tl.constexpr, HAS_LORA: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
    SUB: tl.constexpr, ASM_DECODE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """dx[BLOCK_M, BLOCK_K] = dy·deq(W) (+ s·(dy·B)·A); the reduction runs over N in BLOCK_N steps,
    each W tile ``[BLOCK_N, BLOCK_K]`` decoded in storage order."""
    pid_m, pid_k = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_K), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    k_mask = offs_k < K
    acc = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        dy = tl.load(dy_ptr + offs_m[:, None] * stride_dym + offs_n[None, :] * stride_dyn,
                     mask=m_mask[:, None] & (offs_n[None, :] < N), other=0.0)
        w = load_weight_tile(offs_n, pid_k * BLOCK_K, N, K, packed_ptr, scales_ptr, scales2_ptr, offset_ptr,
                             code2_ptr, FORMAT, DOUBLE_QUANT, CODEBOOK, QBLOCK, QBLOCK2, SUB, BLOCK_N, BLOCK_K,
                             ASM_DECODE, dy_ptr.dtype.element_ty)
        acc = tl.dot(dy, w.to(dy.dtype), acc, input_precision=PRECISION)
    if HAS_LORA:
        offs_r = tl.arange(0, BLOCK_R)
        r_mask = offs_r < R
        # operands in their dtype: half products are exact in fp32 (see decode_triton.lora_epilogue)
        dyb = tl.load(dyb_ptr + offs_m[:, None] * stride_dybm + offs_r[None, :],
                      mask=m_mask[:, None] & r_mask[None, :], other=0.0)
        a = tl.load(lora_a_ptr + offs_r[:, None] * stride_ar + offs_k[None, :],
                    mask=r_mask[:, None] & k_mask[None, :], other=0.0)
        acc += scaling * tl.dot(dyb, a.to(dyb.dtype), input_precision=PRECISION)
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
        meta = dict(FORMAT=0, DOUBLE_QUANT=False, CODEBOOK=0, QBLOCK=16, QBLOCK2=16)
        dev = qw.device
    elif isinstance(qw, QuantizedWeight):
        check_quantized(qw)
        n, k = qw.shape
        meta = dict(FORMAT=format_id(qw.format), DOUBLE_QUANT=qw.double_quant, CODEBOOK=codebook_id(qw.format),
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


def _precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: fp32 operands run as tf32x3 (three tf32 tensor-core products, about fp32
    accuracy, never an FMA loop); fp16/bf16 ignore it."""
    return "tf32x3" if dtype == torch.float32 else "tf32"


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
    if m == 0:
        return torch.empty(m, n, dtype=out_dtype, device=x2d.device)
    if dense is not None:
        qw = dense.contiguous()
    xa = _mm(x_lora2d if x_lora2d is not None else x2d, lora_A.t()).contiguous() if r else None
    x_in, xs, extra = x2d, None, None
    if meta["FORMAT"] == 4:
        x_in, xs, extra = _llm_int8_split(x2d, qw)
    bias_c = bias.contiguous() if bias is not None else None
    lora_b = lora_B.contiguous() if r else None
    if use_gemv(m):
        y = launch_gemv(x_in, kernel_tensors(qw), bias_c, xa, lora_b, xs, extra, x2d.dtype, n, k, r, scaling,
                        _m_key(m), _block_r(r), _precision(x2d.dtype), meta)
        return y.to(out_dtype) if upcast else y
    y = torch.empty(m, n, dtype=x2d.dtype, device=x2d.device)
    packed, scales, scales2, offset, code2 = kernel_tensors(qw)
    dummy = y
    grid = lambda META: (triton.cdiv(m, META["BLOCK_M"]) * triton.cdiv(n, META["BLOCK_N"]),)  # noqa: E731
    _qlora_forward_kernel[grid](
        x_in, packed, scales, scales2, offset, code2, bias_c if bias_c is not None else dummy,
        xa if r else dummy, lora_b if r else dummy, xs if xs is not None else dummy,
        extra if extra is not None else dummy, y,
        m, n, k, r, _m_key(m), float(scaling),
        x_in.stride(0), x_in.stride(1), xa.stride(0) if r else 0, lora_b.stride(0) if r else 0, y.stride(0),
        HAS_BIAS=bias is not None, HAS_LORA=r > 0, HAS_EXTRA=extra is not None, BLOCK_R=_block_r(r),
        PRECISION=_precision(x2d.dtype), enable_fp_fusion=FP_FUSION, **meta)
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
            packed, scales, scales2, offset, code2 = kernel_tensors(qw)
            lora_a = lora_A.contiguous() if fold_lora else dx
            grid = lambda META: (triton.cdiv(m, META["BLOCK_M"]) * triton.cdiv(k, META["BLOCK_K"]),)  # noqa: E731
            _qlora_dx_kernel[grid](
                dy2d, packed, scales, scales2, offset, code2, dyb if fold_lora else dx, lora_a, dx,
                m, n, k, r, _m_key(m), float(scaling),
                dy2d.stride(0), dy2d.stride(1), dyb.stride(0) if fold_lora else 0,
                lora_a.stride(0) if fold_lora else 0, dx.stride(0),
                HAS_LORA=fold_lora, BLOCK_R=_block_r(r), PRECISION=_precision(dy2d.dtype),
                enable_fp_fusion=FP_FUSION, **meta)
    dx = dx.to(dtypes[0]) if dx is not None else None
    if not r:
        return dx, None, None, None
    dx_lora = (_mm(dyb, lora_A) * scaling).to(dtypes[1]) if need_dxl and x_lora2d is not None else None
    d_a = (_mm(dyb.t(), xl) * scaling).to(dtypes[2]) if need_da else None
    d_b = (_mm(dy2d.t(), _mm(xl, lora_A.t())) * scaling).to(dtypes[3]) if need_db else None
    return dx, dx_lora, d_a, d_b
