"""The tiled CPU path (:mod:`peftfx.kernels.cpu_gemm`) against the plain oracle (:mod:`reference`)."""
from __future__ import annotations

import os
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from peftfx.errors import KernelError
from peftfx.kernels import cpu_gemm as G
from peftfx.kernels import reference as R
from peftfx.kernels import cpu_native, dtypes, quantizer
from peftfx.kernels.modules import QLoRALinear

FORMATS = ["nf4", "fp4", "int8", "int8-zeropoint", "llm-int8", "none"]


def _weight(fmt: str, n: int, k: int, bs: int, dq: bool):
    w = torch.randn(n, k) * 0.3
    if fmt == "none":
        return w
    return quantizer.quantize(w, fmt, block_size=bs, double_quant=dq and fmt in ("nf4", "fp4"))


@given(fmt=st.sampled_from(FORMATS), n=st.integers(1, 70), k_blocks=st.integers(1, 5), odd_k=st.booleans(),
       bs=st.sampled_from([16, 32, 64]), m=st.integers(1, 20), r=st.integers(1, 4), dq=st.booleans(),
       x_lora=st.booleans(), bias=st.booleans(), tile=st.sampled_from([64, 256, 1 << 18]),
       compute=st.sampled_from([None, torch.float32, torch.bfloat16]), native=st.booleans())
def test_tiled_path_matches_oracle(fmt, n, k_blocks, odd_k, bs, m, r, dq, x_lora, bias, tile, compute, native):
    """Row tiles (forward) and column tiles (backward) of any size give the oracle's numbers, filled by the
    native decoder or by PyTorch steps (``native``); without native, K that is not a whole number of blocks
    (blocks crossing rows) takes the row-chunk fallback."""
    k = k_blocks * bs + (3 if odd_k else 0)
    weight = _weight(fmt, n, k, bs, dq)
    x = torch.randn(m, k)
    xl = x * 0.5 if x_lora else None
    A, B = torch.randn(r, k) * 0.1, torch.randn(n, r) * 0.1
    b = torch.randn(n) if bias else None
    dy = torch.randn(m, n)
    old = (G.TILE_ELEMS, G.GEMM_TILE_ELEMS, G.NATIVE_GEMM_TILE_ELEMS, G.NATIVE_FP32_GEMM_TILE_ELEMS,
           os.environ.get("PEFTFX_CPU_NATIVE"))
    G.TILE_ELEMS = G.GEMM_TILE_ELEMS = G.NATIVE_GEMM_TILE_ELEMS = G.NATIVE_FP32_GEMM_TILE_ELEMS = tile
    os.environ["PEFTFX_CPU_NATIVE"] = "1" if native else "0"
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="PEFTFX_CPU_NATIVE=0")
            y = G.qlora_forward(x, weight, b, A, B, 0.7, xl, compute)
            got = G.qlora_backward(dy, x, weight, A, B, 0.7, xl, (True, True, True, True), compute)
    finally:
        G.TILE_ELEMS, G.GEMM_TILE_ELEMS, G.NATIVE_GEMM_TILE_ELEMS, G.NATIVE_FP32_GEMM_TILE_ELEMS = old[:4]
        if old[4] is None:
            os.environ.pop("PEFTFX_CPU_NATIVE", None)
        else:
            os.environ["PEFTFX_CPU_NATIVE"] = old[4]
    y_ref = R.qlora_forward_ref(x, weight, b, A, B, 0.7, xl, compute)
    want = R.qlora_backward_ref(dy, x, weight, A, B, 0.7, xl, (True, True, True, True), compute)
    # bf16 GEMMs: operands are rounded identically, sums differ by accumulation order, output by 1 bf16 ulp
    tol = dict(rtol=1e-2, atol=2e-2 * k ** 0.5) if compute == torch.bfloat16 else dict(rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(y, y_ref, **tol)
    for g, w_, name in zip(got, want, ("dx", "dx_lora", "dA", "dB")):
        assert (g is None) == (w_ is None), name
        if g is not None:
            torch.testing.assert_close(g, w_, **tol, msg=lambda s, name=name: f"{name}: {s}")


@pytest.mark.parametrize("fmt", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dequant_tile_rounds_once(fmt, dtype):
    """A tile equals deq(W) in fp32 sliced, then rounded once to the compute dtype (as bitsandbytes does)."""
    qw = quantizer.quantize(torch.randn(48, 256), fmt, block_size=64, double_quant=True)
    full = R.dequantize(qw, torch.float32)
    scales = R.decode_scales(qw)
    ws = G._Workspace(48 * 256, dtype, torch.device("cpu"))
    for r0, r1, c0, c1 in [(0, 48, 0, 256), (5, 30, 64, 192), (47, 48, 192, 256)]:
        tile = G._dequant_tile(qw, scales, r0, r1, c0, c1, dtype, ws)
        assert tile.dtype == dtype
        assert torch.equal(tile, full[r0:r1, c0:c1].to(dtype))


def test_auto_compute_dtype_follows_the_cpu(monkeypatch):
    monkeypatch.setitem(dtypes._FAST_BF16, "cpu", True)
    assert dtypes.resolve_compute_dtype("auto", "cpu") == torch.bfloat16
    assert dtypes.gemm_dtype(torch.zeros(1, dtype=torch.bfloat16)) == torch.bfloat16
    monkeypatch.setitem(dtypes._FAST_BF16, "cpu", False)
    assert dtypes.resolve_compute_dtype("auto", "cpu") is None
    assert dtypes.gemm_dtype(torch.zeros(1, dtype=torch.bfloat16)) == torch.float32  # slow bf16 units: fp32
    assert dtypes.resolve_compute_dtype("bfloat16", "cpu") == torch.bfloat16
    assert dtypes.resolve_compute_dtype(None, "cpu") is None
    assert dtypes.gemm_dtype(torch.zeros(1, dtype=torch.float16)) == torch.float32
    assert dtypes.gemm_dtype(torch.zeros(1), torch.bfloat16) == torch.bfloat16


def test_module_compute_dtype_rounds_only_the_base_product():
    torch.manual_seed(0)
    qw = quantizer.quantize(torch.randn(96, 128), "nf4", block_size=64, double_quant=True)
    x = torch.randn(32, 128, requires_grad=True)  # above GEMV_ROWS: decode shapes compute in fp32
    fp32 = QLoRALinear(qw, None, r=4, alpha=8)
    bf16 = QLoRALinear(qw, None, r=4, alpha=8, compute_dtype=torch.bfloat16)
    bf16.load_state_dict(fp32.state_dict())
    with torch.no_grad():
        fp32.lora_B.normal_()
        bf16.lora_B.copy_(fp32.lora_B)
    y32, y16 = fp32(x), bf16(x)
    assert y16.dtype == torch.float32 and bf16.compute_dtype == "bfloat16"
    assert not torch.equal(y32, y16)  # the setting is applied...
    torch.testing.assert_close(y16, y32, rtol=2e-2, atol=0.2)  # ...within bf16 rounding (|y| ~ 11) of the base GEMM
    want = R.qlora_forward_ref(x.detach(), qw, None, bf16.lora_A.detach(), bf16.lora_B.detach(), 2.0, None,
                               torch.bfloat16)
    torch.testing.assert_close(y16, want, rtol=1e-2, atol=2e-2)
    y16.sum().backward()
    assert bf16.lora_A.grad.dtype == torch.float32 and x.grad.dtype == torch.float32


def test_module_rejects_unknown_compute_dtype():
    qw = quantizer.quantize(torch.randn(16, 64), "nf4")
    with pytest.raises(KernelError, match="compute_dtype 'int8'"):
        QLoRALinear(qw, None, r=None, name="model.q", compute_dtype="int8")


def test_bad_compute_dtypes_raise_kernel_errors_naming_the_value():
    from peftfx.kernels import ops

    with pytest.raises(KernelError, match="compute_dtype 'float8'"):
        dtypes.resolve_compute_dtype("float8", "cpu")
    qw = quantizer.quantize(torch.randn(16, 64), "nf4")
    with pytest.raises(KernelError, match="layer 'model.q': compute_dtype torch.int8"):
        ops.qlora_linear(torch.randn(2, 64), qw, None, None, None, 0.0, name="model.q", compute_dtype=torch.int8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_fp32_tiles_are_capped_and_half_tiles_stay_whole(dtype, monkeypatch):
    """fp32 GEMM tiles hold at most NATIVE_FP32_GEMM_TILE_ELEMS (a fresh whole-weight fp32 tile faulted its pages
    in on every call inside a training step); bf16 tiles stay whole weights up to NATIVE_GEMM_TILE_ELEMS (AMX
    GEMMs run best on them). Forward walks row tiles, backward column tiles; both match the oracle."""
    if not cpu_native.available():
        pytest.skip("the native decoder is not built here")
    weight = _weight("nf4", 96, 256, 64, True)
    windows = []
    decode = cpu_native.decode_window
    monkeypatch.setattr(cpu_native, "decode_window",
                        lambda qw, r0, r1, c0, c1, out, **kw: windows.append((r1 - r0) * (c1 - c0)) or
                        decode(qw, r0, r1, c0, c1, out, **kw))
    monkeypatch.setattr(G, "NATIVE_FP32_GEMM_TILE_ELEMS", 96 * 64)
    x, dy = torch.randn(G.GEMV_ROWS + 4, 256), torch.randn(G.GEMV_ROWS + 4, 96)
    y, dx = G.base_forward(x, weight, dtype), G.base_backward(dy, weight, dtype)
    if dtype == torch.float32:
        assert len(windows) == 8 and max(windows) <= 96 * 64  # 4 row tiles of 24 rows, 4 column tiles of 64
    else:
        assert windows == [96 * 256, 96 * 256]
    torch.testing.assert_close(y.float(), R.base_product(x, weight, dtype).float(), rtol=1e-2, atol=0.1)
    torch.testing.assert_close(dx.float(), R.base_grad(dy, weight, dtype).float(), rtol=1e-2, atol=0.1)
