"""lora.init is honoured by compile (and by multi-adapter) with PEFT's semantics; prefix.init is checked."""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import peftfx
from peftfx.errors import KernelError, PlanError
from peftfx.kernels.modules import LORA_INITS, QLoRALinear


class TwoLinears(nn.Module):
    def __init__(self, d: int = 256) -> None:
        super().__init__()
        self.up = nn.Linear(d, d)
        self.down = nn.Linear(d, d)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def _lora_layers(gm) -> dict[str, QLoRALinear]:
    return {n: m for n, m in gm.named_modules() if isinstance(m, QLoRALinear) and m.r is not None}


def _is_gaussian(a: torch.Tensor, r: int) -> bool:
    """PEFT's init_lora_weights='gaussian': A ~ N(0, std=1/r), unbounded (kaiming bound is 1/sqrt(in))."""
    return abs(a.std().item() - 1 / r) < 0.1 / r and a.abs().max().item() > 1.5 / math.sqrt(a.shape[1])


def _is_kaiming(a: torch.Tensor) -> bool:
    """PEFT's default: kaiming_uniform_(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in))."""
    bound = 1 / math.sqrt(a.shape[1])
    return a.abs().max().item() <= bound and abs(a.std().item() - bound / math.sqrt(3)) < 0.1 * bound


@pytest.mark.parametrize("quant", [None, {"format": "nf4"}])
def test_gaussian_init_reaches_the_compiled_layers(quant):
    plan = {"targets": ["up", "down"], "lora": {"r": 2, "init": "gaussian"}}
    if quant:
        plan["quant"] = quant
    gm = peftfx.compile(TwoLinears(), plan, example_inputs=(torch.randn(3, 256),))
    layers = _lora_layers(gm)
    assert sorted(layers) == ["down", "up"]
    for name, m in layers.items():
        assert _is_gaussian(m.lora_A.detach(), 2), (name, m.lora_A.std().item())
        assert torch.count_nonzero(m.lora_B) == 0  # the adapter starts as the base


def test_default_init_stays_kaiming_and_a_rule_switches_one_layer_to_gaussian():
    plan = {"targets": ["up", "down"], "lora": {"r": 2}, "rules": [{"targets": ["down"], "lora": {"init": "gaussian"}}]}
    layers = _lora_layers(peftfx.compile(TwoLinears(), plan, example_inputs=(torch.randn(3, 256),)))
    assert _is_kaiming(layers["up"].lora_A.detach())
    assert _is_gaussian(layers["down"].lora_A.detach(), 2)


def test_module_init_has_the_distribution_of_peft_reset_lora_parameters():
    """PEFT's own layers pass the same distribution checks as ours, per option (so the checks are PEFT's)."""
    peft = pytest.importorskip("peft")
    r, d_in = 2, 256
    for init, peft_init, family in (("default", True, _is_kaiming), ("gaussian", "gaussian", None)):
        holder = nn.Sequential()
        holder.add_module("lin", nn.Linear(d_in, 128, bias=False))
        cfg = peft.LoraConfig(r=r, lora_alpha=8, target_modules=["lin"], init_lora_weights=peft_init)
        theirs = peft.get_peft_model(holder, cfg).base_model.model.lin.lora_A["default"].weight.detach()
        ours = QLoRALinear(torch.randn(128, d_in), None, r=r, alpha=8, init=init)
        check = family or (lambda a: _is_gaussian(a, r))
        assert check(theirs) and check(ours.lora_A.detach()), init
        assert torch.count_nonzero(ours.lora_B) == 0


def test_the_plan_accepts_exactly_the_kernel_inits():
    for init in LORA_INITS:
        assert peftfx.Plan.from_dict({"targets": ["up"], "lora": {"init": init}}).lora.init == init
    with pytest.raises(KernelError, match="LoRA init 'pissa'"):
        QLoRALinear(torch.randn(8, 8), None, r=2, init="pissa", name="up")


def test_unknown_inits_are_refused_with_the_allowed_values():
    with pytest.raises(PlanError, match="lora.init.*'default', 'gaussian'"):
        peftfx.Plan.from_dict({"targets": ["up"], "lora": {"init": "pissa"}})
    with pytest.raises(PlanError, match="prefix.init.*'random'"):
        peftfx.Plan.from_dict({"prefix": {"tokens": 2, "init": "gaussian"}})


@pytest.mark.parametrize(("init", "written"), [("default", True), ("gaussian", "gaussian")])
def test_export_records_the_plan_init_in_peft_spelling(tmp_path, init, written):
    """adapter_config.json says how A started, as PEFT's own save does (it used to say True always)."""
    plan = {"targets": ["up", "down"], "lora": {"r": 2, "init": init}}
    gm = peftfx.compile(TwoLinears(), plan, example_inputs=(torch.randn(3, 256),))
    peftfx.export_peft(gm, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg.get("init_lora_weights", True) == written
