"""merge / unmerge: the dense merge equals the unmerged outputs, merging is idempotent, the
quantized merge reports what re-quantization added, and unmerge restores the adapters exactly."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import peftfx
from peftfx.kernels.modules import qlora_layers
from peftfx.errors import CheckpointError
from peftfx.kernels import reference
from peftfx.io.merging import merge_report, merged_weight
from tests.rewriter.travel_cases import fresh, same_bytes


def _logits(gm, case):
    with torch.no_grad():
        return gm(**case.inputs).logits


@pytest.mark.parametrize("name,fmt", [("llama", "nf4"), ("gpt2", "none")])
def test_dense_merge_equals_unmerged(name, fmt):
    gm, case = fresh(name, fmt)
    before = {k: v.detach().clone() for k, v in gm.state_dict().items()}
    ref = _logits(gm, case)
    merged = peftfx.merge(gm)
    assert merged is not gm and not qlora_layers(merged)
    lins = [m for n, m in merged.named_modules() if n in qlora_layers(gm)]
    assert lins and all(type(m) is nn.Linear for m in lins)
    assert not peftfx.trainable_parameters(merged)
    assert (_logits(merged, case) - ref).abs().max().item() <= 1e-5
    assert (ref - _logits(peftfx.merge(fresh(name, fmt, seed=5)[0]), case)).abs().max().item() > 1e-3
    now = gm.state_dict()  # the input module is left as it was
    assert all(same_bytes(now[k], v) for k, v in before.items())
    assert merged(**case.other_inputs).logits.shape[:2] == case.other_inputs["input_ids"].shape


def test_merged_twice_equals_merged_once():
    gm, case = fresh("llama", "nf4")
    once = peftfx.merge(gm)
    assert peftfx.merge(once) is once
    assert peftfx.merge(once, into="quantized") is once
    q = peftfx.merge(gm, into="quantized")
    assert peftfx.merge(q) is q
    assert torch.equal(_logits(peftfx.merge(q), case), _logits(q, case))


def test_quantized_merge_reports_its_error():
    gm, case = fresh("llama", "nf4")
    dense = peftfx.merge(gm)
    q = peftfx.merge(gm, into="quantized")
    report = merge_report(q)
    layers = qlora_layers(gm)
    assert [r["layer"] for r in report] == list(layers)
    for r in report:
        m = layers[r["layer"]]
        w = merged_weight(m)
        new = q.get_submodule(r["layer"])
        assert new.format == "nf4" and new.r is None and new.weight_scales2 is not None
        err = (reference.dequantize(new.quantized_weight(), torch.float32) - w).abs()
        assert r["into"] == "quantized" and r["max_abs"] == pytest.approx(err.max().item())
        assert r["mean_abs"] == pytest.approx(err.mean().item())
        assert 0 < r["mean_abs"] < r["max_abs"] <= w.abs().max().item() * 0.2  # NF4-sized, not garbage
        assert torch.equal(dense.get_submodule(r["layer"]).weight, w)
    diff = (_logits(q, case) - _logits(dense, case)).abs().max().item()
    assert 0 < diff < 0.5
    assert all(r["max_abs"] == 0.0 for r in merge_report(dense))


def test_unmerge_restores_the_adapters_exactly():
    gm, case = fresh("llama", "nf4")
    ref = _logits(gm, case)
    for into in ("dense", "quantized"):
        back = peftfx.unmerge(peftfx.merge(gm, into=into))
        assert set(qlora_layers(back)) == set(qlora_layers(gm))
        a, b = gm.state_dict(), back.state_dict()
        assert a.keys() == b.keys() and all(same_bytes(a[k], b[k]) for k in a)
        assert torch.equal(_logits(back, case), ref)
        assert set(peftfx.trainable_parameters(back)) == set(peftfx.trainable_parameters(gm))
    with pytest.raises(CheckpointError, match="not produced by peftfx.merge"):
        peftfx.unmerge(gm)


def test_bad_into():
    gm, _ = fresh("llama", "nf4")
    with pytest.raises(CheckpointError, match="'int3'"):
        peftfx.merge(gm, into="int3")
