"""Memory planner: exact quantized bytes, estimates vs. measured peaks, a 7B config on fake tensors.

The measured peak of a training step is taken from the torch profiler's allocator events
(``peftfx.memory.allocator.measure_peak``): ``profile(profile_memory=True)`` logs every CPU allocation and
free with its size; the running sum's maximum during a step (forward, backward, AdamW step,
``zero_grad``), plus the bytes alive before it (parameters, buffers, inputs, optimizer state from a
warm-up step), is the peak. The estimate must be within 15% of it.
"""
from __future__ import annotations

import time

import pytest
import torch

import peftfx
from peftfx.errors import PlanError
from peftfx.inspect.estimate import bits_per_param, estimate, loss_of, measure_peak, quant_storage, quantized_nbytes
from peftfx.kernels import quantizer

ALL = ["*.q_proj", "*.k_proj", "*.v_proj", "*.o_proj", "*.gate_proj", "*.up_proj", "*.down_proj"]


@pytest.mark.parametrize("shape", [(37, 53), (64, 64), (130, 300)])
@pytest.mark.parametrize("format,dq", [("nf4", True), ("nf4", False), ("fp4", True), ("int8", False),
                                       ("int8-zeropoint", False), ("llm-int8", False)])
def test_quantized_bytes_equal_the_real_quantized_weight(format, dq, shape):
    torch.manual_seed(0)
    qw = quantizer.quantize(torch.randn(*shape), format, block_size=64, double_quant=dq, block_size2=256)
    assert quantized_nbytes(format, shape, block_size=64, double_quant=dq, block_size2=256) == qw.nbytes()
    spec = quant_storage(format, shape, block_size=64, double_quant=dq)
    for name, t in qw.tensors().items():
        assert spec[name] == (t.numel(), t.dtype), name


def test_nf4_double_quant_is_4_127_bits_per_param_on_llama_7b_layers():
    for shape in [(4096, 4096), (11008, 4096), (4096, 11008)]:
        assert round(bits_per_param("nf4", shape, double_quant=True), 3) == 4.127
    assert round(bits_per_param("nf4", (4096, 4096), double_quant=False), 3) == 4.5


def _small_llama():
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=1024, hidden_size=384, intermediate_size=1024, num_hidden_layers=2,
                                   num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=128,
                                   use_cache=False, attn_implementation="sdpa")
    return transformers.LlamaForCausalLM(cfg).train()


def _resident(tensors) -> int:
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if not t.is_meta}
    return sum(storages.values())


@pytest.mark.parametrize("config", ["full", "lora", "nf4+lora"])
def test_estimate_is_within_15_percent_of_the_measured_peak(config):
    plan = {"full": None,
            "lora": {"targets": ALL, "lora": {"r": 8}},
            "nf4+lora": {"targets": ALL, "quant": {"format": "nf4", "double_quant": True}, "lora": {"r": 8}}}[config]
    torch.manual_seed(1)
    ids = torch.randint(0, 1024, (4, 64))
    inputs = {"input_ids": ids, "labels": ids}
    model = _small_llama()
    est = estimate(model, plan, example_inputs=inputs, optimizer="adamw")
    predicted = (est.after or est.before).peak
    trained = model if plan is None else peftfx.compile(model, plan, example_inputs=inputs)
    trained.train()
    opt = torch.optim.AdamW([p for p in trained.parameters() if p.requires_grad], lr=1e-4)

    def step():
        loss_of(trained(**inputs)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up: creates the optimizer state, so the measured step is a steady-state one
    state = [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    resident = _resident(list(trained.parameters()) + list(trained.buffers()) + [ids] + state)
    measured = measure_peak(step, resident=resident)
    ratio = predicted / measured
    print(f"{config}: estimated {predicted / 2**20:.2f} MiB, measured {measured / 2**20:.2f} MiB, "
          f"ratio {ratio:.3f}")
    assert 0.85 <= ratio <= 1.15, (config, predicted, measured)
    # the step really trained what the plan says, and the estimate agrees on how much
    n_trainable = sum(p.numel() for p in trained.parameters() if p.requires_grad)
    assert (est.after or est.before).trainable_params == n_trainable


def test_estimate_before_is_the_textbook_16_bytes_per_param_plus_activations():
    model = _small_llama()
    est = estimate(model, {"targets": ALL, "lora": {"r": 4}}, batch=2, seq=16, optimizer="adamw")
    n = sum(p.numel() for p in model.parameters())
    before = est.before
    assert before.weights["float32"] == 4 * n and before.gradients == 4 * n and before.optimizer_state == 8 * n
    assert before.activations > 0 and before.total == 16 * n + before.activations + before.weights.get("buffers", 0)
    assert est.after.trainable_params < before.trainable_params
    sgd = estimate(model, None, batch=2, seq=16, optimizer="sgd")
    assert sgd.before.optimizer_state == 0 and sgd.after is None
    adam8 = estimate(model, None, batch=2, seq=16, optimizer="adamw-8bit")
    assert 2 * n <= adam8.before.optimizer_state < 2.1 * n
    # the model's own weights were not touched: still real tensors
    assert not next(model.parameters()).is_meta


def test_bad_optimizer_and_unmatched_pattern_raise_plan_error():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    with pytest.raises(PlanError, match="optimizer"):
        estimate(model, None, example_inputs=(torch.randn(2, 8),), optimizer="adam9")
    with pytest.raises(PlanError, match="q_proj"):
        estimate(model, {"targets": ["q_proj"], "lora": {"r": 2}}, example_inputs=(torch.randn(2, 8),))


def test_llama_7b_config_on_meta_reports_4_127_bits_without_allocating():
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                   num_attention_heads=32, num_key_value_heads=32, use_cache=False,
                                   attn_implementation="sdpa")
    cpu = time.process_time()
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg)
    plan = {"targets": ALL, "quant": {"format": "nf4", "double_quant": True},
            "lora": {"r": 16, "alpha": 32, "targets": ["q_proj", "v_proj"]}}
    est = estimate(model, plan, batch=2, seq=8)
    cpu = time.process_time() - cpu
    print(f"7B estimate: {cpu:.1f} s CPU time, {est.seconds:.1f} s wall for the estimate")
    assert cpu < 30
    assert est.bits_per_param() == {"nf4": 4.127}
    n = sum(p.numel() for p in model.parameters())
    assert 6.7e9 < n < 6.8e9 and est.before.peak > 16 * n  # the lecture's 16 bytes/param, plus activations
    targeted = sum(r["shape"][0] * r["shape"][1] for r in est.layers)
    assert len(est.layers) == 7 * 32 and est.after.weights["nf4"] == pytest.approx(targeted * 4.127 / 8, rel=1e-3)
    assert est.after.trainable_params == 32 * 2 * 16 * (4096 + 4096)
    assert est.after.peak < est.before.peak / 5


def test_meta_built_model_estimates_like_the_real_one():
    # the twin runs as fake *CPU* tensors either way, so attention takes the flash path (no [S, S] weights)
    import transformers

    real = _small_llama()
    with torch.device("meta"):
        meta = transformers.LlamaForCausalLM(real.config)
    plan = {"targets": ALL, "quant": {"format": "nf4"}, "lora": {"r": 4}}
    a, b = estimate(real, plan, batch=2, seq=32), estimate(meta, plan, batch=2, seq=32)
    assert a.before.activations == b.before.activations and a.after.peak == b.after.peak
    assert "[2, 6, 32, 32]" not in a.before.largest_tensor
