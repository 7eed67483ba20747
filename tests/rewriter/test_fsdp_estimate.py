"""``peftfx estimate --world-size``: the per-rank peak under FSDP2 (peftfx.inspect.fsdp_estimate)."""
from __future__ import annotations

import os

import pytest
import torch

LLAMA_2_70B = dict(vocab_size=32000, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                   num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=4096, use_cache=False,
                   attn_implementation="sdpa")
QLORA_PLAN = os.path.join(os.path.dirname(__file__), "..", "..", "plans", "llama_qlora.toml")


def test_llama_2_70b_qlora_fits_two_24gb_cards_with_block_checkpointing_and_offload():
    import transformers

    from peftfx.inspect.estimate import format_bytes
    from peftfx.inspect.fsdp_estimate import estimate_sharded

    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA_2_70B))
    kw = dict(batch=1, seq=2048, dtype="bfloat16", train_device="cuda")
    est = estimate_sharded(model, QLORA_PLAN, world_size=2, checkpoint="blocks", offload="cpu", **kw)
    print(est.render())
    assert est.peak <= 22 * 2**30, format_bytes(est.peak)
    # each term moves the way it must: one rank alone holds the whole packed model (~34 GiB)
    alone = estimate_sharded(model, QLORA_PLAN, world_size=1, checkpoint="blocks", offload="cpu", **kw)
    assert alone.sharded_weights > 1.9 * est.sharded_weights and alone.peak > 32 * 2**30
    flat = estimate_sharded(model, QLORA_PLAN, world_size=2, **kw)  # no checkpointing: every activation kept
    assert flat.activations > 40 * 2**30 > est.activations


def test_sharded_estimate_extrapolates_blocks_like_the_full_estimate():
    """One rank, no checkpointing: the 1-and-2-block extrapolation equals estimating all 4 blocks."""
    import transformers

    from peftfx.inspect.estimate import estimate
    from peftfx.inspect.fsdp_estimate import estimate_sharded

    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2, use_cache=False,
                                   attn_implementation="sdpa")
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg)
    full = estimate(model, QLORA_PLAN, batch=2, seq=64, train_device="cuda").after
    sharded = estimate_sharded(model, QLORA_PLAN, world_size=1, batch=2, seq=64)
    assert sharded.sharded_weights == full.weight_bytes and sharded.activations == full.activations
    assert sharded.peak == pytest.approx(full.peak, rel=0.02)


def test_cli_estimate_world_size(tmp_path, capsys):
    import json

    from peftfx.inspect.cli import main

    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 512, "hidden_size": 128,
              "intermediate_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert main(["estimate", str(tmp_path / "config.json"), "--plan", QLORA_PLAN, "--world-size", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["world_size"] == 2 and out["blocks"] == 4 and out["peak"] > out["sharded_weights"] > 0
