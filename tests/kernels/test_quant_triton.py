"""Triton quantize/dequantize vs reference.py: byte-identical storage, per-element error bounds, bad input.

Runs under TRITON_INTERPRET=1 on the CPU (tests/conftest.py turns it on when there is no GPU) or natively on a GPU
when the environment sets TRITON_INTERPRET=0 (bench/gpu_check.sh does).
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
from hypothesis import given, settings, strategies as st

from peftfx.errors import KernelError
from peftfx.kernels import formats, reference
from peftfx.kernels import quantizer
from peftfx.kernels.quant_triton import dequantize_triton, quantize_triton

from tests.kernels.triton_env import DEVICE, INTERPRET, NO_DEVICE, NO_DEVICE_REASON

if NO_DEVICE:
    pytest.skip(NO_DEVICE_REASON, allow_module_level=True)

FOUR_BIT = ("nf4", "fp4")
ALL = ("nf4", "fp4", "int8", "int8-zeropoint", "llm-int8")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _weight(seed: int, n: int, k: int, dtype: torch.dtype, zero_rows: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * (0.02 + 2 * torch.rand(1, generator=g))
    w[:zero_rows] = 0.0
    return w.to(dtype).to(DEVICE)


@st.composite
def cases(draw, formats_=ALL):
    fmt = draw(st.sampled_from(formats_))
    return dict(
        fmt=fmt,
        n=draw(st.integers(1, 256)) if fmt != "llm-int8" else draw(st.integers(16, 256)),
        k=draw(st.integers(16, 256)),
        block_size=draw(st.sampled_from((32, 64, 128, 256))),
        double_quant=fmt in FOUR_BIT and draw(st.booleans()),
        block_size2=draw(st.sampled_from((32, 64, 256))),
        dtype=draw(st.sampled_from(DTYPES)),
        seed=draw(st.integers(0, 2**31 - 1)),
        zero_rows=draw(st.integers(0, 2)),
    )


def _quantize_both(c):
    w = _weight(c["seed"], c["n"], c["k"], c["dtype"], c["zero_rows"])
    kw = dict(block_size=c["block_size"], double_quant=c["double_quant"], block_size2=c["block_size2"])
    return w, quantizer.quantize(w, c["fmt"], **kw), quantize_triton(w, c["fmt"], **kw)


def _assert_same_storage(ref: formats.QuantizedWeight, got: formats.QuantizedWeight) -> None:
    assert (got.format, got.shape, got.block_size, got.block_size2, got.dtype, got.threshold) == \
        (ref.format, ref.shape, ref.block_size, ref.block_size2, ref.dtype, ref.threshold)
    assert ref.tensors().keys() == got.tensors().keys()
    for name, t in ref.tensors().items():
        u = got.tensors()[name]
        assert (u.dtype, u.numel()) == (t.dtype, t.numel()), name
        assert torch.equal(u.reshape(-1), t.reshape(-1)), f"{name}: {(u.reshape(-1) != t.reshape(-1)).sum()} differ"


# ------------------------------------------------------------------------------ oracle and error bounds
def _half_max_gap(fmt: str) -> float:
    code = formats.code_for(fmt).sort().values
    return float((code[1:] - code[:-1]).max()) / 2


def _per_element_bound(qw: formats.QuantizedWeight) -> torch.Tensor:
    """The per-element bound of |deq(q(w)) - w| as a flat tensor (see the issue's error table)."""
    n = qw.numel
    if qw.format == "llm-int8":
        return (0.5 * qw.scales.float() / 127).repeat_interleave(qw.shape[1])
    s = qw.scales.float().repeat_interleave(qw.block_size)[:n]
    if qw.format in FOUR_BIT:
        return _half_max_gap(qw.format) * s  # half the largest code gap x block absmax
    return 0.5 * s  # int8 / int8-zeropoint: half a quantization step


# One property per quantization (the interpreter is slow): storage equal to the oracle byte for byte,
# dequantize equal to the oracle (IEEE-exact fp32 math, no FMA contraction), and, for exact block
# scales (no double quant), the per-element error bound.
@settings(deadline=None)
@given(c=cases())
def test_quantize_matches_reference_and_error_bound(c):
    w, ref, got = _quantize_both(c)
    _assert_same_storage(ref, got)
    for dtype in (None, torch.float32):
        assert torch.equal(dequantize_triton(ref, dtype), reference.dequantize(ref, dtype))
    if not c["double_quant"]:
        err = (dequantize_triton(got, torch.float32) - w.float()).abs().reshape(-1)
        bound = _per_element_bound(got)
        # fp32 rounding of the scaling itself (zero point: w/scale + zp rounds at ~255 ulp of the code)
        slack = 1e-4 * bound + 1e-30
        assert bool((err <= bound + slack).all()), f"max excess {(err - bound).max()}"


@settings(deadline=None, max_examples=10)
@given(c=cases())
def test_dequantize_is_a_fixed_point(c):
    """dequantize ∘ quantize ∘ dequantize == dequantize: requantizing a dequantized weight is lossless."""
    c = dict(c, dtype=torch.float32, double_quant=False)
    _, _, qw = _quantize_both(c)
    d1 = dequantize_triton(qw)
    d2 = dequantize_triton(quantize_triton(d1, c["fmt"], block_size=c["block_size"]))
    torch.testing.assert_close(d2, d1, atol=1e-6 * float(d1.abs().max()) + 1e-30, rtol=0)


@pytest.mark.parametrize("fmt", ALL)
@pytest.mark.parametrize("double_quant", [False, True])
def test_all_zero_block_dequantizes_to_exact_zeros(fmt, double_quant):
    if double_quant and fmt not in FOUR_BIT:
        pytest.skip("double quantization is 4-bit only")
    w = _weight(0, 8, 48, torch.float32)
    w[2:4] = 0.0  # flat [96, 192): blocks 3..5 of 32 are all zero (they cross rows)
    w[-1, -10:] = 0.0  # part of the partial last block
    qw = quantize_triton(w, fmt, block_size=32, double_quant=double_quant, block_size2=32)
    _assert_same_storage(quantizer.quantize(w, fmt, block_size=32, double_quant=double_quant, block_size2=32), qw)
    d = dequantize_triton(qw)
    assert bool((d[2:4] == 0).all())
    if not double_quant:  # DQ approximates absmax: zeros stay exact only where the codebook has a zero
        assert bool((d[-1, -10:] == 0).all()) or fmt == "llm-int8"
    assert torch.equal(d, reference.dequantize(qw))


@pytest.mark.parametrize("fmt", ALL)
def test_partial_last_block_and_odd_numel(fmt):
    w = _weight(1, 7, 37, torch.float16)  # 259 elements: odd, and a partial block for every size
    for bs in (32, 64, 256):
        ref = quantizer.quantize(w, fmt, block_size=bs)
        _assert_same_storage(ref, quantize_triton(w, fmt, block_size=bs))
        assert torch.equal(dequantize_triton(ref), reference.dequantize(ref))


# ------------------------------------------------------------------------------ bad input
def test_non_contiguous_weight_is_handled():
    w = _weight(2, 64, 48, torch.float32).t()  # [48, 64] transposed view
    assert not w.is_contiguous()
    for fmt in ALL:
        _assert_same_storage(quantizer.quantize(w.contiguous(), fmt), quantize_triton(w, fmt))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nan_inf_rejected(bad):
    w = _weight(3, 16, 32, torch.float32)
    w[3, 5] = bad
    with pytest.raises(KernelError, match="NaN"):
        quantize_triton(w, "nf4")


@pytest.mark.parametrize("kwargs, match", [
    (dict(w=torch.zeros(4, 32, dtype=torch.int32), format="nf4"), "float"),
    (dict(w=torch.zeros(32), format="nf4"), "2-D"),
    (dict(w=torch.zeros(4, 32), format="nf5"), "format"),
    (dict(w=torch.zeros(4, 32), format="nf4", block_size=48), "power of two"),
    (dict(w=torch.zeros(4, 32), format="nf4", block_size=8), "power of two"),
    (dict(w=torch.zeros(4, 32), format="int8", double_quant=True), "double_quant"),
])
def test_bad_quantize_arguments(kwargs, match):
    kwargs["w"] = kwargs["w"].to(DEVICE)
    with pytest.raises(KernelError, match=match):
        quantize_triton(**kwargs)


def _corrupt(qw, **changes):
    t = dict(qw.tensors())
    return formats.QuantizedWeight(changes.get("format", qw.format), changes.get("packed", t["packed"]),
                                   changes.get("scales", t["scales"]), t.get("scales2"), t.get("offset"),
                                   changes.get("shape", qw.shape), qw.block_size, qw.block_size2, qw.dtype,
                                   qw.threshold)


def test_inconsistent_metadata_rejected():
    qw = quantize_triton(_weight(4, 16, 64, torch.float32), "nf4", block_size=64)
    with pytest.raises(KernelError, match="scales"):
        dequantize_triton(_corrupt(qw, scales=qw.scales[:-1]))
    with pytest.raises(KernelError, match="packed"):
        dequantize_triton(_corrupt(qw, packed=qw.packed[:-1]))
    with pytest.raises(KernelError, match="packed|shape"):
        dequantize_triton(_corrupt(qw, shape=(16, 80)))
    with pytest.raises(KernelError, match="packed"):
        dequantize_triton(_corrupt(qw, packed=qw.packed.to(torch.int8)))
    with pytest.raises(KernelError, match="scales"):
        dequantize_triton(_corrupt(qw, scales=qw.scales.half()))
    with pytest.raises(KernelError, match="dequantize"):
        dequantize_triton(qw.packed)
    with pytest.raises(KernelError, match="not supported"):
        dequantize_triton(qw, torch.int32)
