"""The engineered CPU path of ``peftfx::qlora_linear``: tiled dequantize -> GEMM in a compute dtype.

:mod:`reference` holds the plain math (the test oracle); this module computes the same thing fast on
one CPU core, in two ways:

* **Compute dtype.** The base GEMM runs in ``gemm_dtype``: what the plan asked for
  (``quant.compute_dtype``, ``"auto"`` resolved by :func:`peftfx.kernels.dtypes.resolve_compute_dtype`), else the input's
  dtype (half inputs in fp32 where the CPU has no bf16 GEMM units). On a CPU with AMX-BF16 a bf16 GEMM
  runs ~8x faster than fp32 (measured 1,100 vs 142 GFLOP/s on one Sapphire Rapids core), which is
  bitsandbytes' ``bnb_4bit_compute_dtype=bfloat16``. The LoRA term, the bias and the output stay in
  the input's precision (fp32 for fp32 models): only the frozen base product is rounded.
* **Tiles.** deq(W) is never materialized whole. Forward walks row tiles ``W[r0:r1, :]`` and writes
  ``x @ tile.T`` into the output's column slice (BLAS ``ldc``); backward walks column tiles
  ``W[:, c0:c1]`` and writes ``dy @ tile`` into dx's column slice, so no partial sums are re-read.
  A tile is ~:data:`TILE_ELEMS` elements: its int32 indices, its fp32 values and its compute-dtype
  copy stay in L2 from the table lookup through the scale multiply and cast to the GEMM that reads
  them, and the workspace is allocated once per call, so no page of it faults twice. On one core this
  dequantizes ~1.5-2 G elements/s, against ~0.45 G for bitsandbytes' C++ into a fresh fp32 tensor.
* **Native decoder.** Where :func:`peftfx.kernels.cpu_native.usable` holds (the C++ extension built,
  ``PEFTFX_CPU_NATIVE`` not 0), tiles are filled by its SIMD decode (~9 G elements/s in L2, any format
  and any tile position, so blocks that cross rows tile too), and decode-shaped fp32 calls
  (M <= GEMV_ROWS) run its fused matmul, which reads each packed byte once and never writes deq(W)
  to memory. Otherwise the PyTorch steps below run; both equal the oracle.

Shapes: x ``[M, K]``, deq(W) ``[N, K]``, dy ``[M, N]``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from peftfx.kernels import cpu_native, reference
from peftfx.kernels.dtypes import gemm_dtype
from peftfx.kernels.formats import QuantizedWeight

__all__ = ["TILE_ELEMS", "base_forward", "base_backward", "qlora_forward", "qlora_backward"]

# Elements of deq(W) per tile. Decode-shaped calls (M <= GEMV_ROWS) are bound by the dequantization:
# 1 MB of fp32 values + 0.5 MB of int32 indices stay in a 2 MB L2 between the lookup and the GEMV.
# Larger M is bound by the GEMM, which runs best on big tiles (fewer calls, less per-op overhead).
TILE_ELEMS = 1 << 18
GEMM_TILE_ELEMS = 1 << 21
# With the native decoder a tile costs one call however large it is, so GEMM-bound calls take fewer,
# larger GEMMs: a 2816x1024 weight in one tile ran a forward + backward 8% faster in fp32 than in 2M
# tiles (1,103 vs 1,200 ms for 4 layers' worth, interleaved, load 15), bf16 the same. Peak memory grows
# by at most the difference, still below bitsandbytes' whole deq(W).
NATIVE_GEMM_TILE_ELEMS = 1 << 22
# ... except fp32 tiles, capped at 1M elements (4 MiB): a fresh whole-weight fp32 tile (11 MiB for
# 2816x1024) per call is where malloc hands back memory it just returned to the kernel, so inside a
# training step every call faulted its pages in again: 90-240 ms of kernel time a step in the fp32 q,v
# step of bench/cpu_train (5,900-9,000 faults), 5-30 ms per decode that takes 0.6 ms in a warm buffer.
# 4 MiB tiles are reused from the heap: 0 faults, the step 1.10-1.21x -> 0.99-1.00x of peft+bnb
# (interleaved with the other setups as the bench runs them, load 3-4). bf16 tiles (5.5 MiB) did not fault,
# and 2-4x smaller bf16 tiles made the AMX GEMMs slower, so they stay whole.
NATIVE_FP32_GEMM_TILE_ELEMS = 1 << 20
# Elements dequantized per step inside a tile, whatever the tile size: the step's indices and fp32
# values stay in L2 from the lookup through the scale multiply and cast.
L2_ELEMS = 1 << 18
GEMV_ROWS = 16

# --------------------------------------------------------------------------------------- tiled deq
def _tiles_fit(weight: QuantizedWeight) -> bool:
    """2-D tiles need blocks that never cross a row: K a multiple of the block size (and even)."""
    k = weight.shape[1]
    return weight.format in ("nf4", "fp4") and k % weight.block_size == 0 and k % 2 == 0


def _native_tiles(weight: QuantizedWeight, dtype: torch.dtype) -> bool:
    """Whether the native decoder fills the tiles (any format but LLM.int8's forward, see callers)."""
    return dtype in cpu_native.NATIVE_DTYPES and cpu_native.usable(weight)


class _Workspace:
    """Buffers reused by every tile of one call and freed with it: the tile itself (``dtype``), and, unless
    the native decoder fills it (``native``), int32 indices and (for a non-fp32 tile) fp32 values stored as
    float64 pairs for the L2-sized PyTorch steps that do.

    Why not keep the tile between calls: a per-thread scratch tile saved first-touch page faults in the fp32
    step (1,760 -> 1,577 ms CPU in bench/cpu_train, load 11) but kept up to 16 MiB alive across the step,
    lifting its peak from 0.87x to 0.91x bitsandbytes' (target <= 0.90x); the bf16 step gained nothing."""

    def __init__(self, elems: int, dtype: torch.dtype, device: torch.device, native: bool = False) -> None:
        step = (min(elems, L2_ELEMS) + 1) // 2
        self.native = native
        self.idx = None if native else torch.empty(step, dtype=torch.int32, device=device)
        self.pairs = None if native or dtype == torch.float32 else torch.empty(step, dtype=torch.float64,
                                                                                device=device)
        self.tile = torch.empty(elems, dtype=dtype, device=device)


def _dequant_tile(qw: QuantizedWeight, scales: Tensor, r0: int, r1: int, c0: int, c1: int, dtype: torch.dtype,
                  ws: _Workspace) -> Tensor:
    """deq(W)[r0:r1, c0:c1] in ``dtype`` (a view into ``ws``). PyTorch steps need c0, c1 to be multiples
    of the block size (and ``scales`` decoded); the native decoder (``ws.native``) takes any window.

    Filled in steps of about :data:`L2_ELEMS` elements (rows of the tile): one ``index_select`` from the
    256-entry byte -> (hi, lo) table viewed as float64 (8 bytes = the two fp32 values of one byte), one
    in-place multiply by the block scales and, for a bf16/fp16 tile, one cast, each reading what the
    previous op just wrote to L2. Every element is rounded once, from fp32 code x fp32 absmax, as
    bitsandbytes does.
    """
    n_rows, k = qw.shape
    bs = qw.block_size
    rows, cols = r1 - r0, c1 - c0
    out = ws.tile[: rows * cols].view(rows, cols)
    if ws.native:  # storage checked once by the caller
        return cpu_native.decode_window(qw, r0, r1, c0, c1, out, check=False)
    packed = qw.packed.reshape(n_rows, k // 2)[:, c0 // 2: c1 // 2]
    scales = scales.view(n_rows, k // bs)[:, c0 // bs: c1 // bs].unsqueeze(-1)
    table = reference.pair_table64(qw.format, qw.packed.device)
    step = max(1, min(rows, L2_ELEMS // cols))
    for s0 in range(r0, r1, step):
        s1 = min(r1, s0 + step)
        half = (s1 - s0) * cols // 2
        idx = ws.idx[:half]
        idx.view(s1 - s0, cols // 2).copy_(packed[s0:s1])
        dst = out[s0 - r0: s1 - r0]
        # fp32 tile: look up straight into it (cols is even, so each step starts 8-byte aligned)
        pairs = dst.view(-1).view(torch.float64) if ws.pairs is None else ws.pairs[:half]
        torch.index_select(table, 0, idx, out=pairs)
        vals = pairs.view(torch.float32).view(s1 - s0, cols // bs, bs)
        vals.mul_(scales[s0:s1])
        if ws.pairs is not None:
            dst.copy_(vals.view(s1 - s0, cols))
    return out


def _tile_elems(m: int, native: bool = False, dtype: torch.dtype = torch.float32) -> int:
    if m <= GEMV_ROWS:
        return TILE_ELEMS
    if not native:
        return GEMM_TILE_ELEMS
    return NATIVE_FP32_GEMM_TILE_ELEMS if dtype == torch.float32 else NATIVE_GEMM_TILE_ELEMS


def _row_tile(n: int, k: int, elems: int) -> int:
    return max(1, min(n, elems // max(k, 1)))


def _col_tile(n: int, k: int, bs: int, elems: int) -> int:
    return max(bs, min(k, (elems // max(n, 1)) // bs * bs))


# ----------------------------------------------------------------------------------------- GEMMs
def _tiled_dtype(m: int, dtype: torch.dtype) -> torch.dtype:
    # a bf16 GEMV is slower than fp32 on CPUs (no AMX tile to fill): decode-shaped calls stay fp32
    return torch.float32 if m <= GEMV_ROWS and dtype == torch.bfloat16 else dtype


def base_forward(x2: Tensor, weight: QuantizedWeight | Tensor, dtype: torch.dtype) -> Tensor:
    """``x2 @ deq(W).T`` in ``dtype``: x2 ``[M, K]`` -> ``[M, N]`` (``dtype``; fp32 for M <= GEMV_ROWS)."""
    if isinstance(weight, Tensor) or weight.format == "llm-int8":
        return reference.base_product(x2, weight, dtype)  # nothing to dequantize in tiles
    n, k = weight.shape
    m = x2.shape[0]
    dtype = _tiled_dtype(m, dtype)
    native = _native_tiles(weight, dtype)
    if native:
        cpu_native.check_storage(weight)
        if m <= GEMV_ROWS and dtype == torch.float32:
            return cpu_native.decode_matmul(x2, weight, check=False)
    xc = x2.to(dtype)
    y = xc.new_empty(m, n)
    if not native and not _tiles_fit(weight):
        for r0, r1, w in reference.iter_dequantized_rows(weight, dtype, _tile_elems(m), reuse=True):
            torch.mm(xc, w.t(), out=y[:, r0:r1])
        return y
    scales = None if native else reference.decode_scales(weight)
    rows = _row_tile(n, k, _tile_elems(m, native, dtype))
    ws = _Workspace(rows * k, dtype, x2.device, native)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        torch.mm(xc, _dequant_tile(weight, scales, r0, r1, 0, k, dtype, ws).t(), out=y[:, r0:r1])
    return y


def base_backward(dy2: Tensor, weight: QuantizedWeight | Tensor, dtype: torch.dtype) -> Tensor:
    """``dy2 @ deq(W)`` in ``dtype``: dy2 ``[M, N]`` -> ``[M, K]`` (``dtype``; fp32 for M <= GEMV_ROWS)."""
    if isinstance(weight, Tensor):
        return reference.base_grad(dy2, weight, dtype)
    n, k = weight.shape
    m = dy2.shape[0]
    dtype = _tiled_dtype(m, dtype)
    dyc = dy2.to(dtype)
    native = _native_tiles(weight, dtype)
    if native:
        cpu_native.check_storage(weight)
    elif not _tiles_fit(weight):
        dx = None
        for r0, r1, w in reference.iter_dequantized_rows(weight, dtype, _tile_elems(m), reuse=True):
            dx = dyc[:, r0:r1] @ w if dx is None else dx.addmm_(dyc[:, r0:r1], w)
        return dx
    scales = None if native else reference.decode_scales(weight)
    cols = _col_tile(n, k, weight.block_size, _tile_elems(m, native, dtype))
    ws = _Workspace(n * cols, dtype, dy2.device, native)
    dx = dyc.new_empty(dy2.shape[0], k)
    for c0 in range(0, k, cols):
        c1 = min(k, c0 + cols)
        torch.mm(dyc, _dequant_tile(weight, scales, 0, n, c0, c1, dtype, ws), out=dx[:, c0:c1])
    return dx


# ------------------------------------------------------------------------------------- fused math
def qlora_forward(x: Tensor, weight: QuantizedWeight | Tensor, bias: Tensor | None, lora_A: Tensor | None,
                  lora_B: Tensor | None, scaling: float, x_lora: Tensor | None = None,
                  compute: torch.dtype | None = None) -> Tensor:
    """:func:`reference.qlora_forward_ref` with the tiled :func:`base_forward` in :func:`gemm_dtype`."""
    return reference.qlora_forward_ref(x, weight, bias, lora_A, lora_B, scaling, x_lora, gemm_dtype(x, compute),
                                       base=base_forward)


def qlora_backward(dy: Tensor, x: Tensor, weight: QuantizedWeight | Tensor, lora_A: Tensor | None,
                   lora_B: Tensor | None, scaling: float, x_lora: Tensor | None = None,
                   needs: tuple[bool, bool, bool, bool] = (True, True, True, True),
                   compute: torch.dtype | None = None,
                   ) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """:func:`reference.qlora_backward_ref` with the tiled :func:`base_backward`: ``(dx, dx_lora, dA, dB)``."""
    return reference.qlora_backward_ref(dy, x, weight, lora_A, lora_B, scaling, x_lora, needs,
                                        gemm_dtype(x, compute), base_grad=base_backward)
