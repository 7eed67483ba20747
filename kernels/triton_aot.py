"""Ahead-of-time compilation of Triton kernels for CUDA targets, on a machine without a GPU.

``triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32))``
runs the whole pipeline (TTIR -> TTGIR -> LLVM -> PTX -> ptxas cubin) with no driver. From the
result this module reads what decides whether a launch succeeds and how fast it can run:

- ``shared_bytes``: ``metadata.shared`` (what the launcher checks against the device's opt-in limit);
- ``registers`` and ``spill_bytes``: ``cuobjdump -res-usage`` on the cubin (``REG``; ``STACK + LOCAL``,
  the per-thread local memory that Triton's ``n_spills`` reports after a launch);
- ``mma``: ``"wgmma"`` / ``"mma"`` when the PTX contains those tensor-core instructions, else ``""``;
- the SASS of the hottest loop (the longest backward branch): its instruction count and MMA count, for
  static per-element estimates.

The argument specialisation mirrors a launch with torch tensors (Triton 3.6-3.9 alike): pointers are
16-byte aligned (``tt.divisibility``), an int equal to 1 becomes a constexpr, an int divisible by 16
gets ``tt.divisibility``. ``cuobjdump`` ships in the triton wheel (``triton/backends/nvidia/bin``).

Results are cached as JSON under ``$PEFTFX_AOT_CACHE`` (default ``~/.cache/peftfx/aot``), keyed by the
kernel's ``cache_key`` (its source and every jit function it calls), the signature, constexprs,
options, target and Triton version: editing a kernel invalidates exactly its entries.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import triton

__all__ = ["TARGETS", "TargetSpec", "KernelResources", "compile_resources", "compile_key", "specialize", "cache_dir",
           "cuda_tool"]


@dataclass(frozen=True)
class TargetSpec:
    """A CUDA compile target and its launch limits."""

    name: str          # "sm_80"
    arch: int          # 80
    shared_limit: int  # opt-in max shared memory per block, bytes
    sms: int           # streaming multiprocessors of the reference part (A100 / H100-H200)


TARGETS = {
    "sm_80": TargetSpec("sm_80", 80, 166912, 108),  # A100: 163 KB opt-in
    "sm_90": TargetSpec("sm_90", 90, 232448, 132),  # H100/H200: 227 KB opt-in
}


@dataclass(frozen=True)
class KernelResources:
    """What one compiled kernel needs from the GPU (see the module docstring)."""

    shared_bytes: int
    registers: int
    spill_bytes: int
    mma: str
    loop_instructions: int
    loop_mma: int
    compile_s: float
    triton_version: str

    def fits(self, target: TargetSpec) -> bool:
        return self.shared_bytes <= target.shared_limit


def cache_dir() -> Path:
    return Path(os.environ.get("PEFTFX_AOT_CACHE", Path.home() / ".cache" / "peftfx" / "aot"))


def cuda_tool(name: str) -> str:
    """Path of a CUDA binary (``cuobjdump``, ``ptxas``) shipped in the triton wheel."""
    from triton.backends.nvidia import compiler as nv

    path = Path(nv.__file__).parent / "bin" / name
    if not path.exists():
        raise FileNotFoundError(f"{name} not found at {path}; this triton wheel ships no CUDA tools")
    return str(path)


def specialize(fn, *, pointers: dict[str, str], ints: dict[str, int], floats: dict[str, str] | None = None,
               constexprs: dict[str, object]) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) for ``ASTSource`` as a launch with these arguments would build them.

    ``pointers`` maps pointer args to element types (``"bf16"``, ``"u8"``...), ``ints`` int args to a
    sample value, ``floats`` float args to their type; every argument of ``fn`` must be named once.
    """
    floats = floats or {}
    sig: dict[str, str] = {}
    consts = dict(constexprs)
    attrs: dict[tuple, list] = {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in pointers:
            sig[name] = "*" + pointers[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in ints:
            value = int(ints[name])
            if value == 1:
                sig[name] = "constexpr"
                consts[name] = 1
            else:
                sig[name] = "i32"
                if value % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in floats:
            sig[name] = floats[name]
        else:
            raise ValueError(f"{fn.__name__}: argument {name!r} has no type")
    return sig, consts, attrs


def _key(fn, sig, consts, attrs, options, target: TargetSpec) -> str:
    text = json.dumps([fn.cache_key, sig, sorted((k, repr(v)) for k, v in consts.items()),
                       sorted((repr(k), v) for k, v in attrs.items()), sorted(options.items()), target.name,
                       triton.__version__], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


_RES = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:\d+\s+LOCAL:(\d+)")
_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


def hottest_loop(sass: str) -> tuple[int, int]:
    """(instructions, MMA instructions) in the longest loop of ``sass`` (cuobjdump -sass text)."""
    instrs = [(int(a, 16), op, rest) for a, _, op, rest in _INSTR.findall(sass)]
    best = (0, 0)
    for addr, op, rest in instrs:
        if op.startswith("BRA"):
            m = re.search(r"0x([0-9a-f]+)", rest)
            if m and int(m.group(1), 16) < addr:
                body = [o for a, o, _ in instrs if int(m.group(1), 16) <= a <= addr]
                n_mma = sum(o.split(".")[0] in ("HMMA", "HGMMA", "IMMA", "IGMMA") for o in body)
                best = max(best, (len(body), n_mma))
    return best


def _inspect(compiled, elapsed: float) -> KernelResources:
    ptx = compiled.asm["ptx"]
    mma = "wgmma" if "wgmma.mma_async" in ptx else "mma" if re.search(r"\bmma\.sync", ptx) else ""
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        res = subprocess.run([cuda_tool("cuobjdump"), "-res-usage", str(cubin)], capture_output=True, text=True,
                             check=True).stdout
        sass = subprocess.run([cuda_tool("cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True,
                              check=True).stdout
    m = _RES.search(res)
    if m is None:
        raise RuntimeError(f"cannot parse cuobjdump -res-usage output:\n{res}")
    loop_n, loop_mma = hottest_loop(sass)
    return KernelResources(shared_bytes=int(compiled.metadata.shared), registers=int(m.group(1)),
                           spill_bytes=int(m.group(2)) + int(m.group(3)), mma=mma, loop_instructions=loop_n,
                           loop_mma=loop_mma, compile_s=round(elapsed, 2), triton_version=triton.__version__)


def _prepare(fn, pointers, ints, constexprs, floats, num_warps, num_stages, target, enable_fp_fusion):
    while not hasattr(fn, "arg_names") or not hasattr(fn, "cache_key"):
        fn = fn.fn  # Autotuner / Heuristics wrap the JITFunction
    spec = TARGETS[target] if isinstance(target, str) else target
    sig, consts, attrs = specialize(fn, pointers=pointers, ints=ints, floats=floats, constexprs=constexprs)
    options = dict(num_warps=num_warps, num_stages=num_stages, enable_fp_fusion=enable_fp_fusion)
    return fn, spec, sig, consts, attrs, options, _key(fn, sig, consts, attrs, options, spec)


def compile_key(fn, *, pointers: dict[str, str], ints: dict[str, int], constexprs: dict[str, object],
                floats: dict[str, str] | None = None, num_warps: int = 4, num_stages: int = 3,
                target: str | TargetSpec = "sm_90", enable_fp_fusion: bool = False) -> str:
    """The key :func:`compile_resources` caches under: equal keys are one and the same compilation
    (Triton specialises ints only on ``== 1`` and divisibility by 16, so e.g. N = 4096 and 11008 agree)."""
    return _prepare(fn, pointers, ints, constexprs, floats, num_warps, num_stages, target, enable_fp_fusion)[-1]


def compile_resources(fn, *, pointers: dict[str, str], ints: dict[str, int], constexprs: dict[str, object],
                      floats: dict[str, str] | None = None, num_warps: int = 4, num_stages: int = 3,
                      target: str | TargetSpec = "sm_90", enable_fp_fusion: bool = False,
                      use_cache: bool = True, cache_only: bool = False) -> KernelResources | None:
    """Compile ``fn`` (a ``@triton.jit`` function, or an autotuned/heuristics wrapper of one) for
    ``target`` and return its :class:`KernelResources`, from the on-disk cache when present
    (``cache_only``: None instead of compiling)."""
    fn, spec, sig, consts, attrs, options, key = _prepare(fn, pointers, ints, constexprs, floats, num_warps,
                                                          num_stages, target, enable_fp_fusion)
    path = cache_dir() / f"{fn.__name__}-{key}.json"
    if use_cache and path.exists():
        return KernelResources(**json.loads(path.read_text()))
    if cache_only:
        return None
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    t0 = time.perf_counter()
    compiled = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", spec.arch, 32),
                              options=options)
    res = _inspect(compiled, time.perf_counter() - t0)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(dataclasses.asdict(res)))
    tmp.replace(path)  # atomic: a concurrent reader sees the whole entry or none
    return res
