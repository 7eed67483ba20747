"""The decode-shaped GEMV path (M <= 16, gemv_triton) and the in-register decode (decode_triton) vs the
oracle: every format, tails, ranks that are not powers of two, split-K on and off.

Runs under TRITON_INTERPRET=1 on the CPU (small shapes: the interpreter pays per op) or natively on CUDA
when TRITON_INTERPRET=0 (bench/gpu_check.sh).
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
from hypothesis import given, settings, strategies as st

from peftfx.kernels import formats, gemv_triton, reference
from peftfx.kernels.decode_triton import scale_sub
from peftfx.kernels.quant_triton import dequantize_triton
from peftfx.kernels.qlora_triton import qlora_forward_triton

from tests.kernels.test_qlora_triton import FORMATS, assert_close, make
from tests.kernels.triton_env import DEVICE, NO_DEVICE, NO_DEVICE_REASON

if NO_DEVICE:
    pytest.skip(NO_DEVICE_REASON, allow_module_level=True)


@st.composite
def decode_problems(draw):
    fmt = draw(st.sampled_from(FORMATS))
    return dict(
        fmt=fmt, m=draw(st.integers(1, 16)), n=draw(st.integers(1, 130)),
        k=draw(st.one_of(st.integers(16, 200), st.integers(1, 8).map(lambda j: 32 * j))),
        r=draw(st.sampled_from((1, 3, 7, 12, 20))), block_size=draw(st.sampled_from((32, 64, 128))),
        double_quant=fmt in ("nf4", "fp4") and draw(st.booleans()),
        dtype=draw(st.sampled_from((torch.float32, torch.float16, torch.bfloat16))),
        bias=draw(st.booleans()), x_lora=draw(st.booleans()), lora=draw(st.integers(0, 4)) > 0,
        scaling=draw(st.sampled_from((0.5, 2.0))), seed=draw(st.integers(0, 2**31 - 1)),
    )


def _forward_both(p):
    t = make(p)
    args = (t["weight"], t["bias"], t["lora_A"], t["lora_B"], t["scaling"])
    return qlora_forward_triton(t["x"], *args, t["x_lora"]), reference.qlora_forward_ref(t["x"], *args, t["x_lora"])


@settings(deadline=None, max_examples=15)
@given(p=decode_problems())
def test_gemv_matches_reference(p):
    assert gemv_triton.use_gemv(p["m"])
    y, y_ref = _forward_both(p)
    assert y.dtype == y_ref.dtype and y.shape == y_ref.shape
    assert_close(y, y_ref, p["dtype"], "y")


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("m, n, k, r", [(1, 67, 256, 5), (16, 40, 96, 12), (3, 33, 50, 3)])
def test_gemv_every_format_with_tails(fmt, m, n, k, r):
    """Every format; N not a multiple of BLOCK_N, K aligned (block-scale path) and unaligned (50), r odd;
    the first two shapes split K (atomic fp32 partial sums), checked below."""
    p = dict(fmt=fmt, m=m, n=n, k=k, r=r, block_size=32, double_quant=fmt in ("nf4", "fp4"),
             dtype=torch.float32, bias=True, x_lora=False, lora=True, scaling=2.0, seed=m * 1000 + n)
    y, y_ref = _forward_both(p)
    assert_close(y, y_ref, torch.float32, f"{fmt} y")


def test_split_k_and_sub_cover_both_paths():
    """The shapes above exercise split-K and the block-scale decode, not only their fallbacks."""
    assert gemv_triton.gemv_split(67, 256)[0] > 1 and gemv_triton.gemv_split(40, 96)[0] > 1
    assert scale_sub(32, 32, 256) == 32 and scale_sub(32, 32, 96) == 32 and scale_sub(32, 32, 50) == 0
    splits, per = gemv_triton.gemv_split(4096, 11008)
    assert splits * per >= 11008 and (splits - 1) * per < 11008  # no empty split, K covered


@pytest.mark.parametrize("fmt", ("nf4", "fp4"))
def test_select_tree_is_the_codebook(fmt):
    """Every byte value decodes to (code[hi], code[lo]) exactly: the select tree's constants are the table."""
    packed = torch.arange(256, dtype=torch.uint8)
    qw = formats.QuantizedWeight(fmt, packed.to(DEVICE), torch.ones(8, device=DEVICE), None, None, (8, 64), 64,
                                 256, torch.float32)
    got = dequantize_triton(qw, torch.float32).reshape(-1, 2).cpu()
    code = formats.code_for(fmt)
    want = torch.stack([code[torch.arange(256) >> 4], code[torch.arange(256) & 15]], dim=1)
    assert torch.equal(got, want)
    assert torch.equal(got, reference.dequantize(qw.to("cpu"), torch.float32).reshape(-1, 2))
