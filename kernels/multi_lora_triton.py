"""Triton gathered batched LoRA: shrink ``xa = x·A[id]ᵀ`` then expand ``delta = s[id]·xa·B[id]ᵀ``.

Math and layout as :mod:`peftfx.kernels.multi_lora` (``x [B, T, K]``, ``ids [B]``, ``A [n, R, K]``,
``Bw [n, N, R]``, ``s [n]``). Punica's BGMV gathers one adapter per *token*; here every token of a
batch row shares the row's adapter, so each program owns a ``BLOCK_M``-token tile of one row
(a segment, as in SGMV) and both steps are ``tl.dot`` tiles against that row's adapter:

- ``_multi_lora_shrink_kernel``: grid ``(B, cdiv(T, BLOCK_M))``; loops over K, accumulating
  ``x_tile [BLOCK_M, BLOCK_K] · A[id]ᵀ [BLOCK_K, BLOCK_R]`` in fp32; writes ``xa [B*T, R]`` fp32.
- ``_multi_lora_expand_kernel``: grid ``(B, cdiv(T, BLOCK_M), cdiv(N, BLOCK_N))``; one
  ``xa_tile [BLOCK_M, BLOCK_R] · B[id]ᵀ [BLOCK_R, BLOCK_N]`` dot (R is small), times ``s[id]``.

``id = -1`` rows read slot 0 and get scale 0 (the expand still writes zeros, so the output needs no
memset). R is padded to a power of two >= 16 for ``tl.dot``; every tail (T, K, N, R) is masked.
fp32 inputs use IEEE dots (TF32 would cost ~1e-3 relative error against the reference).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from peftfx.errors import KernelError
from peftfx.kernels.quant_triton import interpreting

__all__ = ["multi_lora_triton"]


@triton.jit
def _multi_lora_shrink_kernel(
    # pointers
    x_ptr, ids_ptr, a_ptr, xa_ptr,
    # dims
    T, K, R,
    # strides
    stride_xb, stride_xt, stride_xk, stride_an, stride_ar, stride_ak, stride_xam, stride_xar,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
):
    row = tl.program_id(0)
    pid_t = tl.program_id(1)
    slot = tl.maximum(tl.load(ids_ptr + row), 0)
    offs_t = pid_t * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + row * stride_xb + offs_t[:, None] * stride_xt + offs_k[None, :] * stride_xk,
                    mask=(offs_t[:, None] < T) & (offs_k[None, :] < K), other=0.0)
        a_t = tl.load(a_ptr + slot * stride_an + offs_r[None, :] * stride_ar + offs_k[:, None] * stride_ak,
                      mask=(offs_r[None, :] < R) & (offs_k[:, None] < K), other=0.0)
        acc += tl.dot(x, a_t.to(x.dtype), input_precision=PRECISION)
    m = row * T + offs_t
    tl.store(xa_ptr + m[:, None] * stride_xam + offs_r[None, :] * stride_xar, acc,
             mask=(offs_t[:, None] < T) & (offs_r[None, :] < R))


@triton.jit
def _multi_lora_expand_kernel(
    # pointers
    xa_ptr, ids_ptr, b_ptr, s_ptr, y_ptr,
    # dims
    T, N, R,
    # strides
    stride_xam, stride_xar, stride_bn, stride_bo, stride_br, stride_yb, stride_yt, stride_yn,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    row = tl.program_id(0)
    pid_t = tl.program_id(1)
    pid_n = tl.program_id(2)
    adapter = tl.load(ids_ptr + row)
    slot = tl.maximum(adapter, 0)
    scale = tl.where(adapter >= 0, tl.load(s_ptr + slot).to(tl.float32), 0.0)
    offs_t = pid_t * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    m = row * T + offs_t
    xa = tl.load(xa_ptr + m[:, None] * stride_xam + offs_r[None, :] * stride_xar,
                 mask=(offs_t[:, None] < T) & (offs_r[None, :] < R), other=0.0)
    b_t = tl.load(b_ptr + slot * stride_bn + offs_n[None, :] * stride_bo + offs_r[:, None] * stride_br,
                  mask=(offs_n[None, :] < N) & (offs_r[:, None] < R), other=0.0).to(tl.float32)
    y = tl.dot(xa, b_t, input_precision="ieee") * scale
    tl.store(y_ptr + row * stride_yb + offs_t[:, None] * stride_yt + offs_n[None, :] * stride_yn,
             y.to(y_ptr.dtype.element_ty), mask=(offs_t[:, None] < T) & (offs_n[None, :] < N))


def _pow2_at_least(n: int, floor: int = 16) -> int:
    return max(floor, triton.next_power_of_2(n))


def multi_lora_triton(x: torch.Tensor, ids: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                      scalings: torch.Tensor) -> torch.Tensor:
    """``delta [B, T, N]`` (x's dtype) for ``x [B, T, K]``; shapes as checked by ``multi_lora._check``."""
    bsz, t, k = x.shape
    n_out, r = lora_B.shape[1], lora_A.shape[1]
    if lora_A.shape[0] == 0:
        raise KernelError("multi_lora_triton: the adapter stacks are empty (n = 0 slots)")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise KernelError(f"multi_lora_triton: x must be fp32/fp16/bf16, got {x.dtype}")
    if interpreting() and x.dtype == torch.bfloat16:
        # the interpreter's bf16 dots are unreliable (see qlora_triton): run the tile math in fp32 there
        return multi_lora_triton(x.float(), ids, lora_A.float(), lora_B.float(), scalings).to(x.dtype)
    # the adapter stack is tiny next to x: match x's dtype so the shrink dot runs on tensor cores
    a = lora_A.to(x.dtype)
    xa = torch.empty(bsz * t, r, device=x.device, dtype=torch.float32)
    y = torch.empty(bsz, t, n_out, device=x.device, dtype=x.dtype)
    block_r = _pow2_at_least(r)
    block_m = 16 if interpreting() or t <= 16 else 64
    block_k = 32 if interpreting() else 64
    block_n = 32 if interpreting() else 64
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    _multi_lora_shrink_kernel[(bsz, triton.cdiv(t, block_m))](
        x, ids, a, xa,
        t, k, r,
        x.stride(0), x.stride(1), x.stride(2), a.stride(0), a.stride(1), a.stride(2), xa.stride(0), xa.stride(1),
        BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_R=block_r, PRECISION=precision,
    )
    _multi_lora_expand_kernel[(bsz, triton.cdiv(t, block_m), triton.cdiv(n_out, block_n))](
        xa, ids, lora_B, scalings, y,
        t, n_out, r,
        xa.stride(0), xa.stride(1), lora_B.stride(0), lora_B.stride(1), lora_B.stride(2),
        y.stride(0), y.stride(1), y.stride(2),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r,
    )
    return y
