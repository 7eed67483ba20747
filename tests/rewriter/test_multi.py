"""compile_multi: one quantized base, several LoRA adapters of different ranks/targets in one batch."""
from __future__ import annotations

import pytest
import torch

import peftfx
from peftfx.kernels.multi_lora import MultiLoRALinear
from peftfx.serve.multi_adapter import AdapterIdError
from tests.model_zoo import VOCAB, make_case

pytest.importorskip("transformers")

QUANT = {"format": "nf4", "targets": ["*.q_proj", "*.v_proj"]}
PLANS = {  # different ranks and targets, one agreed quantized base
    "a": {"quant": QUANT, "lora": {"r": 2, "alpha": 4, "targets": ["*.q_proj", "*.v_proj"]}},
    "b": {"quant": QUANT, "lora": {"r": 8, "alpha": 8, "targets": ["*.v_proj", "*.o_proj"]}},
    "c": {"quant": QUANT, "lora": {"r": 4, "alpha": 16, "targets": ["*.q_proj", "*.down_proj"]}},
}


def _inputs(batch: int = 5, seq: int = 6) -> dict:
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, :2] = 0
    return {"input_ids": torch.randint(3, VOCAB, (batch, seq), generator=g), "attention_mask": mask,
            "labels": torch.randint(3, VOCAB, (batch, seq), generator=g)}


def _trained(name: str, inputs: dict):
    """A single-adapter compile of the same base whose LoRA weights are random (as if trained)."""
    gm = peftfx.compile(make_case("llama").model, PLANS[name], example_inputs=inputs)
    g = torch.Generator().manual_seed(ord(name))
    with torch.no_grad():
        for p in peftfx.trainable_parameters(gm).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return gm.eval()


@pytest.fixture(scope="module")
def served():
    """(multi gm, the single-adapter gms, inputs); built once: every compile is an export."""
    inputs = _inputs()
    singles = {name: _trained(name, inputs) for name in PLANS}
    gm = peftfx.compile_multi(make_case("llama").model, singles, example_inputs=inputs)
    return gm, singles, inputs


def _base_logits(single, inputs):
    """The frozen base alone: a single-adapter module with its LoRA B zeroed for one call."""
    saved = {n: p.detach().clone() for n, p in peftfx.trainable_parameters(single).items()}
    with torch.no_grad():
        for n, p in peftfx.trainable_parameters(single).items():
            if n.endswith("lora_B"):
                p.zero_()
        out = single(**inputs).logits
        for n, p in peftfx.trainable_parameters(single).items():
            p.copy_(saved[n])
    return out


def test_mixed_batch_equals_each_adapter_alone_on_its_rows(served):
    gm, singles, inputs = served
    ids = torch.tensor([peftfx.adapter_index(gm, n) for n in ("c", "a", "b", "c")] + [-1])
    assert sorted(ids.tolist()) == [-1, 0, 1, 2, 2]
    with torch.no_grad():
        mixed = gm(**inputs, adapter_ids=ids).logits
        alone = {n: s(**inputs).logits for n, s in singles.items()}
        base = _base_logits(singles["a"], inputs)
    for row, name in enumerate(["c", "a", "b", "c", None]):
        want = base[row] if name is None else alone[name][row]
        torch.testing.assert_close(mixed[row], want, atol=1e-5, rtol=0)
    # the adapters really differ from the base and from each other on these rows
    assert (alone["a"][1] - base[1]).abs().max() > 1e-2 and (alone["b"][2] - alone["c"][2]).abs().max() > 1e-2
    layers = {n: m.ranks for n, m in gm.named_modules() if isinstance(m, MultiLoRALinear)}
    assert layers["model.layers.0.self_attn.v_proj"] == [2, 8, 0]
    assert layers["model.layers.1.mlp.down_proj"] == [0, 0, 4]
    assert "model.layers.0.self_attn.k_proj" not in layers
    assert peftfx.trainable_parameters(gm) == {}


def test_bad_ids_are_clear_errors(served):
    gm, _, inputs = served
    for bad, pos in ((torch.tensor([0, 1, 3, 0, -1]), 2), (torch.tensor([0, -2, 1, 0, 0]), 1)):
        with pytest.raises(AdapterIdError, match=rf"adapter_ids\[{pos}\] = {int(bad[pos])} is out of range.*-1 "
                                                 r"\(base model\) and 0\.\.2 \(0=a, 1=b, 2=c\)"):
            gm(**inputs, adapter_ids=bad)
    assert issubclass(AdapterIdError, peftfx.PeftfxError)
    with pytest.raises(AdapterIdError, match="int64"):
        gm(**inputs, adapter_ids=torch.tensor([0, 0, 0, 0, 0], dtype=torch.int32))
    with pytest.raises(AdapterIdError, match="3 entries but the batch has 5"):
        gm(**inputs, adapter_ids=torch.tensor([0, 0, 0]))
    with pytest.raises(AdapterIdError, match="missing adapter_ids"):
        gm(**inputs)
    with pytest.raises(peftfx.PlanError, match="'zzz'.*loaded"):
        peftfx.adapter_index(gm, "zzz")


def test_add_and_remove_adapters_without_retracing(served, tmp_path):
    gm, singles, inputs = served
    graph, code = gm.graph, gm.code
    ids_b = torch.full((5,), peftfx.adapter_index(gm, "b"))
    with torch.no_grad():
        with_b = gm(**inputs, adapter_ids=ids_b).logits
        base = gm(**inputs, adapter_ids=torch.full((5,), -1)).logits
    peftfx.remove_adapter(gm, "b")
    with torch.no_grad():  # the freed slot serves the base model
        torch.testing.assert_close(gm(**inputs, adapter_ids=ids_b).logits, base, atol=0, rtol=0)
    # a folder written by save_adapters, checked against this base's fingerprint
    source = tmp_path / "b"
    peftfx.save_adapters(singles["b"], source)
    slot = peftfx.add_adapter(gm, "b2", source)
    assert slot == 1 and peftfx.adapter_index(gm, "b2") == 1  # reuses the freed slot
    with torch.no_grad():
        torch.testing.assert_close(gm(**inputs, adapter_ids=ids_b).logits, with_b, atol=1e-6, rtol=0)
    fresh = peftfx.add_adapter(gm, "d", {"quant": QUANT, "lora": {"r": 16, "targets": ["*.q_proj"]}})
    assert fresh == 3 and gm.get_submodule("model.layers.0.self_attn.q_proj").lora_A.shape[1] == 16
    with torch.no_grad():  # fresh adapters start at B = 0: the base model
        torch.testing.assert_close(gm(**inputs, adapter_ids=torch.full((5,), 3)).logits, base, atol=1e-6, rtol=0)
    assert gm.graph is graph and gm.code == code
    with pytest.raises(peftfx.PlanError, match="already loaded"):
        peftfx.add_adapter(gm, "d", PLANS["a"])
    with pytest.raises(peftfx.PlanError, match=r"k_proj.*no adapter targeted"):
        peftfx.add_adapter(gm, "e", {"quant": QUANT, "lora": {"r": 2, "targets": ["*.k_proj"]}})
    peftfx.remove_adapter(gm, "d")
    assert gm.get_submodule("model.layers.0.self_attn.q_proj").lora_A.shape[1] == 4  # padding shrinks back


def test_plans_must_agree_on_the_base_and_serve_lora_only():
    model = make_case("llama").model
    plans = {"a": PLANS["a"], "int8": {"quant": {**QUANT, "format": "int8"}, "lora": {"r": 2, "targets": ["q_proj"]}}}
    with pytest.raises(peftfx.PlanError, match=r"'a' and 'int8' disagree .*self_attn.q_proj.*nf4.*int8"):
        peftfx.compile_multi(model, plans, example_inputs=_inputs())
    with pytest.raises(peftfx.PlanError, match="LoRA adapters only.*prefix"):
        peftfx.compile_multi(model, {"p": {"prefix": {"tokens": 2}}}, example_inputs=_inputs())
    with pytest.raises(peftfx.PlanError, match="at least one adapter"):
        peftfx.compile_multi(model, {}, example_inputs=_inputs())


def test_gpt2_conv1d_rows_route_through_flattened_inputs():
    case = make_case("gpt2")
    plans = {"x": {"targets": ["*.c_attn"], "lora": {"r": 2}}, "y": {"targets": ["*.c_attn", "*.c_fc"], "lora": {"r": 3}}}
    gm = peftfx.compile_multi(case.model, plans, example_inputs=case.inputs)
    g = torch.Generator().manual_seed(0)
    for layer in (m for m in gm.modules() if isinstance(m, MultiLoRALinear)):
        with torch.no_grad():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g))
    inputs = case.other_inputs  # batch 3, another sequence length
    with torch.no_grad():
        runs = {i: gm(**inputs, adapter_ids=torch.full((3,), i)).logits for i in (-1, 0, 1)}
        mixed = gm(**inputs, adapter_ids=torch.tensor([1, -1, 0])).logits
    for row, i in enumerate([1, -1, 0]):
        torch.testing.assert_close(mixed[row], runs[i][row], atol=1e-5, rtol=0)
    assert (runs[0] - runs[-1]).abs().max() > 1e-2 and (runs[1] - runs[0]).abs().max() > 1e-2
