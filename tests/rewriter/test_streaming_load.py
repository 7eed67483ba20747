"""``peftfx.load``: compile from a sharded Hugging Face folder, one dense layer in memory at a time.

The model is big enough (vocab 2048, hidden 512) that the quantizer's fixed-size slices and
capture's bookkeeping stay well under the 10% margin, and small enough to save and load in a
second or two.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

import peftfx
from peftfx.inspect.estimate import measure_peak
from peftfx.io.streaming import SafetensorsFolder

PLAN = {"targets": ["*.q_proj", "*.k_proj", "*.v_proj", "*.o_proj", "*.gate_proj", "*.up_proj", "*.down_proj"],
        "quant": {"format": "nf4", "double_quant": True}, "lora": {"r": 4, "alpha": 8}}


def _inputs() -> dict:
    ids = torch.randint(0, 2048, (2, 8), generator=torch.Generator().manual_seed(3))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=2048, hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
                                   num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=64,
                                   use_cache=False, attn_implementation="sdpa")
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("hf") / "llama"
    transformers.LlamaForCausalLM(cfg).save_pretrained(path, max_shard_size="8MB")
    return path


def _bytes(gm) -> int:
    seen, total = set(), 0
    for t in [*gm.parameters(), *gm.buffers()]:
        if t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            total += t.untyped_storage().nbytes()
    return total


def test_streaming_load_peaks_at_one_layer_and_equals_compile(folder):
    import transformers

    shards = sorted(p.name for p in folder.glob("*.safetensors"))
    assert len(shards) >= 3, shards
    out = {}
    torch.manual_seed(0)  # LoRA A init
    peak = measure_peak(lambda: out.update(gm=peftfx.load(folder, PLAN, example_inputs=_inputs(), snapshots=False)))
    gm = out["gm"]
    source = SafetensorsFolder(folder)
    largest = max(torch.Size(v["shape"]).numel() * 4 for _, v in source.entries.values())  # fp32 on disk
    bound = (largest + _bytes(gm)) * 1.10
    print(f"streaming load: peak {peak / 2**20:.2f} MiB, largest layer {largest / 2**20:.2f} MiB + compiled model "
          f"{_bytes(gm) / 2**20:.2f} MiB (bound {bound / 2**20:.2f} MiB)")
    assert peak <= bound

    model = transformers.LlamaForCausalLM.from_pretrained(folder)
    torch.manual_seed(0)
    ref = peftfx.compile(model, PLAN, example_inputs=_inputs(), snapshots=False)
    a, b = gm.state_dict(), ref.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with torch.no_grad():
        assert torch.equal(gm(**_inputs()).logits, ref(**_inputs()).logits)


def _copy(folder: Path, dst: Path) -> Path:
    shutil.copytree(folder, dst)
    return dst


def _shard(folder: Path) -> Path:
    return sorted(folder.glob("model-*.safetensors"))[1]


def test_missing_shard_is_named(folder, tmp_path):
    bad = _copy(folder, tmp_path / "m")
    victim = _shard(bad)
    victim.unlink()
    with pytest.raises(peftfx.CheckpointError, match=f"{victim.name}.*missing"):
        peftfx.load(bad, PLAN, example_inputs=_inputs())


def test_truncated_shard_is_named(folder, tmp_path):
    bad = _copy(folder, tmp_path / "t")
    victim = _shard(bad)
    data = victim.read_bytes()
    victim.write_bytes(data[:len(data) - 1000])
    with pytest.raises(peftfx.CheckpointError, match=f"{victim.name}.*truncated"):
        peftfx.load(bad, PLAN, example_inputs=_inputs())


def test_shard_not_matching_its_recorded_sha256_is_named(folder, tmp_path):
    """A Hugging Face cache snapshot links each file to a blob named by its sha256."""
    snap, blobs = tmp_path / "snapshots" / "rev", tmp_path / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for f in folder.iterdir():
        data = f.read_bytes()
        blob = blobs / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snap / f.name).symlink_to(blob)
    SafetensorsFolder(snap)  # intact: passes
    victim = _shard(snap)
    real = victim.resolve()
    data = bytearray(real.read_bytes())
    data[-5] ^= 0xFF  # one payload byte: sizes and header still fine
    real.write_bytes(bytes(data))
    with pytest.raises(peftfx.CheckpointError, match=f"{victim.name}.*sha256.*does not match"):
        peftfx.load(snap, PLAN, example_inputs=_inputs())


def test_peftfx_tensor_checksum_mismatch_is_named(tmp_path):
    """Shards written by peftfx carry a sha256 per tensor; a changed payload is caught when read."""
    import transformers

    from peftfx.io.checkpoint import write_safetensors

    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, use_cache=False,
                                   architectures=["LlamaForCausalLM"])
    model = transformers.LlamaForCausalLM(cfg)
    cfg.save_pretrained(tmp_path)
    write_safetensors(tmp_path / "model.safetensors", model.state_dict(), {})
    path = tmp_path / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01
    path.write_bytes(bytes(data))
    ids = torch.randint(0, 64, (2, 5))
    with pytest.raises(peftfx.CheckpointError, match="model.safetensors.*checksum mismatch"):
        peftfx.load(tmp_path, PLAN, example_inputs={"input_ids": ids, "attention_mask": torch.ones_like(ids)})


def test_index_naming_a_shard_without_the_tensor_is_refused(folder, tmp_path):
    bad = _copy(folder, tmp_path / "i")
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    key = "model.layers.0.self_attn.q_proj.weight"
    others = sorted({f for f in index["weight_map"].values() if f != index["weight_map"][key]})
    index["weight_map"][key] = others[0]
    (bad / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(peftfx.CheckpointError, match="q_proj.weight"):
        peftfx.load(bad, PLAN, example_inputs=_inputs())
    assert os.path.exists(bad / others[0])
