"""Decode-shaped fused dequant-matmul + LoRA (M <= 16): the packed weight streamed once, split over K.

For generation and small-batch decode (M = 1..16) the forward is a GEMV bound by the bytes of W. A
tile kernel with BLOCK_M >= 16 launches only ``N / BLOCK_N`` programs (64 for N = 4096), too few to
keep an H100/H200's 132 SMs streaming. ``_qlora_gemv_kernel`` instead gives each program one
``BLOCK_N``-row slice of W over one ``K / SPLIT_K`` range (grid ``(cdiv(N, BLOCK_N), SPLIT_K)``):

- every W byte is read by exactly one program (x, 16 rows at most, is re-read from L2);
- the W tile is decoded in registers (:func:`decode_triton.load_weight_tile`) and multiplied on tensor
  cores with M padded to 16 rows (``tl.dot``: M = 16 is its smallest shape; the extra rows are free
  next to the memory traffic);
- the split K = 0 program adds the epilogue (bias, LoRA ``s·xa·Bᵀ``, LLM.int8 outliers);
- with ``SPLIT_K > 1`` the partial sums are ``atomic_add``-ed into a zeroed fp32 output (the launcher
  casts it to x's dtype); with ``SPLIT_K == 1`` the program stores directly (deterministic).

``SPLIT_K`` is chosen by the host (:func:`triton_configs.split_k`): about two waves of programs. The
LLM.int8 format runs its int8 x int8 product here too (x quantized per token by the launcher).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from peftfx.kernels.decode_triton import decode_heuristics, dequant_matmul_tile, int8_matmul_tile, lora_epilogue
from peftfx.kernels.quant_triton import interpreting
from peftfx.kernels.triton_configs import FP_FUSION, GEMV_MAX_M, configs_for, device_limits, early_prune, split_k

__all__ = ["use_gemv", "launch_gemv", "gemv_split"]

_KEY = ["M_KEY", "N", "K", "FORMAT", "DOUBLE_QUANT", "QBLOCK", "BLOCK_R", "PRECISION", "SPLIT_K"]
_INTERPRET_SMS = 4  # the interpreter has no SMs: small enough that the tests' shapes split K


def use_gemv(m: int) -> bool:
    """Whether a forward with ``m`` rows runs the GEMV kernel."""
    return 0 < m <= GEMV_MAX_M


def gemv_split(n: int, k: int) -> tuple[int, int]:
    """(SPLIT_K, K per split) the launcher uses for an ``[n, k]`` weight on this device."""
    grain = max(c.kwargs["BLOCK_K"] for c in configs_for("gemv"))
    sms = _INTERPRET_SMS if interpreting() else device_limits()[1]
    return split_k(n, k, 64 if not interpreting() else 32, grain, sms)


@triton.autotune(configs=configs_for("gemv"), key=_KEY, reset_to_zero=["y_ptr"],
                 prune_configs_by={"early_config_prune": early_prune("gemv", "x_ptr")})
@triton.heuristics(decode_heuristics())
@triton.jit
def _qlora_gemv_kernel(
    # pointers
    x_ptr, packed_ptr, scales_ptr, scales2_ptr, offset_ptr, code2_ptr,
    bias_ptr, xa_ptr, lora_b_ptr, xs_ptr, extra_ptr, y_ptr,
    # dims
    M, N, K, R, M_KEY, K_SPLIT, scaling,
    # strides
    stride_xm, stride_xk, stride_xam, stride_bn, stride_ym,
    # constexprs
    FORMAT: tl.constexpr, DOUBLE_QUANT: tl.constexpr, CODEBOOK: tl.constexpr, QBLOCK: tl.constexpr,
    QBLOCK2: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, HAS_EXTRA: tl.constexpr,
    BLOCK_R: tl.constexpr, PRECISION: tl.constexpr, SUB: tl.constexpr, ASM_DECODE: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """y[:M, n-slice] (+)= x[:, k-range]·deq(W)[n-slice, k-range]ᵀ (+ epilogue on split 0)."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    k_lo = pid_s * K_SPLIT
    k_hi = tl.minimum(K, k_lo + K_SPLIT)
    if FORMAT == 4:
        acc = int8_matmul_tile(x_ptr, stride_xm, stride_xk, xs_ptr, offs_m, M, offs_n, N, K, k_lo, k_hi,
                               packed_ptr, scales_ptr, BLOCK_M, BLOCK_N, BLOCK_K)
    else:
        acc = dequant_matmul_tile(tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), x_ptr, stride_xm, stride_xk,
                                  offs_m, M, offs_n, N, K, k_lo, k_hi, packed_ptr, scales_ptr, scales2_ptr,
                                  offset_ptr, code2_ptr, FORMAT, DOUBLE_QUANT, CODEBOOK, QBLOCK, QBLOCK2, SUB,
                                  PRECISION, BLOCK_N, BLOCK_K, ASM_DECODE)
    # only split 0 adds bias / LoRA / outliers: the other splits see an all-false row mask there
    epi_rows = tl.where(pid_s == 0, M, 0)
    acc = lora_epilogue(acc, offs_m, offs_m < epi_rows, offs_n, n_mask, N, R, scaling, bias_ptr, xa_ptr,
                        stride_xam, lora_b_ptr, stride_bn, extra_ptr, HAS_BIAS, HAS_LORA, HAS_EXTRA, BLOCK_R,
                        PRECISION)
    out = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    if SPLIT_K > 1:
        tl.atomic_add(out, acc, mask=m_mask[:, None] & n_mask[None, :])
    else:
        tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def launch_gemv(x_in: torch.Tensor, weight_ptrs: tuple, bias, xa, lora_b, xs, extra, out_dtype: torch.dtype,
                n: int, k: int, r: int, scaling: float, m_key: int, block_r: int, precision: str,
                meta: dict) -> torch.Tensor:
    """y ``[M, n]`` in ``out_dtype``; arguments as prepared by ``qlora_triton.qlora_forward_triton``
    (``None`` for absent bias / LoRA / outliers; ``xs`` the LLM.int8 row scales or None)."""
    m = x_in.shape[0]
    splits, k_split = gemv_split(n, k)
    dev = x_in.device
    y = (torch.zeros if splits > 1 else torch.empty)(m, n, dtype=torch.float32 if splits > 1 else out_dtype,
                                                     device=dev)
    dummy = y
    packed, scales, scales2, offset, code2 = weight_ptrs
    grid = lambda META: (triton.cdiv(n, META["BLOCK_N"]), splits)  # noqa: E731
    _qlora_gemv_kernel[grid](
        x_in, packed, scales, scales2, offset, code2, bias if bias is not None else dummy,
        xa if r else dummy, lora_b if r else dummy, xs if xs is not None else dummy,
        extra if extra is not None else dummy, y,
        m, n, k, r, m_key, k_split, float(scaling),
        x_in.stride(0), x_in.stride(1), xa.stride(0) if r else 0, lora_b.stride(0) if r else 0, y.stride(0),
        HAS_BIAS=bias is not None, HAS_LORA=r > 0, HAS_EXTRA=extra is not None, BLOCK_R=block_r,
        PRECISION=precision, SPLIT_K=splits, enable_fp_fusion=FP_FUSION, **meta)
    return y.to(out_dtype)
