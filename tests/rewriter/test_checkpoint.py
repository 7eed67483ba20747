"""Adapter and whole-model checkpoints: bit-exact round trips, and every bad input is a
CheckpointError that names the culprit and leaves the module untouched."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import peftfx
from peftfx.io.checkpoint import ADAPTER_FILE, read_safetensors, write_safetensors
from peftfx.errors import CheckpointError
from tests.rewriter.travel_cases import fresh, same_bytes

Q1 = "model.layers.1.self_attn.q_proj"


def _snapshot(gm) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in gm.state_dict().items()}


def _unchanged(gm, snap) -> bool:
    now = gm.state_dict()
    return now.keys() == snap.keys() and all(same_bytes(now[k], v) for k, v in snap.items())


@pytest.fixture
def saved(tmp_path):
    """(source gm, case, adapter dir, target gm with other LoRA values, its snapshot)."""
    src, case = fresh("llama", "nf4", seed=1)
    peftfx.save_adapters(src, tmp_path)
    dst, _ = fresh("llama", "nf4", seed=2)
    return src, case, tmp_path, dst, _snapshot(dst)


def _rewrite(path, edit) -> None:
    """Re-save ``path`` after ``edit(tensors, meta)`` (fresh checksums: only the edit is wrong)."""
    tensors, meta = read_safetensors(path)
    edit(tensors, meta)
    meta.pop("peftfx.checksums", None)
    meta.pop("format", None)
    write_safetensors(path, tensors, meta)


def test_adapters_round_trip_bit_exact(saved):
    src, case, d, dst, _ = saved
    with torch.no_grad():  # a NaN with a payload: torch.equal would call equal bytes different
        src.get_submodule(Q1).lora_B.view(-1)[:1].view(torch.int32).fill_(0x7FC0BEEF)
    peftfx.save_adapters(src, d)
    info = peftfx.load_adapters(dst, d)
    assert info["plan"] == src.meta["peftfx.plan"].to_dict() and info["version"] == peftfx.__version__
    a, b = peftfx.trainable_parameters(src), peftfx.trainable_parameters(dst)
    assert a.keys() == b.keys() and all(same_bytes(a[k], b[k]) for k in a)
    with torch.no_grad():
        src.get_submodule(Q1).lora_B.view(-1)[:1].fill_(0.5)
        dst.get_submodule(Q1).lora_B.view(-1)[:1].fill_(0.5)
        assert torch.equal(src(**case.inputs).logits, dst(**case.inputs).logits)


def test_model_round_trip_bit_exact_with_packed_buffers(tmp_path):
    src, case = fresh("llama", "nf4", seed=1)
    dst, _ = fresh("llama", "nf4", seed=2)
    with torch.no_grad():  # make the packed base differ too, so the load must restore it
        dst.get_submodule(Q1).weight.bitwise_xor_(0xFF)
    path = peftfx.save_model(src, tmp_path / "model.safetensors")
    info = peftfx.load_model(dst, path)
    assert info["plan"]["quant"]["format"] == "nf4"
    a, b = src.state_dict(), dst.state_dict()
    assert any(v.dtype == torch.uint8 for v in a.values())
    assert a.keys() == b.keys() and all(same_bytes(a[k], b[k]) for k in a)
    with torch.no_grad():
        assert torch.equal(src(**case.inputs).logits, dst(**case.inputs).logits)


def test_model_with_tied_weights_stores_them_once(tmp_path):
    m = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
    m[1].weight = m[0].weight
    path = peftfx.save_model(m, tmp_path / "tied.safetensors")
    tensors, meta = read_safetensors(path)
    assert len(tensors) == 1 and json.loads(meta["peftfx.aliases"]) == {"1.weight": "0.weight"}
    other = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
    other[1].weight = other[0].weight
    peftfx.load_model(other, path)
    assert same_bytes(other[0].weight, m[0].weight) and other[1].weight is other[0].weight


def test_fingerprint_mismatch_names_the_layer(saved):
    _, _, d, dst, _ = saved
    with torch.no_grad():
        dst.get_submodule(Q1).weight[5] ^= 1  # another base: one code differs in one layer
    snap = _snapshot(dst)
    with pytest.raises(CheckpointError, match=r"another base.*\['model.layers.1.self_attn.q_proj'\]"):
        peftfx.load_adapters(dst, d)
    assert _unchanged(dst, snap)
    peftfx.load_adapters(dst, d, verify_base=False)  # the user may override
    assert not _unchanged(dst, snap)


def test_missing_and_extra_keys_are_listed(saved):
    _, _, d, dst, snap = saved
    gone = f"{Q1}.lora_A"

    def edit(tensors, meta):
        del tensors[gone]
        tensors["model.layers.9.mlp.lora_A"] = torch.zeros(2, 2)

    _rewrite(d / ADAPTER_FILE, edit)
    with pytest.raises(CheckpointError, match=rf"missing \['{gone}'\], unexpected \['model.layers.9.mlp.lora_A'\]"):
        peftfx.load_adapters(dst, d)
    assert _unchanged(dst, snap)


def test_wrong_shape(saved):
    _, _, d, dst, snap = saved
    _rewrite(d / ADAPTER_FILE, lambda t, m: t.update({f"{Q1}.lora_B": torch.zeros(64, 8)}))
    msg = rf"{Q1}.lora_B: file torch.float32 \[64, 8\] vs model torch.float32 \[64, 4\]"
    with pytest.raises(CheckpointError, match=msg):
        peftfx.load_adapters(dst, d)
    assert _unchanged(dst, snap)


def test_changed_scaling_is_refused(saved):
    _, _, d, dst, snap = saved

    def edit(tensors, meta):
        layers = json.loads(meta["peftfx.layers"])
        layers[Q1]["alpha"], layers[Q1]["scaling"] = 16, 4.0
        meta["peftfx.layers"] = json.dumps(layers)

    _rewrite(d / ADAPTER_FILE, edit)
    with pytest.raises(CheckpointError, match=rf"{Q1} \(file vs model: alpha 16 vs 8, scaling 4.0 vs 2.0\)"):
        peftfx.load_adapters(dst, d)
    assert _unchanged(dst, snap)


@pytest.mark.parametrize("damage,message", [
    (lambda b: b[: len(b) - 10], "truncated"),
    (lambda b: b[:4], "too short"),
    (lambda b: b[:8] + b"x" + b[9:], "bad safetensors header"),
    (lambda b: (10**9).to_bytes(8, "little") + b[8:], "header claims"),
    (lambda b: b[:-1] + bytes([b[-1] ^ 0x04]), r"checksum mismatch .*\['model.layers.1.self_attn.v_proj.lora_B'\]"),
])
def test_corrupt_files(saved, damage, message):
    _, _, d, dst, snap = saved
    path = d / ADAPTER_FILE
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(CheckpointError, match=message):
        peftfx.load_adapters(dst, d)
    assert _unchanged(dst, snap)


def test_missing_file_and_wrong_kind(tmp_path, saved):
    _, _, d, dst, snap = saved
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        peftfx.load_adapters(dst, tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="expected peftfx model"):
        peftfx.load_model(dst, d / ADAPTER_FILE)
    assert _unchanged(dst, snap)


def test_float_tensor_into_uint8_buffer(tmp_path):
    src, _ = fresh("llama", "nf4", seed=1)
    dst, _ = fresh("llama", "nf4", seed=2)
    snap = _snapshot(dst)
    path = peftfx.save_model(src, tmp_path / "model.safetensors")
    key = f"{Q1}.weight"
    _rewrite(path, lambda t, m: t.update({key: t[key].float()}))
    with pytest.raises(CheckpointError, match=rf"{key}: file torch.float32 \[2048\] vs model torch.uint8 \[2048\]"):
        peftfx.load_model(dst, path)
    assert _unchanged(dst, snap)


def test_save_without_adapters_is_an_error(tmp_path):
    with pytest.raises(CheckpointError, match="no trainable parameters"):
        peftfx.save_adapters(nn.Linear(2, 2).requires_grad_(False), tmp_path)
