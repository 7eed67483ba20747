"""Inspection report: per-pass created/erased/replaced nodes, targets, patterns, trainable %, diffs, .dot."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import peftfx
from peftfx.errors import PeftfxError, PlanError
from peftfx.inspect.reporting import REPORT_SCHEMA_VERSION, build_report, pass_diff, render_report, write_dot, write_graph


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(64, 128)
        self.mid = nn.Linear(128, 128)
        self.down = nn.Linear(128, 8)

    def forward(self, x):
        return self.down(torch.relu(self.mid(torch.relu(self.up(x)))))


@pytest.fixture(scope="module")
def gm():
    torch.manual_seed(0)
    plan = {"targets": ["up", "mid"], "quant": {"format": "nf4", "double_quant": True},
            "lora": {"r": 4, "targets": ["re:up|mid"]}, "rules": [{"targets": "mid", "quant": {"format": "int8"}}]}
    return peftfx.compile(MLP(), plan, example_inputs=(torch.randn(2, 64),))


def test_report_lists_what_each_pass_did(gm):
    rep = build_report(gm, model="MLP")
    assert rep["schema"] == "peftfx.inspect" and rep["schema_version"] == REPORT_SCHEMA_VERSION
    json.dumps(rep)  # JSON-able as is
    swap = next(p for p in rep["passes"] if p["name"] == "swap_linear")
    assert sorted(swap["created"]) == ["mid", "up"]
    assert {"linear", "linear_1"} <= set(swap["erased"])
    assert sorted(swap["replaced"]) == [["linear", "up"], ["linear_1", "mid"]]
    rows = {t["target"]: t for t in swap["targets"]}
    assert rows["up"]["shape"] == [128, 64] and rows["up"]["format"] == "nf4" and rows["up"]["r"] == 4
    assert rows["up"]["input_shape"][-1] == 64 and rows["up"]["output_shape"][-1] == 128
    assert rows["mid"]["format"] == "int8"
    assert "peftfx::qlora_linear" in rows["up"]["kernel"]
    # 128*64 weights in nf4 + DQ: 4 bits + 8/64 + small second-level/offset terms
    assert 4.12 < rows["up"]["bits_per_param"] < 4.2
    assert [(p["pattern"], p["from"], p["matched"]) for p in rep["patterns"]] == [
        ("up", "targets", 1), ("mid", "targets", 1), ("re:up|mid", "lora.targets", 2), ("mid", "rules[0].targets", 1)]
    assert rep["unmatched_patterns"] == []
    lora = (128 * 4 + 4 * 64) + (128 * 4 + 4 * 128)
    total = lora + 64 * 128 + 128 + 128 * 128 + 128 + 128 * 8 + 8
    assert rep["trainable"] == {"parameters": lora, "total": total, "percent": round(100 * lora / total, 4)}


def test_text_rendering_names_passes_targets_and_trainable_percent(gm):
    text = render_report(build_report(gm, model="MLP"))
    assert "pass swap_linear" in text and "2 nodes created" in text and "replaced linear -> up" in text
    assert "up: weight [128, 64]" in text and "format nf4" in text and "format int8" in text
    assert "patterns that matched nothing: none" in text
    assert "trainable parameters: 1,792 of" in text


def test_pass_diff_shows_the_swapped_lines(gm):
    diff = pass_diff(gm, "swap_linear")
    assert diff.startswith("--- before swap_linear\n+++ after swap_linear")
    assert "-    linear = torch.ops.aten.linear.default(x" in diff
    assert "+    up = self.up(x)" in diff
    with pytest.raises(PlanError, match="prefix_tuning.*passes that ran: swap_linear, causal_attention, fuse_activations, "
                       "fuse_linear_cross_entropy, freeze"):
        pass_diff(gm, "prefix_tuning")


def test_dot_file_without_graphviz(gm, tmp_path):
    path = tmp_path / "g.dot"
    write_dot(gm, str(path))
    text = path.read_text()
    assert text.startswith("digraph peftfx {") and text.rstrip().endswith("}")
    assert '"up" [label="up\\ncall_module: up' in text and 'fillcolor="#ffd27f"' in text
    assert '"x" -> "up";' in text and '"linear_2" [label="linear_2\\ncall_function: linear.default' in text


def test_svg_needs_pydot_and_says_so(gm, tmp_path):
    try:
        import pydot  # noqa: F401
    except ImportError:
        with pytest.raises(PeftfxError, match="pip install pydot"):
            write_graph(gm, str(tmp_path / "g.svg"))
    with pytest.raises(PlanError, match=".svg or .dot"):
        write_graph(gm, str(tmp_path / "g.png"))


def test_uncompiled_module_is_refused():
    with pytest.raises(PlanError, match="not produced by peftfx.compile"):
        build_report(torch.fx.symbolic_trace(MLP()))
