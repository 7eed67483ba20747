"""fuse_linear_cross_entropy: the LM head + loss of every LM family in the zoo become one op; logits and
loss stay bitwise, gradients agree to float rounding (with ignored labels, a trainable head and
``checkpoint = "blocks"``), the ``[tokens, vocab]`` logits are no longer saved, and what it cannot fuse
is left alone with a note."""
from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F

import peftfx
from peftfx import pass_manager
from peftfx.pass_manager import PassContext
from peftfx.passes.activation_checkpoint import checkpoint_blocks
from peftfx.passes.fuse_activations import fuse_activations
from peftfx.passes.fuse_linear_cross_entropy import fuse_linear_cross_entropy
from tests.model_zoo import VOCAB, make_case
from tests.training import saved_activation_bytes

LCE = torch.ops.peftfx.linear_cross_entropy.default
CE = torch.ops.peftfx.cross_entropy.default
HEAD = {"gpt2": "lm_head.weight"}  # tied to transformer.wte.weight


@contextlib.contextmanager
def pass_disabled():
    """``peftfx.compile`` without this pass: the baseline (``peftfx::cross_entropy`` on materialized logits)."""
    import peftfx.passes  # noqa: F401  (registers every pass)

    spec = pass_manager._REGISTRY.pop("fuse_linear_cross_entropy")
    try:
        yield
    finally:
        pass_manager._REGISTRY["fuse_linear_cross_entropy"] = spec


def _sites(gm, target):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target == target]


def _apply(gm):
    ctx = PassContext(plan=None)
    res = fuse_linear_cross_entropy(gm, ctx)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return res.modified, ctx.notes


@pytest.fixture(scope="module")
def compiled():
    """``compiled(family) -> (case, unfused gm, fused gm, notes)``: one compile per family (NF4 + LoRA on
    the attention projections) without this pass, and a copy of it with the pass applied by hand."""
    cache = {}

    def get(family):
        if family not in cache:
            case = make_case(family)
            plan = {"targets": case.attn_targets, "quant": {"format": "nf4"}, "lora": {"r": 4, "dropout": 0.0}}
            with pass_disabled():
                unfused = peftfx.compile(copy.deepcopy(case.model), plan, example_inputs=case.inputs)
            fused = copy.deepcopy(unfused)
            modified, notes = _apply(fused)
            assert modified
            cache[family] = (case, unfused, fused, notes)
        return cache[family]

    return get


def _prepare(gm, *, head: bool, blocks: bool):
    gm = copy.deepcopy(gm).train()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # nonzero B: every LoRA parameter gets a gradient
        for name, p in gm.named_parameters():
            if name.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    if head:  # what train_modules = ["lm_head"] does (and, tied, the embedding too)
        gm.get_parameter("lm_head.weight").requires_grad_(True)
    if blocks:
        assert checkpoint_blocks(gm, "blocks")
    return gm


def _step(gm, inputs):
    out = gm(**inputs)
    loss, logits = out.loss, out.logits.detach()
    del out
    loss.backward()
    grads = {n: p.grad.clone() for n, p in gm.named_parameters() if p.grad is not None}
    gm.zero_grad(set_to_none=True)
    return loss.detach(), logits, grads


def _with_ignored_labels(inputs):
    labels = inputs["input_ids"].clone()
    labels[:, ::3] = -100  # padding / prompt tokens
    return {**inputs, "labels": labels}


# (trainable head, checkpoint = "blocks", batches): ignored labels in the first batch, another size in the
# second; the mixed pairs run in the slow sweep
_VARIANTS = ((False, False, 2), (True, True, 1))
_MIXED = ((True, False, 1), (False, True, 1))
FAMILIES = ["llama", "gpt2", *(pytest.param(f, marks=pytest.mark.slow) for f in ("qwen2", "qwen3", "mistral"))]


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_head_equals_the_unfused_compile(compiled, family):
    case, unfused, fused, notes = compiled(family)
    assert len(_sites(fused, LCE)) == 1 and not _sites(fused, CE) and len(_sites(unfused, CE)) == 1
    assert notes[-1] == {"fused_linear_cross_entropy": 1}
    (call,) = _sites(fused, LCE)
    assert call.meta["peftfx.pass"] == "fuse_linear_cross_entropy" and call.args[4:6] == (-100, "mean")
    _check_variants(family, case, unfused, fused, _VARIANTS)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_fused_head_equals_the_unfused_compile_mixed_settings(compiled, family):
    case, unfused, fused, _ = compiled(family)
    _check_variants(family, case, unfused, fused, _MIXED)


def _check_variants(family, case, unfused, fused, variants):
    for head, blocks, batches in variants:
        f, u = _prepare(fused, head=head, blocks=blocks), _prepare(unfused, head=head, blocks=blocks)
        for inputs in (_with_ignored_labels(case.inputs), case.other_inputs)[:batches]:
            torch.manual_seed(0)  # GPT-2's dropout: the same masks on both sides
            loss_f, logits_f, grads_f = _step(f, inputs)
            torch.manual_seed(0)
            loss_u, logits_u, grads_u = _step(u, inputs)
            assert torch.equal(loss_f, loss_u) and torch.equal(logits_f, logits_u)
            assert grads_f.keys() == grads_u.keys() and any("lora_A" in k for k in grads_f)
            assert (HEAD.get(family, "lm_head.weight") in grads_f) is head
            for name, g in grads_f.items():
                scale = grads_u[name].abs().max()
                assert scale > 0, name
                assert (g - grads_u[name]).abs().max() <= 1e-6 * scale, (name, head, blocks)


def test_the_logits_are_not_saved_for_backward(compiled):
    case, unfused, fused, _ = compiled("llama")
    inputs = case.other_inputs  # B=3, S=11: not the export's sizes

    b, s = inputs["input_ids"].shape
    hidden = case.model.config.hidden_size
    # the fp32 [tokens, vocab] logits, the int64 targets and the mean's fp32 divisor go; d loss / d
    # hidden [tokens, hidden] comes (the frozen head's backward, computed in forward; the unfused
    # linear kept nothing)
    logits, targets, divisor, grad_hidden = b * s * VOCAB * 4, b * s * 8, 4, b * s * hidden * 4
    assert saved_activation_bytes(unfused, inputs) - saved_activation_bytes(fused, inputs) \
        == logits + targets + divisor - grad_hidden


def test_runs_between_fuse_activations_and_freeze_and_a_second_run_finds_nothing(compiled):
    """Inside ``peftfx.compile`` it is covered by test_fuse_activations' compile test (one fused site,
    the model's loss and logits) and by the quantized-head compile below."""
    names = [spec.name for spec in pass_manager.registered_passes()]
    assert names.index("fuse_activations") < names.index("fuse_linear_cross_entropy") < names.index("freeze")
    _, _, fused, _ = compiled("llama")
    gm = copy.deepcopy(fused)
    code = gm.code
    assert _apply(gm) == (False, [{"fused_linear_cross_entropy": 0}]) and gm.code == code


def test_a_quantized_lora_head_stays_on_the_cross_entropy_path():
    case = make_case("llama")
    plan = {"targets": [*case.attn_targets, "lm_head"], "quant": {"format": "nf4"}, "lora": {"r": 4, "dropout": 0.0}}
    gm = peftfx.compile(copy.deepcopy(case.model), plan, example_inputs=case.inputs)
    assert not _sites(gm, LCE) and len(_sites(gm, CE)) == 1
    rec = next(r for r in peftfx.report(gm) if r.name == "fuse_linear_cross_entropy")
    (refusal,) = [n for n in rec.notes if "refused" in n]
    assert "lm_head" in refusal["reason"] and "quantized or LoRA head" in refusal["reason"]
    assert rec.notes[-1] == {"fused_linear_cross_entropy": 0} and not rec.modified


# --------------------------------------------------------------------------- rules on small graphs
class _Head(torch.nn.Module):
    def __init__(self, kind, dtype=torch.float32):
        super().__init__()
        self.kind, self.head = kind, torch.nn.Linear(8, 10, bias=kind != "no_bias").to(dtype)

    def forward(self, x, t):
        logits = self.head(x)
        if self.kind == "softcap":  # Gemma-2's final_logit_softcapping
            logits = torch.tanh(logits / 30.0) * 30.0
        if self.kind == "read_before_upcast":
            return F.cross_entropy(logits.float().view(-1, 10), t), logits
        if self.kind in ("upcast", "read_before_upcast"):
            logits = logits.float()
        flat = logits if self.kind == "two_d" else logits.view(-1, 10)
        return F.cross_entropy(flat, t, ignore_index=3, reduction="sum" if self.kind == "no_bias" else "mean"), logits


RULE_CASES = {  # kind: (dtype, fused?, refusal reason)
    "plain": (torch.float32, True, None),
    "no_bias": (torch.float32, True, None),
    "two_d": (torch.float32, True, None),
    "upcast": (torch.bfloat16, True, None),
    "softcap": (torch.float32, False, "the logits are not an LM head's aten.linear output (mul.Tensor)"),
    "read_before_upcast": (torch.bfloat16, False, "the head's output is read before the upcast"),
}


@pytest.mark.parametrize("kind", list(RULE_CASES))
def test_rule_matches_exactly(kind):
    dtype, fuses, reason = RULE_CASES[kind]
    torch.manual_seed(0)
    module = _Head(kind, dtype)
    x = torch.randn(6, 8).to(dtype) if kind == "two_d" else torch.randn(2, 3, 8).to(dtype)
    t = torch.tensor([1, 3, 3, 0, 9, 5])
    gm = torch.export.export(module, (x, t), strict=False).module()
    fuse_activations(gm, PassContext(plan=None))
    modified, notes = _apply(gm)
    assert modified is fuses and len(_sites(gm, LCE)) == int(fuses) and len(_sites(gm, CE)) == int(not fuses)
    assert [n["reason"] for n in notes if "refused" in n] == ([reason] if reason else [])
    xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref, out = module(xr, t), gm(xf, t)
    assert all(torch.equal(r, o) for r, o in zip(ref, out))  # loss and logits, bitwise
    if fuses:
        (call,) = _sites(gm, LCE)
        assert call.args[6] == (torch.float32 if kind == "upcast" else None)
        params = dict(gm.named_parameters())
        grads_f = torch.autograd.grad(out[0], (xf, *params.values()))
        grads_u = torch.autograd.grad(ref[0], (xr, *(module.get_parameter(n) for n in params)))
        for g, e in zip(grads_f, grads_u):
            tol = 1e-2 if dtype == torch.bfloat16 else 1e-6  # bf16: fp32 sums over rows vs one bf16 matmul
            assert (g.float() - e.float()).abs().max() <= tol * e.float().abs().max()
        again = torch.export.export(gm, (x, t), strict=False)  # the opaque op survives a re-export
        assert LCE in {n.target for n in again.graph.nodes} and torch.equal(again.module()(x, t)[0], out[0])
