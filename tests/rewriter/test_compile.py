"""compile() contract on small hand-written models: memory, quantize-only plans, bad input."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import peftfx
from peftfx.kernels.modules import QLoRALinear


class MLP(nn.Module):
    def __init__(self, d: int = 128, h: int = 256, out: int = 10) -> None:
        super().__init__()
        self.up = nn.Linear(d, h)
        self.act = nn.GELU()
        self.down = nn.Linear(h, out)

    def forward(self, x):
        return self.down(self.act(self.up(x)))


def _nf4(targets, **lora):
    plan = {"targets": targets, "quant": {"format": "nf4", "double_quant": True}}
    if lora is not None:
        plan["lora"] = lora
    return plan


def test_positional_inputs_and_new_batch_shapes():
    torch.manual_seed(0)
    model = MLP()
    gm = peftfx.compile(model, _nf4(["up", "down"], r=4), example_inputs=(torch.randn(4, 128),))
    assert gm(torch.randn(3, 128)).shape == (3, 10)


def test_quantize_only_plan_freezes_everything_and_holds_4_127_bits():
    torch.manual_seed(0)
    model = MLP(256, 512)
    source_weight = model.up.weight
    ref = copy.deepcopy(model)
    plan = {"targets": ["up", "down"], "quant": {"format": "nf4", "block_size": 64, "double_quant": True}}
    gm = peftfx.compile(model, plan, example_inputs=(torch.randn(4, 256),))
    assert peftfx.trainable_parameters(gm) == {}
    up = gm.get_submodule("up")
    assert isinstance(up, QLoRALinear) and up.r is None
    # packed codes + 8-bit absmax + fp32 second-level absmax: 4 + 8/64 + 32/(64*256) bits/param
    stored = sum(t.numel() * t.element_size() for n, t in up.named_buffers() if n != "bias")
    bits = 8 * stored / (256 * 512)
    assert bits == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=1e-3)
    assert round(bits, 3) == 4.127
    # the full-precision weight is gone: nowhere in the module, freed in the source model
    for name, t in list(gm.named_parameters()) + list(gm.named_buffers()):
        assert not (t.is_floating_point() and t.shape == (512, 256)), name
    assert model.up.weight.is_meta and source_weight.numel() == 0
    # outputs equal the dequantized model
    with torch.no_grad():
        ref.up.weight.copy_(up.dequantized_weight())
        ref.down.weight.copy_(gm.get_submodule("down").dequantized_weight())
        x = torch.randn(3, 256)
        torch.testing.assert_close(gm(x), ref(x), atol=1e-5, rtol=0)


def test_release_can_be_turned_off():
    model = MLP()
    gm = peftfx.compile(model, _nf4(["up"], r=4), example_inputs=(torch.randn(2, 128),), release_source_weights=False)
    assert not model.up.weight.is_meta
    assert isinstance(gm.get_submodule("up"), QLoRALinear)


def test_dense_lora_plan_no_quant():
    torch.manual_seed(0)
    model = MLP()
    ref = copy.deepcopy(model)
    gm = peftfx.compile(model, {"targets": ["up"], "lora": {"r": 8}}, example_inputs=(torch.randn(2, 128),))
    x = torch.randn(5, 128)
    torch.testing.assert_close(gm(x), ref(x), atol=1e-6, rtol=0)
    assert set(peftfx.trainable_parameters(gm)) == {"up.lora_A", "up.lora_B"}


def test_report_records_each_pass():
    gm = peftfx.compile(MLP(), _nf4(["up"], r=4), example_inputs=(torch.randn(2, 128),))
    records = peftfx.report(gm)
    names = [r.name for r in records]
    assert names[0] == "swap_linear" and names[-1] == "freeze"
    swap = records[0]
    assert swap.notes[0]["target"] == "up" and swap.notes[0]["format"] == "nf4"
    assert any(n.meta.get("peftfx.pass") == "swap_linear" for n in gm.graph.nodes)
    assert "linear" in swap.code_before and swap.code_before != swap.code_after


# ---------------------------------------------------------------- bad input


def test_plan_matching_nothing_lists_patterns_and_closest_names():
    with pytest.raises(peftfx.PlanError) as e:
        peftfx.compile(MLP(), _nf4(["*.q_proj", "upp"], r=4), example_inputs=(torch.randn(2, 128),))
    msg = str(e.value)
    assert "'*.q_proj'" in msg and "'upp'" in msg and "closest" in msg and "up" in msg


def test_one_pattern_matching_nothing_while_others_match():
    with pytest.raises(peftfx.PlanError, match="'donw'"):
        peftfx.compile(MLP(), _nf4(["up", "donw"], r=4), example_inputs=(torch.randn(2, 128),))


@pytest.mark.parametrize(
    "plan, needle",
    [
        ({"targets": ["up"], "quant": {"format": "nf5"}}, "nf5"),
        ({"targets": ["up"], "lora": {"r": 0}}, "r"),
        ({"targets": ["up"], "quant": {"format": "nf4", "block_size": 48}}, "48"),
        ({"targets": ["up"], "quant": {"format": "nf4", "block_size": 8}}, "8"),
    ],
)
def test_bad_plan_values(plan, needle):
    with pytest.raises(peftfx.PlanError, match=needle):
        peftfx.compile(MLP(), plan, example_inputs=(torch.randn(2, 128),))


def test_rank_larger_than_layer_names_the_layer():
    with pytest.raises(peftfx.PlanError, match="down"):
        peftfx.compile(MLP(), _nf4(["down"], r=64), example_inputs=(torch.randn(2, 128),))


def test_nan_weight_names_the_layer():
    model = MLP()
    with torch.no_grad():
        model.down.weight[3, 7] = float("nan")
    with pytest.raises(peftfx.KernelError, match="down"):
        peftfx.compile(model, _nf4(["up", "down"], r=4), example_inputs=(torch.randn(2, 128),))


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent Python branch: export cannot capture it
            return self.lin(x)
        return -self.lin(x)


def test_unexportable_model_names_source_line():
    with pytest.raises(peftfx.TraceError) as e:
        peftfx.compile(Branchy(), _nf4(["lin"], r=2), example_inputs=(torch.randn(2, 8),))
    msg = str(e.value)
    assert "test_compile.py" in msg and "hint" in msg


def test_missing_example_inputs():
    with pytest.raises(peftfx.TraceError, match="example_inputs"):
        peftfx.compile(MLP(), _nf4(["up"], r=4))


def test_call_with_other_arguments_than_compiled_for_is_a_clear_error():
    from tests.model_zoo import make_case

    case = make_case("bert")
    gm = peftfx.compile(case.model, {"targets": ["query"], "lora": {}}, example_inputs=case.inputs)
    # other keyword sets of the forward are captured on first use (tests/rewriter/test_entry_points.py);
    # an argument the forward does not take is still a clear error
    with pytest.raises(peftfx.TraceError, match="BertForSequenceClassification.forward takes no argument 'lables'"):
        gm(**case.inputs, lables=case.inputs["labels"])


def test_aliased_example_inputs_stay_separate_graph_inputs():
    """labels=input_ids in the example must not tie the two inputs together forever."""
    from tests.model_zoo import make_case

    case = make_case("llama")
    inputs = {"input_ids": case.inputs["input_ids"], "attention_mask": case.inputs["attention_mask"]}
    inputs["labels"] = inputs["input_ids"]  # the same tensor object
    ref = copy.deepcopy(case.model)
    gm = peftfx.compile(case.model, {"targets": ["q_proj"], "lora": {}}, example_inputs=inputs)
    other_labels = torch.randint(3, 96, inputs["input_ids"].shape)
    gm.eval()
    with torch.no_grad():
        got = gm(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], labels=other_labels)
        want = ref(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], labels=other_labels)
    torch.testing.assert_close(got.loss, want.loss, atol=1e-5, rtol=0)
