"""The step graph's per-token rewrites change no result: no-op nodes dropped, linears called directly.

Small hand-built graphs (no model compile): the generation tests cover the rewrites inside the real step
graph (their greedy tokens equal transformers').
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from peftfx.kernels.modules import LoRALinear, QLoRALinear
from peftfx.kernels.quantizer import quantize
from peftfx.serve.step_rewrite import call_linears_directly, drop_no_op_nodes, step_linear


def _layers(seed: int = 0) -> list[QLoRALinear]:
    g = torch.Generator().manual_seed(seed)
    nf4 = QLoRALinear(quantize(torch.randn(48, 64, generator=g), "nf4", double_quant=True), torch.randn(48, generator=g),
                      r=4, alpha=8, name="nf4")
    int8 = QLoRALinear(quantize(torch.randn(32, 48, generator=g), "int8"), None, r=None, name="int8")
    dense = LoRALinear(torch.randn(16, 32, generator=g), None, r=2, alpha=4, name="dense")
    for m in (nf4, dense):
        with torch.no_grad():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g))
    return [nf4, int8, dense]


class _Stack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = _layers()

    def forward(self, x):
        return self.c(self.b(torch.nn.functional.silu(self.a(x))))


class _Casts(nn.Module):
    def forward(self, x):
        return (x.to(torch.float32) * 2).to(torch.float64)


class _KeepLinears(torch.fx.Tracer):
    def is_leaf_module(self, m, qualname):
        return isinstance(m, QLoRALinear) or super().is_leaf_module(m, qualname)


@pytest.mark.parametrize("rows", [1, 8, 40])
def test_step_linear_equals_the_module_bit_for_bit(rows):
    x = torch.randn(rows, 2, 64)
    nf4 = _layers()[0].eval()
    with torch.no_grad():
        assert torch.equal(step_linear(nf4, x), nf4(x))


def test_step_linear_leaves_training_and_autograd_to_the_module():
    nf4 = _layers()[0]
    x = torch.randn(4, 64)
    y = step_linear(nf4, x)  # grad enabled: the module (its custom op records the backward)
    y.sum().backward()
    assert nf4.lora_B.grad is not None and nf4.lora_B.grad.abs().sum() > 0


def test_linears_become_direct_calls_with_the_same_output():
    root = _Stack().eval()
    gm = torch.fx.GraphModule(root, _KeepLinears().trace(root))
    x = torch.randn(3, 5, 64)
    with torch.no_grad():
        expected = gm(x)
        assert call_linears_directly(gm) == 3
        assert not any(n.op == "call_module" for n in gm.graph.nodes)
        assert torch.equal(gm(x), expected)
    assert gm.get_submodule("a") is root.a  # still the same module objects


def test_identity_casts_and_checks_are_dropped_and_a_real_cast_stays():
    gm = torch.export.export(_Casts(), (torch.randn(4),), strict=False).module()
    x = torch.randn(4)
    expected = gm(x)
    assert drop_no_op_nodes(gm) >= 1
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert torch.ops.aten._assert_tensor_metadata.default not in targets
    assert sum(t in (torch.ops.aten.to.dtype, torch.ops.aten.to.dtype_layout) for t in targets) == 1  # the fp64 one
    out = gm(x)
    assert out.dtype == torch.float64 and torch.equal(out, expected)
