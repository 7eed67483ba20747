"""compile() on tiny random-init configs of every model family the foundation issue lists.

For each family and two plans (attention projections; all linears), NF4 + double quant + LoRA:
* with LoRA B zero, outputs equal the model whose targeted weights hold their dequantized values;
* after backward only LoRA parameters have gradients;
* 20 AdamW steps lower the loss on a fixed batch;
* other batch sizes / sequence lengths run; ``.eval()`` disables dropout.
"""
from __future__ import annotations

import copy

import pytest
import torch

import peftfx
from peftfx.kernels.modules import QLoRALinear
from tests.model_zoo import ZOO, make_case

pytest.importorskip("transformers")

PLANS = ("attn", "all")


def _plan(case, which: str) -> dict:
    targets = case.attn_targets if which == "attn" else case.all_targets
    return {
        "targets": targets,
        "quant": {"format": "nf4", "block_size": 64, "double_quant": True},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.1},
    }


def _dequantized_reference(ref: torch.nn.Module, gm) -> int:
    """Write each swapped layer's dequantized weight into ``ref``; return how many layers."""
    n = 0
    for name, mod in gm.named_modules():
        if isinstance(mod, QLoRALinear):
            w = mod.dequantized_weight().to(torch.float32)
            target = ref.get_submodule(name)
            with torch.no_grad():
                if type(target).__name__ == "Conv1D":
                    target.weight.copy_(w.t())
                else:
                    target.weight.copy_(w)
            n += 1
    return n


def _logits(out):
    return out.logits if hasattr(out, "logits") else out[0]


@pytest.mark.parametrize("which", PLANS)
@pytest.mark.parametrize("family", ZOO)
def test_family_zero_b_equals_dequantized_and_trains(family, which):
    case = make_case(family)
    ref = copy.deepcopy(case.model)
    gm = peftfx.compile(case.model, _plan(case, which), example_inputs=case.inputs)
    n = _dequantized_reference(ref, gm)
    assert n >= 2, "the plan should have swapped several layers"

    # zero B: same outputs as the dequantized model (eval: no dropout anywhere)
    gm.eval()
    with torch.no_grad():
        got, want = _logits(gm(**case.inputs)), _logits(ref(**case.inputs))
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)

    # eval() disables dropout (LoRA dropout 0.1 is planned), train() brings it back
    with torch.no_grad():
        again = _logits(gm(**case.inputs))
    assert torch.equal(got, again)

    # only LoRA parameters get gradients
    gm.train()
    loss = gm(**case.inputs).loss
    loss.backward()
    with_grad = {n for n, p in gm.named_parameters() if p.grad is not None}
    lora = {n for n, _ in peftfx.trainable_parameters(gm).items()}
    assert with_grad and with_grad <= lora
    assert all(".lora_A" in n or ".lora_B" in n for n in lora)
    assert all(not p.requires_grad for n, p in gm.named_parameters() if n not in lora)

    # 20 AdamW steps lower the loss on a fixed batch
    torch.manual_seed(0)
    opt = torch.optim.AdamW(peftfx.trainable_parameters(gm).values(), lr=1e-2)
    gm.eval()  # fixed batch, deterministic forward: compare like with like
    with torch.no_grad():
        first = gm(**case.inputs).loss.item()
    for _ in range(20):
        opt.zero_grad()
        gm(**case.inputs).loss.backward()
        opt.step()
    with torch.no_grad():
        last = gm(**case.inputs).loss.item()
    assert last < first, f"{family}/{which}: loss {first:.4f} -> {last:.4f}"

    # other batch sizes and sequence lengths run, shapes as the original model's
    with torch.no_grad():
        got, want = _logits(gm(**case.other_inputs)), _logits(ref(**case.other_inputs))
    assert got.shape == want.shape


def test_dropout_follows_train_mode():
    case = make_case("bert")  # BERT keeps hidden dropout 0.1 in its config
    gm = peftfx.compile(case.model, _plan(case, "attn"), example_inputs=case.inputs)
    gm.train()
    with torch.no_grad():
        a, b = _logits(gm(**case.inputs)), _logits(gm(**case.inputs))
    assert not torch.equal(a, b), "train mode must apply dropout"
    gm.eval()
    with torch.no_grad():
        a, b = _logits(gm(**case.inputs)), _logits(gm(**case.inputs))
    assert torch.equal(a, b)
