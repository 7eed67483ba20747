"""PEFT interop: our exported adapters load in ``peft.PeftModel`` with the same logits (dense and
over a bitsandbytes 4-bit base holding our codes), PEFT-trained adapters import, and the config
file equals the one PEFT writes itself."""
from __future__ import annotations

import json

import pytest
import torch

import peftfx
from peftfx.io.bnb_io import to_linear4bit
from peftfx.kernels.modules import qlora_layers
from peftfx.errors import CheckpointError
from peftfx.io.peft_io import CONFIG_NAME, WEIGHTS_NAME, _write_config, lora_config_fields
from tests.model_zoo import make_case
from tests.rewriter.travel_cases import PROMPT_TOKENS, fresh

peft = pytest.importorskip("peft")

# (name, format, atol): dense bases match to float rounding; NF4 through bitsandbytes' own CPU
# dequant + matmul order differs from ours by a few ulps.
CASES = [("llama", "none", 1e-5), ("gpt2", "none", 1e-5), ("llama", "nf4", 1e-4), ("gpt2", "nf4", 1e-4)]


def _peft_base(name: str, gm):
    """The same tiny model; NF4 targets become bitsandbytes Linear4bit modules with our exact codes."""
    base = make_case(name).model
    for fqn, m in qlora_layers(gm).items():
        if m.format != "none":
            pytest.importorskip("bitsandbytes")
            base.set_submodule(fqn, to_linear4bit(m))
            base.is_loaded_in_4bit = True  # as transformers marks a 4-bit model: PEFT dispatches its bnb LoRA
    return base


def _logits(model, case):
    with torch.no_grad():
        return model(**case.inputs).logits


def _max_diff(a, b) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("name,fmt,atol", CASES)
def test_export_loads_in_peft_with_same_logits(tmp_path, name, fmt, atol):
    gm, case = fresh(name, fmt)
    peftfx.export_peft(gm, tmp_path)
    base = _peft_base(name, gm)
    model = peft.PeftModel.from_pretrained(base, tmp_path).eval()
    if fmt == "nf4":  # PEFT really runs its bitsandbytes LoRA layer over bnb's 4-bit base
        from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit

        assert sum(isinstance(m, PeftLinear4bit) for m in model.modules()) == len(qlora_layers(gm))
    ours, theirs = _logits(gm, case), _logits(model, case)
    assert _max_diff(ours, _logits(_peft_base(name, gm), case)) > 1e-3  # LoRA really changes the output
    assert _max_diff(ours, theirs) <= atol


@pytest.mark.parametrize("name,fmt,atol", CASES[:3])
def test_peft_trained_adapter_imports(tmp_path, name, fmt, atol):
    gm, case = fresh(name, fmt)
    base = _peft_base(name, gm)
    targets = [t.rpartition(".")[2] for t in case.attn_targets]
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:  # "trained": B non-zero by hand
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    model.save_pretrained(tmp_path)
    peftfx.import_peft(gm, tmp_path)
    assert _max_diff(_logits(gm, case), _logits(model.eval(), case)) <= atol


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_config_equals_what_peft_writes(tmp_path, name):
    gm, case = fresh(name, "none")
    peftfx.export_peft(gm, tmp_path / "ours")
    targets = [t.rpartition(".")[2] for t in case.attn_targets]
    model = peft.get_peft_model(make_case(name).model, peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, fan_in_fan_out=name == "gpt2"))
    model.save_pretrained(tmp_path / "peft")
    ours = json.loads((tmp_path / "ours" / CONFIG_NAME).read_text())
    theirs = json.loads((tmp_path / "peft" / CONFIG_NAME).read_text())
    assert ours == theirs
    from safetensors import safe_open

    with safe_open(tmp_path / "ours" / WEIGHTS_NAME, "pt") as a, safe_open(tmp_path / "peft" / WEIGHTS_NAME, "pt") as b:
        assert a.metadata() == b.metadata()
        assert sorted(a.keys()) == sorted(b.keys())
        assert all(a.get_slice(k).get_shape() == b.get_slice(k).get_shape() for k in a.keys())


def test_config_without_peft_writes_only_non_defaults_and_loads(tmp_path):
    gm, case = fresh("llama", "none")
    fields = lora_config_fields(gm)
    minimal = _write_config(tmp_path, "LORA", fields, None, use_peft=False)
    full = peft.LoraConfig(**fields).to_dict()
    assert set(minimal) < set(full) | {"peft_type"}
    norm = lambda v: sorted(v) if isinstance(v, (set, list)) else v  # noqa: E731 - peft keeps a set
    assert all(norm(full[k]) == norm(v) for k, v in minimal.items() if k not in ("peft_type", "inference_mode"))
    assert "lora_dropout" not in minimal and minimal["r"] == 4
    loaded = peft.PeftConfig.from_pretrained(tmp_path)
    assert (loaded.r, loaded.lora_alpha, set(loaded.target_modules)) == (4, 8, {"q_proj", "v_proj"})


def test_rank_pattern_round_trip(tmp_path):
    case = make_case("llama")
    plan = {"targets": case.attn_targets, "lora": {"r": 4, "alpha": 8},
            "rules": [{"targets": "model.layers.0.self_attn.q_proj", "lora": {"r": 2, "alpha": 3}}]}
    gm = peftfx.compile(case.model, plan, example_inputs=case.inputs)
    with torch.no_grad():
        for p in peftfx.trainable_parameters(gm).values():
            p.normal_(0, 0.1)
    peftfx.export_peft(gm, tmp_path)
    cfg = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert cfg["rank_pattern"] == {"model.layers.0.self_attn.q_proj": 2}
    assert cfg["alpha_pattern"] == {"model.layers.0.self_attn.q_proj": 3}
    model = peft.PeftModel.from_pretrained(make_case("llama").model, tmp_path).eval()
    assert _max_diff(_logits(gm, case), _logits(model, case)) <= 1e-5


def test_import_refuses_mismatches_and_changes_nothing(tmp_path):
    gm, case = fresh("llama", "none")
    peftfx.export_peft(gm, tmp_path)
    before = {k: v.clone() for k, v in peftfx.trainable_parameters(gm).items()}
    cfg_path = tmp_path / CONFIG_NAME
    cfg = json.loads(cfg_path.read_text())

    other, _ = fresh("llama", "none", seed=3)
    cfg_path.write_text(json.dumps({**cfg, "lora_alpha": 16}))
    with pytest.raises(CheckpointError, match=r"scaling.*alpha=16"):
        peftfx.import_peft(other, tmp_path)
    cfg_path.write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(CheckpointError, match="use_dora"):
        peftfx.import_peft(other, tmp_path)
    cfg_path.write_text(json.dumps(cfg))

    from safetensors.torch import load_file, save_file

    tensors = load_file(tmp_path / WEIGHTS_NAME)
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    extra = {"base_model.model.lm_head.lora_A.weight": torch.zeros(4, 64)}
    save_file({k: v for k, v in tensors.items() if k != key} | extra, tmp_path / WEIGHTS_NAME)
    with pytest.raises(CheckpointError, match=r"missing \[.*v_proj.lora_B.weight'\].*unexpected \[.*lm_head"):
        peftfx.import_peft(other, tmp_path)
    save_file(tensors | {key: torch.zeros(32, 2)}, tmp_path / WEIGHTS_NAME)
    with pytest.raises(CheckpointError, match=r"v_proj.lora_B.weight: file torch.float32 \[32, 2\]"):
        peftfx.import_peft(other, tmp_path)
    after = peftfx.trainable_parameters(other)
    theirs = fresh("llama", "none", seed=3)[0]
    assert all(torch.equal(after[k], v) for k, v in peftfx.trainable_parameters(theirs).items())
    assert all(torch.equal(peftfx.trainable_parameters(gm)[k], v) for k, v in before.items())


def test_export_needs_adapters(tmp_path):
    merged = peftfx.merge(fresh("llama", "nf4")[0])  # no LoRA layer left
    with pytest.raises(CheckpointError, match="nothing to export"):
        peftfx.export_peft(merged, tmp_path)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_prompt_and_prefix_tuning_round_trip_with_peft(tmp_path, name, kind):
    gm, case = fresh(name, kind)
    cfg_cls = peft.PromptTuningConfig if kind == "prompt" else peft.PrefixTuningConfig
    # PEFT's prompt-tuning logits include the P virtual positions; ours are sliced back to S
    cut = PROMPT_TOKENS if kind == "prompt" else 0

    peftfx.export_peft(gm, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(make_case(name).model, tmp_path / "ours").eval()
    ours = _logits(gm, case)
    assert _max_diff(ours, _logits(make_case(name).model, case)) > 1e-3  # the adapter matters
    assert _max_diff(ours, _logits(theirs, case)[:, cut:]) <= 1e-5

    trained = peft.get_peft_model(make_case(name).model, cfg_cls(task_type="CAUSAL_LM",
                                                                  num_virtual_tokens=PROMPT_TOKENS))
    with torch.no_grad():
        for p in trained.parameters():
            if p.requires_grad:
                p.normal_(0, 0.5)
    trained.save_pretrained(tmp_path / "peft")
    assert json.loads((tmp_path / "ours" / CONFIG_NAME).read_text()) == \
        json.loads((tmp_path / "peft" / CONFIG_NAME).read_text())
    peftfx.import_peft(gm, tmp_path / "peft")
    assert _max_diff(_logits(gm, case), _logits(trained.eval(), case)[:, cut:]) <= 1e-5


def test_prompt_import_refuses_wrong_length(tmp_path):
    gm, _ = fresh("llama", "prefix")
    before = {k: v.clone() for k, v in peftfx.trainable_parameters(gm).items()}
    trained = peft.get_peft_model(make_case("llama").model, peft.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=PROMPT_TOKENS + 2))
    trained.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=r"expects \[3, 128\] \(prefix tuning with num_virtual_tokens=3\)"):
        peftfx.import_peft(gm, tmp_path)
    assert all(torch.equal(peftfx.trainable_parameters(gm)[k], v) for k, v in before.items())
    lora_gm, _ = fresh("llama", "none")
    with pytest.raises(CheckpointError, match="needs a module compiled with a 'prefix' plan section"):
        peftfx.import_peft(lora_gm, tmp_path)
