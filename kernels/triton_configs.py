"""Autotune configs of the fused QLoRA kernels, pruned by a resource model so every launch fits.

Triton's autotuner compiles every config it is given for every key, and when none fits the device it
launches the first one anyway (``OutOfResources``). Here ``early_config_prune`` (Triton's matmul
examples and Liger do the same) keeps, per key, at most :data:`MAX_CANDIDATES` configs that the
resource model says fit the device's shared memory and register file, ranked by a shape heuristic;
the fallback config is always kept, so a launch on any sm80+ GPU has a config that fits.

Resource model (bytes of shared memory; ``e`` = element size of the activation dtype, ``wb`` =
stored bytes per weight element: 0.5 for 4-bit, 1 for int8, ``e`` dense)::

    stages * (A tile + raw W bytes + scales) + staged W operand (dot input)     main loop
    BLOCK_M * BLOCK_N * 4                                                        epilogue layout change
    (BLOCK_M + BLOCK_N) * BLOCK_R * e                                            LoRA dot operands

plus a fixed margin; registers per thread: the fp32 accumulator, the decoded fp32 W tile and the
A operand fragments spread over ``32 * num_warps`` threads, plus a base for addresses and the select
tree. Where ptxas spilled although the estimate fits (a wide LoRA epilogue), the config is pruned for
that BLOCK_R and above (:func:`spills_with_rank`). ``tests/kernels/test_aot_resources.py`` checks the
model against what ptxas reports for the compiled kernels (it must never underestimate shared memory).

Kinds: ``"forward"`` (y tiles over M x N, reduction over K), ``"dx"`` (dx tiles over M x K,
reduction over N), ``"gemv"`` (M <= 16; W streamed once, split over K).
"""
from __future__ import annotations

import os

import triton

__all__ = ["FP_FUSION", "MAX_CANDIDATES", "GEMV_MAX_M", "gpu_configs", "configs_for", "candidate_configs", "estimate_shared",
           "estimate_registers", "spills_with_rank", "device_limits", "early_prune", "split_k"]

MAX_CANDIDATES = 3
# FP contraction (a*b+c -> fma) in the fused kernels, set explicitly at every launch because Triton's
# default changes (on in 3.9, off from 3.10). Off: the decoded weights (code*absmax, DYN[q]*s2 + offset)
# then equal the oracle's separately rounded products bit for bit; the products run in tl.dot anyway.
FP_FUSION = False
GEMV_MAX_M = 16
_SHARED_MARGIN = 2048   # barriers, scalars, alignment padding
_MAX_REGISTERS = 255    # per thread; above this ptxas spills
_SM80 = (166912, 108)   # the smallest sm80+ part we target (A100): limits used when no GPU is visible

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages); for "dx" BLOCK_N is the reduction step and
# BLOCK_K the output width. The last entry of each list is the fallback that fits everywhere.
_TILE_SHAPES = [
    (128, 256, 64, 8, 3), (128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (256, 128, 64, 8, 3),
    (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (64, 64, 128, 4, 3),
    # (16, 128, 64, 4, 4) was here: the dx kernel spilled 8 B with it on sm_80 (AOT sweep)
    (16, 64, 128, 4, 4), (32, 64, 128, 4, 4), (32, 128, 64, 4, 3),
    (64, 64, 32, 4, 2),
]
_GEMV_SHAPES = [  # BLOCK_M is fixed at 16 (the smallest tensor-core M)
    # (16, 32, 256, 4, 3) was first here: it spilled 8 B for fp4 at M = 16 on sm_90 (AOT sweep)
    (16, 32, 128, 4, 4), (16, 64, 128, 4, 4), (16, 64, 256, 4, 3), (16, 128, 128, 4, 3),
    (16, 32, 128, 4, 2),
]
# Configs ptxas spills with once the LoRA epilogue is wide although :func:`estimate_registers` stays
# under 255: (kind, shape) -> the smallest BLOCK_R that spilled in the AOT sweep. The estimate counts
# the main loop only (the epilogue's rank-r operands load after the loop's W tile is dead); here ptxas
# held the dx kernel at 168 registers, the loop's own estimate, and the r = 128 epilogue (A tile
# [128, BLOCK_K] = 64 registers a thread) then spilled 8 B on sm_90 at M = 1 (dense bf16/fp16; r = 16
# compiles to the same 168 registers without a spill).
_SPILLS_FROM_BLOCK_R = {("dx", (32, 64, 128, 4, 4)): 128}
_INTERPRET = {"forward": (16, 32, 32, 4, 1), "dx": (16, 32, 32, 4, 1), "gemv": (16, 32, 32, 4, 1)}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _config(shape) -> triton.Config:
    bm, bn, bk, w, s = shape
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)


def gpu_configs(kind: str) -> list[triton.Config]:
    """Every GPU config of ``kind`` before pruning (the fallback last)."""
    return [_config(s) for s in (_GEMV_SHAPES if kind == "gemv" else _TILE_SHAPES)]


def configs_for(kind: str) -> list[triton.Config]:
    """The autotuner's config list of ``kind``: :func:`gpu_configs`, or one small config in the interpreter."""
    if _interpreting():
        return [_config(_INTERPRET[kind])]
    return gpu_configs(kind)


def _weight_bytes(fmt_id: int, esize: int) -> float:
    return {0: esize, 1: 0.5, 2: 1, 3: 1, 4: 1}[fmt_id]


def estimate_shared(kind: str, cfg: triton.Config, esize: int, fmt_id: int, double_quant: bool,
                    qblock: int = 64, block_r: int = 16) -> int:
    """Upper estimate of the shared memory (bytes) one program of ``cfg`` needs (module docstring;
    ``block_r``: BLOCK_R, the LoRA rank padded to a power of two, at least 16)."""
    kw = cfg.kwargs
    bm, bn, bk, stages = kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], cfg.num_stages
    if kind == "dx":  # A = dy [BM, BN], W tile [BN, BK]
        a_tile = bm * bn * esize
    else:
        a_tile = bm * bk * esize
    w_elems = bn * bk
    op_esize = 1 if fmt_id == 4 else esize
    raw_w = int(w_elems * _weight_bytes(fmt_id, esize))
    if fmt_id == 4 and kind == "dx":
        # dx dequantizes llm-int8 elementwise (decode_triton.dequant_values): the fp32 row absmax is a
        # per-element load, pipelined like the int8 bytes, and the operand is the activation dtype
        raw_w, op_esize = w_elems * 5, esize
    n_scales = w_elems // min(qblock, bk) if fmt_id in (1, 2, 3) else 0
    scales = n_scales * (8 if double_quant or fmt_id == 3 else 4)
    # every stage buffered (sm_90's wgmma pipeline keeps all of them; sm_80 one less), plus the decoded
    # W operand staged for the dot; fp32 (tf32x3) also stages its low-order split of W
    main = stages * (a_tile + raw_w + scales) + w_elems * op_esize * (2 if esize == 4 else 1)
    if fmt_id == 0:  # dense W is a plain pipelined operand
        main = stages * (a_tile + raw_w) + (w_elems * esize if esize == 4 else 0)
    n_out = bk if kind == "dx" else bn
    epilogue = bm * n_out * 4
    # the rank-r dot stages its operands (xa / dy·B [BM, BLOCK_R], B / A [BLOCK_R, n_out]): 32 KB (bf16)
    # and 64 KB (fp32) for the 64x64x32 fallback at r = 128 in the full AOT sweep, twice the layout change
    lora = (bm + n_out) * block_r * esize
    return max(main, epilogue, lora) + _SHARED_MARGIN


def estimate_registers(kind: str, cfg: triton.Config, esize: int, fmt_id: int) -> int:
    """Registers per thread of ``cfg``, an upper estimate (configs above 255 would spill and are pruned):
    the fp32 accumulator, the decoded fp32 W tile and its cast copy, the A operand fragments; fp32
    (tf32x3) keeps the value and its high and low tf32 parts of W (x3) and two parts of A (x2):
    calibrated on the AOT sweep, where smaller factors let fp32 configs spill 16-32 B."""
    kw = cfg.kwargs
    bm, bn, bk = kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"]
    threads = 32 * cfg.num_warps
    split = 2 if esize == 4 else 1
    w_split = 3 if esize == 4 else 1
    acc = bm * (bk if kind == "dx" else bn)
    plain = fmt_id == 0 or (fmt_id == 4 and kind != "dx")  # operand loaded as is, no decode
    # decoded tile, its cast copy; dx (W as the B operand in storage order) also holds the two nibble
    # halves live across the join: 8 B spills on sm_90 at 32x64x128 until counted
    w_tile = bn * bk * (1 if plain else (3 if kind == "dx" else 2)) * w_split
    a_frag = bm * (bn if kind == "dx" else bk) * esize // 4 * split
    gather = bn * bk if (fmt_id == 4 and kind == "dx") else 0  # per-element scale index + value
    return (acc + w_tile + a_frag + gather) // threads + 64


def spills_with_rank(kind: str, cfg: triton.Config, block_r: int) -> bool:
    """Whether ``cfg`` is one ptxas spilled with at this LoRA width (``block_r`` = BLOCK_R, the rank padded
    to a power of two, at least 16): :data:`_SPILLS_FROM_BLOCK_R`."""
    kw = cfg.kwargs
    shape = (kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], cfg.num_warps, cfg.num_stages)
    return block_r >= _SPILLS_FROM_BLOCK_R.get((kind, shape), 1 << 30)


def device_limits() -> tuple[int, int]:
    """(opt-in shared memory per block, SM count) of the current CUDA device, else A100's."""
    try:
        import torch

        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(torch.cuda.current_device())
            return int(getattr(p, "shared_memory_per_block_optin", _SM80[0])), int(p.multi_processor_count)
    except Exception:  # noqa: BLE001 - no driver: fall back to the smallest target
        pass
    return _SM80


def _rank_key(kind: str, cfg: triton.Config, m: int, n_out: int, sms: int):
    """Sort key: least padding of M, then at least one wave of programs, then the biggest tile."""
    kw = cfg.kwargs
    bm = kw["BLOCK_M"]
    bn = kw["BLOCK_K"] if kind == "dx" else kw["BLOCK_N"]
    padded = triton.cdiv(m, bm) * bm
    waste = round(padded / max(m, 1), 1) if m >= 16 else bm // 16
    programs = triton.cdiv(m, bm) * triton.cdiv(n_out, bn)
    return (waste, programs < sms, -bm * bn, -kw["BLOCK_K"] * kw["BLOCK_N"], cfg.num_stages)


def candidate_configs(kind: str, m: int, n_out: int, esize: int, fmt_id: int, double_quant: bool,
                      qblock: int = 64, shared_limit: int | None = None, sms: int | None = None,
                      configs: list[triton.Config] | None = None, block_r: int = 16) -> list[triton.Config]:
    """At most MAX_CANDIDATES configs of ``kind`` that fit, best first (``n_out``: output columns,
    ``block_r``: the launch's BLOCK_R, the LoRA rank padded to a power of two)."""
    configs = configs if configs is not None else configs_for(kind)
    if len(configs) == 1:
        return list(configs)
    if shared_limit is None or sms is None:
        dev_shared, dev_sms = device_limits()
        shared_limit, sms = shared_limit or dev_shared, sms or dev_sms
    fallback = configs[-1]
    fits = [c for c in configs
            if estimate_shared(kind, c, esize, fmt_id, double_quant, qblock, block_r) <= shared_limit
            and estimate_registers(kind, c, esize, fmt_id) <= _MAX_REGISTERS
            and not spills_with_rank(kind, c, block_r)]
    fits.sort(key=lambda c: _rank_key(kind, c, m, n_out, sms))
    keep = fits[:MAX_CANDIDATES]
    if fallback not in keep:
        keep = keep[:MAX_CANDIDATES - 1] + [fallback]
    if os.environ.get("PEFTFX_TRITON_AUTOTUNE", "1") == "0":
        keep = keep[:1]
    return keep


def early_prune(kind: str, a_arg: str):
    """An ``early_config_prune`` for ``triton.autotune``; ``a_arg`` names the activation pointer."""
    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        esize = args[a_arg].element_size()
        n_out = args["K"] if kind == "dx" else args["N"]
        return candidate_configs(kind, args["M"], n_out, esize, int(args["FORMAT"]), bool(args["DOUBLE_QUANT"]),
                                 int(args["QBLOCK"]), configs=configs, block_r=int(args.get("BLOCK_R", 16)))
    return prune


def split_k(n: int, k: int, block_n: int, k_grain: int, sms: int) -> tuple[int, int]:
    """(splits, K per split) for the GEMV: enough programs for about two waves, each split a multiple
    of ``k_grain`` (the largest BLOCK_K) long, no empty split."""
    tiles = triton.cdiv(n, block_n)
    want = max(1, min(8, triton.cdiv(2 * sms, tiles), triton.cdiv(k, k_grain)))
    per = triton.cdiv(triton.cdiv(k, want), k_grain) * k_grain
    return triton.cdiv(k, per), per
