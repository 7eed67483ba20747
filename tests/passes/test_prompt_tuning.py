"""prompt_tuning: a soft prompt in front of the token embeddings equals the model run on inputs_embeds."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import peftfx
from peftfx.errors import PlanError, RewriteError
from peftfx.kernels.prompt_modules import PrefixKV, SoftPrompt
from peftfx.passes.prefix_tuning import prefix_prompt_embeddings
from peftfx.passes.prompt_tuning import prompt_init
from peftfx.plan import PromptTuningSpec
from tests.model_zoo import make_case
from tests.training import train_losses

P = 4
FAMILIES = ("gpt2", "llama", "qwen2", "qwen3", "mistral", "bert", "t5")
_BUILT: dict = {}


def _inputs(case_inputs: dict) -> dict:
    # export merges inputs that are the same tensor object (the zoo passes labels=input_ids)
    return {k: v.clone() for k, v in case_inputs.items()}


def built(name: str):
    """(case, compiled gm) per family, built once per module."""
    if name not in _BUILT:
        case = make_case(name)
        gm = peftfx.compile(case.model, {"prompt": {"tokens": P}}, example_inputs=_inputs(case.inputs))
        _BUILT[name] = (case, gm)
    return _BUILT[name]


def with_prompt_embeds(case, inputs: dict, prompt: torch.Tensor):
    """The model on ``inputs_embeds = cat(prompt, embed(ids))``, mask/labels lengthened (PEFT's forward)."""
    ids, mask, labels = inputs["input_ids"], inputs["attention_mask"], inputs["labels"]
    b, p = ids.shape[0], prompt.shape[0]
    embeds = torch.cat([prompt.expand(b, -1, -1), case.model.get_input_embeddings()(ids)], dim=1)
    mask = torch.cat([torch.ones(b, p, dtype=mask.dtype), mask], dim=1)
    if case.name not in ("bert", "t5"):  # token labels of a causal LM: the prompt positions are ignored
        labels = torch.cat([torch.full((b, p), -100), labels], dim=1)
    with torch.no_grad():
        return case.model(inputs_embeds=embeds, attention_mask=mask, labels=labels)


@pytest.mark.parametrize("which", ["inputs", "other_inputs"])
@pytest.mark.parametrize("name", FAMILIES)
def test_matches_model_on_inputs_embeds_with_prompt(name, which):
    case, gm = built(name)
    inputs = _inputs(getattr(case, which))
    with torch.no_grad():
        got = gm(**inputs)
        plain = case.model(**inputs)
    want = with_prompt_embeds(case, inputs, gm.prompt_encoder.prompt_embeddings)
    want_logits = want.logits if name in ("bert", "t5") else want.logits[:, P:]
    assert got.logits.shape == plain.logits.shape  # drop-in: the prompt positions are sliced away
    assert (got.logits - want_logits).abs().max().item() <= 1e-5
    assert abs(got.loss.item() - want.loss.item()) <= 1e-5
    assert (got.logits - plain.logits).abs().max().item() > 1e-3  # the prompt does change the outputs
    if name == "t5":
        enc = want.encoder_last_hidden_state[:, P:]
        assert (got.encoder_last_hidden_state - enc).abs().max().item() <= 1e-5


def test_random_init_copies_vocabulary_rows_and_report_notes():
    case, gm = built("llama")
    prompt = gm.prompt_encoder.prompt_embeddings
    table = case.model.get_input_embeddings().weight
    assert prompt.shape == (P, 64)
    assert all(any(torch.equal(row, t) for t in table) for row in prompt)
    (record,) = [r for r in peftfx.report(gm) if r.name == "prompt_tuning"]
    (note,) = record.notes
    assert note["inputs_lengthened"] == {"attention_mask": 1, "labels": -100}
    assert note["embedding"] == "model.embed_tokens" and note["outputs_sliced"]


def test_only_the_prompt_trains_and_a_short_run_lowers_the_loss():
    case, gm = built("gpt2")
    trainable = peftfx.trainable_parameters(gm)
    assert list(trainable) == ["prompt_encoder.prompt_embeddings"]
    inputs = _inputs(case.inputs)
    gm.zero_grad(set_to_none=True)
    gm(**inputs).loss.backward()
    assert trainable["prompt_encoder.prompt_embeddings"].grad.abs().sum() > 0
    assert all(p.grad is None for n, p in gm.named_parameters() if n not in trainable)
    losses = train_losses(gm, inputs, trainable.values(), lr=0.05)
    assert losses[-1] < losses[0] - 0.05


def test_combines_with_nf4_lora_and_prefix():
    """NF4 + LoRA (B = 0) + prefix + prompt equals HF on dequantized weights, behind a prefix cache."""
    from peftfx.kernels.modules import QLoRALinear

    case = make_case("llama")
    plan = {"targets": ["*.q_proj", "*.v_proj"], "quant": {"format": "nf4"}, "lora": {"r": 4},
            "prefix": {"tokens": 2}, "prompt": {"tokens": P}}
    gm = peftfx.compile(case.model, plan, example_inputs=_inputs(case.inputs), release_source_weights=False)
    assert {"swap_linear", "prefix_tuning", "prompt_tuning"} <= {r.name for r in peftfx.report(gm) if r.modified}
    leaves = {n.rpartition(".")[2] for n in peftfx.trainable_parameters(gm)}
    assert leaves == {"lora_A", "lora_B", "key", "value", "prompt_embeddings"}
    with torch.no_grad():
        for m in gm.modules():
            if isinstance(m, PrefixKV):
                m.key.normal_()
                m.value.normal_()
        for name, m in gm.named_modules():
            if isinstance(m, QLoRALinear):
                case.model.get_submodule(name).weight.copy_(m.dequantized_weight())
    from transformers import DynamicCache

    inputs = _inputs(case.inputs)
    b = inputs["input_ids"].shape[0]
    kv = prefix_prompt_embeddings(gm).view(2, 2 * 2, 2, 16).permute(1, 2, 0, 3)
    cache = DynamicCache(config=case.model.config)
    for layer in range(2):
        cache.update(kv[2 * layer].expand(b, -1, -1, -1), kv[2 * layer + 1].expand(b, -1, -1, -1), layer)
    prompt = gm.prompt_encoder.prompt_embeddings
    embeds = torch.cat([prompt.expand(b, -1, -1), case.model.get_input_embeddings()(inputs["input_ids"])], 1)
    mask = torch.cat([torch.ones(b, 2 + P, dtype=torch.long), inputs["attention_mask"]], 1)
    with torch.no_grad():
        want = case.model(inputs_embeds=embeds, attention_mask=mask, cache=cache, use_cache=True).logits[:, P:]
        got = gm(**inputs).logits
    # the NF4 kernel may sum in another order than F.linear on deq(W) (row chunks): fp32 rounding only
    assert (got - want).abs().max().item() <= 1e-4
    gm(**inputs).loss.backward()
    assert all(p.grad is not None for p in peftfx.trainable_parameters(gm).values())


# --- init from text -------------------------------------------------------------------------------

class TinyLM(nn.Module):
    def __init__(self, vocab: int = 20, d: int = 8) -> None:
        super().__init__()
        self.embed, self.head = nn.Embedding(vocab, d), nn.Linear(d, vocab)

    def forward(self, input_ids):
        return self.head(torch.tanh(self.embed(input_ids)))


def test_text_init_from_token_ids_repeats_to_the_prompt_length():
    torch.manual_seed(0)
    model = TinyLM()
    plan = {"prompt": {"tokens": 5, "init": "text", "init_token_ids": [3, 7]}}
    gm = peftfx.compile(model, plan, example_inputs=(torch.randint(0, 20, (2, 6)),))
    assert torch.equal(gm.prompt_encoder.prompt_embeddings, model.embed.weight[[3, 7, 3, 7, 3]])
    ids = torch.randint(0, 20, (3, 9))
    with torch.no_grad():
        full = model.head(torch.tanh(torch.cat([gm.prompt_encoder.prompt_embeddings.expand(3, -1, -1),
                                                model.embed(ids)], 1)))
        assert (gm(ids) - full[:, 5:]).abs().max().item() <= 1e-6


def test_text_init_with_a_tokenizer_and_without_one():
    weight = torch.randn(20, 8)
    spec = PromptTuningSpec(tokens=3, init="text", init_text="hi there")
    tok = lambda text, add_special_tokens: {"input_ids": [4, 9, 11, 2]}  # noqa: E731 - a stand-in tokenizer
    assert torch.equal(prompt_init(weight, 3, spec, tok), weight[[4, 9, 11]])  # truncated to P
    with pytest.raises(RewriteError, match="tokenizer"):
        peftfx.compile(TinyLM(), {"prompt": {"tokens": 3, "init": "text", "init_text": "hi"}},
                       example_inputs=(torch.randint(0, 20, (2, 6)),))
    with pytest.raises(RewriteError, match="outside the vocabulary"):
        prompt_init(weight, 3, PromptTuningSpec(tokens=3, init="text", init_token_ids=(25,)))


# --- bad input ------------------------------------------------------------------------------------

class EmbedsModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 4)

    def forward(self, inputs_embeds):
        return self.proj(inputs_embeds)


def test_no_embedding_fed_by_input_ids():
    with pytest.raises(RewriteError, match="no aten.embedding fed by the input_ids"):
        peftfx.compile(EmbedsModel(), {"prompt": {"tokens": 2}}, example_inputs={"inputs_embeds": torch.randn(2, 5, 8)})


def test_static_sequence_length_is_rejected():
    with pytest.raises(RewriteError, match="static"):
        peftfx.compile(TinyLM(), {"prompt": {"tokens": 2}}, example_inputs=(torch.randint(0, 20, (2, 1)),))


@pytest.mark.parametrize("tokens", [0, -1])
def test_non_positive_tokens_rejected_by_compile(tokens):
    with pytest.raises(PlanError, match="prompt.tokens"):
        peftfx.compile(TinyLM(), {"prompt": {"tokens": tokens}}, example_inputs=(torch.randint(0, 20, (2, 6)),))


def test_pass_is_idempotent():
    from peftfx.pass_manager import PassContext
    from peftfx.passes.prompt_tuning import prompt_tuning

    gm = peftfx.compile(TinyLM(), {"prompt": {"tokens": 2}}, example_inputs=(torch.randint(0, 20, (2, 6)),))
    code = gm.code
    assert prompt_tuning(gm, PassContext(plan=gm.meta["peftfx.plan"])).modified is False
    assert gm.code == code
    assert sum(isinstance(m, SoftPrompt) for m in gm.modules()) == 1
