"""The 8-bit AdamW update as one Triton kernel per tensor (CUDA; the interpreter runs it on the CPU in tests).

Each program takes ``ROWS`` quantization blocks of 256 elements, so a tile is ``[ROWS, 256]``: it loads the
gradient, the parameter and both moments' codes and absmax, dequantizes through the 512-entry map table,
updates, writes the parameter, takes the new block absmax with one row reduction, and requantizes through
the two moments' code tables (:func:`peftfx.kernels.blockwise8bit.code_table`: one table load per element
and moment instead of an 8-level binary search). The math is :mod:`peftfx.kernels.blockwise8bit`'s, op for op and
rounding for rounding (torch's ``add_(alpha)`` and ``addcmul_`` are fused multiply-adds on the CPU, so the
kernel uses ``tl.fma`` there and is launched with ``enable_fp_fusion=False`` elsewhere; ``div_rn``,
``sqrt_rn``), so it matches the CPU path up to the CPU's scalar tail loop.

Launch footprint (bf16 parameters, checked ahead of time in tests/optim/test_triton_step.py): 4 warps, 96
registers on sm_80 and 120 on sm_90, no spills (no local memory), shared memory only for the row reductions
(64 B dynamic; 1 KiB static on sm_90).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from peftfx.errors import KernelError
from peftfx.kernels.blockwise8bit import BLOCK, MIN_ABSMAX, AdamWHyper, n_state_blocks, tables

__all__ = ["adamw8bit_step_triton", "adamw8bit_kernel", "ROWS"]

ROWS = 4  # quantization blocks per program: a [4, 256] tile, 8 elements per thread with 4 warps


@triton.jit
def adamw8bit_kernel(p_ptr, g_ptr, codes_ptr, absmax_ptr, maps_ptr, tables_ptr, n, nb,
                     beta1, beta2, one_minus_beta1, one_minus_beta2, decay, neg_step_size, eps_hat, min_absmax,
                     ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """codes ``[2, n]`` uint8 and absmax ``[2, nb]`` fp32 (row 0 first moment, row 1 second), in place."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # int64: codes_ptr + n + offs passes 2**31
    offs = rows[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
    mask = offs < n
    rmask = rows < nb
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    c1 = tl.load(codes_ptr + offs, mask=mask, other=0).to(tl.int32)
    c2 = tl.load(codes_ptr + n + offs, mask=mask, other=0).to(tl.int32)
    s1 = tl.load(absmax_ptr + rows, mask=rmask, other=0.0) * beta1
    s2 = tl.load(absmax_ptr + nb + rows, mask=rmask, other=0.0) * beta2
    # m = map1[c1] * (absmax1 beta1) + (1 - beta1) g ;  v = map2[c2] * (absmax2 beta2) + ((1 - beta2) g) g
    m = tl.fma(g, one_minus_beta1, tl.load(maps_ptr + c1) * s1[:, None])
    v = tl.fma(g * one_minus_beta2, g, tl.load(maps_ptr + 256 + c2) * s2[:, None])
    m = tl.where(mask, m, 0.0)
    v = tl.where(mask, v, 0.0)
    # p = p (1 - lr wd) + (-step_size m) / (sqrt(v) + eps_hat)
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32) * decay
    p = p + tl.math.div_rn(neg_step_size * m, tl.sqrt_rn(v) + eps_hat)
    tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=mask)
    # requantize: absmax' = max(max |s|, 2**-126); code = (T[(k >> 16) + 32768] + k) >> 16, k the sortable key
    a1 = tl.maximum(tl.maximum(tl.max(m, axis=1), -tl.min(m, axis=1)), min_absmax)
    a2 = tl.maximum(tl.max(v, axis=1), min_absmax)
    x1 = m * tl.math.div_rn(tl.full([ROWS], 1.0, tl.float32), a1)[:, None]
    x2 = v * tl.math.div_rn(tl.full([ROWS], 1.0, tl.float32), a2)[:, None]
    k1 = x1.to(tl.int32, bitcast=True)
    k1 = k1 ^ ((k1 >> 31) & 0x7FFFFFFF)
    k2 = x2.to(tl.int32, bitcast=True)  # v >= +0: its bits already sort
    q1 = (tl.load(tables_ptr + (k1 >> 16) + 32768) + k1) >> 16
    q2 = (tl.load(tables_ptr + 65536 + (k2 >> 16) + 32768) + k2) >> 16
    tl.store(codes_ptr + offs, q1.to(tl.uint8), mask=mask)
    tl.store(codes_ptr + n + offs, q2.to(tl.uint8), mask=mask)
    tl.store(absmax_ptr + rows, a1, mask=rmask)
    tl.store(absmax_ptr + nb + rows, a2, mask=rmask)


def adamw8bit_step_triton(p: torch.Tensor, g: torch.Tensor, codes: torch.Tensor, absmax: torch.Tensor,
                          h: AdamWHyper) -> None:
    """One fused 8-bit AdamW step on one tensor, in place (same contract as ``blockwise8bit.adamw8bit_step_``).

    Args:
        p: contiguous fp32/bf16/fp16 parameter, ``n`` elements. g: its gradient, same shape, contiguous.
        codes: uint8 ``[2, n]``. absmax: fp32 ``[2, ceil(n / 256)]``; all on ``p``'s device.
    """
    pd = p.detach()
    n = pd.numel()
    nb = n_state_blocks(n)
    if not (pd.is_contiguous() and g.is_contiguous() and codes.is_contiguous() and absmax.is_contiguous()):
        raise KernelError("adamw8bit_step_triton: parameter, gradient and state must be contiguous")
    if codes.shape != (2, n) or absmax.shape != (2, nb) or codes.dtype != torch.uint8 or absmax.dtype != torch.float32:
        raise KernelError(f"adamw8bit_step_triton: state shapes {tuple(codes.shape)} / {tuple(absmax.shape)} "
                          f"do not fit a parameter of {n} elements (expected (2, {n}) uint8 and (2, {nb}) fp32)")
    if n == 0:
        return
    maps, code_tables = tables(p.device)
    grid = (triton.cdiv(nb, ROWS),)
    adamw8bit_kernel[grid](pd, g, codes, absmax, maps, code_tables, n, nb, h.beta1, h.beta2, 1 - h.beta1,
                           1 - h.beta2, 1 - h.lr * h.weight_decay, -h.step_size(), h.eps_hat(), MIN_ABSMAX,
                           ROWS=ROWS, BLOCK=BLOCK, enable_fp_fusion=False)
