"""causal_attention: an exactly-causal boolean mask runs as is_causal, with aten's results; other masks as given."""
from __future__ import annotations

from unittest import mock

import torch
import torch.nn.functional as F

import peftfx
from peftfx.kernels.causal_attention import is_causal_mask, scaled_dot_product_attention
from tests.model_zoo import make_case


def _qkv(s: int = 9, kv: int | None = None):
    torch.manual_seed(0)
    q = torch.randn(2, 4, s, 8, requires_grad=True)
    k = torch.randn(2, 2, kv or s, 8, requires_grad=True)
    v = torch.randn(2, 2, kv or s, 8, requires_grad=True)
    return q, k, v


def _fwd_bwd(fn, q, k, v, **kw):
    for t in (q, k, v):
        t.grad = None
    out = fn(q, k, v, enable_gqa=True, **kw)
    out.square().sum().backward()
    return [out.detach()] + [t.grad.clone() for t in (q, k, v)]


def test_a_causal_mask_runs_the_causal_kernel_with_the_masked_results():
    q, k, v = _qkv()
    causal = torch.ones(9, 9, dtype=torch.bool).tril().expand(2, 1, 9, 9)
    padded = causal.clone()
    padded[0, :, :, :2] = False  # left padding in row 0: not the causal mask
    padded[0, :, :2, 0] = True
    assert is_causal_mask(causal, 9, 9) and not is_causal_mask(padded, 9, 9)
    assert not is_causal_mask(causal.float(), 9, 9) and not is_causal_mask(causal[..., :8, :], 8, 9)
    for mask in (causal, padded):
        ref = _fwd_bwd(F.scaled_dot_product_attention, q, k, v, attn_mask=mask)
        with mock.patch.object(torch.ops.aten.scaled_dot_product_attention, "default",
                               wraps=torch.ops.aten.scaled_dot_product_attention.default) as sdpa:
            got = _fwd_bwd(scaled_dot_product_attention, q, k, v, attn_mask=mask)
        assert (sdpa.call_args.args[3] is None) == (mask is causal)  # the mask dropped only when causal
        assert all(torch.allclose(a, b, rtol=0, atol=1e-6) for a, b in zip(got, ref))


def test_the_check_runs_once_per_mask_and_sees_in_place_writes():
    base = torch.ones(1, 1, 6, 6, dtype=torch.bool).tril()
    with mock.patch.object(torch, "equal", wraps=torch.equal) as equal:
        assert is_causal_mask(base[:, :, :, :6], 6, 6) and is_causal_mask(base[:, :, :, :6], 6, 6)
        assert equal.call_count == 1  # a new view of the same base, same window: the answer is kept
        base[0, 0, 0, 5] = True  # written in place: the version moves, the mask is checked again
        assert not is_causal_mask(base[:, :, :, :6], 6, 6) and equal.call_count == 2
        base.data = torch.ones(1, 1, 6, 6, dtype=torch.bool).tril()  # new memory, same version
        assert is_causal_mask(base[:, :, :, :6], 6, 6) and equal.call_count == 3
        other = torch.ones(1, 1, 6, 6, dtype=torch.bool).tril()
        other[0, 0, 3, 0] = False  # another tensor (same shape, version 0): never the kept answer
        assert not is_causal_mask(other, 6, 6) and equal.call_count == 4
        with torch.inference_mode():  # no version counter: checked every time
            frozen = torch.ones(6, 6, dtype=torch.bool).tril()
            assert is_causal_mask(frozen, 6, 6) and is_causal_mask(frozen, 6, 6)
        assert equal.call_count == 6


def test_fake_masks_follow_the_size_only_flag():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        mask = torch.ones(1, 1, 5, 5, dtype=torch.bool)
        assert is_causal_mask(mask, 5, 5, size_only_mask=True) and not is_causal_mask(mask, 5, 5)


def test_compiled_decoders_route_attention_through_the_check_and_keep_their_outputs():
    case = make_case("llama")
    plan = {"targets": case.attn_targets, "lora": {"r": 2}}
    ids = case.inputs["input_ids"]
    gm = peftfx.compile(case.model, plan, example_inputs={"input_ids": ids})  # no padding mask: size-only
    notes = next(r for r in peftfx.report(gm) if r.name == "causal_attention").notes
    assert len(notes) == 2 and all(n["size_only_mask"] for n in notes)
    with torch.no_grad():
        assert torch.allclose(gm.eval()(input_ids=ids).logits, case.model.eval()(input_ids=ids).logits,
                              rtol=0, atol=1e-5)
    padded = peftfx.compile(make_case("llama").model, plan, example_inputs=case.inputs)
    notes = next(r for r in peftfx.report(padded) if r.name == "causal_attention").notes
    assert notes and not any(n["size_only_mask"] for n in notes)  # the attention mask input feeds it


def test_a_checkpointed_training_step_checks_its_mask_once():
    case = make_case("llama")
    ids = case.inputs["input_ids"]
    plan = {"targets": case.attn_targets, "lora": {"r": 2}, "memory": {"checkpoint": "blocks"}}
    gm = peftfx.compile(case.model, plan, example_inputs={"input_ids": ids, "labels": ids}).train()
    with mock.patch.object(torch, "equal", wraps=torch.equal) as equal:
        gm(input_ids=ids, labels=ids).loss.backward()
    assert equal.call_count == 1  # 2 blocks, each run twice (forward and recompute): one comparison
