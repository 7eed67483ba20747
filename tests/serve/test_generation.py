"""peftfx.generate: greedy tokens equal transformers' generate of the same model + adapter (PEFT over the
dequantized base), left padding, sampling, memory sharing, training visibility, bad input.

Every compile and every first generate is a torch.export (seconds each): the default run keeps one
Llama NF4+LoRA module for most checks; other families and formats are marked slow.
"""
from __future__ import annotations

import tempfile

import pytest
import torch

import peftfx
from peftfx.kernels.modules import qlora_layers
from peftfx.serve.kv_cache import GenerationError, step_graph
from tests.model_zoo import VOCAB, make_case

peft = pytest.importorskip("peft")

NEW = 32


def prompts(batch: int = 2, seq: int = 6, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and a left-padded mask (row 0 has 2 pads when batch > 1)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    if batch > 1:
        mask[0, :2] = 0
    return ids, mask


def no_eos(model):
    """Generate all NEW tokens on both sides (the random tiny models emit eos by chance)."""
    model.generation_config.eos_token_id = None
    return model


def randomize(gm, seed: int = 1, scale: float = 0.1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in peftfx.trainable_parameters(gm).values():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def compile_lora(name: str, fmt: str = "nf4", **lora):
    case = make_case(name)
    plan = {"targets": case.attn_targets, "lora": {"r": 4, "alpha": 8, **lora}}
    if fmt != "none":
        plan["quant"] = {"format": fmt, **({"double_quant": True} if fmt == "nf4" else {})}
    inputs = {k: v for k, v in case.inputs.items() if k != "labels"}
    gm = peftfx.compile(no_eos(case.model), plan, example_inputs=inputs)
    randomize(gm)
    return gm


def dequantized_peft_reference(name: str, gm):
    """PEFT loading our exported adapter over the same model whose targets hold deq(W)."""
    base = no_eos(make_case(name).model)
    for fqn, m in qlora_layers(gm).items():
        w = m.dequantized_weight(torch.float32)
        target = base.get_submodule(fqn)
        with torch.no_grad():
            target.weight.copy_(w if target.weight.shape == w.shape else w.t())  # GPT-2 Conv1D: [in, out]
    with tempfile.TemporaryDirectory() as d:
        peftfx.export_peft(gm, d)
        return peft.PeftModel.from_pretrained(base, d).eval()


def hf_generate(model, ids, mask, new: int = NEW) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=0)


def greedy_by_forward(forward, ids: torch.Tensor, new: int = NEW) -> torch.Tensor:
    """Greedy decoding recomputing the whole (unpadded) sequence each step: no cache at all."""
    seq = ids
    with torch.no_grad():
        for _ in range(new):
            logits = forward(seq)
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq


@pytest.fixture(scope="module")
def llama_nf4():
    return compile_lora("llama")


def test_lora_nf4_greedy_equals_transformers_generate_with_left_padding(llama_nf4):
    ids, mask = prompts()
    ours = peftfx.generate(llama_nf4, ids, mask, max_new_tokens=NEW)
    theirs = hf_generate(dequantized_peft_reference("llama", llama_nf4), ids, mask)
    assert ours.shape == (2, 6 + NEW)
    assert torch.equal(ours, theirs)
    alone = peftfx.generate(llama_nf4, ids[:1, 2:], max_new_tokens=NEW)  # row 0 without its padding
    assert torch.equal(alone[0], ours[0, 2:])
    base = no_eos(make_case("llama").model)
    assert not torch.equal(hf_generate(base, ids, mask), ours)  # the adapter changes the tokens


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gpt2", "qwen2", "qwen3", "mistral"])
def test_families_greedy_equal_transformers_generate(name):
    gm = compile_lora(name)
    ids, mask = prompts()
    assert torch.equal(peftfx.generate(gm, ids, mask, max_new_tokens=NEW),
                       hf_generate(dequantized_peft_reference(name, gm), ids, mask))


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["none", "int8", "int8-zeropoint", "llm-int8", "fp4"])
def test_quant_formats_greedy_equal_transformers_generate(fmt):
    gm = compile_lora("llama", fmt)
    ids, mask = prompts()
    assert torch.equal(peftfx.generate(gm, ids, mask, max_new_tokens=NEW),
                       hf_generate(dequantized_peft_reference("llama", gm), ids, mask))


def test_seeded_sampling_is_reproducible(llama_nf4):
    ids, mask = prompts()

    def sample(seed):
        return peftfx.generate(llama_nf4, ids, mask, max_new_tokens=12, do_sample=True, temperature=0.8, top_k=20,
                               top_p=0.9, generator=torch.Generator().manual_seed(seed))

    first = sample(7)
    assert torch.equal(first, sample(7))
    assert not torch.equal(first, sample(8))


def test_eos_stops_each_row_and_pads_after(llama_nf4):
    ids, mask = prompts()
    free = peftfx.generate(llama_nf4, ids, mask, max_new_tokens=8)
    eos = int(free[0, 6 + 2])  # row 0's third new token
    out = peftfx.generate(llama_nf4, ids, mask, max_new_tokens=8, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(out[0, : 6 + 3], free[0, : 6 + 3])
    assert (out[0, 6 + 3:] == 0).all()
    hits = (free[1, 6:] == eos).nonzero()
    stop = int(hits[0]) + 1 if len(hits) else 8
    assert torch.equal(out[1, 6: 6 + stop], free[1, 6: 6 + stop])


def test_generation_binds_the_compiled_modules_and_adds_only_constants(llama_nf4):
    step = step_graph(llama_nf4)
    ours = dict(qlora_layers(llama_nf4))
    assert ours and all(step.get_submodule(fqn) is m for fqn, m in ours.items())

    def storages(module):
        return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in [*module.parameters(), *module.buffers()] if t.device.type != "meta"}

    base, extra = storages(llama_nf4), storages(step)
    added = sum(n for ptr, n in extra.items() if ptr not in base)
    assert added <= 1024, f"the step graph holds {added} bytes of its own"


def test_a_training_step_shows_in_the_next_generate(llama_nf4):
    ids, mask = prompts(batch=1)
    saved = {n: p.detach().clone() for n, p in peftfx.trainable_parameters(llama_nf4).items()}
    try:
        before = peftfx.generate(llama_nf4, ids, max_new_tokens=8)
        opt = torch.optim.SGD(peftfx.trainable_parameters(llama_nf4).values(), lr=5.0)
        llama_nf4.train()
        loss = llama_nf4(input_ids=ids, attention_mask=mask).logits.logsumexp(-1).mean()
        loss.backward()
        opt.step()
        llama_nf4.eval()
        after = peftfx.generate(llama_nf4, ids, max_new_tokens=8)
        assert llama_nf4.training is False and not torch.equal(before, after)
        expected = greedy_by_forward(lambda s: llama_nf4(input_ids=s, attention_mask=torch.ones_like(s)).logits,
                                     ids, 8)
        assert torch.equal(after, expected)
    finally:
        with torch.no_grad():
            for n, p in peftfx.trainable_parameters(llama_nf4).items():
                p.copy_(saved[n])


def test_bad_inputs_name_the_values(llama_nf4):
    ids, mask = prompts()
    with pytest.raises(GenerationError, match=r"prompt length 6 \+ max_new_tokens 200 = 206 exceeds the cache "
                                              r"length 128"):
        peftfx.generate(llama_nf4, ids, mask, max_new_tokens=200)
    with pytest.raises(GenerationError, match=r"temperature=0"):
        peftfx.generate(llama_nf4, ids, max_new_tokens=2, do_sample=True, temperature=0)
    for top_p in (0.0, 1.5):
        with pytest.raises(GenerationError, match=rf"top_p must be in \(0, 1\], got top_p={top_p}"):
            peftfx.generate(llama_nf4, ids, max_new_tokens=2, do_sample=True, top_p=top_p)
    right = torch.ones_like(ids)
    right[1, -2:] = 0
    with pytest.raises(GenerationError, match="row 1 has padding after a token"):
        peftfx.generate(llama_nf4, ids, right, max_new_tokens=2)
    with pytest.raises(GenerationError, match="adapter_ids is only for"):
        peftfx.generate(llama_nf4, ids, max_new_tokens=2, adapter_ids=torch.tensor([0, 0]))


def test_encoder_only_model_is_refused():
    case = make_case("bert")
    gm = peftfx.compile(case.model, {"targets": case.attn_targets, "lora": {"r": 2}}, example_inputs=case.inputs)
    with pytest.raises(GenerationError, match="encoder-only model: generation needs a decoder"):
        peftfx.generate(gm, case.inputs["input_ids"], max_new_tokens=2)


@pytest.mark.slow
def test_merged_model_generates_like_the_adapter(llama_nf4):
    merged = peftfx.merge(llama_nf4)
    ids, mask = prompts()
    assert torch.equal(peftfx.generate(merged, ids, mask, max_new_tokens=NEW),
                       peftfx.generate(llama_nf4, ids, mask, max_new_tokens=NEW))
