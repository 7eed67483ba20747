"""peftfx.distributed.blocks: outlining transformer blocks into called submodules is exact and keeps every name."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.fx import GraphModule
from torch.utils import _pytree as pytree

import peftfx
from peftfx.distributed.blocks import block_prefixes, outline_blocks


def _compile(name: str):
    from tests.model_zoo import make_case

    case = make_case(name)
    plan = {"targets": case.all_targets, "quant": {"format": "nf4"}, "lora": {"r": 4, "alpha": 8, "targets": case.attn_targets}}
    torch.manual_seed(0)
    gm = peftfx.compile(case.model, plan, example_inputs=case.inputs)
    with torch.no_grad():  # non-zero B: every adapter changes outputs and gets a gradient
        for n, p in gm.named_parameters():
            if n.endswith("lora_B"):
                p.normal_()
    return case, gm


def _run(gm, inputs: dict, seed: int = 7):
    """Float outputs and parameter gradients of one forward/backward (same dropout masks by seed)."""
    gm.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = [t for t in pytree.tree_leaves(gm(**inputs)) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    sum(t.sum() for t in out if t.requires_grad).backward()
    return out, {n: p.grad for n, p in gm.named_parameters() if p.grad is not None}


def _max_diff(a, b) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def test_outlined_llama_is_exact_and_keeps_every_name(tmp_path):
    case, gm = _compile("llama")
    ref = copy.deepcopy(gm)
    tensors = {k: v for k, v in gm.state_dict(keep_vars=True).items()}
    result = outline_blocks(gm)
    assert result.blocks == ["model.layers.0", "model.layers.1"] and not result.reason
    for b in result.blocks:  # the root calls the block; the block graph reads its own parameters
        assert isinstance(gm.get_submodule(b), GraphModule)
        assert [n.target for n in gm.graph.nodes if n.op == "call_module" and n.target == b] == [b]
        assert not any(n.op == "get_attr" and n.target.startswith(b + ".") for n in gm.graph.nodes)
    after = gm.state_dict(keep_vars=True)
    assert list(after) == list(tensors) and all(after[k] is tensors[k] for k in tensors)  # same names, same tensors
    assert "model.layers.0.self_attn.q_proj.lora_A" in peftfx.trainable_parameters(gm)
    assert sorted(peftfx.trainable_parameters(gm)) == sorted(peftfx.trainable_parameters(ref))

    inputs = {**case.inputs, "labels": case.inputs["input_ids"]}
    out, grads = _run(gm, inputs)
    ref_out, ref_grads = _run(ref, inputs)
    assert type(gm(**inputs)) is type(ref(**inputs))  # pytree codegen: same output structure
    assert _max_diff(out, ref_out) == 0.0
    assert grads.keys() == ref_grads.keys() and len(grads) == 8
    assert _max_diff(grads.values(), ref_grads.values()) == 0.0
    with torch.no_grad():  # other batch/sequence sizes still run (dynamic dims pass through the blocks)
        assert torch.equal(gm(**case.other_inputs).logits, ref(**case.other_inputs).logits)
    gm.eval()
    assert not gm.get_submodule("model.layers.1").training and not gm.get_submodule("model.layers.1.mlp").training

    code = gm.code
    assert outline_blocks(gm).blocks == result.blocks and gm.code == code  # idempotent
    peftfx.save_adapters(gm, tmp_path)  # adapter files are interchangeable with the flat graph's
    fresh = copy.deepcopy(ref)
    peftfx.load_adapters(fresh, tmp_path)
    assert all(torch.equal(p, peftfx.trainable_parameters(gm)[n]) for n, p in peftfx.trainable_parameters(fresh).items())


@pytest.mark.parametrize("name", ["gpt2", "t5"])
def test_outlined_families_are_exact_in_train_mode(name):
    case, gm = _compile(name)
    gm.train()  # GPT-2 / T5 dropout: same RNG stream, same masks
    ref = copy.deepcopy(gm)
    result = outline_blocks(gm)
    assert len(result.blocks) == len(block_prefixes(ref)) >= 2, result
    if name == "t5":  # every stack is outlined, encoder before decoder
        assert [b.rpartition(".")[0] for b in result.blocks] == ["encoder.block"] * 2 + ["decoder.block"] * 2
    out, grads = _run(gm, case.inputs)
    ref_out, ref_grads = _run(ref, case.inputs)
    assert _max_diff(out, ref_out) == 0.0
    assert grads.keys() == ref_grads.keys() and grads
    assert _max_diff(grads.values(), ref_grads.values()) == 0.0


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.scale = nn.Parameter(torch.ones(16))

    def forward(self, x):
        return torch.relu(self.fc(x)) * self.scale


class Stack(nn.Module):
    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.body = nn.Module()
        self.body.layers = nn.ModuleList(Block() for _ in range(2))

    def forward(self, x):
        layers = self.body.layers
        if self.mode == "tied":  # block 0's parameter is read again by root code
            return layers[1](layers[0](x)) * layers[0].scale
        if self.mode == "interleaved":  # block 0 runs before and after block 1
            return layers[0](layers[1](layers[0](x)))
        return layers[1](layers[0](x))


@pytest.mark.parametrize("mode, why", [("tied", "read outside its block"), ("interleaved", "not contiguous")])
def test_unsafe_blocks_are_left_alone_with_a_reason(mode, why):
    torch.manual_seed(0)
    model = Stack(mode)
    gm = peftfx.compile(model, {"targets": ["body.layers.*.fc"], "lora": {"r": 2, "alpha": 4}},
                        example_inputs=(torch.randn(3, 16),))
    code = gm.code
    result = outline_blocks(gm)
    assert result.blocks == [] and why in result.reason and result.found == ["body.layers.0", "body.layers.1"]
    assert gm.code == code and not isinstance(gm.get_submodule("body.layers.0"), GraphModule)


def test_plain_stack_is_outlined_and_exact():
    torch.manual_seed(0)
    gm = peftfx.compile(Stack("plain"), {"targets": ["body.layers.*.fc"], "lora": {"r": 2, "alpha": 4}},
                        example_inputs=(torch.randn(3, 16),))
    ref, x = copy.deepcopy(gm), torch.randn(5, 16)
    assert outline_blocks(gm).blocks == ["body.layers.0", "body.layers.1"]
    assert torch.equal(gm(x), ref(x))


def test_model_without_blocks_is_left_alone():
    gm = peftfx.compile(nn.Sequential(nn.Linear(8, 8)), {"targets": ["0"], "lora": {"r": 2, "alpha": 4}},
                        example_inputs=(torch.randn(2, 8),))
    result = outline_blocks(gm)
    assert result.blocks == [] and result.found == [] and "no block stack" in result.reason
