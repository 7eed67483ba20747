"""The native CPU decoder (:mod:`peftfx.kernels.cpu_native`) against the oracle (:mod:`reference`).

Every ISA the CPU has (AVX-512, AVX2, scalar) runs every case: ``force_isa`` caps the level. The build
happens once per session (torch's file lock serializes parallel workers); when it fails these tests
fail rather than skip, unless PEFTFX_CPU_NATIVE=0 asks for the PyTorch path.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from peftfx.errors import KernelError
from peftfx.kernels import cpu_gemm, cpu_native, ops, quantizer
from peftfx.kernels import reference as R
from peftfx.kernels.formats import DYNAMIC_CODE, NF4_CODE, QuantizedWeight
from peftfx.kernels.modules import QLoRALinear

FORMATS = ["nf4", "fp4", "int8", "int8-zeropoint", "llm-int8"]
BLOCK_SIZES = [16, 32, 64, 128, 256, 512, 1024, 2048, 4096]
BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module", autouse=True)
def native():
    if os.environ.get(cpu_native.ENV_VAR, "").strip() == "0":
        pytest.skip(f"{cpu_native.ENV_VAR}=0: the native decoder is switched off")
    assert cpu_native.available(), "the native CPU decoder did not build (see the warning above)"


def _isas() -> list[str]:
    with cpu_native.force_isa("avx512") as best:
        return list(cpu_native.ISAS[: cpu_native.ISAS.index(best) + 1])


def _quantized(fmt: str, n: int, k: int, bs: int, dq: bool, bs2: int = 256, scale: float = 1.0):
    w = torch.randn(n, k) * scale
    return quantizer.quantize(w, fmt, block_size=bs, double_quant=dq and fmt in ("nf4", "fp4"), block_size2=bs2)


def assert_bits_equal(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape, what
    diff = got.view(BITS[got.dtype]) != want.view(BITS[want.dtype])
    assert not bool(diff.any()), f"{what}: {int(diff.sum())} values differ, first at {diff.nonzero()[0].tolist()}"


def fp32_close(got: torch.Tensor, want: torch.Tensor) -> None:
    """The fp32 row of the kernel tolerance table (test_qlora_triton): same math in another summation order."""
    scale = max(1.0, float(want.abs().max())) if want.numel() else 1.0
    torch.testing.assert_close(got, want, atol=1e-4 * scale, rtol=1e-4)


# --------------------------------------------------------------------------------------- bit-exact
def test_every_format_block_size_and_double_quant_is_bit_exact():
    """Every format x block size 16..4096 x double quant, with a partial last block and odd K."""
    for fmt in FORMATS:
        for bs in BLOCK_SIZES:
            for dq in ([False, True] if fmt in ("nf4", "fp4") else [False]):
                qw = _quantized(fmt, 3, bs + 7, bs, dq, bs2=16)
                for dtype in BITS:
                    want = R.dequantize(qw, dtype)
                    for isa in _isas():
                        with cpu_native.force_isa(isa):
                            assert_bits_equal(cpu_native.dequantize(qw, dtype), want, f"{fmt} bs={bs} dq={dq} "
                                                                                      f"{dtype} {isa}")


@settings(max_examples=120, deadline=None)
@given(fmt=st.sampled_from(FORMATS), bs=st.sampled_from(BLOCK_SIZES), dq=st.booleans(),
       bs2=st.sampled_from([16, 32, 256]), n=st.integers(1, 9), data=st.data())
def test_windows_are_bit_exact(fmt, bs, dq, bs2, n, data):
    """Any window deq(W)[r0:r1, c0:c1] (odd starts, every tail) into a strided output equals the oracle's."""
    k = data.draw(st.integers(1, min(2500, max(40, 3 * bs // n))), label="k")
    qw = _quantized(fmt, n, k, bs, dq, bs2)
    r0 = data.draw(st.integers(0, n - 1), label="r0")
    r1 = data.draw(st.integers(r0 + 1, n), label="r1")
    c0 = data.draw(st.integers(0, k - 1), label="c0")
    c1 = data.draw(st.integers(c0 + 1, k), label="c1")
    pad = data.draw(st.integers(0, 5), label="row padding")
    for dtype in BITS:
        want = R.dequantize(qw, dtype)[r0:r1, c0:c1]
        for isa in _isas():
            buf = torch.full((r1 - r0, c1 - c0 + pad), 7.0, dtype=dtype)
            out = buf[:, : c1 - c0]
            with cpu_native.force_isa(isa):
                cpu_native.decode_window(qw, r0, r1, c0, c1, out)
            assert_bits_equal(out.contiguous(), want, f"{fmt} bs={bs} {dtype} {isa}")
            assert bool((buf[:, c1 - c0:] == 7).all()), "wrote outside the window"


@pytest.mark.parametrize("fmt", ["nf4", "fp4"])
def test_tiny_scales_round_denormals_like_torch(fmt):
    """Products in the fp32 denormal range round to bf16/fp16 as torch's casts do (no flush to zero)."""
    qw = _quantized(fmt, 8, 96, 32, False, scale=3e-38)
    assert bool((R.dequantize(qw, torch.float32).abs() < 1.1754944e-38).any())
    for dtype in BITS:
        for isa in _isas():
            with cpu_native.force_isa(isa):
                assert_bits_equal(cpu_native.dequantize(qw, dtype), R.dequantize(qw, dtype), f"{dtype} {isa}")


@pytest.mark.parametrize("fmt", ["int8", "int8-zeropoint"])
def test_exact_ties_round_half_to_even(fmt):
    """Scales 1 + 2**-8 and 1 + 2**-11 make q * scale land exactly halfway between two bf16 / fp16
    values (random data almost never does): both must round to even, as torch's casts do."""
    n, bs = 64 * 32, 32
    gen = torch.Generator().manual_seed(1)
    ties = torch.tensor([1 + 2 ** -8, 1 + 2 ** -11, 3 * 2 ** -9 + 2 ** -17, -(1 + 2 ** -8)])
    scales = ties[torch.randint(0, 4, (n // bs,), generator=gen)].contiguous()
    if fmt == "int8":
        packed = torch.randint(-127, 128, (n,), dtype=torch.int8, generator=gen)
        qw = QuantizedWeight(fmt, packed, scales, None, None, (64, 32), bs)
    else:
        packed = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=gen)
        zero = torch.randint(0, 256, (n // bs,), generator=gen).float()
        qw = QuantizedWeight(fmt, packed, scales, None, zero, (64, 32), bs)
    for dtype in BITS:
        want = R.dequantize(qw, dtype)
        for isa in _isas():
            with cpu_native.force_isa(isa):
                assert_bits_equal(cpu_native.dequantize(qw, dtype), want, f"{dtype} {isa}")


# ------------------------------------------------------------------------------------------ matmul
@settings(max_examples=60, deadline=None)
@given(fmt=st.sampled_from(FORMATS), bs=st.sampled_from([16, 64, 256, 4096]), dq=st.booleans(),
       n=st.integers(1, 21), k=st.integers(1, 1100), m=st.integers(1, 16))
def test_decode_matmul_within_fp32_tolerance(fmt, bs, dq, n, k, m):
    """y = x @ deq(W).T for M <= 16, any N (partial row groups) and K (partial chunks, odd K)."""
    qw = _quantized(fmt, n, k, bs, dq, bs2=16)
    x = torch.randn(m, k)
    want = x @ R.dequantize(qw, torch.float32).t()
    for isa in _isas():
        with cpu_native.force_isa(isa):
            fp32_close(cpu_native.decode_matmul(x, qw), want)
            y = torch.full((m, n + 3), 5.0)
            cpu_native.decode_matmul(x, qw, out=y[:, 1: n + 1])  # a column slice with a longer row stride
            fp32_close(y[:, 1: n + 1], want)
            assert bool((y[:, 0] == 5).all() and (y[:, n + 1:] == 5).all()), "wrote outside y's slice"


@settings(max_examples=40, deadline=None)
@given(fmt=st.sampled_from(["nf4", "fp4"]), bs=st.sampled_from(BLOCK_SIZES), dq=st.booleans(),
       bs2=st.sampled_from([16, 32, 256]), n=st.integers(1, 19), chunks=st.integers(1, 5), m=st.integers(1, 9),
       x_dtype=st.sampled_from(list(cpu_native.NATIVE_DTYPES)))
def test_fused_4bit_matmul_within_fp32_tolerance(fmt, bs, dq, bs2, n, chunks, m, x_dtype):
    """The register-decoding 4-bit GEMV (K % 128 == 0, M <= 8; M = 9 takes the tile path): every block size,
    blocks spanning rows (bs > K), double quant with scales2 blocks that do and do not align with a
    vector of blocks, odd N (a short last row group), fp32/bf16/fp16 x."""
    k = 128 * chunks
    qw = _quantized(fmt, n, k, bs, dq, bs2=bs2)
    x = torch.randn(m, k).to(x_dtype)
    want = x.float() @ R.dequantize(qw, torch.float32).t()
    for isa in _isas():
        with cpu_native.force_isa(isa):
            y = torch.full((m, n + 2), 5.0)
            cpu_native.decode_matmul(x, qw, out=y[:, 1: n + 1])
            fp32_close(y[:, 1: n + 1], want)
            assert bool((y[:, 0] == 5).all() and (y[:, n + 1] == 5).all()), "wrote outside y's slice"


@pytest.mark.parametrize("m", [3, 5, 8])
def test_fused_4bit_matmul_long_rows(m):
    """K > 8192 runs the fused GEMV in two K passes that accumulate into y (M = 3: per-chunk scale
    accumulators; M = 5, 8: scaled weights, two weight rows per pass, an odd N)."""
    qw = _quantized("nf4", 9, 8192 + 384, 64, True)
    x = torch.randn(m, 8192 + 384)
    want = x @ R.dequantize(qw, torch.float32).t()
    for isa in _isas():
        with cpu_native.force_isa(isa):
            fp32_close(cpu_native.decode_matmul(x, qw), want)


# ------------------------------------------------------------------------------------------- wiring
def _counting(monkeypatch) -> dict[str, int]:
    calls = {"decode_window": 0, "decode_matmul": 0}
    for fn in calls:
        real = getattr(cpu_native, fn)

        def wrapped(*a, _real=real, _fn=fn, **kw):
            calls[_fn] += 1
            return _real(*a, **kw)

        monkeypatch.setattr(cpu_native, fn, wrapped)
    return calls


@pytest.mark.parametrize("fmt", FORMATS)
def test_cpu_backend_runs_native_and_matches_the_oracle(fmt, monkeypatch):
    monkeypatch.setenv("PEFTFX_KERNELS", "cpu")
    calls = _counting(monkeypatch)
    qw = _quantized(fmt, 40, 96, 32, True)
    A, B = torch.randn(4, 96) * 0.1, torch.randn(40, 4) * 0.1
    for dtype in BITS:
        assert_bits_equal(ops.dequantize(qw, dtype), R.dequantize(qw, dtype), f"peftfx::dequantize {dtype}")
    for m in (1, 5, 40):  # decode-shaped (native matmul) and tiled (native tiles)
        x = torch.randn(m, 96, requires_grad=True)
        a = A.clone().requires_grad_()
        y = ops.qlora_linear(x, qw, None, a, B, 0.5)
        fp32_close(y, R.qlora_forward_ref(x.detach(), qw, None, A, B, 0.5))
        y.sum().backward()
        dx, _, dA, _ = R.qlora_backward_ref(torch.ones_like(y), x.detach(), qw, A, B, 0.5)
        fp32_close(x.grad, dx)
        fp32_close(a.grad, dA)
    assert calls["decode_window"] >= 3
    assert calls["decode_matmul"] >= (1 if fmt != "llm-int8" else 0)  # LLM.int8 forward quantizes x: oracle


@pytest.mark.parametrize("dtype", list(BITS))
def test_cpu_gemm_tiles_round_once_natively(dtype):
    """The tiled path's bf16/fp16 GEMM operand is deq(W) in fp32 rounded once, like the oracle's cast."""
    qw = _quantized("nf4", 48, 200, 64, True)  # K not a multiple of the block: blocks cross rows
    x = torch.randn(20, 200)
    want = x.to(dtype).float() @ R.dequantize(qw, torch.float32).to(dtype).float().t()
    got = cpu_gemm.base_forward(x, qw, dtype).float()
    torch.testing.assert_close(got, want, rtol=1e-2, atol=2e-2 * 200 ** 0.5)


def _huge_page_advised(t: torch.Tensor) -> bool:
    """Whether the mapping holding ``t``'s middle byte carries MADV_HUGEPAGE (``hg`` in /proc/self/smaps); the
    advice covers the 2 MiB-aligned pages inside the tensor, so its head may sit in a mapping of its own."""
    addr, inside = t.data_ptr() + t.numel() * t.element_size() // 2, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:
            lo, hi = (int(v, 16) for v in head.split("-"))
            inside = lo <= addr < hi
        elif inside and head == "VmFlags:":
            return "hg" in line.split()[1:]
    raise AssertionError("no mapping holds the tensor")


@pytest.mark.skipif(not Path("/proc/self/smaps").exists() or not Path("/sys/kernel/mm/transparent_hugepage").exists(),
                    reason="needs Linux /proc/self/smaps and a kernel with transparent huge pages")
def test_huge_page_advice_only_for_a_whole_dequantized_weight():
    """``dequantize``'s fresh output (a weight the caller keeps) is advised onto huge pages; a window written
    into a caller's buffer (cpu_gemm's scratch tiles in malloc's reused heap) never is: advice sticks to the
    range and made later faults there stall."""
    qw = QuantizedWeight("nf4", torch.randint(0, 256, (4096 * 2048,), dtype=torch.uint8),
                         torch.rand(4096 * 4096 // 64) + 0.5, None, None, (4096, 4096), 64)  # random codes, 64 MiB out
    assert _huge_page_advised(cpu_native.dequantize(qw, torch.float32))
    tile = torch.empty(4096, 4096)  # 64 MiB: above malloc's largest mmap threshold, a mapping of its own
    cpu_native.decode_window(qw, 0, 4096, 0, 4096, tile)
    assert not _huge_page_advised(tile)
    with pytest.raises(RuntimeError, match="contiguous"):
        torch.ops.peftfx_native.advise_huge(tile.t())


def test_reference_backend_never_calls_native(monkeypatch):
    monkeypatch.setenv("PEFTFX_KERNELS", "reference")

    def boom(*a, **kw):
        raise AssertionError("the reference backend called the native decoder")

    for fn in ("decode_window", "decode_matmul", "dequantize"):
        monkeypatch.setattr(cpu_native, fn, boom)
    qw = _quantized("nf4", 16, 64, 64, True)
    x = torch.randn(2, 64, requires_grad=True)
    ops.qlora_linear(x, qw, None, None, None, 0.0).sum().backward()
    assert_bits_equal(ops.dequantize(qw, torch.float32), R.dequantize(qw, torch.float32), "reference dequantize")


# ---------------------------------------------------------------------------------------- bad input
def test_non_contiguous_or_wrongly_sized_storage_raises_naming_the_layer(monkeypatch):
    monkeypatch.setenv("PEFTFX_KERNELS", "cpu")
    qw = _quantized("nf4", 16, 64, 64, False)
    x = torch.randn(2, 64)
    strided = qw.packed.repeat_interleave(2)[::2]  # same values, stride 2
    bad = QuantizedWeight(**{**qw.__dict__, "packed": strided})
    with pytest.raises(KernelError, match="layer 'model.q_proj'.*packed storage is not contiguous"):
        ops.qlora_linear(x, bad, None, None, None, 0.0, name="model.q_proj")
    with pytest.raises(KernelError, match="layer 'model.q_proj'.*not contiguous"):
        ops.dequantize(bad, torch.float32, name="model.q_proj")
    with pytest.raises(KernelError, match="not contiguous"):
        cpu_native.decode_matmul(x, bad)
    short = QuantizedWeight(**{**qw.__dict__, "packed": qw.packed[:-1]})
    with pytest.raises(KernelError, match="layer 'model.k_proj'.*packed weight has 511 elements"):
        ops.qlora_linear(x, short, None, None, None, 0.0, name="model.k_proj")
    layer = QLoRALinear(qw, None, r=None, name="model.o_proj")
    layer.weight = strided
    with pytest.raises(KernelError, match="layer 'model.o_proj'.*packed storage is not contiguous"):
        layer(x)
    few = QuantizedWeight(**{**qw.__dict__, "scales": qw.scales[:-1]})
    with pytest.raises(KernelError, match="layer 'model.v_proj'.*scales length"):
        ops.dequantize(few, torch.float32, name="model.v_proj")


def test_cpp_guards_reject_what_python_would_have_caught():
    """Called directly, the C++ ops check sizes, contiguity and windows themselves (TORCH_CHECK), never
    reading out of bounds."""
    qw = _quantized("nf4", 16, 64, 64, True)
    code, dyn = NF4_CODE, DYNAMIC_CODE
    op = torch.ops.peftfx_native
    args = [qw.packed, qw.scales, qw.scales2, qw.offset, code, dyn, 0, 64, 256, 16, 64]
    out = torch.empty(16, 64)
    op.decode_window(*args, 0, 16, 0, 64, out)
    assert_bits_equal(out, R.dequantize(qw, torch.float32), "direct call")
    cases = {
        "packed has": [qw.packed[:-8], *args[1:]],
        "contiguous": [qw.packed.repeat_interleave(2)[::2], *args[1:]],
        "scales has": [qw.packed, qw.scales[:-1], *args[2:]],
        "scales2": [*args[:2], qw.scales2[:0], *args[3:]],
        "codebook": [*args[:4], code[:8], *args[5:]],
        "block size": [*args[:7], 24, *args[8:]],
    }
    for msg, bad in cases.items():
        with pytest.raises(RuntimeError, match=msg):
            op.decode_window(*bad, 0, 16, 0, 64, out)
    with pytest.raises(RuntimeError, match="outside"):
        op.decode_window(*args, 0, 17, 0, 64, torch.empty(17, 64))
    with pytest.raises(RuntimeError, match="out must be"):
        op.decode_window(*args, 0, 16, 0, 64, torch.empty(16, 63))
    with pytest.raises(RuntimeError, match="x must be"):
        op.decode_matmul(torch.randn(17, 64), *args, torch.empty(17, 16))


# ----------------------------------------------------------------------------------------- fallback
_FALLBACK_SCRIPT = textwrap.dedent("""
    import json, warnings
    import torch
    warnings.simplefilter("always")
    with warnings.catch_warnings(record=True) as caught:
        from peftfx.kernels import cpu_native, ops, quantizer, reference as R
        qw = quantizer.quantize(torch.randn(24, 80), "nf4", block_size=16, double_quant=True)
        same = all(torch.equal(ops.dequantize(qw, d), R.dequantize(qw, d))
                   for d in (torch.float32, torch.bfloat16, torch.float32))
        x = torch.randn(3, 80)
        close = all(torch.allclose(ops.qlora_linear(x[:m], qw, None, None, None, 0.0),
                                   x[:m] @ R.dequantize(qw, torch.float32).t(), atol=1e-4) for m in (1, 3))
        avail = cpu_native.available()
    ours = [str(w.message) for w in caught if "native CPU decoder" in str(w.message)]
    print(json.dumps({"warnings": ours, "same": same, "close": close, "available": avail}))
""")


def _run_fallback(env_extra: dict[str, str], tmp_path) -> dict:
    env = {**os.environ, "PEFTFX_KERNELS": "cpu", "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext"), **env_extra}
    res = subprocess.run([sys.executable, "-c", _FALLBACK_SCRIPT], env=env, cwd=tmp_path, capture_output=True,
                         text=True, timeout=300, check=False)  # the assert below shows stderr
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_fallback_when_switched_off_warns_once_and_matches(tmp_path):
    got = _run_fallback({cpu_native.ENV_VAR: "0"}, tmp_path)
    assert not got["available"] and got["same"] and got["close"]
    assert len(got["warnings"]) == 1 and "PEFTFX_CPU_NATIVE=0" in got["warnings"][0]
    assert not (tmp_path / "ext").exists(), "switched off, yet it tried to build"


def test_fallback_without_a_compiler_warns_once_and_matches(tmp_path):
    missing = str(tmp_path / "no-such-compiler")
    got = _run_fallback({"CXX": missing, "CC": missing}, tmp_path)
    assert not got["available"] and got["same"] and got["close"]
    assert len(got["warnings"]) == 1 and "could not be built" in got["warnings"][0], got["warnings"]


def test_non_finite_scales_decode_to_the_same_non_finite_values():
    """Corrupted storage (NaN/Inf scales) decodes as the oracle does: Inf bit for bit, NaN as NaN (torch's
    own bf16 cast writes 0xFFFF or 0x7FC0 for NaN depending on the code path, so payloads are not compared)."""
    qw = QuantizedWeight("int8", torch.randint(-127, 128, (4 * 64,), dtype=torch.int8),
                         torch.tensor([1.0, float("nan"), float("inf"), -2.5]), None, None, (4, 64), 64)
    for dtype in BITS:
        want = R.dequantize(qw, dtype)
        for isa in _isas():
            with cpu_native.force_isa(isa):
                got = cpu_native.dequantize(qw, dtype)
            assert torch.equal(got.isnan(), want.isnan()), f"{dtype} {isa}"
            keep = ~want.isnan()
            assert_bits_equal(got[keep], want[keep], f"{dtype} {isa}")
