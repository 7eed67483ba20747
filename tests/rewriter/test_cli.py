"""The ``peftfx`` CLI through its real entry point (``python -m peftfx``) in a subprocess.

The factories below are the MODEL argument ``tests.rewriter.test_cli:<name>`` (the subprocess runs
in the repository root, so ``tests`` is importable).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from peftfx.inspect.cli import main

ROOT = Path(__file__).resolve().parents[2]
TINY_LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
              "intermediate_size": 96, "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
              "vocab_size": 128, "max_position_embeddings": 64}


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(64, 128)
        self.down = nn.Linear(128, 8)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


class Branchy(MLP):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.export cannot capture it
            return self.up(x)
        return self.down(torch.relu(self.up(x)))


def make_mlp():
    torch.manual_seed(0)
    return MLP(), (torch.randn(4, 64),)


def make_branchy():
    return Branchy(), (torch.randn(4, 64),)


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("PEFTFX_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "peftfx", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    (d / "plan.toml").write_text('targets = ["up", "down"]\n\n[quant]\nformat = "nf4"\n\n[lora]\nr = 4\n')
    (d / "bad.toml").write_text('targets = ["up"]\n\n[lora]\nr = 4\nrank = 8\n')
    (d / "llama.json").write_text('{"targets": ["*.q_proj", "*.v_proj"], "quant": {"format": "nf4"}, '
                                  '"lora": {"r": 8}}')
    (d / "config.json").write_text(json.dumps(TINY_LLAMA))
    return d


def test_passes_lists_registered_passes_and_sections(capsys):
    assert main(["passes"]) == 0
    out = capsys.readouterr().out
    assert "swap_linear" in out and "quant, lora, rules" in out
    assert "freeze" in out and "(always)" in out
    assert main(["passes", "--json"]) == 0
    specs = {p["name"]: p for p in json.loads(capsys.readouterr().out)}
    assert specs["swap_linear"]["sections"] == ["quant", "lora", "rules"] and specs["freeze"]["sections"] == ["*"]


def test_inspect_text(files):
    res = _run("inspect", "tests.rewriter.test_cli:make_mlp", "--plan", str(files / "plan.toml"))
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "pass swap_linear" in out and "2 nodes created" in out and "2 replaced" in out
    assert "up: weight [128, 64]" in out and "format nf4" in out and "peftfx::qlora_linear" in out
    assert "patterns that matched nothing: none" in out
    lora = 4 * 64 + 128 * 4 + 4 * 128 + 8 * 4
    assert f"trainable parameters: {lora:,} of" in out


def test_inspect_json_with_pass_diff_and_dot_graph(files, tmp_path, capsys):
    # in-process: the subprocess path is covered by test_inspect_text; same main()
    dot = tmp_path / "graph.dot"
    code = main(["inspect", "tests.rewriter.test_cli:make_mlp", "--plan", str(files / "plan.toml"), "--json",
                 "--pass", "swap_linear", "--graph", str(dot)])
    assert code == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["schema"] == "peftfx.inspect" and rep["schema_version"] == 1
    assert [p["name"] for p in rep["passes"]] == ["swap_linear", "causal_attention", "fuse_activations",
                                                  "fuse_linear_cross_entropy", "freeze"]
    assert {t["target"] for t in rep["passes"][0]["targets"]} == {"up", "down"}
    assert rep["diff"]["pass"] == "swap_linear" and "+    up = self.up(x)" in rep["diff"]["text"]
    assert dot.read_text().startswith("digraph peftfx {")


def test_estimate_text_on_a_config_json(files, capsys):
    code = main(["estimate", str(files / "config.json"), "--plan", str(files / "llama.json"), "--batch", "2",
                 "--seq", "16"])
    assert code == 0
    out = capsys.readouterr().out
    assert "peftfx estimate: LlamaForCausalLM, batch 2 x seq 16, adamw" in out
    assert "before (full fine-tune)" in out and "after (plan)" in out
    for line in ("weights", "gradients", "optimizer state", "activations (saved)", "peak of one step",
                 "largest single tensor"):
        assert line in out
    assert "targeted layers in nf4: 2 layers" in out


def test_estimate_json_in_a_subprocess(files):
    res = _run("estimate", "tests.rewriter.test_cli:make_mlp", "--plan", str(files / "plan.toml"), "--json",
               "--optimizer", "sgd", "--device", "cpu")
    assert res.returncode == 0, res.stderr
    est = json.loads(res.stdout)
    assert est["schema"] == "peftfx.estimate" and est["schema_version"] == 1
    assert est["optimizer"] == "sgd" and est["before"]["optimizer_state"] == 0
    n = 64 * 128 + 128 + 128 * 8 + 8
    assert est["before"]["weights"] == {"float32": 4 * n} and est["before"]["gradients"] == 4 * n
    assert est["after"]["trainable_params"] == 4 * 64 + 128 * 4 + 4 * 128 + 8 * 4
    assert est["after"]["weights"]["nf4"] == sum(r["weight_bytes"] for r in est["layers"])
    assert set(est["bits_per_param"]) == {"nf4"}


def test_estimate_json_on_a_config_json_in_bfloat16(files, capsys):
    code = main(["estimate", str(files / "config.json"), "--plan", str(files / "llama.json"), "--json",
                 "--batch", "3", "--seq", "5", "--dtype", "bfloat16", "--optimizer", "adamw-8bit"])
    assert code == 0
    est = json.loads(capsys.readouterr().out)
    assert est["batch"] == 3 and est["seq"] == 5 and est["dtype"] == "bfloat16"
    assert "bfloat16" in est["before"]["weights"] and "lora (float32)" in est["after"]["weights"]


def test_bad_plan_exits_2_with_one_line_and_a_hint(files):
    res = _run("inspect", "tests.rewriter.test_cli:make_mlp", "--plan", str(files / "bad.toml"))
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert lines[-2].startswith("peftfx: error:") and "rank" in lines[-2]
    assert lines[-1].startswith("hint:") and "Traceback" not in res.stderr


def test_untraceable_factory_exits_3(files):
    res = _run("inspect", "tests.rewriter.test_cli:make_branchy", "--plan", str(files / "plan.toml"))
    assert res.returncode == 3, res.stderr
    assert "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert lines[-2].startswith("peftfx: error:") and lines[-1].startswith("hint:")


def test_usage_errors_exit_2_in_process(files, capsys):
    plan = str(files / "plan.toml")
    assert main(["inspect", "tests.rewriter.test_cli:make_mlp", "--plan", str(files / "missing.toml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["estimate", "no_such_module_xyz:make", "--plan", plan]) == 2
    assert "cannot import" in capsys.readouterr().err
    assert main(["estimate", "tests.rewriter.test_cli:make_mlp", "--plan", plan, "--batch", "0"]) == 2
    assert main(["inspect", "tests.rewriter.test_cli:make_mlp", "--plan", plan, "--pass", "nope"]) == 2
    assert "did not run" in capsys.readouterr().err


def test_model_from_spec_reads_a_local_hf_folder(files, tmp_path):
    import transformers

    from peftfx.inspect.model_source import model_from_spec

    config = transformers.AutoConfig.for_model(**TINY_LLAMA)
    torch.manual_seed(0)
    saved = transformers.LlamaForCausalLM(config)
    saved.save_pretrained(tmp_path)
    model, inputs, name = model_from_spec(str(tmp_path), device="cpu", batch=3, seq=5)
    assert name == "LlamaForCausalLM" and inputs["input_ids"].shape == (3, 5) and "labels" in inputs
    assert torch.equal(model.model.embed_tokens.weight, saved.model.embed_tokens.weight)  # weights loaded
    meta, meta_inputs, _ = model_from_spec(str(tmp_path), device="meta")
    assert next(meta.parameters()).is_meta and meta_inputs["input_ids"].shape == (2, 8)
