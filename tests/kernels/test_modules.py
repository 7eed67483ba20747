from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from peftfx.errors import KernelError
from peftfx.kernels import quantizer
from peftfx.kernels.modules import LoRALinear, QLoRALinear

FMTS = ["nf4", "fp4", "int8", "int8-zeropoint", "llm-int8"]


@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch):
    monkeypatch.setenv("PEFTFX_KERNELS", "cpu")


@pytest.mark.parametrize("fmt", FMTS)
def test_state_dict_holds_packed_bytes(fmt):
    m = QLoRALinear(quantizer.quantize(torch.randn(16, 48), fmt, block_size=32, double_quant=fmt == "nf4"),
                    torch.randn(16), r=4, alpha=8)
    sd = m.state_dict()
    assert sd["weight"].dtype in (torch.uint8, torch.int8)
    assert set(n for n, _ in m.named_parameters()) == {"lora_A", "lora_B"}
    assert sd["lora_A"].shape == (4, 48) and sd["lora_B"].shape == (16, 4)
    m2 = QLoRALinear(quantizer.quantize(torch.randn(16, 48), fmt, block_size=32, double_quant=fmt == "nf4"),
                     torch.randn(16), r=4, alpha=8)
    m2.load_state_dict(sd)
    x = torch.randn(3, 48)
    torch.testing.assert_close(m2(x), m(x))


@pytest.mark.parametrize("fmt", ["none"] + FMTS)
def test_zero_b_equals_dequantized_linear_and_only_lora_grads(fmt):
    w = torch.randn(16, 48)
    weight = w if fmt == "none" else quantizer.quantize(w, fmt, block_size=32)
    bias = torch.randn(16)
    m = QLoRALinear(weight, bias, r=4, alpha=8, dropout=0.1)
    x = torch.randn(2, 5, 48, requires_grad=True)
    y = m(x)
    expect = F.linear(x, m.dequantized_weight(), bias)
    if fmt == "llm-int8":  # activations are int8-quantized per token
        torch.testing.assert_close(y, expect, rtol=0.05, atol=0.1)
    else:
        torch.testing.assert_close(y, expect)
    y.sum().backward()
    grads = {n for n, p in m.named_parameters() if p.grad is not None}
    assert grads == {"lora_A", "lora_B"}
    assert all(not b.requires_grad for b in m.buffers())
    assert x.grad is not None


def test_init_and_scaling():
    m = QLoRALinear(torch.randn(32, 64), None, r=8, alpha=16)
    assert m.scaling == 2.0 and bool((m.lora_B == 0).all())
    bound = 1 / math.sqrt(64)  # kaiming_uniform(a=sqrt(5)) on fan_in 64
    assert m.lora_A.abs().max() <= bound and m.lora_A.abs().max() > bound / 2
    assert QLoRALinear(torch.randn(32, 64), None, r=16, alpha=16, use_rslora=True).scaling == 4.0
    q = QLoRALinear(quantizer.quantize(torch.randn(32, 64), "nf4"), None, r=None)
    assert q.lora_A is None and list(q.parameters()) == []
    assert "format=nf4" in repr(q) and "r=None" in repr(q)


def test_lora_linear_is_dense_qlora():
    m = LoRALinear(torch.randn(8, 12), torch.randn(8), r=2, alpha=4)
    assert isinstance(m, QLoRALinear) and m.format == "none"
    assert set(m.state_dict()) == {"weight", "bias", "lora_A", "lora_B"}
    assert m.quantized_weight() is None


@pytest.mark.parametrize("r", [0, -1, 13, 2.5])
def test_bad_rank_names_layer(r):
    with pytest.raises(KernelError, match="'m.fc'.*rank r="):
        QLoRALinear(torch.randn(12, 20), None, r=r, alpha=1, name="m.fc")


def test_bad_weight_names_layer():
    with pytest.raises(KernelError, match="'m.fc'.*weight must be"):
        QLoRALinear(torch.randn(12, 20, 3), None, r=2, name="m.fc")
    with pytest.raises(KernelError, match="'m.fc'.*bias shape"):
        QLoRALinear(torch.randn(12, 20), torch.randn(3), r=2, name="m.fc")


def test_dropout_only_in_training():
    m = QLoRALinear(quantizer.quantize(torch.randn(8, 32), "nf4", block_size=32), None, r=2, alpha=2, dropout=0.5)
    torch.nn.init.normal_(m.lora_B)
    x = torch.randn(4, 32)
    m.eval()
    torch.testing.assert_close(m(x), m(x))
    m.train()
    assert not torch.equal(m(x), m(x))


def test_export_and_fx_see_one_op():
    m = QLoRALinear(quantizer.quantize(torch.randn(16, 32), "nf4", block_size=32, double_quant=True), torch.randn(16),
                    r=4, alpha=8).eval()
    ep = torch.export.export(m, (torch.randn(2, 32),))
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert targets == [torch.ops.peftfx.qlora_linear.default]

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = m

        def forward(self, x):
            return self.fc(x).relu()

    gm = torch.fx.symbolic_trace(Wrap(), concrete_args=None)
    gm.graph.lint()
    # leaf module or traced-through: either way a single qlora_linear call
    x = torch.randn(3, 32)
    torch.testing.assert_close(gm(x), m(x).relu())
