"""Prefix tuning shifts positions a model derives from the attention mask's cumulative sum (OPT's learned
absolute positions, ``cumsum(mask) * mask - 1``) as PEFT's prefix cache does, and says which it shifted."""
from __future__ import annotations

import pytest
import torch

import peftfx

peft = pytest.importorskip("peft")
TOKENS = 3


def _opt(seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.OPTConfig(vocab_size=96, hidden_size=32, ffn_dim=48, num_hidden_layers=2, num_attention_heads=4,
                                 max_position_embeddings=64, word_embed_proj_dim=32, use_cache=False,
                                 attn_implementation="sdpa")
    return transformers.OPTForCausalLM(cfg).eval()


def _inputs(b: int, s: int) -> dict:
    ids = torch.randint(3, 96, (b, s))
    mask = torch.ones(b, s, dtype=torch.long)
    mask[0, :2] = 0  # left padding: padded rows' positions differ from arange's
    return {"input_ids": ids, "attention_mask": mask}


def test_opt_prefix_matches_peft_on_the_exported_adapter(tmp_path):
    inputs = _inputs(2, 7)
    gm = peftfx.compile(_opt(), {"prefix": {"tokens": TOKENS}}, example_inputs=inputs)
    with torch.no_grad():  # a prefix that matters
        for p in peftfx.trainable_parameters(gm).values():
            p.normal_(0, 1.0)
    notes = [n for r in peftfx.report(gm) if r.name == "prefix_tuning" for n in r.notes if "positions_shifted" in n]
    shifted = notes[0]["positions_shifted"]
    assert isinstance(shifted, list) and any("cumsum" in s for s in shifted), shifted
    peftfx.export_peft(gm, tmp_path)
    theirs = peft.PeftModel.from_pretrained(_opt(), tmp_path).eval()
    for batch in (inputs, _inputs(3, 5)):
        with torch.no_grad():
            ours, want = gm(**batch).logits, theirs(**batch).logits
        real = batch["attention_mask"].bool()  # PEFT's padded rows see their own (masked) positions too
        torch.testing.assert_close(ours[real], want[real], rtol=0, atol=1e-5)
        torch.testing.assert_close(ours, want, rtol=0, atol=1e-5)
