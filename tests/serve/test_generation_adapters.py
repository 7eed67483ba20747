"""peftfx.generate with prefix tuning, prompt tuning, bottleneck adapters and many adapters per batch.

References: prefix tuning -> greedy decoding over PEFT's prefix-tuning *forward*, one unpadded row at
a time (PEFT's own prefix generate differs from its forward); prompt tuning -> PEFT's generate;
bottleneck -> greedy decoding over the compiled training graph itself; multi-adapter -> each row
alone, and the single-adapter module's forward.
"""
from __future__ import annotations

import tempfile

import pytest
import torch

import peftfx
from tests.model_zoo import make_case
from tests.serve.test_generation import greedy_by_forward, hf_generate, no_eos, prompts, randomize

peft = pytest.importorskip("peft")

NEW = 32
TOKENS = 3


def compile_plan(name: str, plan: dict, scale: float):
    case = make_case(name)
    inputs = {k: v for k, v in case.inputs.items() if k != "labels"}
    gm = peftfx.compile(no_eos(case.model), plan, example_inputs=inputs)
    randomize(gm, scale=scale)
    return gm


def peft_model(name: str, gm):
    with tempfile.TemporaryDirectory() as d:
        peftfx.export_peft(gm, d)
        return peft.PeftModel.from_pretrained(no_eos(make_case(name).model), d).eval()


def virtual_tokens_case(name: str, kind: str):
    """(ours: generated [2, 6+NEW] on a left-padded batch, PEFT's model of the same adapter, ids, mask, gm)."""
    gm = compile_plan(name, {kind: {"tokens": TOKENS}}, scale=1.0)
    ids, mask = prompts()
    return peftfx.generate(gm, ids, mask, max_new_tokens=NEW), peft_model(name, gm), ids, mask, gm


@pytest.mark.parametrize("name", ["gpt2", pytest.param("llama", marks=pytest.mark.slow)])
def test_prefix_tuning_equals_greedy_over_peft_prefix_forward(name):
    ours, ref, ids, _, _ = virtual_tokens_case(name, "prefix")
    for row, pads in ((0, 2), (1, 0)):
        alone = ids[row:row + 1, pads:]
        expected = greedy_by_forward(lambda s: ref(input_ids=s).logits, alone)
        assert torch.equal(ours[row, pads:], expected[0]), f"row {row}"
    with torch.no_grad():  # the prefix matters (tiny random models often repeat one token either way)
        assert (ref(input_ids=ids[1:]).logits - make_case(name).model(input_ids=ids[1:]).logits).abs().max() > 1e-2


@pytest.mark.parametrize("name", ["llama", pytest.param("gpt2", marks=pytest.mark.slow)])
def test_prompt_tuning_equals_peft_generate(name):
    ours, ref, ids, mask, gm = virtual_tokens_case(name, "prompt")
    assert torch.equal(ours, hf_generate(ref, ids, mask))
    alone = peftfx.generate(gm, ids[:1, 2:], max_new_tokens=NEW)
    assert torch.equal(alone[0], ours[0, 2:])


@pytest.mark.slow
def test_bottleneck_adapters_equal_greedy_over_the_compiled_forward():
    gm = compile_plan("llama", {"adapter": {"size": 8}}, scale=0.5)
    ids, _ = prompts(batch=2)
    expected = greedy_by_forward(lambda s: gm(input_ids=s, attention_mask=torch.ones_like(s)).logits, ids)
    assert torch.equal(peftfx.generate(gm, ids, max_new_tokens=NEW), expected)


QUANT = {"format": "nf4", "targets": ["*.q_proj", "*.v_proj"]}
PLANS = {"a": {"quant": QUANT, "lora": {"r": 2, "alpha": 4, "targets": ["*.q_proj", "*.v_proj"]}},
         "b": {"quant": QUANT, "lora": {"r": 8, "alpha": 8, "targets": ["*.v_proj", "*.o_proj"]}}}


def test_multi_adapter_mixed_batch_rows_equal_each_adapter_alone():
    singles = {n: compile_plan("llama", plan, scale=0.3) for n, plan in PLANS.items()}
    inputs = {k: v for k, v in make_case("llama").inputs.items() if k != "labels"}
    gm = peftfx.compile_multi(no_eos(make_case("llama").model), singles, example_inputs=inputs)
    a, b = peftfx.adapter_index(gm, "a"), peftfx.adapter_index(gm, "b")
    ids, _ = prompts(batch=3, seed=5)
    mask = torch.ones_like(ids)
    mask[1, :1] = 0
    ids[1, :1] = 0
    rows = torch.tensor([a, b, -1])
    mixed = peftfx.generate(gm, ids, mask, max_new_tokens=16, adapter_ids=rows)
    for row, pads in ((0, 0), (1, 1), (2, 0)):
        alone = peftfx.generate(gm, ids[row:row + 1, pads:], max_new_tokens=16, adapter_ids=rows[row:row + 1])
        assert torch.equal(alone[0], mixed[row, pads:]), f"row {row}"
    single_a = singles["a"].eval()
    expected = greedy_by_forward(lambda s: single_a(input_ids=s, attention_mask=torch.ones_like(s)).logits,
                                 ids[:1], 16)
    assert torch.equal(mixed[0], expected[0])
    assert not torch.equal(mixed[0, 6:], mixed[2, 6:]) or not torch.equal(ids[0], ids[2])
    with pytest.raises(peftfx.PeftfxError, match=r"adapter_ids\[1\] = 7 is out of range"):
        peftfx.generate(gm, ids, mask, max_new_tokens=2, adapter_ids=torch.tensor([a, 7, -1]))
    with pytest.raises(peftfx.PeftfxError, match="missing|pass adapter_ids"):
        peftfx.generate(gm, ids, mask, max_new_tokens=2)
