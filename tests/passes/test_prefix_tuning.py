"""prefix_tuning: K/V prefixes on every SDPA call equal Hugging Face run behind a preloaded KV cache."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import peftfx
from peftfx.errors import PlanError, RewriteError
from peftfx.kernels.prompt_modules import PrefixEncoder, PrefixKV
from peftfx.pass_manager import PassContext
from peftfx.passes.prefix_tuning import (
    fold_prefix_encoder,
    load_prefix_prompt_embeddings,
    prefix_prompt_embeddings,
    prefix_tuning,
)
from tests.model_zoo import make_case
from tests.training import train_losses

P = 3
DECODERS = ("gpt2", "llama", "qwen2", "qwen3", "mistral")
_BUILT: dict = {}


def _inputs(case_inputs: dict) -> dict:
    # export merges inputs that are the same tensor object (the zoo passes labels=input_ids)
    return {k: v.clone() for k, v in case_inputs.items()}


def built(name: str, **prefix):
    """(case, compiled gm) per family, built once per module; prefixes randomized to matter."""
    key = (name, tuple(sorted(prefix.items())))
    if key not in _BUILT:
        case = make_case(name)
        gm = peftfx.compile(case.model, {"prefix": {"tokens": P, **prefix}}, example_inputs=_inputs(case.inputs))
        torch.manual_seed(1)
        with torch.no_grad():
            for m in gm.modules():
                if isinstance(m, PrefixKV):
                    m.key.normal_()
                    m.value.normal_()
        _BUILT[key] = (case, gm)
    return _BUILT[key]


def hf_with_cache(model, inputs: dict, table: torch.Tensor):
    """The model with PEFT's ``prompt_embeddings`` preloaded as a DynamicCache (mask extended by P ones)."""
    from transformers import DynamicCache

    cfg = model.config
    n_kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    n_layers = cfg.num_hidden_layers
    kv = table.view(table.shape[0], n_layers * 2, n_kv, -1).permute(1, 2, 0, 3)
    b = inputs["input_ids"].shape[0]
    cache = DynamicCache(config=cfg)
    for layer in range(n_layers):
        cache.update(kv[2 * layer].expand(b, -1, -1, -1), kv[2 * layer + 1].expand(b, -1, -1, -1), layer)
    mask = inputs["attention_mask"]
    mask = torch.cat([torch.ones(b, table.shape[0], dtype=mask.dtype), mask], dim=1)
    with torch.no_grad():
        return model(input_ids=inputs["input_ids"], attention_mask=mask, cache=cache, use_cache=True).logits


# --- decoders: equal to Hugging Face behind a KV cache of the prefixes --------------------------

@pytest.mark.parametrize("name", DECODERS)
def test_decoder_matches_hf_kv_cache_with_left_padding(name):
    case, gm = built(name)
    inputs = _inputs(case.inputs)
    assert (inputs["attention_mask"][0, :2] == 0).all()  # left padding in the batch
    with torch.no_grad():
        got = gm(**inputs).logits
        plain = case.model(**inputs).logits
    want = hf_with_cache(case.model, inputs, prefix_prompt_embeddings(gm))
    assert got.shape == plain.shape
    assert (got - want).abs().max().item() <= 1e-5
    assert (got - plain).abs().max().item() > 1e-2  # the prefixes do change the outputs


@pytest.mark.parametrize("name", DECODERS)
def test_decoder_new_batch_and_length(name):
    case, gm = built(name)
    inputs = _inputs(case.other_inputs)
    with torch.no_grad():
        got = gm(**inputs).logits
    assert got.shape == (3, 11, 96)
    want = hf_with_cache(case.model, inputs, prefix_prompt_embeddings(gm))
    assert (got - want).abs().max().item() <= 1e-5


def test_gqa_prefix_is_stored_per_kv_head_and_repeated():
    _, gm = built("mistral")
    mods = [m for m in gm.modules() if isinstance(m, PrefixKV)]
    assert len(mods) == 2
    assert all(m.key.shape == (2, P, 16) and m.n_rep == 2 for m in mods)  # 4 query heads, 2 kv heads
    notes = [n for r in peftfx.report(gm) if r.name == "prefix_tuning" for n in r.notes]
    assert any(n.get("positions_shifted") not in (None, []) for n in notes)


def test_only_prefix_parameters_get_gradients():
    case, gm = built("llama")
    gm.zero_grad(set_to_none=True)
    gm(**_inputs(case.inputs)).loss.backward()
    trainable = peftfx.trainable_parameters(gm)
    assert sorted(trainable) == sorted(
        f"model.layers.{i}.self_attn.prefix.{w}" for i in range(2) for w in ("key", "value"))
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable.values())
    assert all(p.grad is None for n, p in gm.named_parameters() if n not in trainable)


# --- encoders: BERT and T5 accept prefixes --------------------------------------------------------

@pytest.mark.parametrize("name", ["bert", "t5"])
def test_encoder_models_accept_prefixes(name):
    case, gm = built(name)
    with torch.no_grad():
        want = case.model(**_inputs(case.inputs)).logits.shape
    gm.zero_grad(set_to_none=True)
    out = gm(**_inputs(case.inputs))
    assert out.logits.shape == want
    out.loss.backward()
    prefixes = [m for m in gm.modules() if isinstance(m, PrefixKV)]
    assert len(prefixes) == (2 if name == "bert" else 6)  # T5: enc self, dec self, dec cross per block
    assert all(m.key.grad is not None and m.key.grad.abs().sum() > 0 for m in prefixes)
    with torch.no_grad():
        assert gm(**_inputs(case.other_inputs)).logits.shape == case.model(**case.other_inputs).logits.shape


# --- a hand-written model with SDPA's causal flag -------------------------------------------------

class CausalAttention(nn.Module):
    def __init__(self, d: int = 16, heads: int = 2, sdpa: bool = True) -> None:
        super().__init__()
        self.heads, self.sdpa = heads, sdpa
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if self.sdpa:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # eager: matmul + softmax
            scores = q @ k.transpose(-1, -2) / math.sqrt(d // self.heads)
            scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
            o = scores.softmax(-1) @ v
        return self.out(o.transpose(1, 2).reshape(b, s, d))


def _manual_causal_prefix(model: CausalAttention, prefix: PrefixKV, x):
    b, s, d = x.shape
    q, k, v = model.qkv(x).view(b, s, 3, model.heads, -1).permute(2, 0, 3, 1, 4)
    k = torch.cat([prefix.key.expand(b, -1, -1, -1), k], 2)
    v = torch.cat([prefix.value.expand(b, -1, -1, -1), v], 2)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    i, j = torch.arange(s)[:, None], torch.arange(P + s)[None, :]
    scores = scores.masked_fill(j > i + P, float("-inf"))  # prefix always visible, causal on real keys
    return model.out((scores.softmax(-1) @ v).transpose(1, 2).reshape(b, s, d))


@pytest.fixture(scope="module")
def causal_gm():
    torch.manual_seed(0)
    model = CausalAttention()
    gm = peftfx.compile(model, {"prefix": {"tokens": P}}, example_inputs=(torch.randn(2, 5, 16),))
    return model, gm


def test_is_causal_becomes_explicit_mask_with_prefix_columns(causal_gm):
    model, gm = causal_gm
    (prefix,) = [m for m in gm.modules() if isinstance(m, PrefixKV)]
    assert prefix.is_causal
    sdpa = [n for n in gm.graph.nodes if n.target == torch.ops.aten.scaled_dot_product_attention.default]
    assert all(n.kwargs.get("is_causal", False) is False and (len(n.args) < 6 or n.args[5] is False) for n in sdpa)
    for shape in ((2, 5, 16), (3, 8, 16)):
        x = torch.randn(shape)
        with torch.no_grad():
            assert (gm(x) - _manual_causal_prefix(model, prefix, x)).abs().max().item() <= 1e-5


def test_pass_run_twice_is_idempotent(causal_gm):
    _, gm = causal_gm
    plan = peftfx.Plan.from_dict({"prefix": {"tokens": P}})
    code = gm.code
    assert prefix_tuning(gm, PassContext(plan=plan)).modified is False
    assert gm.code == code


# --- reparametrization ----------------------------------------------------------------------------

def test_reparametrized_prefix_trains_and_equals_its_folded_form():
    case, gm = built("gpt2", reparametrize=True, hidden=16)
    (enc,) = [m for m in gm.modules() if isinstance(m, PrefixEncoder)]
    assert sorted(n.rpartition(".")[2] for n in peftfx.trainable_parameters(gm)) == sorted(enc.PEFTFX_TRAINABLE)
    inputs = _inputs(case.inputs)
    losses = train_losses(gm, inputs, peftfx.trainable_parameters(gm).values(), lr=1e-2)
    assert losses[-1] < losses[0] - 0.05
    table = prefix_prompt_embeddings(gm)
    assert table.shape == (P, 2 * 2 * 4 * 16)  # [P, layers*2*kv_heads*head_dim]
    with torch.no_grad():
        before = gm(**inputs).logits
        assert (before - hf_with_cache(case.model, inputs, table)).abs().max().item() <= 1e-5
    fold_prefix_encoder(gm)
    assert not any(isinstance(m, PrefixEncoder) for m in gm.modules())
    with torch.no_grad():
        assert (gm(**inputs).logits - before).abs().max().item() <= 1e-6
    assert torch.equal(prefix_prompt_embeddings(gm), table)
    assert all(p.requires_grad for m in gm.modules() if isinstance(m, PrefixKV) for p in m.parameters())
    load_prefix_prompt_embeddings(gm, torch.zeros_like(table))  # the import direction
    assert prefix_prompt_embeddings(gm).abs().sum() == 0
    with pytest.raises(RewriteError, match="expects"):
        load_prefix_prompt_embeddings(gm, torch.zeros(P + 1, table.shape[1]))


# --- bad input ------------------------------------------------------------------------------------

def test_eager_attention_is_named_with_the_fix():
    model = CausalAttention(sdpa=False)
    with pytest.raises(RewriteError, match=r"eager attention \(matmul \+ softmax\)") as err:
        peftfx.compile(model, {"prefix": {"tokens": P}}, example_inputs=(torch.randn(2, 5, 16),))
    assert "attn_implementation='sdpa'" in str(err.value)


@pytest.mark.parametrize("tokens", [0, -2])
def test_non_positive_tokens_rejected_by_compile(tokens):
    with pytest.raises(PlanError, match="prefix.tokens"):
        peftfx.compile(CausalAttention(), {"prefix": {"tokens": tokens}}, example_inputs=(torch.randn(2, 5, 16),))
