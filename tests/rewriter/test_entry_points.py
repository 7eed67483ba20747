"""A compiled module answers other keyword sets of the model's forward (labels dropped or added) with
outputs equal to a compile of that signature, through the same modules; unknown arguments still raise."""
from __future__ import annotations

import pytest
import torch

import peftfx
from peftfx.errors import TraceError
from peftfx.kernels.modules import qlora_layers
from tests.model_zoo import make_case

pytest.importorskip("transformers")


def _compiled(with_labels: bool):
    case = make_case("llama")
    inputs = dict(case.inputs) if with_labels else {k: v for k, v in case.inputs.items() if k != "labels"}
    plan = {"targets": case.attn_targets, "quant": {"format": "nf4"}, "lora": {"r": 4, "alpha": 8}}
    gm = peftfx.compile(case.model, plan, example_inputs=inputs)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in peftfx.trainable_parameters(gm).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return gm.eval(), case


@pytest.fixture(scope="module")
def pair():
    """(compiled with labels, compiled without, case): each compile is an export, so built once."""
    with_labels, case = _compiled(True)
    return with_labels, _compiled(False)[0], case


def test_labels_dropped_and_added_equal_a_compile_of_that_signature(pair):
    with_labels, without, case = pair
    inputs = dict(case.other_inputs)  # another batch / sequence size than the example
    plain = {k: v for k, v in inputs.items() if k != "labels"}
    with torch.no_grad():
        assert torch.equal(with_labels(**plain).logits, without(**plain).logits)
        assert torch.equal(with_labels(**plain, labels=None).logits, without(**plain).logits)  # None = absent
        added, native = without(**inputs), with_labels(**inputs)
    assert torch.equal(added.loss, native.loss) and torch.equal(added.logits, native.logits)

    variant = with_labels.forward.entry_points.variants[(0, frozenset(plain))]
    assert all(variant.get_submodule(fqn) is m for fqn, m in qlora_layers(with_labels).items())
    with_labels.train()
    with_labels(**plain).logits.sum().backward()  # a step through the new signature trains gm's own adapters
    grads = [p.grad for p in peftfx.trainable_parameters(with_labels).values()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_unknown_keyword_still_raises_trace_error(pair):
    _, gm, case = pair
    with pytest.raises(TraceError, match=r"LlamaForCausalLM.forward takes no argument 'labelz'"):
        gm(**{k: v for k, v in case.inputs.items() if k != "labels"}, labelz=case.inputs["labels"])
