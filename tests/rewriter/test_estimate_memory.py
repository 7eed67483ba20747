"""[memory] in the estimate: measured peaks follow the estimate for each setting, budgets, --fit, big configs.

Peaks are measured as tests/rewriter/test_estimate.py does (``measure_peak``: the profiler's CPU
allocator events over one steady-state step, plus the bytes alive before it). On CPU, ``offload =
"cpu"`` is accepted and does nothing, in the estimate (``train_device = "cpu"``) as in the measured
step; bench/gpu_check.sh measures it on CUDA.
"""
from __future__ import annotations

import pytest
import torch

import peftfx
from peftfx.errors import PlanError
from peftfx.inspect.estimate import estimate, format_bytes, loss_of, measure_peak, step_breakdown
from peftfx.kernels.checkpointed_block import CheckpointedBlock
from peftfx.plan import Plan

ALL = ["*.q_proj", "*.k_proj", "*.v_proj", "*.o_proj", "*.gate_proj", "*.up_proj", "*.down_proj"]
QLORA = {"targets": ALL, "quant": {"format": "nf4", "double_quant": True},
         "lora": {"r": 8, "alpha": 16, "targets": ["q_proj", "v_proj"]}}
SETTINGS = {"off": {"checkpoint": "off"}, "blocks": {"checkpoint": "blocks"},
            "selective": {"checkpoint": "selective"}, "blocks+offload": {"checkpoint": "blocks", "offload": "cpu"},
            # 512 tokens in 3 MLP chunks of 171 (hidden 256, intermediate 768)
            "blocks+tiled": {"checkpoint": "blocks", "tile_tokens": 64},
            "blocks untiled": {"checkpoint": "blocks", "tile_mlp": False}}


def _small_llama(layers: int = 4):
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=768, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                   use_cache=False, attn_implementation="sdpa")
    return transformers.LlamaForCausalLM(cfg).train()


def _inputs(batch: int = 4, seq: int = 128) -> dict:
    torch.manual_seed(1)
    ids = torch.randint(0, 512, (batch, seq))
    return {"input_ids": ids, "labels": ids}


def _measured_peak(gm, inputs) -> int:
    gm.train()
    opt = torch.optim.AdamW([p for p in gm.parameters() if p.requires_grad], lr=1e-4)

    def step():
        loss_of(gm(**inputs)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up: the optimizer state exists before the measured step
    state = [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    tensors = list(gm.parameters()) + list(gm.buffers()) + [inputs["input_ids"]] + state
    resident = sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())
    return measure_peak(step, resident=resident)


@pytest.mark.parametrize("setting", [
    "blocks", "blocks+tiled", pytest.param("blocks untiled", marks=pytest.mark.slow),
    pytest.param("selective", marks=pytest.mark.slow), pytest.param("blocks+offload", marks=pytest.mark.slow),
])
def test_measured_peak_follows_the_estimate_for_each_memory_setting(setting):
    """off is tests/rewriter/test_estimate.py's nf4+lora case; the ordering of the settings'
    measured savings is tests/passes/test_activation_checkpoint.py's."""
    inputs = _inputs()
    plan = {**QLORA, "memory": SETTINGS[setting]}
    est = estimate(_small_llama(), plan, example_inputs=inputs)
    assert est.memory["checkpoint"] == SETTINGS[setting]["checkpoint"] and est.memory["checkpointed_blocks"] == 4
    assert est.memory["tiled_mlps"] == (4 if setting in ("blocks", "blocks+tiled", "blocks+offload") else 0)
    measured = _measured_peak(peftfx.compile(_small_llama(), plan, example_inputs=inputs), inputs)
    ratio = est.after.peak / measured
    print(f"{setting}: estimated {format_bytes(est.after.peak)}, measured {format_bytes(measured)}, ratio {ratio:.3f}")
    assert 0.85 <= ratio <= 1.15, (setting, est.after.peak, measured)
    off = estimate(_small_llama(), QLORA, example_inputs=inputs).after.peak
    # checkpointing shows up in the estimate: blocks keep far less; selective keeps most of a Llama
    # block anyway (its matmul outputs are most of what a block saves) but still less than off
    assert est.after.peak < (0.9 if setting.startswith("blocks") else 1.0) * off


def test_offload_on_cuda_moves_block_inputs_off_the_device_in_the_estimate():
    inputs = _inputs()
    blocks = estimate(_small_llama(), {**QLORA, "memory": SETTINGS["blocks"]}, example_inputs=inputs,
                      train_device="cuda")
    offload = estimate(_small_llama(), {**QLORA, "memory": SETTINGS["blocks+offload"]}, example_inputs=inputs,
                       train_device="cuda")
    hidden = 4 * 128 * 256 * 4  # one [batch, seq, hidden] fp32 block input
    assert offload.after.offloaded >= 4 * hidden  # every block's input went to the host
    assert offload.after.peak < blocks.after.peak
    assert "offloaded to host" in offload.render()


@pytest.fixture(scope="module")
def peaks_by_policy():
    """Estimated peaks of the small Llama's QLoRA step with every block at one policy (one compile)."""
    inputs = _inputs()
    gm = peftfx.compile(_small_llama(), {**QLORA, "memory": {"checkpoint": "selective"}}, example_inputs=inputs)
    blocks = [m for m in gm.modules() if isinstance(m, CheckpointedBlock)]
    peaks = {}
    for policy in ("none", "selective", "full"):
        for b in blocks:
            b.set_policy(policy, False)
        peaks[policy] = step_breakdown(gm, inputs).peak
    assert peaks["none"] > peaks["selective"] > peaks["full"], peaks
    for b in blocks:
        b.set_policy("selective", False)
    return gm, peaks


def test_a_budget_makes_selective_pick_per_block_what_to_save(peaks_by_policy):
    _, peaks = peaks_by_policy
    budget = (peaks["full"] + peaks["selective"]) // 2
    plan = {**QLORA, "memory": {"checkpoint": "selective", "budget": budget}}
    gm = peftfx.compile(_small_llama(), plan, example_inputs=_inputs())
    policies = [m.policy for m in gm.modules() if isinstance(m, CheckpointedBlock)]
    assert "selective" in policies and "full" in policies and policies[0] == "selective", policies
    note = next(n for r in peftfx.report(gm) if r.name == "activation_checkpoint" for n in r.notes if "budget" in n)
    assert note["estimated_peak"] <= budget and note["selective_blocks"] == policies.count("selective")
    assert step_breakdown(gm, _inputs()).peak == pytest.approx(note["estimated_peak"], rel=1e-3)  # emit drops a few bytes


def test_an_unreachable_budget_names_the_smallest_reachable_peak():
    inputs = _inputs(2, 32)
    with pytest.raises(PlanError, match=r"memory.budget = '1MiB' .* smallest estimated peak .* MiB, with "
                                        r"checkpoint = 'blocks'"):
        peftfx.compile(_small_llama(2), {**QLORA, "memory": {"checkpoint": "blocks", "budget": "1MiB"}},
                       example_inputs=inputs)


@pytest.mark.slow
def test_fit_picks_the_cheapest_setting_and_the_largest_batch(peaks_by_policy):
    gm, peaks = peaks_by_policy
    size = (peaks["none"] + peaks["selective"]) // 2  # off does not fit, selective does
    est = estimate(_small_llama(), {**QLORA, "memory": {"checkpoint": "off"}}, example_inputs=_inputs(), fit=size)
    fit = est.fit
    assert [s["checkpoint"] for s in fit["settings"]] == ["off", "selective", "blocks"]
    assert [s["fits"] for s in fit["settings"]] == [False, True, True]
    assert fit["chosen"]["checkpoint"] == "selective" and fit["max_batch"] >= 4
    # the compiled module has dynamic shapes: check the batch limit on it directly
    assert step_breakdown(gm, _inputs(fit["max_batch"])).peak <= size
    assert step_breakdown(gm, _inputs(fit["max_batch"] + 1)).peak > size * 0.98
    assert "cheapest that fits" in est.render() and est.to_dict()["fit"]["chosen"]["checkpoint"] == "selective"
    with pytest.raises(PlanError, match="fit"):
        estimate(_small_llama(), QLORA, example_inputs=_inputs(), fit="huge")


def _llama_config(size: str):
    import transformers

    if size == "7b":
        return transformers.LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                                        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                                        use_cache=False, attn_implementation="sdpa")
    return transformers.LlamaConfig(vocab_size=32000, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                    num_attention_heads=64, num_key_value_heads=8, use_cache=False,
                                    attn_implementation="sdpa")


@pytest.mark.slow
@pytest.mark.parametrize("size, batch, memory, limit_gib", [
    ("7b", 4, {"checkpoint": "blocks"}, 12),
    ("70b", 1, {"checkpoint": "blocks", "offload": "cpu"}, 46),
])
def test_qlora_llama_configs_fit_their_cards_with_checkpointing(size, batch, memory, limit_gib):
    import transformers

    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(_llama_config(size))
    plan = {**Plan.from_file("plans/llama_qlora.toml").to_dict(), "memory": memory}
    est = estimate(model, plan, batch=batch, seq=2048, dtype="bfloat16", train_device="cuda")
    print(f"{size} batch {batch}x2048 {memory}: peak {format_bytes(est.after.peak)} "
          f"(offloaded {format_bytes(est.after.offloaded)}, {est.seconds:.0f} s)")
    assert est.after.peak <= limit_gib * 2**30
    assert est.memory["checkpointed_blocks"] == model.config.num_hidden_layers


def test_cli_estimate_fit_and_inspect_show_the_memory_settings(tmp_path, capsys):
    import json

    from peftfx.inspect.cli import main

    _small_llama(2).config.to_json_file(tmp_path / "config.json")
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({**QLORA, "memory": {"checkpoint": "blocks", "offload": "cpu"}}))
    args = [str(tmp_path / "config.json"), "--plan", str(plan), "--batch", "2", "--seq", "32"]
    assert main(["estimate", *args, "--fit", "1GiB", "--json"]) == 0
    est = json.loads(capsys.readouterr().out)
    assert est["schema_version"] == 1 and isinstance(est["after"]["peak"], int)
    assert est["memory"]["checkpoint"] == "blocks" and est["memory"]["checkpointed_blocks"] == 2
    assert est["fit"]["chosen"]["checkpoint"] == "off" and est["fit"]["max_batch"] > 2  # 1 GiB: everything fits
    assert main(["estimate", *args, "--fit", "lots"]) == 2
    assert "'lots'" in capsys.readouterr().err
    assert main(["inspect", *args]) == 0
    out = capsys.readouterr().out
    assert "pass activation_checkpoint" in out and "block=model.layers.1, policy=full" in out and "saves=" in out
    assert "offload=accepted, no effect" in out
