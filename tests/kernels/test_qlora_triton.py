"""Fused dequant-matmul + LoRA (Triton) vs reference.py: forward and every gradient, LLM.int8 outliers,
bad input. Runs under TRITON_INTERPRET=1 on the CPU (tests/conftest.py turns it on when there is no GPU) or natively
on a GPU when the environment sets TRITON_INTERPRET=0 (bench/gpu_check.sh does).
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
from hypothesis import given, settings, strategies as st

from peftfx.errors import KernelError
from peftfx.kernels import reference
from peftfx.kernels import quantizer
from peftfx.kernels.qlora_triton import qlora_backward_triton, qlora_forward_triton

from tests.kernels.triton_env import DEVICE, INTERPRET, NO_DEVICE, NO_DEVICE_REASON

if NO_DEVICE:
    pytest.skip(NO_DEVICE_REASON, allow_module_level=True)

FORMATS = ("none", "nf4", "fp4", "int8", "int8-zeropoint", "llm-int8")

# (dtype, atol, rtol) against the reference, relative to max(1, max|reference|) for atol. Inputs are
# scaled so |y| ~ 1 and K <= 256.
TOLERANCES = {
    # fp32: same math, different summation order (tiles of K, fp32 accumulate): ~K ulps
    torch.float32: (1e-4, 1e-4),
    # fp16: the kernel rounds each dequantized W tile and xa = x·Aᵀ to fp16 before tl.dot, the
    # reference rounds only its fp32 result: a few fp16 ulps (2**-11) of |y|
    torch.float16: (1e-2, 1e-2),
    # bf16: the interpreter runs bf16 through fp32 (its bf16 tl.dot is broken), so there only the
    # final rounding differs (1 bf16 ulp = 2**-8); natively the W tile is rounded to bf16 first
    torch.bfloat16: (3e-2, 2e-2),
}


def assert_close(got, ref, dtype, what):
    atol, rtol = TOLERANCES[dtype]
    scale = max(1.0, float(ref.float().abs().max())) if ref.numel() else 1.0
    torch.testing.assert_close(got.float(), ref.float(), atol=atol * scale, rtol=rtol, msg=lambda m: f"{what}: {m}")


@st.composite
def problems(draw, formats_=FORMATS):
    fmt = draw(st.sampled_from(formats_))
    return dict(
        # k: any (per-element scale path) or a multiple of 32 (the block-scale path, decode_triton.scale_sub)
        fmt=fmt, m=draw(st.integers(1, 64)), n=draw(st.integers(16, 256)),
        k=draw(st.one_of(st.integers(16, 256), st.integers(1, 8).map(lambda j: 32 * j))),
        r=draw(st.integers(1, 16)), block_size=draw(st.sampled_from((32, 64, 128, 256))),
        double_quant=fmt in ("nf4", "fp4") and draw(st.booleans()),
        dtype=draw(st.sampled_from((torch.float32, torch.float16, torch.bfloat16))),
        bias=draw(st.booleans()), x_lora=draw(st.booleans()), lora=draw(st.integers(0, 5)) > 0,
        scaling=draw(st.sampled_from((0.5, 2.0, 4.0))), seed=draw(st.integers(0, 2**31 - 1)),
    )


def make(p):
    g = torch.Generator().manual_seed(p["seed"])
    m, k, n, r, dt = p["m"], p["k"], p["n"], p["r"], p["dtype"]

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dt).to(DEVICE)

    w = rnd(n, k, scale=k ** -0.5)
    if p["fmt"] == "none":
        weight = w
    else:
        weight = quantizer.quantize(w, p["fmt"], block_size=p["block_size"], double_quant=p["double_quant"],
                                    block_size2=32, threshold=2.5)
    x = rnd(m, k)
    return dict(
        x=x, weight=weight, bias=rnd(n) if p["bias"] else None,
        lora_A=rnd(r, k, scale=k ** -0.5) if p["lora"] else None,
        lora_B=rnd(n, r, scale=r ** -0.5) if p["lora"] else None,
        x_lora=rnd(m, k) if p["x_lora"] and p["lora"] else None, dy=rnd(m, n), scaling=p["scaling"],
    )


def run_both(t):
    args = (t["weight"], t["bias"], t["lora_A"], t["lora_B"], t["scaling"])
    y_ref = reference.qlora_forward_ref(t["x"], *args, t["x_lora"])
    y = qlora_forward_triton(t["x"], *args, t["x_lora"])
    bargs = (t["dy"], t["x"], t["weight"], t["lora_A"], t["lora_B"], t["scaling"], t["x_lora"])
    g_ref = reference.qlora_backward_ref(*bargs, needs=(True,) * 4)
    g = qlora_backward_triton(*bargs, (True,) * 4)
    return y_ref, y, g_ref, g


# ------------------------------------------------------------------------------ forward and gradients
@settings(deadline=None)
@given(p=problems())
def test_forward_and_gradients_match_reference(p):
    t = make(p)
    y_ref, y, g_ref, g = run_both(t)
    assert y.dtype == t["x"].dtype and y.shape == y_ref.shape
    assert_close(y, y_ref, p["dtype"], "y")
    for name, a, b in zip(("dx", "dx_lora", "dA", "dB"), g, g_ref):
        assert (a is None) == (b is None), name
        if b is not None:
            assert a.dtype == b.dtype and a.shape == b.shape, name
            assert_close(a, b, p["dtype"], name)


@pytest.mark.parametrize("needs", [(True, False, False, False), (False, False, True, True), (False,) * 4])
def test_needs_masks_outputs(needs):
    t = make(dict(fmt="nf4", m=5, k=40, n=24, r=4, block_size=32, double_quant=True, dtype=torch.float32,
                  bias=False, x_lora=False, lora=True, scaling=2.0, seed=0))
    g = qlora_backward_triton(t["dy"], t["x"], t["weight"], t["lora_A"], t["lora_B"], 2.0, None, needs)
    g_ref = reference.qlora_backward_ref(t["dy"], t["x"], t["weight"], t["lora_A"], t["lora_B"], 2.0, None, needs)
    for a, b, need in zip(g, g_ref, needs):
        assert (a is None) == (b is None) and (a is not None) == (need and b is not None)
        if b is not None:
            assert_close(a, b, torch.float32, "grad")


def test_strided_input_is_handled():
    t = make(dict(fmt="int8", m=9, k=48, n=33, r=3, block_size=64, double_quant=False, dtype=torch.float32,
                  bias=True, x_lora=False, lora=True, scaling=1.0, seed=1))
    wide = torch.randn(9, 96, device=DEVICE)
    x = wide[:, ::2]  # stride (96, 2)
    assert not x.is_contiguous()
    args = (t["weight"], t["bias"], t["lora_A"], t["lora_B"], 1.0)
    assert_close(qlora_forward_triton(x, *args, None), reference.qlora_forward_ref(x.contiguous(), *args),
                 torch.float32, "y")


# ------------------------------------------------------------------------------ LLM.int8
@pytest.mark.parametrize("seed", range(3))
def test_llm_int8_with_outliers_matches_fp32_product(seed):
    """LLM.int8 vs the exact fp32 product x·deq(W)ᵀ (weight error excluded).

    Outlier columns (any |x| >= threshold) are exact up to fp32 rounding. The other columns of row m are
    quantized per token with step rs_m/127 (rs_m = max |x| over them), so each has error <= rs_m/254 and
    |Δy[m, n]| <= rs_m/254 · Σ_k |deq(W)[n, k]| over the non-outlier k: asserted per element.
    """
    g = torch.Generator().manual_seed(seed)
    m, k, n, thr = 24, 200, 72, 6.0
    x = torch.randn(m, k, generator=g)
    x[:, [3, 77, 150]] *= 20.0  # outlier features, as in LLM.int8's emergent large-magnitude columns
    qw = quantizer.quantize(torch.randn(n, k, generator=g) * 0.05, "llm-int8", threshold=thr)
    x, qw = x.to(DEVICE), qw.to(DEVICE)
    wd = reference.dequantize(qw, torch.float32)
    y = qlora_forward_triton(x, qw, None, None, None, 1.0, None)
    exact = x.double() @ wd.double().t()
    outl = (x.abs() >= thr).any(dim=0)
    assert int(outl.sum()) >= 3
    rs = x.masked_fill(outl, 0).abs().amax(dim=1, keepdim=True).double()
    bound = rs / 254.0 * (wd.abs().double() * (~outl).double()).sum(dim=1).view(1, -1)
    slack = 1e-5 * exact.abs().max()
    assert bool(((y.double() - exact).abs() <= bound + slack).all())
    # and it is the reference's mixed-precision decomposition, not a plain dequantized matmul
    assert_close(y, reference.qlora_forward_ref(x, qw, None, None, None, 1.0), torch.float32, "y")


# ------------------------------------------------------------------------------ bad input
def _small():
    return make(dict(fmt="nf4", m=4, k=32, n=16, r=2, block_size=32, double_quant=False, dtype=torch.float32,
                     bias=True, x_lora=False, lora=True, scaling=1.0, seed=2))


def test_bad_inputs_raise_kernel_error():
    t = _small()
    w, b, A, B = t["weight"], t["bias"], t["lora_A"], t["lora_B"]
    cases = [
        (dict(x=t["x"][:, :31]), "features"),
        (dict(x=t["x"].to(torch.int32)), "float"),
        (dict(x=t["x"].reshape(-1)), "2-D"),
        (dict(bias=b[:5]), "bias"),
        (dict(lora_A=A[:, :8]), "LoRA shapes"),
        (dict(lora_B=None), "both"),
        (dict(weight=w.packed), "2-D float|dense weight"),
        (dict(weight=type(w)(w.format, w.packed, w.scales[:-1], None, None, w.shape, w.block_size,
                              w.block_size2, w.dtype, 0.0)), "scales"),
        (dict(x_lora=t["x"][:2]), "rows"),
    ]
    for change, match in cases:
        a = dict(x=t["x"], weight=w, bias=b, lora_A=A, lora_B=B, x_lora=None) | change
        with pytest.raises(KernelError, match=match):
            qlora_forward_triton(a["x"], a["weight"], a["bias"], a["lora_A"], a["lora_B"], 1.0, a["x_lora"])
    with pytest.raises(KernelError, match="grad_output"):
        qlora_backward_triton(t["dy"][:, :3], t["x"], w, A, B, 1.0, None, (True,) * 4)


def test_op_compute_dtype_casts_around_the_triton_kernels(monkeypatch):
    """Through ``peftfx::qlora_linear`` on the Triton backend, compute_dtype casts x (and dy) into the
    kernels and the results back: fp16 compute of fp32 inputs gives fp32 outputs and fp32 LoRA grads
    within fp16 rounding of the fp32 ones."""
    from peftfx.kernels import ops

    monkeypatch.setenv("PEFTFX_KERNELS", "triton")
    torch.manual_seed(0)
    qw = quantizer.quantize(torch.randn(48, 64) * 0.1, "nf4", block_size=32).to(DEVICE)
    x = torch.randn(5, 64, device=DEVICE) * 0.1
    A0, B0 = torch.randn(4, 64, device=DEVICE) * 0.1, torch.randn(48, 4, device=DEVICE) * 0.1
    grads = {}
    for cd in (None, torch.float16):
        xr, A, B = (t.clone().requires_grad_() for t in (x, A0, B0))
        y = ops.qlora_linear(xr, qw, None, A, B, 2.0, compute_dtype=cd)
        y.sum().backward()
        assert y.dtype == xr.grad.dtype == A.grad.dtype == torch.float32
        grads[cd] = (y.detach(), xr.grad, A.grad, B.grad)
    for a, b in zip(grads[None], grads[torch.float16]):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3)
