"""``peftfx generate``: a saved model folder + tokenizer + saved adapters stream the same tokens as
``peftfx.generate``; bad folders exit 2 with one line."""
from __future__ import annotations

import pytest
import torch

import peftfx
from peftfx.inspect.cli import main
from tests.model_zoo import VOCAB, make_case
from tests.serve.test_generation import greedy_by_forward

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

WORDS = [f"w{i}" for i in range(VOCAB - 3)]


def _tokenizer():
    """A whitespace word-level tokenizer over the tiny model's vocabulary, built offline."""
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    core = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<pad>"))
    core.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    core.decoder = tokenizers.decoders.WordPiece(prefix="##")  # joins words with spaces
    return transformers.PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>",
                                                eos_token="</s>")


def test_generate_command_streams_the_adapters_tokens(tmp_path, capsys):
    case = make_case("llama")
    case.model.generation_config.eos_token_id = None
    case.model.save_pretrained(tmp_path / "model")
    tok = _tokenizer()
    tok.save_pretrained(tmp_path / "model")
    plan = {"targets": case.attn_targets, "quant": {"format": "nf4"}, "lora": {"r": 4, "alpha": 8}}
    inputs = {k: v for k, v in case.inputs.items() if k != "labels"}
    gm = peftfx.compile(case.model, plan, example_inputs=inputs)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in peftfx.trainable_parameters(gm).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    peftfx.save_adapters(gm, tmp_path / "adapters")
    prompt = "w5 w17 w40 w2"
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    tokens = greedy_by_forward(lambda s: gm(input_ids=s, attention_mask=torch.ones_like(s)).logits, ids, 6)[0]
    eos = (tokens[ids.shape[1]:] == tok.eos_token_id).nonzero()
    expected = tok.decode(tokens[: ids.shape[1] + int(eos[0]) + 1] if len(eos) else tokens)

    code = main(["generate", str(tmp_path / "model"), "--adapters", str(tmp_path / "adapters"), "--prompt", prompt,
                 "--max-new-tokens", "6"])
    assert code == 0
    assert capsys.readouterr().out.split() == expected.split()

    code = main(["generate", str(tmp_path / "model"), "--adapters", str(tmp_path), "--prompt", prompt])
    assert code == 2
    assert "holds no peftfx_adapters.safetensors" in capsys.readouterr().err
