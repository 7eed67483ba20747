"""The native CPU decoder: a small C++ extension that decodes packed weights and runs decode-shaped GEMMs.

Two ops, registered as ``torch.ops.peftfx_native.*`` by ``native/decode.cpp``:

* :func:`decode_window` / :func:`dequantize` — ``deq(W)[r0:r1, c0:c1]`` for every quantized format
  (NF4/FP4 with or without double quantization, int8, int8-zeropoint, llm-int8) into fp32, bf16 or
  fp16, bit-exact against :func:`peftfx.kernels.reference.dequantize` (one fp32 product, one
  round-to-nearest-even cast);
* :func:`decode_matmul` — ``y[M, N] = x[M, K] @ deq(W).T`` in fp32 for ``M <= 16``: each packed byte
  is read once (the GEMV case of LLM decoding, where a dense fp32 weight would cost 8x the memory
  traffic). NF4/FP4 with ``M <= 8`` and ``K % 128 == 0`` (every common LLM width) decode 16 codes per
  shift + ``vpermps`` in registers and FMA them straight into M accumulators, the block scale applied
  once per 8 codes (for M >= 5 on AVX-512: to each decoded vector, two weight rows per pass), nothing
  written to memory; other formats and shapes decode L1-sized tiles and
  multiply them against every row of x. Both are within the fp32 tolerance of the oracle.

The extension is built just in time on first use by :func:`torch.utils.cpp_extension.load` (one
translation unit, light torch headers only: ~9 s of compiler CPU time (g++ -O3), 27-35 s wall at load 7-11 on the shared
2-core VM; ``<torch/extension.h>`` alone would add ~30 s), then cached in torch's extension
directory, ``TORCH_EXTENSIONS_DIR``, under a name that hashes the sources, flags and torch version, so
an edit rebuilds; torch's file lock lets parallel test workers share one build). It picks AVX-512,
AVX2 or scalar code at run time.

Fallback: when the build fails (no compiler, no ninja) or ``PEFTFX_CPU_NATIVE=0`` is set,
:func:`available` warns once and returns False, and callers run the PyTorch path, which stays the
oracle. The ``reference`` backend never calls this module.

Bad input: :func:`check_storage` raises a :class:`~peftfx.errors.KernelError` naming the layer for
non-contiguous, wrongly sized or wrongly typed storage before anything reaches C++; the C++ side checks
the same again (``TORCH_CHECK``), so no call can read out of bounds.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import threading
import warnings
from pathlib import Path
from typing import Iterator

import torch
from torch import Tensor

from peftfx.errors import KernelError
from peftfx.kernels.formats import DYNAMIC_CODE, QuantizedWeight, code_for, layer_prefix

__all__ = ["ENV_VAR", "SOURCE_DIR", "ISAS", "NATIVE_DTYPES", "MATMUL_MAX_ROWS", "available", "usable",
           "build_name", "check_storage", "decode_window", "dequantize", "decode_matmul", "isa", "force_isa"]

ENV_VAR = "PEFTFX_CPU_NATIVE"
SOURCE_DIR = Path(__file__).with_name("native")
_SOURCES = ("decode.cpp", "decode_simd.inc")
# No -ffast-math: the decode must round exactly like the oracle; -ffp-contract=off keeps a*b+c two roundings.
_CFLAGS = ("-O3", "-ffp-contract=off", "-fno-math-errno")
ISAS = ("scalar", "avx2", "avx512")
NATIVE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MATMUL_MAX_ROWS = 16
_FORMAT_IDS = {"nf4": 0, "fp4": 1, "int8": 2, "int8-zeropoint": 3, "llm-int8": 4}

_lock = threading.Lock()
_built: list[bool] = []  # [] until the first build attempt, then [ok]
_warned: set[str] = set()


def build_name() -> str:
    """Extension name: a digest of the sources, flags, torch version and source folder (a change means a rebuild).

    The folder is in the digest because torch's JIT versioner hashes the build arguments, which name it
    (``extra_include_paths``): two checkouts sharing one extension name rebuilt it in turn on every first use
    (19-33 s each, seen with several git worktrees sharing ``~/.cache/torch_extensions``)."""
    h = hashlib.sha256()
    h.update(str(SOURCE_DIR).encode())
    for src in _SOURCES:
        h.update((SOURCE_DIR / src).read_bytes())
    h.update(" ".join(_CFLAGS).encode())
    h.update(torch.__version__.encode())
    return f"peftfx_cpu_native_{h.hexdigest()[:16]}"


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _build() -> bool:
    with _lock:
        if not _built:
            try:
                from torch.utils.cpp_extension import load

                load(name=build_name(), sources=[str(SOURCE_DIR / "decode.cpp")], extra_cflags=list(_CFLAGS),
                     extra_include_paths=[str(SOURCE_DIR)], is_python_module=False, verbose=False)
                _built.append(True)
            except Exception as e:  # no compiler, no ninja, a failed compile: the PyTorch path still works
                first = (str(e).strip().splitlines() or [""])[0][:200]
                _warn_once("build", f"peftfx: the native CPU decoder could not be built ({type(e).__name__}: "
                                    f"{first}); using the PyTorch path (slower dequantize and decode). Install a "
                                    f"C++ compiler and ninja, or set {ENV_VAR}=0 to choose the PyTorch path.")
                _built.append(False)
        return _built[0]


def available() -> bool:
    """Whether the native decoder can run: not disabled by ``PEFTFX_CPU_NATIVE=0`` and built (first call builds)."""
    if os.environ.get(ENV_VAR, "").strip() == "0":
        _warn_once("disabled", f"{ENV_VAR}=0: the native CPU decoder is off; peftfx runs the PyTorch path")
        return False
    return _build()


def usable(qw: QuantizedWeight) -> bool:
    """Whether ``qw`` can be decoded natively: CPU storage and :func:`available`."""
    return qw.device.type == "cpu" and available()


def check_storage(qw: QuantizedWeight, name: str | None = None) -> None:
    """Raise :class:`KernelError` naming ``name`` unless every storage tensor of ``qw`` is contiguous and sized
    and typed as its metadata says (the native decoder reads them as flat arrays)."""
    qw.validate(name)
    for key, t in qw.tensors().items():
        if not t.is_contiguous():
            raise KernelError(f"{layer_prefix(name)}{qw.format} {key} storage is not contiguous (shape "
                              f"{list(t.shape)}, strides {list(t.stride())}); pass {key}.contiguous()")


def _storage_args(qw: QuantizedWeight) -> tuple:
    fmt = _FORMAT_IDS[qw.format]
    code = code_for(qw.format) if qw.format in ("nf4", "fp4") else DYNAMIC_CODE[:16]
    return (qw.packed, qw.scales, qw.scales2, qw.offset, code, DYNAMIC_CODE, fmt, qw.block_size, qw.block_size2,
            qw.shape[0], qw.shape[1])


def decode_window(qw: QuantizedWeight, r0: int, r1: int, c0: int, c1: int, out: Tensor, *,
                  name: str | None = None, check: bool = True) -> Tensor:
    """Write ``deq(W)[r0:r1, c0:c1]`` into ``out`` (``[r1-r0, c1-c0]``, unit column stride, a NATIVE_DTYPES
    dtype) and return it. ``check=False`` skips :func:`check_storage` (callers that checked once per call)."""
    if check:
        check_storage(qw, name)
    _ops().decode_window(*_storage_args(qw), r0, r1, c0, c1, out)
    return out


def dequantize(qw: QuantizedWeight, dtype: torch.dtype | None = None, *, name: str | None = None) -> Tensor:
    """deq(W) ``[out, in]`` in ``dtype`` (default: the weight's own); equal bit for bit to the oracle's.
    An output of 4 MiB or more is advised onto transparent huge pages before its first write."""
    dtype = dtype or qw.dtype
    if dtype not in NATIVE_DTYPES:
        raise KernelError(f"{layer_prefix(name)}native dequantize writes {list(NATIVE_DTYPES)}, not {dtype}")
    check_storage(qw, name)
    out = torch.empty(qw.shape, dtype=dtype, device=qw.device)
    _ops().advise_huge(out)  # a whole weight the caller keeps; never cpu_gemm's scratch tiles (see decode.cpp)
    return decode_window(qw, 0, qw.shape[0], 0, qw.shape[1], out, name=name, check=False)


def decode_matmul(x2: Tensor, qw: QuantizedWeight, out: Tensor | None = None, *, name: str | None = None,
                  check: bool = True) -> Tensor:
    """``x2 @ deq(W).T`` in fp32: x2 ``[M <= 16, K]`` -> ``[M, N]`` (written into ``out`` when given)."""
    if check:
        check_storage(qw, name)
    m, k = x2.shape
    if m > MATMUL_MAX_ROWS or k != qw.shape[1]:
        raise KernelError(f"{layer_prefix(name)}decode matmul takes x [M <= {MATMUL_MAX_ROWS}, {qw.shape[1]}], "
                          f"got {list(x2.shape)}")
    x2 = x2.to(torch.float32).contiguous()
    y = torch.empty(m, qw.shape[0], dtype=torch.float32, device=x2.device) if out is None else out
    _ops().decode_matmul(x2, *_storage_args(qw), y)
    return y


def isa() -> str:
    """The instruction set the native kernels use now (``"avx512"``, ``"avx2"`` or ``"scalar"``)."""
    return ISAS[_ops().set_isa(-1)]


@contextlib.contextmanager
def force_isa(level: str) -> Iterator[str]:
    """Run the native kernels with at most ``level`` (tests cover every path on one CPU); yields the ISA used."""
    ops = _ops()
    before = ops.set_isa(-1)
    try:
        yield ISAS[ops.set_isa(ISAS.index(level))]
    finally:
        ops.set_isa(before)


def _ops():
    """``torch.ops.peftfx_native``, building the extension first if needed (KernelError if it cannot run)."""
    if not (_built and _built[0]) and not available():
        raise KernelError(f"the native CPU decoder is not available ({ENV_VAR}=0 or it could not be built); "
                          f"check cpu_native.available() before calling it")
    return torch.ops.peftfx_native
