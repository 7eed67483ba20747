"""fuse_activations: exact pattern matches only, bitwise-equal outputs and gradients, idempotence, and
fewer bytes saved for backward."""
from __future__ import annotations

import contextlib
import copy
import operator

import pytest
import torch
import torch.nn.functional as F

import peftfx
from peftfx import pass_manager
from peftfx.pass_manager import PassContext
from peftfx.passes.fuse_activations import fuse_activations
from tests.model_zoo import VOCAB, make_case
from tests.training import saved_activation_bytes

ACT_MUL = torch.ops.peftfx.act_mul.default
CE = torch.ops.peftfx.cross_entropy.default


@contextlib.contextmanager
def fusion_disabled():
    """``peftfx.compile`` without this pass: the baseline every fused result must equal."""
    import peftfx.passes  # noqa: F401  (registers every pass)

    spec = pass_manager._REGISTRY.pop("fuse_activations")
    try:
        yield
    finally:
        pass_manager._REGISTRY["fuse_activations"] = spec


def _gemma():
    import transformers

    torch.manual_seed(0)
    cfg = transformers.GemmaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                   max_position_embeddings=128, use_cache=False, attn_implementation="sdpa")
    case = make_case("llama")  # its inputs (left-padded batch, labels = input_ids) and q/v targets
    case.model = transformers.GemmaForCausalLM(cfg).eval()
    return case


def _case(family):
    return _gemma() if family == "gemma" else make_case(family)


def _sites(gm, target):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target == target]


def _loss_and_grads(gm, inputs):
    out = gm(**inputs)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in gm.named_parameters() if p.requires_grad}
    gm.zero_grad(set_to_none=True)
    return out.loss.detach(), out.logits.detach(), grads


def _randomize_lora_b(gm):
    """Nonzero B so that every LoRA parameter gets a gradient (B starts at zero)."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in gm.named_parameters():
            if name.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


# (family, act_mul sites, activation, cross-entropy sites); GPT-2's gelu_new is a tanh formula, not aten.gelu
FAMILIES = [("llama", 2, "silu", 1), ("gemma", 2, "gelu_tanh", 1), ("gpt2", 0, None, 1)]


def _fused_copy(unfused):
    """A deep copy of an unfused compile with the pass applied by hand (equal A, B and weights)."""
    gm = copy.deepcopy(unfused)
    ctx = PassContext(plan=None)
    assert fuse_activations(gm, ctx).modified
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return gm, ctx.notes


@pytest.fixture(scope="module")
def compiled():
    """``compiled(family) -> (case, fused gm, unfused gm, notes)``, NF4 + LoRA on the attention
    projections, built on first use (a test worker compiles only the families its tests need).

    One compile per family (export dominates the test time): the unfused compile, and a copy of it
    fused by the pass. ``test_compile_runs_the_pass_and_matches_the_model`` covers the pass inside
    ``peftfx.compile``."""
    cache = {}

    def get(family):
        if family not in cache:
            case = _case(family)
            plan = {"targets": case.attn_targets, "quant": {"format": "nf4"}, "lora": {"r": 4, "dropout": 0.0}}
            with fusion_disabled():
                unfused = peftfx.compile(copy.deepcopy(case.model), plan, example_inputs=case.inputs)
            fused, notes = _fused_copy(unfused)
            cache[family] = (case, fused, unfused, notes)
        return cache[family]

    return get


@pytest.mark.parametrize("family,n_act,act,n_ce", FAMILIES)
def test_sites_found_and_reported(compiled, family, n_act, act, n_ce):
    case, fused, unfused, notes = compiled(family)
    assert len(_sites(fused, ACT_MUL)) == n_act and len(_sites(fused, CE)) == n_ce
    assert all(n.args[2] == act for n in _sites(fused, ACT_MUL))
    # nothing left for the rules: no activation feeding a product, no aten loss
    assert not _sites(fused, torch.ops.aten.cross_entropy_loss.default)
    if n_act:
        assert not _sites(fused, torch.ops.aten.silu.default) and not _sites(fused, torch.ops.aten.gelu.default)
        owners = {n.meta["peftfx.source_fqn"] for n in _sites(fused, ACT_MUL)}
        assert owners == {"model.layers.0.mlp", "model.layers.1.mlp"}
    assert notes[-1] == {"fused_act_mul": n_act, "fused_cross_entropy": n_ce}
    assert len([n for n in notes if "fused" in n]) == n_act + n_ce


@pytest.mark.parametrize("family", [f for f, *_ in FAMILIES])
def test_outputs_and_lora_grads_bitwise_equal_unfused(compiled, family):
    case, fused, unfused, _ = compiled(family)
    _randomize_lora_b(fused)  # the same seeded values in both
    _randomize_lora_b(unfused)
    for inputs in (case.inputs, case.other_inputs):  # and another batch / sequence size
        loss_f, logits_f, grads_f = _loss_and_grads(fused, inputs)
        loss_u, logits_u, grads_u = _loss_and_grads(unfused, inputs)
        assert torch.equal(loss_f, loss_u) and torch.equal(logits_f, logits_u)
        assert grads_f.keys() == grads_u.keys() and any("lora_A" in k for k in grads_f)
        for name in grads_f:
            assert grads_f[name].abs().sum() > 0, name
            assert torch.equal(grads_f[name], grads_u[name]), name


def test_compile_runs_the_pass_and_matches_the_model():
    case = make_case("llama")
    plan = {"targets": case.attn_targets, "lora": {"r": 4, "dropout": 0.0}}
    gm = peftfx.compile(copy.deepcopy(case.model), plan, example_inputs=case.inputs)
    # the loss this pass fused, fuse_linear_cross_entropy (next) fused with the LM head
    assert len(_sites(gm, ACT_MUL)) == 2 and not _sites(gm, CE)
    assert len(_sites(gm, torch.ops.peftfx.linear_cross_entropy.default)) == 1
    rec = next(r for r in peftfx.report(gm) if r.name == "fuse_activations")
    assert rec.modified and rec.notes[-1] == {"fused_act_mul": 2, "fused_cross_entropy": 1}
    assert all(n.meta.get("peftfx.pass") == "fuse_activations" for n in _sites(gm, ACT_MUL))
    ref, out = case.model(**case.inputs), gm(**case.inputs)  # B = 0: the model's function
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-6)


def test_second_run_changes_nothing(compiled):
    _, fused, unfused, _ = compiled("llama")
    ctx = PassContext(plan=None)
    code = fused.code
    assert fuse_activations(fused, ctx).modified is False
    assert fused.code == code and ctx.notes == [{"fused_act_mul": 0, "fused_cross_entropy": 0}]
    # the unfused compile, fused by hand: once modifies, twice does not
    gm = copy.deepcopy(unfused)
    assert fuse_activations(gm, PassContext(plan=None)).modified is True
    gm.graph.lint()
    gm.recompile()
    code = gm.code
    assert fuse_activations(gm, PassContext(plan=None)).modified is False and gm.code == code


def test_saved_activation_bytes_drop_by_one_intermediate_per_layer(compiled):
    case, fused, unfused, _ = compiled("llama")
    inputs = case.other_inputs  # B=3, S=11: not the export's sizes

    b, s = inputs["input_ids"].shape
    act_out = 2 * b * s * 96 * 4  # layers x tokens x intermediate x fp32: act(gate), no longer kept
    # the loss keeps the logits instead of log_softmax's output (equal sizes): the MLPs make the gap
    assert saved_activation_bytes(unfused, inputs) - saved_activation_bytes(fused, inputs) == act_out


# --------------------------------------------------------------------------- rules on small graphs
def _export(module, *args):
    return torch.export.export(module, args, strict=False).module()


def _fuse(gm):
    ctx = PassContext(plan=None)
    res = fuse_activations(gm, ctx)
    gm.graph.lint()
    gm.recompile()
    return res.modified, ctx.notes


class _Gated(torch.nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.gate, self.up = torch.nn.Linear(8, 12), torch.nn.Linear(8, 12)

    def forward(self, x):
        g, u = self.gate(x), self.up(x)
        if self.kind == "silu_left":
            return F.silu(g) * u
        if self.kind == "silu_right":
            return u * F.gelu(g)
        if self.kind == "act_reused":  # act(gate) feeds something else too: nothing saved, no match
            a = F.silu(g)
            return a * u, a
        if self.kind == "broadcast":
            return F.silu(g) * u[:1]
        if self.kind == "scalar":
            return F.silu(g) * 2.0
        if self.kind == "relu":
            return F.relu(g) * u
        raise AssertionError(self.kind)


@pytest.mark.parametrize("kind,fused_as", [("silu_left", "silu"), ("silu_right", "gelu"), ("act_reused", None),
                                           ("broadcast", None), ("scalar", None), ("relu", None)])
def test_act_mul_rule_matches_exactly(kind, fused_as):
    module, x = _Gated(kind), torch.randn(3, 5, 8)
    gm = _export(module, x)
    modified, notes = _fuse(gm)
    assert modified is (fused_as is not None)
    sites = _sites(gm, ACT_MUL)
    assert [n.args[2] for n in sites] == ([fused_as] if fused_as else [])
    ref, out = module(x), gm(x)
    for r, o in zip(ref if isinstance(ref, tuple) else (ref,), out if isinstance(out, tuple) else (out,)):
        assert torch.equal(r, o)


class _Loss(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.head, self.fn = torch.nn.Linear(8, 10), fn

    def forward(self, x, t):
        return self.fn(self.head(x), t)


LOSSES = {  # name: (loss fn, fused?, refusal reason)
    "ce_mean": (lambda x, t: F.cross_entropy(x, t), True, None),
    "ce_sum_ignore": (lambda x, t: F.cross_entropy(x, t, ignore_index=3, reduction="sum"), True, None),
    "nll_log_softmax": (lambda x, t: F.nll_loss(F.log_softmax(x, -1), t, reduction="sum"), True, None),
    "nll_log_softmax_dim1": (lambda x, t: F.nll_loss(F.log_softmax(x, dim=1), t), True, None),
    "label_smoothing": (lambda x, t: F.cross_entropy(x, t, label_smoothing=0.1), False, "label_smoothing=0.1"),
    "class_weights": (lambda x, t: F.cross_entropy(x, t, weight=torch.linspace(0.5, 2, 10)), False, "class weights"),
    "reduction_none": (lambda x, t: F.cross_entropy(x, t, reduction="none"), False, "reduction=0 (none)"),
    "log_softmax_reused": (lambda x, t: (lambda lsm: (F.nll_loss(lsm, t), lsm))(F.log_softmax(x, -1)), False, None),
    "log_softmax_float64": (lambda x, t: F.nll_loss(F.log_softmax(x, -1, dtype=torch.float64), t), False, None),
}


@pytest.mark.parametrize("name", list(LOSSES))
def test_cross_entropy_rule_matches_exactly(name):
    fn, fuses, reason = LOSSES[name]
    module = _Loss(fn)
    x, t = torch.randn(6, 8), torch.tensor([1, 3, 3, 0, 9, 5])
    gm = _export(module, x, t)
    modified, notes = _fuse(gm)
    assert modified is fuses and len(_sites(gm, CE)) == int(fuses)
    refused = [n for n in notes if "refused" in n]
    assert [n["reason"] for n in refused] == ([reason] if reason else [])
    ref, out = module(x, t), gm(x, t)
    for r, o in zip(ref if isinstance(ref, tuple) else (ref,), out if isinstance(out, tuple) else (out,)):
        assert torch.equal(r, o)
    if fuses:  # gradients reach the head through the fused loss, bitwise
        xr = x.clone().requires_grad_()
        (g_ref,) = torch.autograd.grad(module(xr, t), xr)
        xf = x.clone().requires_grad_()
        (g_out,) = torch.autograd.grad(gm(xf, t), xf)
        assert torch.equal(g_ref, g_out)


def test_fused_module_exports_again_and_merges(compiled):
    case, fused, _, _ = compiled("llama")
    ep = torch.export.export(fused, (), dict(case.inputs), strict=False)
    targets = {n.target for n in ep.graph.nodes if n.op == "call_function"}
    assert ACT_MUL in targets and CE in targets  # opaque custom ops survive re-export
    torch.testing.assert_close(ep.module()(**case.inputs).loss, fused(**case.inputs).loss, rtol=0, atol=0)
    merged = peftfx.merge(fused)
    assert len(_sites(merged, ACT_MUL)) == 2
    torch.testing.assert_close(merged(**case.inputs).loss, fused(**case.inputs).loss, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("section", [{"prefix": {"tokens": 3}}, {"prompt": {"tokens": 2}}])
def test_prefix_and_prompt_tuning_graphs_still_fuse(section):
    case = make_case("llama")
    plan = {"targets": case.attn_targets, "lora": {"r": 4, "dropout": 0.0}, **section}
    with fusion_disabled():
        unfused = peftfx.compile(copy.deepcopy(case.model), plan, example_inputs=case.inputs)
    fused, _ = _fused_copy(unfused)
    assert len(_sites(fused, ACT_MUL)) == 2 and len(_sites(fused, CE)) == 1
    _randomize_lora_b(fused)
    _randomize_lora_b(unfused)
    loss_f, logits_f, grads_f = _loss_and_grads(fused, case.other_inputs)
    loss_u, logits_u, grads_u = _loss_and_grads(unfused, case.other_inputs)
    assert torch.equal(loss_f, loss_u) and torch.equal(logits_f, logits_u)
    assert len(grads_u) > 4 and all(torch.equal(grads_f[k], grads_u[k]) for k in grads_u)


def test_no_pattern_no_change():
    gm = _export(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()), torch.randn(2, 4))
    code = gm.code
    modified, notes = _fuse(gm)
    assert modified is False and gm.code == code and notes == [{"fused_act_mul": 0, "fused_cross_entropy": 0}]


def test_loss_node_keeps_getitem_shape():
    """The loss is ``getitem(cross_entropy(...), 0)``: total_weight (output 1) stays unread."""
    gm = _export(_Loss(lambda x, t: F.cross_entropy(x, t)), torch.randn(6, 8), torch.tensor([1, 3, 3, 0, 9, 5]))
    _fuse(gm)
    (call,) = _sites(gm, CE)
    assert [(u.target, u.args[1]) for u in call.users] == [(operator.getitem, 0)]
