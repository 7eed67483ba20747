"""tile_mlp: MLPs run in token chunks with the untiled outputs and gradients, and keep less alive.

Compared against the same plan with ``tile_mlp = false``: bitwise with one chunk (the default
chunking on the zoo's short inputs), within 1e-6 relative with several chunks (``min_tokens`` set
small), where only the row blocks of the GEMMs and the sum of the LoRA gradients over chunks differ.
"""
from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

import peftfx
from peftfx.errors import PlanError
from peftfx.kernels.checkpointed_block import CheckpointedBlock
from peftfx.kernels.tiled_mlp import TiledMLP, tile_tokens
from peftfx.memory.twin import step_breakdown
from peftfx.plan import Plan
from tests.model_zoo import make_case


def _plan(case, lora_dropout: float = 0.0, **memory) -> dict:
    # LoRA on every linear (the MLP's too, so its adapters train through the chunks)
    return {"targets": case.all_targets, "quant": {"format": "nf4"},
            "lora": {"r": 4, "alpha": 8, "dropout": lora_dropout}, "memory": {"checkpoint": "blocks", **memory}}


def _pair(case, plan: dict, untiled_memory: dict | None = None):
    """(tiled, untiled) compiles of ``case`` with the same random non-zero LoRA B."""
    models = []
    for memory in (plan["memory"], untiled_memory or {**plan["memory"], "tile_mlp": False}):
        torch.manual_seed(0)
        models.append(peftfx.compile(copy.deepcopy(case.model), {**plan, "memory": memory}, example_inputs=case.inputs))
    with torch.no_grad():
        for (name, p), (_, q) in zip(models[0].named_parameters(), models[1].named_parameters()):
            if name.endswith("lora_B"):
                p.normal_()
                q.copy_(p)
    return models


def _run(gm, inputs: dict, seed: int = 7):
    gm.train()
    gm.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = gm(**inputs)
    (out.loss + out.logits.float().square().mean()).backward()
    return out.logits.detach(), {n: p.grad for n, p in gm.named_parameters() if p.grad is not None}


def _assert_close(a, b, rel: float) -> None:
    (out, grads), (ref_out, ref_grads) = a, b
    assert grads.keys() == ref_grads.keys() and any(".mlp." in k for k in grads)
    for x, y in [(out, ref_out)] + [(grads[k], ref_grads[k]) for k in grads]:
        if rel == 0:
            assert torch.equal(x, y)
        else:
            assert (x - y).abs().max().item() <= rel * max(y.abs().max().item(), 1.0)


def _tiled(gm) -> list[TiledMLP]:
    return [m for m in gm.modules() if isinstance(m, TiledMLP)]


@pytest.mark.parametrize("name", ["llama", "gpt2"] + [pytest.param(n, marks=pytest.mark.slow)
                                                       for n in ("qwen2", "qwen3", "mistral")])
def test_tiled_mlp_equals_the_untiled_compile(name):
    """One chunk: bitwise; several chunks (min_tokens 3 on 33 tokens): within 1e-6."""
    case = make_case(name)
    tiled, ref = _pair(case, _plan(case))
    mlps = _tiled(tiled)
    assert len(mlps) == 2 and not _tiled(ref)
    assert all(isinstance(b, CheckpointedBlock) for b in (tiled.get_submodule(p.rsplit(".", 1)[0]) for p in
                                                            [n for n, m in tiled.named_modules() if m in mlps]))
    assert [n for n, _ in tiled.named_parameters()] == [n for n, _ in ref.named_parameters()]
    _assert_close(_run(tiled, case.inputs), _run(ref, case.inputs), rel=0)
    for m in mlps:
        m.set_tiling(True, min_tokens=3)
    assert len(mlps[0].chunks(torch.empty(3, 11, 64))) >= 2
    _assert_close(_run(tiled, case.other_inputs), _run(ref, case.other_inputs), rel=1e-6)


@pytest.mark.parametrize("fmt", ["int8"] + [pytest.param(f, marks=pytest.mark.slow)
                                            for f in ("int8-zeropoint", "fp4", "none")])
def test_every_format_tiles_with_lora_on_the_mlp(fmt):
    case = make_case("llama")
    plan = _plan(case, tile_tokens=3)
    plan["quant"] = {"format": fmt} if fmt != "none" else {"format": "none"}
    tiled, ref = _pair(case, plan)
    assert all(m.min_tokens == 3 for m in _tiled(tiled))
    _assert_close(_run(tiled, case.other_inputs), _run(ref, case.other_inputs), rel=1e-6)


@pytest.mark.parametrize("checkpoint", [pytest.param(c, marks=pytest.mark.slow) for c in ("off", "selective")])
def test_tile_mlp_true_works_without_block_checkpointing(checkpoint):
    case = make_case("llama")
    tiled, ref = _pair(case, _plan(case, tile_mlp=True, tile_tokens=3, checkpoint=checkpoint),
                       {"checkpoint": checkpoint})
    assert len(_tiled(tiled)) == 2
    _assert_close(_run(tiled, case.other_inputs), _run(ref, case.other_inputs), rel=1e-6)


def test_lora_dropout_in_the_mlp_replays_the_forward_masks_in_backward():
    """Per-chunk masks (not the untiled graph's); backward must see the forward's, so the tiled
    gradients equal autograd's through the very same chunked forward."""
    case = make_case("llama")
    gm = peftfx.compile(case.model, _plan(case, lora_dropout=0.5), example_inputs=case.inputs).train()
    mlp = gm.get_submodule("model.layers.1.mlp")
    mlp.set_tiling(True, min_tokens=3)
    with torch.no_grad():
        for p in mlp.parameters():
            if p.requires_grad:
                p.normal_()
    x = torch.randn(3, 11, 64, requires_grad=True)
    g = torch.randn(3, 11, 64)

    def grads(tiled: bool, seed: int):
        mlp.zero_grad(set_to_none=True)
        x.grad = None
        torch.manual_seed(seed)
        if tiled:
            y = mlp(x)
        else:  # the same chunks, straight through autograd (no recompute)
            y = torch.cat([mlp.graph_call((x[:, s:s + n],)) for s, n in mlp.chunks(x)], dim=1)
        torch.autograd.backward(y, g)
        return [y.detach(), x.grad] + [p.grad for p in mlp.parameters() if p.requires_grad]

    tiled, direct = grads(True, 1), grads(False, 1)
    assert all(torch.equal(a, b) for a, b in zip(tiled, direct))
    assert not torch.equal(grads(True, 2)[0], tiled[0])  # the masks do depend on the RNG


def test_llm_int8_mlps_stay_untiled():
    """LLM.int8 picks its outlier columns over all rows of a call: chunks would pick others."""
    case = make_case("llama")
    gm = peftfx.compile(case.model, {**_plan(case), "quant": {"format": "llm-int8"}}, example_inputs=case.inputs)
    assert not _tiled(gm)
    notes = next(r for r in peftfx.report(gm) if r.name == "tile_mlp").notes
    assert all("llm-int8" in n["reason"] for n in notes), notes


def _wide_llama():
    import transformers

    torch.manual_seed(0)  # intermediate 8x hidden: the MLP's backward is the step's peak, as at scale
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=512, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, use_cache=False,
                                   attn_implementation="sdpa")
    return transformers.LlamaForCausalLM(cfg)


def test_tiling_lowers_the_estimated_peak_and_survives_copies():
    case = make_case("llama")
    ids = torch.randint(0, 96, (2, 128))
    inputs = {"input_ids": ids, "labels": ids}
    plans = {t: _plan(case, tile_mlp=t, tile_tokens=16) for t in (True, False)}
    peaks = {}
    for t, plan in plans.items():
        gm = peftfx.compile(_wide_llama(), plan, example_inputs=inputs)
        peaks[t] = step_breakdown(gm, inputs).forward_backward_peak
    # 256 tokens in 8 chunks of 32: at least three [256, 512] fp32 tensors fewer at the peak
    assert peaks[True] < peaks[False] - 3 * 256 * 512 * 4, peaks
    gm = peftfx.compile(make_case("llama").model, plans[True], example_inputs=case.inputs)
    record = next(r for r in peftfx.report(gm) if r.name == "tile_mlp")
    assert [n["mlp"] for n in record.notes if n.get("tiled")] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    mlp = gm.get_submodule("model.layers.0.mlp")
    for clone in (copy.deepcopy(mlp), pickle.loads(pickle.dumps(mlp))):
        assert isinstance(clone, TiledMLP) and clone.min_tokens == 16 and clone.enabled
        assert clone.last_linear == "down_proj"
    with pytest.raises(PlanError, match="got 0"):
        mlp.set_tiling(False, 0)
    assert mlp.min_tokens == 16 and mlp.enabled  # nothing changed


def test_mlps_that_are_not_row_wise_stay_untiled_with_a_reason():
    class Mix(nn.Module):  # an "MLP" that mixes tokens: chunking it would be wrong
        def __init__(self):
            super().__init__()
            self.up = nn.Linear(8, 16)

        def forward(self, x):
            return self.up(x).softmax(dim=1)[..., :8]

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = Mix()

        def forward(self, x):
            return x + self.mlp(x)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(Block() for _ in range(2))

        def forward(self, x):
            for layer in self.layers:
                x = layer(x)
            return x

    gm = peftfx.compile(Net(), {"targets": ["*.up"], "lora": {"r": 2}, "memory": {"checkpoint": "blocks"}},
                        example_inputs=(torch.randn(2, 5, 8),))
    assert not _tiled(gm)
    notes = next(r for r in peftfx.report(gm) if r.name == "tile_mlp").notes
    assert all(not n["tiled"] and "row-wise" in n["reason"] for n in notes), notes


@pytest.mark.parametrize("memory, match", [
    ({"tile_mlp": "yes"}, "'yes'"),
    ({"tile_mlp": 1}, "tile_mlp"),
    ({"tile_tokens": 0}, "memory.tile_tokens"),
    ({"tile_tokens": "512"}, "'512'"),
])
def test_bad_tile_settings_raise_plan_errors_naming_the_value(memory, match):
    with pytest.raises(PlanError, match=match):
        Plan.from_dict({"targets": ["q"], "lora": {"r": 2}, "memory": {"checkpoint": "blocks", **memory}})


def test_tile_settings_resolve_and_round_trip():
    spec = lambda **kw: Plan.from_dict({"targets": ["q"], "lora": {"r": 2}, "memory": kw}).memory  # noqa: E731
    assert spec(checkpoint="blocks").tiles_mlp and not spec(checkpoint="selective").tiles_mlp
    assert not spec(checkpoint="off").tiles_mlp and spec(checkpoint="off", tile_mlp=True).tiles_mlp
    assert not spec(checkpoint="blocks", tile_mlp=False).tiles_mlp
    plan = Plan.from_dict({"targets": ["q"], "lora": {"r": 2}, "memory": {"checkpoint": "blocks", "tile_mlp": True,
                                                                          "tile_tokens": 256}})
    assert Plan.from_dict(plan.to_dict()) == plan and "tile_mlp = true" in plan.to_toml()
    # ceil(tokens * hidden / intermediate), at least min_tokens: Llama's 2.75x -> 3 chunks at 2048
    assert tile_tokens(2048, 1024, 2816) == 745 and tile_tokens(512, 1024, 2816) == 512
    assert tile_tokens(100, 64, 96, min_tokens=3) == 67
