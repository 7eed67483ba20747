"""A module dtype cast never touches quantization state (scales, scales2, offset stay fp32, bit for bit)
nor the packed codes; it still casts the adapter and the bias."""
from __future__ import annotations

import pytest
import torch

from peftfx.kernels import quantizer
from peftfx.kernels.modules import QLoRALinear
from peftfx.kernels.multi_lora import MultiLoRALinear

# (format, double_quant): every quantization state there is
FORMATS = [("nf4", False), ("nf4", True), ("fp4", True), ("int8", False), ("int8-zeropoint", False),
           ("llm-int8", False)]
CASTS = [lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.to(dtype=torch.float16),
         lambda m: m.type(torch.bfloat16), lambda m: m.bfloat16().float()]


@pytest.fixture(autouse=True)
def _cpu_backend(monkeypatch):
    monkeypatch.setenv("PEFTFX_KERNELS", "cpu")


def _layer(fmt: str, dq: bool) -> QLoRALinear:
    qw = quantizer.quantize(torch.randn(24, 64), fmt, block_size=32, double_quant=dq, block_size2=16)
    return QLoRALinear(qw, torch.randn(24), r=4, alpha=8, name="layer")


def _state(m: QLoRALinear) -> dict[str, torch.Tensor]:
    return {n: t.clone() for n in QLoRALinear.QUANT_STATE if (t := getattr(m, n)) is not None}


@pytest.mark.parametrize("fmt,dq", FORMATS)
@pytest.mark.parametrize("cast", range(len(CASTS)))
def test_cast_keeps_quantization_state_and_the_dequantized_weight(fmt, dq, cast):
    m = _layer(fmt, dq)
    before, deq = _state(m), m.dequantized_weight(torch.float32)
    assert all(t.dtype in (torch.float32, torch.uint8) for t in before.values())  # uint8: double-quant codes
    assert len(before) == (3 if dq else 2 if fmt == "int8-zeropoint" else 1)
    CASTS[cast](m)
    after = _state(m)
    assert after.keys() == before.keys() and m.weight.dtype in (torch.uint8, torch.int8)
    for name in before:
        assert after[name].dtype == before[name].dtype, name
        assert torch.equal(after[name], before[name]), name
    torch.testing.assert_close(m.dequantized_weight(torch.float32), deq, rtol=0, atol=0)
    m.quantized_weight().validate("layer")  # raised "scales must be float32" after a cast


@pytest.mark.parametrize("fmt,dq", [("nf4", True), ("int8-zeropoint", False)])
def test_cast_still_casts_the_rest_and_the_forward_runs(fmt, dq):
    m = _layer(fmt, dq)
    x = torch.randn(3, 64)
    want = m(x)
    m.to(torch.bfloat16)
    assert m.lora_A.dtype == m.lora_B.dtype == m.bias.dtype == torch.bfloat16
    assert m.weight.dtype in (torch.uint8, torch.int8)
    torch.testing.assert_close(m(x.bfloat16()).float(), want, rtol=0.05, atol=0.05)


def test_multi_lora_base_keeps_its_quantization_state():
    base = QLoRALinear(quantizer.quantize(torch.randn(24, 64), "nf4", double_quant=True, block_size2=16), None, r=None)
    multi = MultiLoRALinear(base, 64, 24, n_slots=1, name="layer")
    before = _state(base)
    multi.to(torch.bfloat16)
    assert multi.lora_A.dtype == torch.bfloat16
    assert base.weight.dtype == torch.uint8
    for name, t in _state(base).items():
        assert t.dtype == before[name].dtype and torch.equal(t, before[name]), name
