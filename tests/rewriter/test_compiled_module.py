"""A compiled module pickles (torch.save, pickle, deepcopy) with its graph, meta and hooks, and refuses
dtype casts its graph cannot run, before casting anything."""
from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch

import peftfx
from peftfx.errors import TraceError
from peftfx.kernels.modules import QLoRALinear
from tests.model_zoo import make_case

PLAN = {"quant": {"format": "nf4", "double_quant": True}, "lora": {"r": 2}, "prefix": {"tokens": 2}}


@pytest.fixture(scope="module")
def compiled():
    torch.manual_seed(0)
    case = make_case("llama")
    gm = peftfx.compile(case.model, {**PLAN, "targets": case.attn_targets}, example_inputs=case.inputs)
    with torch.no_grad():  # non-zero adapters, so a lost LoRA B would show
        for p in peftfx.trainable_parameters(gm).values():
            p.normal_(0, 0.05)
    gm.eval()
    return case, gm


def _torch_round_trip(gm):
    buf = io.BytesIO()
    torch.save(gm, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


ROUND_TRIPS = {"torch.save": _torch_round_trip, "pickle": lambda gm: pickle.loads(pickle.dumps(gm)),
               "deepcopy": copy.deepcopy}


@pytest.mark.parametrize("how", ROUND_TRIPS)
def test_round_trip_keeps_outputs_graph_meta_hooks_and_export(compiled, how, tmp_path):
    case, gm = compiled
    other = ROUND_TRIPS[how](gm)
    assert other is not gm and type(other) is not type(gm)
    with torch.no_grad():
        torch.testing.assert_close(other(**case.other_inputs).logits, gm(**case.other_inputs).logits, rtol=0, atol=0)
    assert [n.name for n in other.graph.nodes] == [n.name for n in gm.graph.nodes]
    marks = [n.meta.get("peftfx.pass") for n in gm.graph.nodes]
    assert [n.meta.get("peftfx.pass") for n in other.graph.nodes] == marks and any(marks)
    assert other.meta["peftfx.plan"] == gm.meta["peftfx.plan"]
    with pytest.raises(TraceError, match="compiled for arguments.*takes no argument 'input_idz'"):
        other(input_idz=case.inputs["input_ids"])  # the entry points survived: unknown names still refused
    peftfx.export_peft(other, tmp_path / "peft", method="prefix")  # reads the prefix marks and shapes in node meta
    assert (tmp_path / "peft" / "adapter_config.json").exists()
    again = ROUND_TRIPS[how](other)  # and the copy pickles again
    with torch.no_grad():
        torch.testing.assert_close(again(**case.inputs).logits, gm(**case.inputs).logits, rtol=0, atol=0)


def _quant_state(gm):
    return {f"{n}.{b}": t.clone() for n, m in gm.named_modules() if isinstance(m, QLoRALinear)
            for b in QLoRALinear.QUANT_STATE if (t := getattr(m, b)) is not None}


@pytest.mark.parametrize("cast", ["to", "half", "bfloat16", "double"])
def test_a_dtype_cast_is_refused_before_anything_is_cast(compiled, cast):
    case, gm = compiled
    before = {k: v.dtype for k, v in gm.state_dict().items()}
    state = _quant_state(gm)
    with pytest.raises(TraceError, match=r"captured in torch.float32.*model.to\(torch\.\w+\); peftfx.compile"):
        gm.to(torch.bfloat16) if cast == "to" else getattr(gm, cast)()
    assert {k: v.dtype for k, v in gm.state_dict().items()} == before
    for name, t in _quant_state(gm).items():
        assert t.dtype == state[name].dtype and torch.equal(t, state[name]), name
    gm.to("cpu").float()  # a device move and a same-dtype cast are fine
    with torch.no_grad():
        gm(**case.inputs)


@pytest.mark.parametrize("fmt", ["nf4", "int8", "int8-zeropoint", "llm-int8"])
def test_compiled_bf16_model_keeps_fp32_quantization_state(fmt):
    """The other road: compile a bf16 model; its quantization state is fp32 and stays so under a cast."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)).bfloat16()
    gm = peftfx.compile(model, {"targets": ["0", "2"], "quant": {"format": fmt, "double_quant": fmt == "nf4"},
                                "lora": {"r": 2}}, example_inputs=(torch.randn(2, 64, dtype=torch.bfloat16),))
    state = _quant_state(gm)
    assert state and all(t.dtype in (torch.float32, torch.uint8) for t in state.values())
    assert gm.get_submodule("0").lora_A.dtype == torch.float32
    gm.bfloat16()  # the model's tensors are bf16 already: only the (trainable) LoRA follows the cast
    assert gm.get_submodule("0").lora_A.dtype == torch.bfloat16
    for name, t in _quant_state(gm).items():
        assert torch.equal(t, state[name]) and t.dtype == state[name].dtype, name
    assert gm(torch.randn(3, 64, dtype=torch.bfloat16)).dtype == torch.bfloat16
