"""activation_checkpoint: blocks recompute in backward with the same outputs, gradients and names.

Equality is checked in train mode with LoRA dropout 0.1 (and each family's own dropout), so the
recompute must replay the forward's RNG state to match.
"""
from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn
from torch.utils import _pytree as pytree

import peftfx
from peftfx.errors import PlanError
from peftfx.kernels.checkpointed_block import CheckpointedBlock, offload_hooks
from peftfx.pass_manager import PassContext
from peftfx.passes.activation_checkpoint import FALLBACK_KEY, activation_checkpoint, checkpoint_blocks
from peftfx.plan import Plan
from tests.model_zoo import ZOO, make_case


def _plan(case, **memory) -> dict:
    plan = {"targets": case.all_targets, "quant": {"format": "nf4"},
            "lora": {"r": 4, "alpha": 8, "dropout": 0.1, "targets": case.attn_targets}}
    return {**plan, "memory": memory} if memory else plan


def _randomize_lora_b(gm) -> None:
    with torch.no_grad():  # non-zero B: every adapter changes outputs and gets a gradient
        for n, p in gm.named_parameters():
            if n.endswith("lora_B"):
                p.normal_()


def _run(gm, inputs: dict, seed: int = 7):
    """Float outputs and parameter gradients of one train-mode step (dropout masks fixed by seed)."""
    gm.train()
    gm.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = [t for t in pytree.tree_leaves(gm(**inputs)) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    sum(t.float().sum() for t in out if t.requires_grad).backward()
    return out, {n: p.grad for n, p in gm.named_parameters() if p.grad is not None}


def _assert_same(a, b, tol: float = 1e-6) -> None:
    (out, grads), (ref_out, ref_grads) = a, b
    assert len(out) == len(ref_out) and all(x.shape == y.shape for x, y in zip(out, ref_out))
    assert max((x - y).abs().max().item() for x, y in zip(out, ref_out)) <= tol
    assert grads.keys() == ref_grads.keys() and grads
    assert max((grads[k] - ref_grads[k]).abs().max().item() for k in grads) <= tol


def _checkpointed(gm, mode: str):
    """A copy of ``gm`` with the pass applied (as compile runs it, on the copied module)."""
    out = copy.deepcopy(gm)
    plan = Plan.from_dict({"train_top_layers": 0, "train_modules": [], "lora": {"r": 1}, "targets": ["x"],
                           "memory": {"checkpoint": mode}})
    return activation_checkpoint(out, PassContext(plan=plan)).graph_module


# llama (decoder) and gpt2 (Conv1D, the model's own dropout) by default; the rest (t5: two stacks) in slow
_DEFAULT_FAMILIES = ("llama", "gpt2")


@pytest.mark.parametrize("name", [n if n in _DEFAULT_FAMILIES else pytest.param(n, marks=pytest.mark.slow)
                                  for n in ZOO])
def test_blocks_and_selective_equal_the_plain_compile_in_train_mode(name):
    case = make_case(name)
    gm = peftfx.compile(case.model, _plan(case), example_inputs=case.inputs)
    _randomize_lora_b(gm)
    ref = _run(gm, case.inputs)
    for mode in ("blocks", "selective"):
        ck = _checkpointed(gm, mode)
        blocks = [m for m in ck.modules() if isinstance(m, CheckpointedBlock)]
        assert len(blocks) >= 2 and all(b.policy == ("full" if mode == "blocks" else "selective") for b in blocks)
        assert [n for n, _ in ck.named_parameters()] == [n for n, _ in gm.named_parameters()]
        _assert_same(_run(ck, case.inputs), ref)


def test_compile_with_memory_keeps_names_files_and_other_shapes(tmp_path):
    case = make_case("llama")
    torch.manual_seed(0)
    gm = peftfx.compile(copy.deepcopy(case.model), _plan(case), example_inputs=case.inputs)
    torch.manual_seed(0)
    ck = peftfx.compile(case.model, _plan(case, checkpoint="blocks"), example_inputs=case.inputs)
    assert list(ck.state_dict()) == list(gm.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(ck.state_dict().values(), gm.state_dict().values()))
    assert isinstance(ck.get_submodule("model.layers.1"), CheckpointedBlock)
    record = next(r for r in peftfx.report(ck) if r.name == "activation_checkpoint")
    saves = {n["block"]: n["saves"] for n in record.notes if "block" in n}
    assert list(saves) == ["model.layers.0", "model.layers.1"]
    assert any("[s" in s for s in saves["model.layers.0"])  # the block input hidden states, with shapes
    _randomize_lora_b(gm)
    ck.load_state_dict(gm.state_dict())
    _assert_same(_run(ck, case.other_inputs), _run(gm, case.other_inputs))
    ck.eval()
    with torch.no_grad():
        assert torch.equal(ck(**case.inputs).logits, gm.eval()(**case.inputs).logits)

    peftfx.save_adapters(ck, tmp_path)  # the adapter file loads into the un-checkpointed module
    fresh = peftfx.compile(make_case("llama").model, _plan(case), example_inputs=case.inputs)
    peftfx.load_adapters(fresh, tmp_path)
    ref = peftfx.trainable_parameters(ck)
    assert all(torch.equal(p, ref[n]) for n, p in peftfx.trainable_parameters(fresh).items())

    block = ck.get_submodule("model.layers.0")  # copies and pickles stay checkpointed
    for clone in (copy.deepcopy(block), pickle.loads(pickle.dumps(block))):
        assert isinstance(clone, CheckpointedBlock) and clone.policy == "full"


def _retained_by_forward(m, inputs) -> int:
    """Bytes the forward leaves allocated (outputs + what autograd keeps for backward), from the
    profiler's allocator events (their signed sum over the forward)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = m(**inputs)
    retained = sum(e.nbytes() for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    out.loss.backward()
    return retained


def test_recompute_keeps_fewer_bytes_alive_after_forward():
    """off > selective > blocks: the mechanism, not only equal numbers."""
    case = make_case("llama")
    inputs = {k: torch.cat([v] * 8) for k, v in case.inputs.items()}  # activations dominate the logits
    gm = peftfx.compile(case.model, _plan(case), example_inputs=case.inputs)
    kept = {mode: _retained_by_forward(gm.train() if mode == "off" else _checkpointed(gm, mode).train(), inputs)
            for mode in ("off", "selective", "blocks")}
    assert kept["off"] > kept["selective"] > kept["blocks"] > 0, kept


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.drop = nn.Dropout(0.2)
        self.scale = nn.Parameter(torch.ones(16))

    def forward(self, x):
        return self.drop(torch.relu(self.fc(x))) * self.scale + x


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Module()
        self.body.layers = nn.ModuleList(_Block() for _ in range(2))

    def forward(self, x):
        layers = self.body.layers
        return layers[1](layers[0](x)) * layers[0].scale  # block 0's parameter is read outside it


def test_blocks_that_cannot_be_outlined_fall_back_to_whole_graph_selective_recompute():
    torch.manual_seed(0)
    x = torch.randn(3, 16)
    plan = {"targets": ["body.layers.*.fc"], "lora": {"r": 2, "alpha": 4, "dropout": 0.1}, "train_modules": ["body.layers.0"]}
    gm = peftfx.compile(_Tied(), plan, example_inputs=(x,))
    _randomize_lora_b(gm)
    ck = copy.deepcopy(gm)
    with pytest.warns(UserWarning, match="read outside its block"):
        assert checkpoint_blocks(ck, "selective") == []
    assert "read outside its block" in ck.meta[FALLBACK_KEY]

    def run(m):
        m.train()
        m.zero_grad(set_to_none=True)
        torch.manual_seed(3)
        y = m(x)
        y.square().sum().backward()
        return [y], {n: p.grad for n, p in m.named_parameters() if p.grad is not None}

    _assert_same(run(ck), run(gm))


def test_offload_on_cpu_is_accepted_as_a_noop_and_the_hooks_see_only_block_inputs():
    case = make_case("llama")
    plan = _plan(case, checkpoint="blocks", offload="cpu")
    gm = peftfx.compile(case.model, plan, example_inputs=case.inputs)
    record = next(r for r in peftfx.report(gm) if r.name == "activation_checkpoint")
    assert any("no effect" in n.get("offload", "") for n in record.notes)
    assert all(b.offload for b in gm.modules() if isinstance(b, CheckpointedBlock))
    packed = []

    def pack(t):
        packed.append(tuple(t.shape))
        return t

    gm.train()
    with offload_hooks(pack, lambda t: t):
        gm(**case.inputs).loss.backward()
    hidden = tuple(case.inputs["input_ids"].shape) + (64,)
    assert packed.count(hidden) == 2  # each block's hidden-state input, nothing from inside the blocks
    assert all(len(s) < 3 or s == hidden or s[-1] == 16 or s[-1] == s[-2] for s in packed), packed


@pytest.mark.parametrize("memory, match", [
    ({"checkpoint": "everything"}, "memory.checkpoint"),
    ({"offload": "disk", "checkpoint": "blocks"}, "memory.offload"),
    ({"budget": "24 gigs"}, "'24 gigs'"),
    ({"budget": "-1GiB"}, "positive"),
    ({"budget": 0}, "positive"),
    ({"budget": True}, "True"),
    ({"offload": "cpu"}, "checkpoint = 'off'"),
    ({"checkpoint": "blocks", "budgte": "1GiB"}, "did you mean 'budget'"),
])
def test_bad_memory_sections_raise_plan_errors_naming_the_value(memory, match):
    with pytest.raises(PlanError, match=match):
        Plan.from_dict({"targets": ["q"], "lora": {"r": 2}, "memory": memory})


def test_memory_section_round_trips_and_parses_sizes():
    plan = Plan.from_dict({"targets": ["q"], "lora": {"r": 2},
                           "memory": {"checkpoint": "selective", "offload": "cpu", "budget": "1.5GB"}})
    assert plan.memory.budget_bytes == 1_500_000_000
    assert Plan.from_dict(plan.to_dict()) == plan and "[memory]" in plan.to_toml()
    assert Plan.from_dict({"targets": ["q"], "lora": {"r": 2}, "memory": {"budget": "24GiB"}}).memory.budget_bytes \
        == 24 * 2**30


@pytest.mark.parametrize("extra", [
    {"quant": {"format": "int8"}, "adapter": {"size": 8}},
    pytest.param({"quant": {"format": "llm-int8"}, "prefix": {"tokens": 3}}, marks=pytest.mark.slow),
    pytest.param({"quant": {"format": "int8-zeropoint"}, "prompt": {"tokens": 3}}, marks=pytest.mark.slow),
    pytest.param({"quant": {"format": "fp4", "double_quant": False}}, marks=pytest.mark.slow),
])
def test_checkpointing_composes_with_every_format_and_adapter_kind(extra):
    case = make_case("llama")
    gm = peftfx.compile(case.model, {**_plan(case), **extra}, example_inputs=case.inputs)
    _randomize_lora_b(gm)
    ref = _run(gm, case.inputs)
    for mode in ("blocks", "selective"):
        _assert_same(_run(_checkpointed(gm, mode), case.inputs), ref)


@pytest.mark.slow
def test_multi_adapter_model_checkpoints_its_blocks():
    from peftfx.serve.multi_adapter import compile_multi

    case = make_case("llama")
    plans = {name: {"targets": case.attn_targets, "lora": {"r": r, "alpha": 8}} for name, r in (("a", 2), ("b", 4))}
    gm = compile_multi(case.model, plans, example_inputs=case.inputs)
    slots = [p for n, p in gm.named_parameters() if "lora" in n] + [b for n, b in gm.named_buffers() if "lora" in n]
    with torch.no_grad():
        for t in slots:
            if t.is_floating_point():
                t.normal_()
    ids = torch.tensor([0, 1])
    inputs = {**case.inputs, "adapter_ids": ids}
    with torch.no_grad():
        ref = gm(**inputs).logits
    ck = copy.deepcopy(gm)
    assert len(checkpoint_blocks(ck, "selective")) == 2
    with torch.no_grad():
        assert torch.equal(ck(**inputs).logits, ref)
    # training through the checkpointed blocks: gradients reach the inputs' embeddings the same way
    emb = dict(gm.named_parameters())["model.embed_tokens.weight"]
    grads = []
    for m in (gm, ck):
        p = dict(m.named_parameters())["model.embed_tokens.weight"]
        p.requires_grad_(True)
        m.train()
        m(**inputs).logits.square().mean().backward()
        grads.append(p.grad)
    assert emb.shape == grads[0].shape and torch.allclose(grads[0], grads[1], rtol=0, atol=1e-6)


def test_fsdp2_shards_a_checkpointed_model(tmp_path):
    import torch.distributed as dist

    from peftfx.distributed import shard

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        case = make_case("llama")
        # tile_tokens 3: the MLPs run tiled in two chunks inside the sharded, checkpointed blocks
        gm = peftfx.compile(case.model, _plan(case, checkpoint="blocks", tile_tokens=3), example_inputs=case.inputs)
        _randomize_lora_b(gm)
        ref = _run(copy.deepcopy(gm), case.inputs)
        fsdp = shard(gm)
        assert gm.meta["peftfx.fsdp_groups"] == ["model.layers.0", "model.layers.1", ""]
        assert isinstance(gm.get_submodule("model.layers.0"), CheckpointedBlock)
        out = _run(fsdp, case.inputs)
        full = {n: g.full_tensor() if hasattr(g, "full_tensor") else g for n, g in out[1].items()}
        _assert_same((out[0], full), ref, tol=1e-5)
        dist.barrier()
    finally:
        dist.destroy_process_group()
