"""swap_linear: the plan picks the format per target through rules; every format swaps and trains."""
from __future__ import annotations

import copy

import pytest
import torch

import peftfx
from peftfx.kernels.modules import QLoRALinear
from tests.model_zoo import make_case

RULES_PLAN = {
    "targets": ["*.q_proj", "*.k_proj", "*.v_proj", "*.o_proj", "*.gate_proj", "*.up_proj", "*.down_proj"],
    "quant": {"format": "nf4", "block_size": 64, "double_quant": True},
    "lora": {"r": 4, "alpha": 8, "targets": ["q_proj", "v_proj"]},
    "rules": [
        {"targets": ["k_proj"], "quant": {"format": "int8", "block_size": 32}},
        {"targets": ["v_proj"], "quant": {"format": "int8-zeropoint", "block_size": 128}},
        {"targets": ["o_proj"], "quant": {"format": "fp4", "double_quant": False}},
        {"targets": ["down_proj"], "quant": {"format": "llm-int8"}},
        {"targets": ["re:model[.]layers[.]1[.]mlp[.]up_proj"], "quant": {"format": "none"}, "lora": {"r": 2}},
    ],
}

EXPECTED = {"q_proj": "nf4", "k_proj": "int8", "v_proj": "int8-zeropoint", "o_proj": "fp4",
            "gate_proj": "nf4", "down_proj": "llm-int8"}


def test_rules_choose_the_format_per_layer_and_outputs_match_the_dequantized_model():
    case = make_case("llama")
    ref = copy.deepcopy(case.model)
    gm = peftfx.compile(case.model, RULES_PLAN, example_inputs=case.inputs)
    seen = {}
    for name, mod in gm.named_modules():
        if isinstance(mod, QLoRALinear):
            seen[name] = mod.format
            with torch.no_grad():
                ref.get_submodule(name).weight.copy_(mod.dequantized_weight().float())
    for name, fmt in seen.items():
        leaf = name.rsplit(".", 1)[-1]
        if name == "model.layers.1.mlp.up_proj":
            assert fmt == "none" and gm.get_submodule(name).r == 2
        elif leaf in EXPECTED:
            assert fmt == EXPECTED[leaf], name
    assert gm.get_submodule("model.layers.0.self_attn.k_proj").r is None  # quantize-only
    assert gm.get_submodule("model.layers.0.self_attn.q_proj").r == 4
    gm.eval()
    with torch.no_grad():
        got, want = gm(**case.inputs).logits, ref(**case.inputs).logits
    # llm-int8 quantizes activations per token at run time, so the model is not exactly
    # x·deq(W)ᵀ there: int8 activation rounding adds at most ~1/254 relative error per product.
    torch.testing.assert_close(got, want, atol=2e-2, rtol=0)
    assert (got - want).abs().max() > 0  # the llm-int8 layers do quantize activations


@pytest.mark.parametrize("fmt", ["int8", "int8-zeropoint", "llm-int8", "fp4"])
def test_each_format_trains(fmt):
    case = make_case("gpt2")
    plan = {"targets": case.all_targets, "quant": {"format": fmt, "double_quant": False}, "lora": {"r": 4}}
    gm = peftfx.compile(case.model, plan, example_inputs=case.inputs)
    opt = torch.optim.AdamW(peftfx.trainable_parameters(gm).values(), lr=1e-2)
    gm.eval()
    with torch.no_grad():
        first = gm(**case.inputs).loss.item()
    for _ in range(10):
        opt.zero_grad()
        gm(**case.inputs).loss.backward()
        opt.step()
    with torch.no_grad():
        assert gm(**case.inputs).loss.item() < first


def test_swap_is_idempotent_on_an_already_swapped_graph():
    """Running the pass again finds no aten.linear for the swapped layers and changes nothing."""
    from peftfx.pass_manager import PassContext
    from peftfx.passes.swap_linear import swap_linear
    from peftfx.plan import Plan

    case = make_case("llama")
    plan = Plan.from_dict({"targets": ["q_proj"], "lora": {"r": 4}})
    gm = peftfx.compile(case.model, plan, example_inputs=case.inputs)
    code = gm.code
    with pytest.raises(peftfx.PlanError, match="q_proj"):
        swap_linear(gm, PassContext(plan=plan))  # nothing left to match: says so, changes nothing
    assert gm.code == code


def test_plan_compute_dtype_reaches_every_swapped_layer_and_bf16_training_runs():
    """``quant.compute_dtype`` (bnb's ``bnb_4bit_compute_dtype``) sets the base GEMM dtype per layer; rules
    may override it. bf16 GEMMs change the logits by bf16 rounding only, and LoRA still trains in fp32."""
    case = make_case("llama")
    ref = peftfx.compile(copy.deepcopy(case.model), {**RULES_PLAN, "rules": []}, example_inputs=case.inputs)
    plan = {**RULES_PLAN, "quant": {**RULES_PLAN["quant"], "compute_dtype": "bfloat16"},
            "rules": [{"targets": ["down_proj"], "quant": {"format": "nf4", "compute_dtype": "float32"}}]}
    gm = peftfx.compile(case.model, plan, example_inputs=case.inputs)
    dtypes = {n.rsplit(".", 1)[-1]: m.compute_dtype for n, m in gm.named_modules() if isinstance(m, QLoRALinear)}
    assert dtypes["q_proj"] == "bfloat16" and dtypes["down_proj"] == "float32"
    big = {k: v.repeat(4, 3) for k, v in case.inputs.items()}  # 8 x 21 rows: above the fp32 GEMV cut-off
    out, want = gm(**big).logits, ref(**big).logits
    assert not torch.equal(out, want)
    torch.testing.assert_close(out, want, rtol=0.05, atol=0.05)
    gm.train()
    gm(**big).loss.backward()
    grads = [p.grad for n, p in gm.named_parameters() if p.requires_grad]
    assert grads and all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


def test_auto_compute_dtype_is_recorded_and_resolved_per_call(monkeypatch):
    from peftfx.kernels import cpu_gemm, dtypes

    case = make_case("llama")
    plan = {**RULES_PLAN, "rules": [], "quant": {**RULES_PLAN["quant"], "compute_dtype": "auto"}}
    gm = peftfx.compile(case.model, plan, example_inputs=case.inputs)
    mods = [m for m in gm.modules() if isinstance(m, QLoRALinear)]
    assert mods and {m.compute_dtype for m in mods} == {"auto"}
    seen = []
    real = cpu_gemm.qlora_forward
    monkeypatch.setattr(cpu_gemm, "qlora_forward", lambda *a: seen.append(a[-1]) or real(*a))
    for fast in (True, False):
        monkeypatch.setitem(dtypes._FAST_BF16, "cpu", fast)
        seen.clear()
        gm(**case.inputs)
        assert set(seen) == {torch.bfloat16 if fast else None}
