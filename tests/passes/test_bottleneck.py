"""bottleneck pass: zero-init adapters leave outputs unchanged, only adapters (and top-k blocks) train."""
from __future__ import annotations

import copy

import pytest
import torch

import peftfx
from peftfx.kernels.bottleneck_modules import Bottleneck
from peftfx.pass_manager import PassContext
from peftfx.passes.bottleneck import block_index, bottleneck
from tests.model_zoo import make_case

pytest.importorskip("transformers")


def _logits(out):
    return out.logits if hasattr(out, "logits") else out[0]


def _adapters(gm) -> dict[str, Bottleneck]:
    return {n: m for n, m in gm.named_modules() if isinstance(m, Bottleneck)}


@pytest.mark.parametrize("family, expected", [
    ("llama", {"model.layers.0.self_attn.o_proj_adapter", "model.layers.0.mlp.down_proj_adapter",
               "model.layers.1.self_attn.o_proj_adapter", "model.layers.1.mlp.down_proj_adapter"}),
    ("bert", {"bert.encoder.layer.0.attention.output.dense_adapter", "bert.encoder.layer.0.output.dense_adapter",
              "bert.encoder.layer.1.attention.output.dense_adapter", "bert.encoder.layer.1.output.dense_adapter"}),
])
def test_zero_init_leaves_outputs_unchanged_and_only_adapters_train(family, expected):
    case = make_case(family)
    ref = copy.deepcopy(case.model)
    gm = peftfx.compile(case.model, {"adapter": {"size": 8, "nonlinearity": "gelu"}}, example_inputs=case.inputs)
    assert set(_adapters(gm)) == expected
    with torch.no_grad():
        for inputs in (case.inputs, case.other_inputs):
            got, want = gm(**inputs), ref(**inputs)
            torch.testing.assert_close(_logits(got), want.logits, atol=1e-6, rtol=0)
            torch.testing.assert_close(got.loss, want.loss, atol=1e-6, rtol=0)
    trainable = peftfx.trainable_parameters(gm)
    assert set(trainable) == {f"{a}.{p}" for a in expected for p in Bottleneck.PEFTFX_TRAINABLE}
    record = next(r for r in peftfx.report(gm) if r.name == "bottleneck")
    share = record.notes[-1]
    hidden = 64
    assert share["added_parameters"] == 4 * (2 * 8 * hidden + 8 + hidden)
    assert share["added_share"] == pytest.approx(share["added_parameters"] / share["base_parameters"])
    assert 0 < share["added_share"] < 0.2


def test_top_layers_train_with_adapters_and_loss_falls():
    case = make_case("llama")
    plan = {"adapter": {"size": 8, "where": ["mlp"], "layers": [1]}, "train_top_layers": 1}
    gm = peftfx.compile(case.model, plan, example_inputs=case.inputs)
    assert set(_adapters(gm)) == {"model.layers.1.mlp.down_proj_adapter"}
    trainable = set(peftfx.trainable_parameters(gm))
    expected_top = {n for n, _ in gm.named_parameters() if n.startswith("model.layers.1.")}
    assert trainable == expected_top  # the adapter lives in block 1 too
    assert "model.layers.1.mlp.down_proj_adapter.up_weight" in trainable
    assert not any(n.startswith(("model.layers.0.", "model.embed_tokens", "lm_head")) for n in trainable)

    # the pass run again adds nothing; layers the model lacks are named with the blocks it has
    before = gm.code
    _, modified = bottleneck(gm, PassContext(plan=peftfx.Plan.from_dict(plan)))
    assert not modified and gm.code == before
    with pytest.raises(peftfx.PlanError, match=r"\[5\].*blocks are \[0, 1\]"):
        bottleneck(gm, PassContext(plan=peftfx.Plan.from_dict({"adapter": {"size": 4, "layers": [5]}})))

    gm.train()
    opt = torch.optim.AdamW(peftfx.trainable_parameters(gm).values(), lr=1e-2)
    losses = []
    for _ in range(10):
        loss = gm(**case.inputs).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    frozen = [p for n, p in gm.named_parameters() if n not in trainable]
    assert frozen and all(p.grad is None for p in frozen)


def test_adapter_only_plan_trains_on_gpt2_conv1d_with_nf4_base():
    """Adapters sit after the Conv1D ``view`` and after a swapped (quantized) projection alike."""
    case = make_case("gpt2")
    plan = {"targets": ["*.c_attn"], "quant": {"format": "nf4"}, "adapter": {"size": 4, "where": ["attn", "mlp"]}}
    gm = peftfx.compile(case.model, plan, example_inputs=case.inputs)
    assert set(_adapters(gm)) == {f"transformer.h.{i}.{m}.c_proj_adapter" for i in (0, 1) for m in ("attn", "mlp")}
    gm.train()
    opt = torch.optim.AdamW(peftfx.trainable_parameters(gm).values(), lr=1e-2)
    first = None
    for _ in range(5):
        loss = gm(**case.inputs).loss
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert gm(**case.inputs).loss.item() < first
    assert all(n.split(".")[-1] in Bottleneck.PEFTFX_TRAINABLE for n in peftfx.trainable_parameters(gm))


def test_block_index_and_module_init():
    assert block_index("model.layers.3.mlp.down_proj") == 3
    assert block_index("encoder.block.1.layer.0.SelfAttention.o") == 1
    assert block_index("lm_head") is None
    m = Bottleneck(16, 4, nonlinearity="tanh")
    h = torch.randn(2, 3, 16)
    torch.testing.assert_close(m(h), h)
    with torch.no_grad():
        m.up_weight.normal_()
    assert not torch.allclose(m(h), h)
    with pytest.raises(peftfx.KernelError, match="swish"):
        Bottleneck(16, 4, nonlinearity="swish")
