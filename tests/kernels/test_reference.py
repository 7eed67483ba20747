from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from peftfx.errors import KernelError
from peftfx.kernels import reference as R
from peftfx.kernels import quantizer
from peftfx.kernels.formats import FP4_CODE, NF4_CODE

SHAPES = [(33, 47), (64, 64), (7, 300), (1, 3)]


# ------------------------------------------------------------------------- bitsandbytes byte identity
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("block_size", [32, 64, 128, 256])
@pytest.mark.parametrize("fmt", ["nf4", "fp4"])
@pytest.mark.parametrize("dq", [False, True])
def test_4bit_byte_identical_to_bitsandbytes(shape, block_size, fmt, dq):
    bnbF = pytest.importorskip("bitsandbytes.functional")
    w = torch.randn(shape) * 2
    packed, state = bnbF.quantize_4bit(w, blocksize=block_size, quant_type=fmt, compress_statistics=dq)
    qw = quantizer.quantize(w, fmt, block_size=block_size, double_quant=dq)
    assert torch.equal(packed.reshape(-1), qw.packed)
    assert torch.equal(state.absmax, qw.scales)
    if dq:
        assert torch.equal(state.state2.absmax, qw.scales2)
        assert torch.equal(state.offset, qw.offset)
    if shape[1] % block_size == 0:  # bnb's CPU dequant assumes blocks do not cross rows
        assert torch.equal(bnbF.dequantize_4bit(packed, state), R.dequantize(qw))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_4bit_half_input_byte_identical(dtype):
    bnbF = pytest.importorskip("bitsandbytes.functional")
    w = torch.randn(48, 64, dtype=dtype)
    packed, state = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    qw = quantizer.quantize(w, "nf4", block_size=64, double_quant=True)
    assert torch.equal(packed.reshape(-1), qw.packed) and torch.equal(state.state2.absmax, qw.scales2)
    assert torch.equal(bnbF.dequantize_4bit(packed, state), R.dequantize(qw))


def test_double_quant_ties_near_lut_bins():
    """Values that straddle dynamic-map midpoints follow bitsandbytes' 65536-bin LUT, not exact nearest."""
    bnbF = pytest.importorskip("bitsandbytes.functional")
    x = torch.randn(256 * 40).clamp(-1, 1)
    x[::256] = 1.0
    q, state = bnbF.quantize_blockwise(x, blocksize=256)
    codes, am = quantizer.quantize_blockwise_8bit(x, 256)
    assert torch.equal(q, codes) and torch.equal(state.absmax, am)


# ------------------------------------------------------------------------------------- error bounds
def test_nf4_error_on_gaussian():
    w = torch.randn(1024, 1024)
    qw = quantizer.quantize(w, "nf4", block_size=64)
    err = (R.dequantize(qw) - w).abs()
    assert err.mean() <= 0.07332
    absmax = w.reshape(-1, 64).abs().amax(1, keepdim=True)
    # 0.1519 is the rounded half-gap between -1 and -0.6962 (exactly 0.15190205...).
    half_gap = 0.5 * _max_gap(NF4_CODE)
    assert half_gap == pytest.approx(0.1519, abs=1e-5)
    assert bool((err.reshape(-1, 64) <= half_gap * absmax * (1 + 1e-6)).all())


def _max_gap(code):
    c = code.sort().values
    return (c[1:] - c[:-1]).max().item()


weights = st.tuples(st.integers(1, 12), st.integers(1, 70), st.sampled_from([16, 32, 64]),
                    st.floats(1e-3, 1e3), st.integers(0, 2**31 - 1))


def _make(rows, cols, scale, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g) * scale


def _per_element_scale(values, n, bs):
    return values.repeat_interleave(bs)[:n]


@given(weights, st.sampled_from(["nf4", "fp4"]), st.booleans())
def test_4bit_error_bound(spec, fmt, dq):
    rows, cols, bs, scale, seed = spec
    w = _make(rows, cols, scale, seed)
    qw = quantizer.quantize(w, fmt, block_size=bs, double_quant=dq)
    err = (R.dequantize(qw) - w).abs().reshape(-1)
    absmax = _per_element_scale(R.decode_scales(qw), w.numel(), bs)
    bound = 0.5 * _max_gap(NF4_CODE if fmt == "nf4" else FP4_CODE) * absmax
    if dq:  # the absmax itself is 8-bit quantized: allow its error on top
        true_absmax = _per_element_scale(quantizer.quantize(w, fmt, block_size=bs).scales, w.numel(), bs)
        bound = 0.5 * _max_gap(NF4_CODE if fmt == "nf4" else FP4_CODE) * true_absmax + (absmax - true_absmax).abs()
    assert bool((err <= bound * (1 + 1e-5) + 1e-30).all())


@given(weights)
def test_int8_error_bound(spec):
    rows, cols, bs, scale, seed = spec
    w = _make(rows, cols, scale, seed)
    qw = quantizer.quantize(w, "int8", block_size=bs)
    err = (R.dequantize(qw) - w).abs().reshape(-1)
    assert bool((err <= 0.5 * _per_element_scale(qw.scales, w.numel(), bs) * (1 + 1e-5) + 1e-30).all())


@given(weights, st.floats(-5, 5))
def test_int8_zeropoint_error_bound(spec, shift):
    rows, cols, bs, scale, seed = spec
    w = _make(rows, cols, scale, seed) + shift * scale
    qw = quantizer.quantize(w, "int8-zeropoint", block_size=bs)
    err = (R.dequantize(qw) - w).abs().reshape(-1)
    s = _per_element_scale(qw.scales, w.numel(), bs)
    assert bool((err <= 0.5 * s * (1 + 1e-4) + 1e-30).all())


@given(weights)
def test_llm_int8_weight_error_bound(spec):
    rows, cols, _, scale, seed = spec
    w = _make(rows, cols, scale, seed)
    qw = quantizer.quantize(w, "llm-int8")
    err = (R.dequantize(qw) - w).abs()
    assert bool((err <= 0.5 * (qw.scales / 127).view(-1, 1) * (1 + 1e-5) + 1e-30).all())


FMTS = ["nf4", "fp4", "int8", "int8-zeropoint", "llm-int8"]


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("dq", [False, True])
def test_zero_block_is_exact_zero(fmt, dq):
    w = torch.randn(4, 48)
    w[1] = 0.0
    w[3, 16:] = 0.0  # the partial last block (n=192, bs=... ) and a full block
    qw = quantizer.quantize(w, fmt, block_size=16, double_quant=dq)
    out = R.dequantize(qw)
    assert bool((out[1] == 0).all()) and bool((out[3, 16:] == 0).all())


@given(weights, st.sampled_from(FMTS))
def test_requantize_is_idempotent(spec, fmt):
    # Without double quant: a dequantized weight is a fixed point (up to one fp32 ulp of the scale).
    # With it, the re-quantized absmax vector has a new mean, so the 8-bit statistics shift.
    rows, cols, bs, scale, seed = spec
    w = _make(rows, cols, scale, seed)
    d1 = R.dequantize(quantizer.quantize(w, fmt, block_size=bs))
    d2 = R.dequantize(quantizer.quantize(d1, fmt, block_size=bs))
    torch.testing.assert_close(d2, d1, rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dequantize_dtype(dtype):
    w = torch.randn(9, 70).to(dtype)
    qw = quantizer.quantize(w, "nf4", block_size=32)
    out = R.dequantize(qw)
    assert out.dtype == dtype
    assert torch.equal(out, R.dequantize(qw, torch.float32).to(dtype))


def test_chunked_dequant_matches_whole(monkeypatch):
    w = torch.randn(37, 96)
    for fmt in FMTS:
        qw = quantizer.quantize(w, fmt, block_size=64, double_quant=fmt == "nf4")
        whole = R.dequantize(qw, torch.float32)
        rows = [c for _, _, c in R.iter_dequantized_rows(qw, max_elems=300)]
        assert len(rows) > 1 and torch.equal(torch.cat(rows), whole)
    qw = quantizer.quantize(torch.randn(33, 47), "fp4", block_size=16)  # odd numel: a padded last nibble
    big_chunks = R.dequantize(qw)
    monkeypatch.setattr(R, "_DEQ_CHUNK_BYTES", 64)
    assert torch.equal(R.dequantize(qw), big_chunks)
    assert torch.equal(R.dequantize(qw, torch.bfloat16), big_chunks.bfloat16())


# ------------------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("w,kwargs,match", [
    (torch.tensor([[1.0, float("nan")]]), {}, "NaN/Inf"),
    (torch.tensor([[1.0, float("inf")]]), {}, "NaN/Inf"),
    (torch.randn(4, 4, 4), {}, "2-D"),
    (torch.randn(8, 8), {"block_size": 48}, "block size 48"),
    (torch.randn(8, 8), {"block_size": 8}, "block size 8"),
    (torch.randn(8, 8), {"format": "nf5"}, "unknown quantization format 'nf5'"),
    (torch.randn(8, 8), {"format": "none"}, "unknown quantization format 'none'"),
    (torch.randint(0, 3, (8, 8)), {}, "floating point"),
])
def test_quantize_errors_name_the_layer(w, kwargs, match):
    kwargs = {"format": "nf4", **kwargs}
    with pytest.raises(KernelError, match=match) as info:
        quantizer.quantize(w, kwargs.pop("format"), name="model.layers.0.q_proj", **kwargs)
    assert "model.layers.0.q_proj" in str(info.value)


# ------------------------------------------------------------------------------ fused reference math
def _naive(x, w_deq, bias, A, B, s, xl):
    y = F.linear(x, w_deq, bias)
    return y + s * F.linear(F.linear(xl, A), B)


@pytest.mark.parametrize("fmt", ["none"] + FMTS)
@pytest.mark.parametrize("with_x_lora", [False, True])
def test_fused_reference_matches_autograd(fmt, with_x_lora):
    w = torch.randn(24, 40) * 0.5
    weight = w if fmt == "none" else quantizer.quantize(w, fmt, block_size=16, double_quant=fmt == "fp4")
    w_deq = w if fmt == "none" else R.dequantize(weight)
    bias = torch.randn(24)
    x = torch.randn(2, 3, 40, requires_grad=True)
    xl = (x.detach() * 0.7).requires_grad_() if with_x_lora else None
    A = torch.randn(4, 40, requires_grad=True)
    B = torch.randn(24, 4, requires_grad=True)
    y = R.qlora_forward_ref(x, weight, bias, A, B, 1.5, xl)
    y_naive = _naive(x, w_deq, bias, A, B, 1.5, x if xl is None else xl)
    tol = dict(rtol=2e-2, atol=5e-2) if fmt == "llm-int8" else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y, y_naive, **tol)
    dy = torch.randn_like(y_naive)
    y_naive.backward(dy)
    dx, dxl, dA, dB = R.qlora_backward_ref(dy, x.detach(), weight, A.detach(), B.detach(), 1.5,
                                            None if xl is None else xl.detach())
    torch.testing.assert_close(dx, x.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dA, A.grad, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(dB, B.grad, rtol=1e-5, atol=1e-4)
    if xl is None:
        assert dxl is None
    else:
        torch.testing.assert_close(dxl, xl.grad, rtol=1e-5, atol=1e-5)


def test_llm_int8_outlier_columns_in_high_precision():
    w = torch.randn(16, 32)
    qw = quantizer.quantize(w, "llm-int8", threshold=6.0)
    x = torch.randn(5, 32) * 0.5
    x[:, 3] = 40.0  # an outlier feature: its column goes through fp32 on deq(W)
    y = R.llm_int8_matmul(x, qw)
    exact = x @ R.dequantize(qw).t()
    no_decomp = R.llm_int8_matmul(x, quantizer.quantize(w, "llm-int8", threshold=0.0))
    assert (y - exact).abs().max() < (no_decomp - exact).abs().max()
    torch.testing.assert_close(y, exact, rtol=0.02, atol=0.1)


def test_half_inputs_compute_in_fp32():
    w = torch.randn(24, 40)
    qw = quantizer.quantize(w, "nf4", block_size=32)
    x = torch.randn(3, 40)
    y16 = R.qlora_forward_ref(x.bfloat16(), qw, None, None, None, 0.0)
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), R.qlora_forward_ref(x.bfloat16().float(), qw, None, None, None, 0.0),
                               rtol=1e-2, atol=1e-2)
