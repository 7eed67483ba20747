"""Triton ``@jit`` helpers that decode quantized weight storage in registers (shared by every kernel).

Two ways to read deq(W):

- :func:`load_weight_tile` — the fast path of the matmul kernels: a ``[BLOCK_N, BLOCK_K]`` tile of W
  (rows ``offs_n``, columns ``k0 .. k0+BLOCK_K``). The packed bytes of the tile are one contiguous
  ``[BLOCK_N, BLOCK_K/2]`` load per row (wide vector loads), split with a shift and a mask into the
  high (even element) and low (odd element) nibbles; :func:`code_value` turns a 4-bit code into its
  NF4/FP4 value with a 4-level select tree over compile-time constants (no table in memory, works in
  the interpreter). Each block scale (and its double-quant code and second-level scale) is loaded once
  per quantization block as a ``[BLOCK_N, BLOCK_K/SUB]`` tile and broadcast over the ``SUB`` elements
  it covers. Per weight element the kernel therefore reads 0.5 byte (4-bit) or 1 byte (int8) plus
  ``4/block_size`` bytes of scale (``1/block_size + 4/(block_size*block_size2)`` with double quant).
- :func:`dequant_values` — elementwise at arbitrary flat indices (used by the dequantize kernel and by
  the matmul kernels when the tile is not scale-aligned, see below).

``SUB`` (a constexpr chosen by the launcher, :func:`scale_sub`) is ``min(block_size, BLOCK_K)`` when
``K % SUB == 0``: then every aligned ``SUB``-run of a tile row lies in one quantization block, also
when blocks cross rows. Otherwise ``SUB = 0`` and the tile is read through :func:`dequant_values`
(correct for any K, one scale load per element; no real model has such a K).

Two decodes of the 4-bit codes, chosen by the ``ASM_DECODE`` constexpr, which the launchers set from
:func:`use_asm_decode` (the one switch; :func:`decode_heuristics`):

- compiled for a GPU with fp16/bf16 activations: :func:`decode_asm_triton.decode_pairs`, table lookup
  by ``prmt`` byte permutes in inline PTX, block scale applied by paired ``fma`` (lookup and scale take
  about 3 SASS instructions per element where the select tree takes about 15; the whole inner loop is
  counted in bench/RESULTS.md; values rounded to the activation dtype, see that module);
- under ``TRITON_INTERPRET=1`` (no inline assembly) and for fp32 activations: the select tree
  :func:`code_value` in fp32.
"""
from __future__ import annotations

import os

import triton
import triton.language as tl

from peftfx.kernels.decode_asm_triton import decode_pairs

__all__ = ["interpreting", "use_asm_decode", "decode_heuristics", "code_value", "dequant_values", "load_weight_tile",
           "scale_sub", "codebook_id", "dequant_matmul_tile", "int8_matmul_tile", "lora_epilogue"]

_CODEBOOKS = {"nf4": 0, "fp4": 1}


def codebook_id(fmt: str) -> int:
    """The CODEBOOK constexpr for a 4-bit format (0 for formats without a codebook)."""
    return _CODEBOOKS.get(fmt, 0)


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1 (numpy-backed Triton on the CPU)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_asm_decode() -> bool:
    """Whether launches decode 4-bit codes with inline PTX (compiled kernels) rather than the select tree
    (the interpreter cannot run inline assembly)."""
    return not interpreting()


def decode_heuristics() -> dict:
    """``triton.heuristics`` values of every kernel that calls :func:`load_weight_tile`: SUB and ASM_DECODE."""
    return {"SUB": lambda a: scale_sub(a["QBLOCK"], a["BLOCK_K"], a["K"]),
            "ASM_DECODE": lambda a: use_asm_decode()}


def scale_sub(block_size: int, block_k: int, k: int) -> int:
    """The SUB constexpr: elements per scale run of a W tile row, or 0 when K is not SUB-aligned."""
    sub = min(block_size, block_k)
    return sub if k % sub == 0 else 0


@triton.jit
def _select16(q, c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13, c14, c15):
    """c[q] for int32 codes 0..15, as a binary select tree (15 selects, no memory access)."""
    b0 = (q & 1) != 0
    b1 = (q & 2) != 0
    b2 = (q & 4) != 0
    b3 = (q & 8) != 0
    v0 = tl.where(b0, c1, c0)
    v1 = tl.where(b0, c3, c2)
    v2 = tl.where(b0, c5, c4)
    v3 = tl.where(b0, c7, c6)
    v4 = tl.where(b0, c9, c8)
    v5 = tl.where(b0, c11, c10)
    v6 = tl.where(b0, c13, c12)
    v7 = tl.where(b0, c15, c14)
    u0 = tl.where(b1, v1, v0)
    u1 = tl.where(b1, v3, v2)
    u2 = tl.where(b1, v5, v4)
    u3 = tl.where(b1, v7, v6)
    t0 = tl.where(b2, u1, u0)
    t1 = tl.where(b2, u3, u2)
    return tl.where(b3, t1, t0)


@triton.jit
def code_value(q, CODEBOOK: tl.constexpr):
    """fp32 NF4 (CODEBOOK 0) or FP4 (1) value of int32 codes ``q``; the constants are
    ``formats.NF4_CODE`` / ``formats.FP4_CODE`` bit for bit (tests/kernels/test_decode_triton.py checks)."""
    if CODEBOOK == 0:
        v = _select16(q, -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                      -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                      0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
                      0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0)
    else:
        v = _select16(q, 0.0, 0.0052083334885537624, 0.6666666865348816, 1.0, 0.3333333432674408, 0.5,
                      0.1666666716337204, 0.25, -0.0, -0.0052083334885537624, -0.6666666865348816, -1.0,
                      -0.3333333432674408, -0.5, -0.1666666716337204, -0.25)
    return v.to(tl.float32)


@triton.jit
def dequant_values(idx, mask,
                   packed_ptr, scales_ptr, scales2_ptr, offset_ptr, code2_ptr,
                   K,
                   FORMAT: tl.constexpr, DOUBLE_QUANT: tl.constexpr, CODEBOOK: tl.constexpr,
                   BLOCK_SIZE: tl.constexpr, BLOCK_SIZE2: tl.constexpr):
    """fp32 values of the weight at flat row-major indices ``idx`` (any shape), 0 where ``~mask``.

    FORMAT: 0 dense, 1 nf4/fp4 (CODEBOOK picks the table), 2 int8, 3 int8-zeropoint, 4 llm-int8.
    """
    if FORMAT == 0:
        w = tl.load(packed_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    elif FORMAT == 1:
        byte = tl.load(packed_ptr + idx // 2, mask=mask, other=0).to(tl.int32)
        q = (byte >> ((1 - idx % 2) * 4)) & 0xF
        blk = idx // BLOCK_SIZE
        if DOUBLE_QUANT:
            sq = tl.load(scales_ptr + blk, mask=mask, other=0).to(tl.int32)
            s2 = tl.load(scales2_ptr + blk // BLOCK_SIZE2, mask=mask, other=0.0)
            absmax = tl.load(code2_ptr + sq) * s2 + tl.load(offset_ptr)
        else:
            absmax = tl.load(scales_ptr + blk, mask=mask, other=0.0)
        w = code_value(q, CODEBOOK) * absmax
    elif FORMAT == 2:
        q = tl.load(packed_ptr + idx, mask=mask, other=0).to(tl.float32)
        w = q * tl.load(scales_ptr + idx // BLOCK_SIZE, mask=mask, other=0.0)
    elif FORMAT == 3:
        q = tl.load(packed_ptr + idx, mask=mask, other=0).to(tl.float32)
        blk = idx // BLOCK_SIZE
        zp = tl.load(offset_ptr + blk, mask=mask, other=0.0)
        w = (q - zp) * tl.load(scales_ptr + blk, mask=mask, other=0.0)
    else:
        q = tl.load(packed_ptr + idx, mask=mask, other=0).to(tl.float32)
        absmax = tl.load(scales_ptr + idx // K, mask=mask, other=0.0)
        w = q * tl.math.div_rn(absmax, tl.full(absmax.shape, 127.0, tl.float32))
    return tl.where(mask, w, 0.0)


@triton.jit
def _block_scales(blk, mask, scales_ptr, scales2_ptr, offset_ptr, code2_ptr,
                  DOUBLE_QUANT: tl.constexpr, BLOCK_SIZE2: tl.constexpr):
    """fp32 scale of quantization blocks ``blk`` (one load per block; double quant decoded here)."""
    if DOUBLE_QUANT:
        sq = tl.load(scales_ptr + blk, mask=mask, other=0).to(tl.int32)
        s2 = tl.load(scales2_ptr + blk // BLOCK_SIZE2, mask=mask, other=0.0)
        s = tl.load(code2_ptr + sq, mask=mask, other=0.0) * s2 + tl.load(offset_ptr)
    else:
        s = tl.load(scales_ptr + blk, mask=mask, other=0.0)
    return tl.where(mask, s, 0.0)


@triton.jit
def load_weight_tile(offs_n, k0, N, K,
                     packed_ptr, scales_ptr, scales2_ptr, offset_ptr, code2_ptr,
                     FORMAT: tl.constexpr, DOUBLE_QUANT: tl.constexpr, CODEBOOK: tl.constexpr,
                     QBLOCK: tl.constexpr, QBLOCK2: tl.constexpr, SUB: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ASM_DECODE: tl.constexpr,
                     OUT_DTYPE: tl.constexpr):
    """deq(W)[offs_n, k0:k0+BLOCK_K] as ``[BLOCK_N, BLOCK_K]`` (0 outside N and K) in OUT_DTYPE, the dot
    operand's dtype (decoded in fp32 and cast, except on the inline-PTX path, which decodes in OUT_DTYPE).

    ``offs_n`` is ``[BLOCK_N]`` row indices; see the module docstring for SUB and ASM_DECODE.
    """
    offs_k = k0 + tl.arange(0, BLOCK_K)
    n_mask = offs_n < N
    if FORMAT == 4:
        # LLM.int8 rows (the dX tile; the forward multiplies int8 on tensor cores): one absmax per row,
        # loaded and divided by 127 once per row of the tile, as dequant_values' per-element formula
        mask = n_mask[:, None] & (offs_k[None, :] < K)
        q = tl.load(packed_ptr + offs_n[:, None] * K + offs_k[None, :], mask=mask, other=0).to(tl.float32)
        absmax = tl.load(scales_ptr + offs_n, mask=n_mask, other=0.0)
        w = q * tl.math.div_rn(absmax, tl.full(absmax.shape, 127.0, tl.float32))[:, None]
    elif SUB == 0 or FORMAT == 0:
        # dense is a plain load already; unaligned K falls back to per-element scales
        mask = n_mask[:, None] & (offs_k[None, :] < K)
        w = dequant_values(offs_n[:, None] * K + offs_k[None, :], mask, packed_ptr, scales_ptr, scales2_ptr,
                           offset_ptr, code2_ptr, K, FORMAT, DOUBLE_QUANT, CODEBOOK, QBLOCK, QBLOCK2)
    else:
        NSB: tl.constexpr = BLOCK_K // SUB
        offs_s = k0 + tl.arange(0, NSB) * SUB  # first column of each scale run
        smask = n_mask[:, None] & (offs_s[None, :] < K)
        blk = (offs_n[:, None] * K + offs_s[None, :]) // QBLOCK  # [BLOCK_N, NSB]
        scale = _block_scales(blk, smask, scales_ptr, scales2_ptr, offset_ptr, code2_ptr, DOUBLE_QUANT, QBLOCK2)
        if FORMAT == 1:
            HALF: tl.constexpr = BLOCK_K // 2
            offs_b = k0 // 2 + tl.arange(0, HALF)
            bmask = n_mask[:, None] & (offs_b[None, :] < K // 2)
            byte = tl.load(packed_ptr + offs_n[:, None] * (K // 2) + offs_b[None, :], mask=bmask, other=0)
            # even flat element in the high nibble: join(hi, lo) interleaves them back into K order
            if ASM_DECODE and OUT_DTYPE != tl.float32:
                # each packed byte's scale, in the dot's dtype: one load per block, broadcast in registers
                s_b = tl.broadcast_to(scale.to(OUT_DTYPE)[:, :, None], [BLOCK_N, NSB, SUB // 2])
                hi, lo = decode_pairs(byte, tl.reshape(s_b, [BLOCK_N, HALF]), CODEBOOK, OUT_DTYPE)
                w = tl.reshape(tl.join(hi, lo), [BLOCK_N, BLOCK_K])
            else:
                byte = byte.to(tl.int32)
                pair = tl.join(code_value(byte >> 4, CODEBOOK), code_value(byte & 0xF, CODEBOOK))
                w = tl.reshape(tl.reshape(pair, [BLOCK_N, NSB, SUB]) * scale[:, :, None], [BLOCK_N, BLOCK_K])
        else:
            mask = n_mask[:, None] & (offs_k[None, :] < K)
            q = tl.load(packed_ptr + offs_n[:, None] * K + offs_k[None, :], mask=mask, other=0)
            q = tl.reshape(q.to(tl.float32), [BLOCK_N, NSB, SUB])
            if FORMAT == 3:
                zp = tl.load(offset_ptr + blk, mask=smask, other=0.0)
                w3 = (q - zp[:, :, None]) * scale[:, :, None]
            else:
                w3 = q * scale[:, :, None]
            w = tl.reshape(w3, [BLOCK_N, BLOCK_K])
    return w.to(OUT_DTYPE)


@triton.jit
def dequant_matmul_tile(acc, x_ptr, stride_xm, stride_xk, offs_m, M, offs_n, N, K, k_lo, k_hi,
                        packed_ptr, scales_ptr, scales2_ptr, offset_ptr, code2_ptr,
                        FORMAT: tl.constexpr, DOUBLE_QUANT: tl.constexpr, CODEBOOK: tl.constexpr,
                        QBLOCK: tl.constexpr, QBLOCK2: tl.constexpr, SUB: tl.constexpr,
                        PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        ASM_DECODE: tl.constexpr):
    """``acc + x[offs_m, k_lo:k_hi] · deq(W)[offs_n, k_lo:k_hi]ᵀ`` (fp32 ``[BLOCK_M, BLOCK_N]``).

    ``k_lo`` is a multiple of BLOCK_K. W tiles are decoded in registers (:func:`load_weight_tile`),
    cast to x's dtype and fed to ``tl.dot`` (fp32 x runs as ``PRECISION``, tf32x3 from the launchers:
    tensor cores at about fp32 accuracy). FORMAT 4 (llm-int8) goes through :func:`int8_matmul_tile`.
    """
    m_mask = offs_m < M
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=m_mask[:, None] & (offs_k[None, :] < K), other=0.0)
        w = load_weight_tile(offs_n, k0, N, K, packed_ptr, scales_ptr, scales2_ptr, offset_ptr, code2_ptr,
                             FORMAT, DOUBLE_QUANT, CODEBOOK, QBLOCK, QBLOCK2, SUB, BLOCK_N, BLOCK_K, ASM_DECODE,
                             x_ptr.dtype.element_ty)
        acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc, input_precision=PRECISION)
    return acc


@triton.jit
def int8_matmul_tile(xq_ptr, stride_xm, stride_xk, xs_ptr, offs_m, M, offs_n, N, K, k_lo, k_hi,
                     packed_ptr, scales_ptr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """LLM.int8 base product ``[BLOCK_M, BLOCK_N]`` fp32: per-token int8 x (row scales ``xs``) times the
    int8 weight rows (row absmax / 127), int8 x int8 -> int32 on tensor cores."""
    m_mask = offs_m < M
    n_mask = offs_n < N
    acc_i = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        xq = tl.load(xq_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                     mask=m_mask[:, None] & k_mask[None, :], other=0)
        wq = tl.load(packed_ptr + offs_n[None, :] * K + offs_k[:, None], mask=k_mask[:, None] & n_mask[None, :],
                     other=0)
        acc_i = tl.dot(xq, wq, acc_i, out_dtype=tl.int32)  # Triton 3.6 needs out_dtype for int8
    xs = tl.load(xs_ptr + offs_m, mask=m_mask, other=0.0)
    w_absmax = tl.load(scales_ptr + offs_n, mask=n_mask, other=0.0)
    ws = tl.math.div_rn(w_absmax, tl.full(w_absmax.shape, 127.0, tl.float32))
    return acc_i.to(tl.float32) * xs[:, None] * ws[None, :]


@triton.jit
def lora_epilogue(acc, offs_m, m_mask, offs_n, n_mask, N, R, scaling,
                  bias_ptr, xa_ptr, stride_xam, lora_b_ptr, stride_bn, extra_ptr,
                  HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, HAS_EXTRA: tl.constexpr,
                  BLOCK_R: tl.constexpr, PRECISION: tl.constexpr):
    """acc + LLM.int8 outlier product + bias + ``scaling · xa · Bᵀ`` (rows outside ``m_mask`` add 0).

    ``xa`` and B stay in their dtype for the rank-r dot: bf16/fp16 products are exact in the fp32
    accumulator, so tensor cores give the fp32 result (an fp32 FMA loop over BLOCK_R = 128 spilled)."""
    out_mask = m_mask[:, None] & n_mask[None, :]
    if HAS_EXTRA:  # LLM.int8 outlier columns, multiplied in fp32 by the host
        acc += tl.load(extra_ptr + offs_m[:, None] * N + offs_n[None, :], mask=out_mask, other=0.0)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        acc += tl.where(m_mask[:, None], bias[None, :], 0.0)
    if HAS_LORA:
        offs_r = tl.arange(0, BLOCK_R)
        r_mask = offs_r < R
        xa = tl.load(xa_ptr + offs_m[:, None] * stride_xam + offs_r[None, :],
                     mask=m_mask[:, None] & r_mask[None, :], other=0.0)
        bt = tl.load(lora_b_ptr + offs_n[None, :] * stride_bn + offs_r[:, None],
                     mask=r_mask[:, None] & n_mask[None, :], other=0.0)
        acc += scaling * tl.dot(xa, bt.to(xa.dtype), input_precision=PRECISION)
    return acc
