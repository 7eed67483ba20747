"""The ahead-of-time compile sweep of the fused QLoRA kernels: which launches exist, compiled per target.

A *case* is one launch the host code can make: kernel (``forward`` tile, ``gemv`` for M <= 16,
``dx`` tile for the backward), target (``sm_80``/``sm_90``), activation dtype, weight format, double
quant, M, N, K, LoRA rank r, and one autotune config that survives pruning for that key
(:func:`triton_configs.candidate_configs` with the target's shared-memory limit and SM count). For each
case :func:`compile_case` compiles the kernel with exactly the constexprs and argument specialisation
the launcher would produce (:mod:`triton_aot`) and returns one record with the keys of issue 19:
``kernel, target, dtype, format, double_quant, M, N, K, r, direction, config, shared_bytes,
spill_bytes, registers, mma, fits`` (plus ``model_shared_bytes``, the resource model's estimate, and
the static per-element estimates).

Identical compilations are compiled once: :func:`case_key` is the real specialisation key (kernel
source + signature + constexprs + divisibility attributes + options + target). Triton specialises an
int argument only on ``== 1`` and divisibility by 16, so N/K = 11008 and 4096 compile alike; they
differ only where the launcher's choices differ (the configs surviving pruning, GEMV's SPLIT_K and
K_SPLIT, SUB). r changes BLOCK_R (16, 16, 64, 128 for r = 8, 16, 64, 128) and, for r = 8, the
divisibility of R and of the LoRA strides. The full grid is 7440 cases but 3560 distinct compiles.
Used by ``tests/kernels/test_aot_resources.py`` and ``python -m bench.aot_check``.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import triton

from peftfx.kernels import gemv_triton, qlora_triton, triton_aot
from peftfx.kernels.decode_triton import codebook_id, scale_sub
from peftfx.kernels.quant_triton import format_id
from peftfx.kernels.triton_configs import (
    FP_FUSION,
    GEMV_MAX_M,
    candidate_configs,
    estimate_shared,
    gpu_configs,
    split_k,
)

__all__ = ["Case", "cases", "case_key", "compile_case", "DTYPES", "FORMATS", "RANKS", "MS", "NKS"]

DTYPES = ("bf16", "fp16", "fp32")
ESIZE = {"bf16": 2, "fp16": 2, "fp32": 4}
# (format, double_quant)
FORMATS = (("none", False), ("nf4", False), ("nf4", True), ("fp4", False), ("fp4", True), ("int8", False),
           ("int8-zeropoint", False), ("llm-int8", False))
RANKS = (8, 16, 64, 128)
MS = (1, 16, 4096)
NKS = ((4096, 4096), (4096, 11008), (11008, 4096))  # (N, K): square, down- and up-projection shapes
QBLOCK, QBLOCK2 = 64, 256


@dataclass(frozen=True)
class Case:
    kernel: str        # "forward" | "gemv" | "dx"
    target: str
    dtype: str
    format: str
    double_quant: bool
    M: int
    N: int
    K: int
    r: int
    config: tuple      # (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)

    @property
    def direction(self) -> str:
        return "backward" if self.kernel == "dx" else "forward"


def _kernels_for(m: int) -> tuple[str, ...]:
    return ("gemv" if m <= GEMV_MAX_M else "forward", "dx")


def _block_r(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


def cases(dtypes=DTYPES, formats=FORMATS, ranks=RANKS, ms=MS, nks=NKS, targets=tuple(triton_aot.TARGETS),
          kernels=("forward", "gemv", "dx")) -> list[Case]:
    """Every (launch, surviving config) of the given sweep axes."""
    out = []
    for target, dtype, (fmt, dq), m, (n, k), r in itertools.product(targets, dtypes, formats, ms, nks, ranks):
        spec = triton_aot.TARGETS[target]
        for kernel in _kernels_for(m):
            if kernel not in kernels:
                continue
            kind = kernel
            n_out = k if kind == "dx" else n
            for cfg in candidate_configs(kind, m, n_out, ESIZE[dtype], format_id(fmt), dq, QBLOCK,
                                         shared_limit=spec.shared_limit, sms=spec.sms, configs=gpu_configs(kind),
                                         block_r=_block_r(r)):
                kw = cfg.kwargs
                out.append(Case(kernel, target, dtype, fmt, dq, m, n, k, r,
                                (kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], cfg.num_warps, cfg.num_stages)))
    return out


def _wtype(fmt: str, dtype: str) -> str:
    return {"none": dtype, "nf4": "u8", "fp4": "u8", "int8": "i8", "int8-zeropoint": "u8", "llm-int8": "i8"}[fmt]


def _compile_args(c: Case, asm_decode: bool = True) -> tuple:
    """(jit function, pointers, ints, constexprs) of the launch ``c`` stands for (``asm_decode``: the
    ASM_DECODE constexpr, True as on a GPU; False compiles the interpreter's select-tree decode)."""
    bm, bn, bk, _, _ = c.config
    fid = format_id(c.format)
    dt = c.dtype
    scales_t = "u8" if c.double_quant else "fp32"
    common = dict(FORMAT=fid, DOUBLE_QUANT=c.double_quant, CODEBOOK=codebook_id(c.format),
                  QBLOCK=QBLOCK if c.format not in ("none", "llm-int8") else 16,
                  QBLOCK2=QBLOCK2 if c.double_quant else 16, BLOCK_R=_block_r(c.r),
                  PRECISION="tf32x3" if dt == "fp32" else "tf32", BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8,
                  ASM_DECODE=asm_decode)
    common["SUB"] = scale_sub(common["QBLOCK"], bk, c.K)
    m_key = min(triton.next_power_of_2(c.M), 4096)
    wptrs = dict(packed_ptr=_wtype(c.format, dt), scales_ptr=scales_t, scales2_ptr="fp32", offset_ptr="fp32",
                 code2_ptr="fp32")
    if c.kernel == "dx":
        pointers = dict(dy_ptr=dt, dyb_ptr=dt, lora_a_ptr=dt, dx_ptr=dt, **wptrs)
        ints = dict(M=c.M, N=c.N, K=c.K, R=c.r, M_KEY=m_key, stride_dym=c.N, stride_dyn=1, stride_dybm=c.r,
                    stride_ar=c.K, stride_dxm=c.K)
        return qlora_triton._qlora_dx_kernel, pointers, ints, dict(common, HAS_LORA=True)
    x_t = "i8" if c.format == "llm-int8" else dt
    pointers = dict(x_ptr=x_t, bias_ptr=dt, xa_ptr=dt, lora_b_ptr=dt,
                    xs_ptr="fp32" if c.format == "llm-int8" else dt, extra_ptr=dt, y_ptr=dt, **wptrs)
    ints = dict(M=c.M, N=c.N, K=c.K, R=c.r, M_KEY=m_key, stride_xm=c.K, stride_xk=1, stride_xam=c.r,
                stride_bn=c.r, stride_ym=c.N)
    consts = dict(common, HAS_BIAS=True, HAS_LORA=True, HAS_EXTRA=False)
    if c.kernel == "gemv":
        spec = triton_aot.TARGETS[c.target]
        splits, per = split_k(c.N, c.K, 64, 256, spec.sms)
        ints["K_SPLIT"] = per
        consts["SPLIT_K"] = splits
        if splits > 1:
            pointers["y_ptr"] = "fp32"
        return gemv_triton._qlora_gemv_kernel, pointers, ints, consts
    return qlora_triton._qlora_forward_kernel, pointers, ints, consts


def case_key(c: Case, asm_decode: bool = True) -> str:
    """The compilation ``c`` needs (:func:`triton_aot.compile_key`): cases with equal keys share one compile."""
    fn, pointers, ints, consts = _compile_args(c, asm_decode)
    _, _, _, warps, stages = c.config
    return triton_aot.compile_key(
        fn, pointers=pointers, ints=ints, constexprs=consts, floats={"scaling": "fp32"}, num_warps=warps,
        num_stages=stages, target=c.target, enable_fp_fusion=FP_FUSION)


def compile_case(c: Case, use_cache: bool = True, asm_decode: bool = True, cache_only: bool = False) -> dict | None:
    """The issue-19 record of case ``c`` (compiling it, or reading the AOT cache; ``cache_only``: None when
    the cache does not hold it)."""
    fn, pointers, ints, consts = _compile_args(c, asm_decode)
    bm, bn, bk, warps, stages = c.config
    res = triton_aot.compile_resources(fn, pointers=pointers, ints=ints, constexprs=consts,
                                       floats={"scaling": "fp32"}, num_warps=warps, num_stages=stages,
                                       target=c.target, enable_fp_fusion=FP_FUSION, use_cache=use_cache,
                                       cache_only=cache_only)
    if res is None:
        return None
    spec = triton_aot.TARGETS[c.target]
    cfg = triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps, num_stages=stages)
    # static estimates: per weight element of one main-loop iteration (W tile BN x BK per program)
    w_elems_per_thread = bn * bk / (32 * warps)
    return dict(
        kernel=c.kernel, target=c.target, dtype=c.dtype, format=c.format, double_quant=c.double_quant,
        M=c.M, N=c.N, K=c.K, r=c.r, direction=c.direction,
        config=dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages,
                    SUB=consts["SUB"], SPLIT_K=consts.get("SPLIT_K", 1)),
        shared_bytes=res.shared_bytes, spill_bytes=res.spill_bytes, registers=res.registers, mma=res.mma,
        fits=res.shared_bytes <= spec.shared_limit and res.registers <= 255,
        model_shared_bytes=estimate_shared(c.kernel, cfg, ESIZE[c.dtype], format_id(c.format), c.double_quant,
                                           QBLOCK, _block_r(c.r)),
        loop_instructions_per_w_element=round(res.loop_instructions / w_elems_per_thread, 2),
        loop_mma=res.loop_mma, compile_s=res.compile_s, triton=res.triton_version,
    )
