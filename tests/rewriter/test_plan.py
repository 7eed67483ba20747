"""Plan parsing, validation, round trips and per-module resolution (pure Python, no torch)."""
from __future__ import annotations

import ast
import copy
import dataclasses
import doctest
import json
import pickle
from pathlib import Path

import pytest

import peftfx.plan as plan_mod
from peftfx.errors import PeftfxError, PlanError
from peftfx.plan import (
    PLAN_VERSION, AdapterSpec, LoRASpec, Plan, PrefixTuningSpec, PromptTuningSpec, QuantSpec, ResolvedLayer, Rule,
    match, matches_any,
)

LLAMA_LINEARS = [f"model.layers.{i}.{m}" for i in range(3) for m in (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]

FULL = {
    "version": 1,
    "targets": ["*.q_proj", "re:.*\\.v_proj"],
    "train_top_layers": 2,
    "quant": {"format": "nf4", "block_size": 128, "double_quant": False, "block_size2": 128,
              "threshold": 5.5, "compute_dtype": "bfloat16", "targets": ["*_proj"]},
    "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "use_rslora": True, "init": "gaussian"},
    "prefix": {"tokens": 16, "reparametrize": True, "hidden": 256, "init": "random"},
    "prompt": {"tokens": 8, "init": "text", "init_text": 'Say "hi"\n\tthen\\stop \x7f é 🙂',
               "init_token_ids": [1, 2, 3]},
    "adapter": {"size": 32, "where": ["mlp"], "layers": [0, 5], "nonlinearity": "relu"},
    "rules": [
        {"targets": ["*.layers.0.*"], "lora": {"r": 4}, "quant": {"format": "int8"}},
        {"targets": ["lm_head"], "lora": False},
        {"targets": ["*.down_proj"], "quant": {"format": "none"}},
    ],
}


def _raises(fn, *needles: object) -> str:
    """Call ``fn``, assert a PlanError whose message contains every needle (repr'd unless str)."""
    with pytest.raises(PlanError) as info:
        fn()
    msg = str(info.value)
    for needle in needles:
        text = needle if isinstance(needle, str) else repr(needle)
        assert text in msg, f"{text!r} not in {msg!r}"
    return msg


# ---------------------------------------------------------------- round trips


def test_dict_round_trip_is_exact_and_json_serializable():
    plan = Plan.from_dict(FULL)
    d = plan.to_dict()
    assert d == FULL
    assert json.loads(json.dumps(d)) == d
    assert Plan.from_dict(d) == plan
    assert d["version"] == PLAN_VERSION


@pytest.mark.parametrize("ext", [".json", ".toml"])
def test_file_round_trip_is_exact(tmp_path: Path, ext: str):
    plan = Plan.from_dict(FULL)
    path = tmp_path / f"plan{ext}"
    path.write_text(plan.to_json() if ext == ".json" else plan.to_toml(), encoding="utf-8")
    again = Plan.from_file(path)
    assert again == plan
    assert again.to_dict() == FULL
    assert again.prompt.init_text == FULL["prompt"]["init_text"]


def test_toml_written_by_hand(tmp_path: Path):
    path = tmp_path / "qlora.toml"
    path.write_text('targets = ["*_proj"]\n[quant]\nformat = "nf4"\n[lora]\n'
                    'targets = ["q_proj", "v_proj"]\n[[rules]]\ntargets = ["*.layers.0.*"]\nlora = {r = 2}\n')
    plan = Plan.from_file(str(path))
    assert plan.lora.targets == ("q_proj", "v_proj") and plan.rules[0].lora == {"r": 2}


def test_minimal_plans_round_trip():
    for d in ({"prefix": {"tokens": 1}}, {"lora": {}, "targets": "q_proj"}, {"train_top_layers": 1}):
        plan = Plan.from_dict(d)
        assert Plan.from_dict(plan.to_dict()) == plan
        assert Plan.from_dict(json.loads(plan.to_json())) == plan


# ---------------------------------------------------------------- defaults and normalization


def test_empty_lora_section_means_r8_alpha16(tmp_path: Path):
    path = tmp_path / "p.toml"
    path.write_text('targets = ["q_proj"]\n[lora]\n')
    lora = Plan.from_file(path).lora
    assert (lora.r, lora.alpha, lora.dropout, lora.use_rslora) == (8, 16, 0.0, False)
    assert lora.scaling == 2.0
    assert LoRASpec(r=4, alpha=8, use_rslora=True).scaling == 4.0


def test_defaults_and_normalization():
    q = QuantSpec()
    assert (q.format, q.block_size, q.double_quant, q.block_size2, q.threshold) == ("nf4", 64, True, 256, 6.0)
    plan = Plan(targets="*.q_proj", quant={"format": "fp4"}, lora=LoRASpec(targets="v_proj"))
    assert plan.targets == ("*.q_proj",) and plan.lora.targets == ("v_proj",)
    assert isinstance(plan.quant, QuantSpec) and plan.quant.format == "fp4"
    assert AdapterSpec(where="attn", layers=3) == AdapterSpec(where=("attn",), layers=(3,))
    assert AdapterSpec().where == ("attn", "mlp")
    assert QuantSpec(compute_dtype="torch.float16").compute_dtype == "float16"
    assert PromptTuningSpec(tokens=2, init="text", init_token_ids=[5, 6]).init_token_ids == (5, 6)
    assert Plan.from_dict({"targets": None, "prompt": {"tokens": 3}, "quant": None}).quant is None


def test_specs_are_frozen_and_hashable():
    plan = Plan.from_dict(FULL)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.lora = None  # type: ignore[misc]
    with pytest.raises(TypeError):
        plan.rules[0].lora["r"] = 99  # type: ignore[index]
    assert hash(plan) == hash(Plan.from_dict(FULL))
    assert pickle.loads(pickle.dumps(plan)) == plan
    assert copy.deepcopy(plan) == plan


# ---------------------------------------------------------------- bad values


BAD = [
    ({"quant": {"format": "nf5"}}, "nf5", "nf4"),
    ({"quant": {"block_size": 48}}, 48, "power of two"),
    ({"quant": {"block_size": 8}}, 8, "16"),
    ({"quant": {"block_size": 8192}}, 8192, "4096"),
    ({"quant": {"block_size": 64.0}}, 64.0, "integer"),
    ({"quant": {"block_size2": 100}}, 100, "block_size2"),
    ({"quant": {"double_quant": "yes"}}, "yes", "true or false"),
    ({"quant": {"threshold": 0}}, 0, "threshold"),
    ({"quant": {"threshold": float("nan")}}, "nan", "finite"),
    ({"quant": {"compute_dtype": "float8"}}, "float8", "bfloat16"),
    ({"quant": {"targets": []}}, "quant.targets", "empty"),
    ({"lora": {"r": 0}}, 0, ">= 1"),
    ({"lora": {"r": -3}}, -3, "lora.r"),
    ({"lora": {"r": True}}, True, "lora.r"),
    ({"lora": {"r": "8"}}, "8", "lora.r"),
    ({"lora": {"alpha": 0}}, 0, "lora.alpha"),
    ({"lora": {"alpha": -1.5}}, -1.5, "> 0"),
    ({"lora": {"dropout": 1.0}}, 1.0, "< 1"),
    ({"lora": {"dropout": -0.1}}, -0.1, ">= 0"),
    ({"lora": {"init": "pissa"}}, "pissa", "gaussian"),
    ({"lora": {"targets": 3}}, 3, "lora.targets"),
    ({"prefix": {"tokens": 0}}, 0, "prefix.tokens"),
    ({"prefix": {"tokens": 4, "hidden": 0}}, 0, "prefix.hidden"),
    ({"prefix": {}}, "prefix.tokens", "required"),
    ({"prompt": {"tokens": -1}}, -1, "prompt.tokens"),
    ({"prompt": {"tokens": 4, "init": "vocab"}}, "vocab", "text"),
    ({"prompt": {"tokens": 4, "init": "text"}}, "init_text", "init_token_ids"),
    ({"prompt": {"tokens": 4, "init_text": "hello"}}, "random", "init = 'text'"),
    ({"prompt": {"tokens": 4, "init": "text", "init_token_ids": [1, -2]}}, -2, "init_token_ids"),
    ({"prompt": {"tokens": 4, "init": "text", "init_text": ""}}, "''", "init_text"),
    ({"adapter": {"size": 0}}, 0, "adapter.size"),
    ({"adapter": {"where": ["ffn"]}}, "ffn", "mlp"),
    ({"adapter": {"where": []}}, "[]", "adapter.where"),
    ({"adapter": {"layers": [-1]}}, -1, "adapter.layers"),
    ({"adapter": {"nonlinearity": "swish"}}, "swish", "silu"),
    ({"train_top_layers": -1}, -1, "train_top_layers"),
    ({"lora": 5}, 5, "LoRASpec"),
    ({"rules": {"targets": "x", "lora": {}}}, "rules must be a list", "targets"),
    ({"rules": [{"targets": "x", "lora": {"r": 0}}]}, "rules[0]", "lora.r"),
    ({"rules": [{"targets": "x", "lora": True}]}, True, "rules[0]"),
    ({"rules": [{"targets": "x"}]}, "neither quant nor lora", "'x'"),
    ({"rules": [{"targets": [], "lora": {}}]}, "rules[0]", "empty"),
    ({"rules": [{"lora": {}}]}, "rules[0]", "targets"),
    ({"rules": [{"targets": "x", "quant": {"format": "int4"}}]}, "int4", "rules[0]"),
    ({"targets": [""], "lora": {}}, "''", "non-empty"),
    ({"targets": ["re:("], "lora": {}}, "re:(", "does not compile"),
    ({"targets": ["ok", 7], "lora": {}}, 7, "targets"),
    ({"lora": {"targets": "re:[a-"}}, "re:[a-", "lora.targets"),
]


@pytest.mark.parametrize("extra, value, hint", BAD, ids=[f"{i}-{next(iter(b[0]))}" for i, b in enumerate(BAD)])
def test_bad_values_name_the_value(extra, value, hint):
    d = {"targets": ["q_proj"], **extra} if ("quant" in extra or "lora" in extra) and "targets" not in extra \
        else {"prefix": {"tokens": 1}, **extra}
    _raises(lambda: Plan.from_dict(d), value, hint)


def test_plan_error_is_a_peftfx_error():
    with pytest.raises(PeftfxError):
        Plan.from_dict({})


@pytest.mark.parametrize("d, bad, suggestion", [
    ({"prefix": {"tokens": 1}, "lroa": {}}, "lroa", "lora"),
    ({"targets": "q", "lora": {"rank": 4}}, "rank", "r"),
    ({"targets": "q", "quant": {"blocksize": 64}}, "blocksize", "block_size"),
    ({"prompt": {"tokens": 1, "init_txt": "a"}}, "init_txt", "init_text"),
    ({"rules": [{"targets": "q", "lora": {"alhpa": 4}}]}, "alhpa", "alpha"),
    ({"rules": [{"targets": "q", "lora": {"targets": "k"}}]}, "targets", "dropout"),
    ({"rules": [{"target": "q", "lora": {}}]}, "target", "targets"),
    ({"targets": "q", "lora": {"lora_alpha": 4}}, "lora_alpha", "alpha"),  # PEFT's name
    ({"target_modules": ["q"], "lora": {}}, "target_modules", "targets"),
])
def test_unknown_keys_are_listed_with_a_suggestion(d, bad, suggestion):
    msg = _raises(lambda: Plan.from_dict(d), f"unknown key {bad!r}", "allowed:", suggestion)
    if bad != "targets":
        assert "did you mean" in msg


def test_version():
    _raises(lambda: Plan.from_dict({"version": PLAN_VERSION + 1, "prefix": {"tokens": 1}}),
            str(PLAN_VERSION + 1), "newer", "upgrade")
    _raises(lambda: Plan.from_dict({"version": 0, "prefix": {"tokens": 1}}), "version", "0")
    assert Plan(prefix=PrefixTuningSpec(tokens=1)).version == PLAN_VERSION


def test_bad_files(tmp_path: Path):
    yaml = tmp_path / "plan.yaml"
    yaml.write_text("lora: {}")
    _raises(lambda: Plan.from_file(yaml), "'.yaml'", ".toml", ".json")
    _raises(lambda: Plan.from_file(tmp_path / "missing.toml"), "missing.toml", "does not exist")
    broken = tmp_path / "broken.toml"
    broken.write_text("[lora\nr = 4\n")
    _raises(lambda: Plan.from_file(broken), "broken.toml", "not valid TOML")
    broken_json = tmp_path / "broken.json"
    broken_json.write_text("[1, 2]")
    _raises(lambda: Plan.from_file(broken_json), "top")


def test_targets_required_and_used():
    _raises(lambda: Plan.from_dict({"lora": {}}), "lora needs targets")
    _raises(lambda: Plan.from_dict({"quant": {"format": "nf4"}, "lora": {"targets": "q_proj"}}), "quant needs targets")
    _raises(lambda: Plan.from_dict({"targets": "q_proj", "prefix": {"tokens": 2}}), "'q_proj'", "unused")
    _raises(lambda: Plan.from_dict({"targets": "q_proj"}), "plan does nothing", "targets alone")
    assert Plan.from_dict({"lora": {"targets": "q_proj"}}).lora_targets() == ("q_proj",)


def test_section_alone_plans():
    for d in ({"prefix": {"tokens": 4}}, {"prompt": {"tokens": 4}}, {"adapter": {}}, {"train_top_layers": 2},
              {"rules": [{"targets": "q_proj", "lora": {}}]}):
        plan = Plan.from_dict(d)
        assert plan.quant is None and plan.lora is None
    for d in ({}, {"train_top_layers": 0}, {"version": 1}):
        _raises(lambda: Plan.from_dict(d), "plan does nothing")


def test_lora_check_fits_names_the_layer():
    LoRASpec(r=32).check_fits(32, 64, "a.b")
    _raises(lambda: LoRASpec(r=33).check_fits(32, 64, "model.layers.0.q_proj"), "'model.layers.0.q_proj'", "33", "32")


# ---------------------------------------------------------------- matching and resolution


@pytest.mark.parametrize("pattern, name, expected", [
    ("*.q_proj", "model.layers.0.self_attn.q_proj", True),
    ("*.q_proj", "q_proj", False),
    ("q_proj", "model.layers.0.self_attn.q_proj", True),  # bare name: last component (PEFT)
    ("q_proj", "q_proj", True),
    ("q_proj", "model.layers.0.self_attn.qq_proj", False),
    ("self_attn.q_proj", "model.layers.0.self_attn.q_proj", True),  # dotted suffix (PEFT)
    ("layers.1.mlp", "model.layers.11.mlp", False),
    ("model.layers.*.mlp.*_proj", "model.layers.2.mlp.up_proj", True),
    ("model.layers.[01].*", "model.layers.2.mlp.up_proj", False),
    ("re:.*layers\\.(0|1)\\.self_attn\\.(q|v)_proj", "model.layers.1.self_attn.v_proj", True),
    ("re:.*layers\\.(0|1)\\.self_attn\\.(q|v)_proj", "model.layers.1.self_attn.k_proj", False),
    ("re:q_proj", "model.layers.0.self_attn.q_proj", False),  # regexes match the whole name
    ("*.Q_PROJ", "model.q_proj", False),  # case-sensitive everywhere
])
def test_match(pattern, name, expected):
    assert match(pattern, name) is expected


def test_matches_any():
    assert matches_any(["k_proj", "re:.*v_proj"], "a.v_proj")
    assert not matches_any([], "a.v_proj") and not matches_any(None, "a.v_proj")


def test_standard_qlora_nf4_everywhere_lora_on_q_v():
    plan = Plan.from_dict({"targets": ["*_proj"], "quant": {"format": "nf4"},
                           "lora": {"r": 16, "alpha": 32, "targets": ["q_proj", "v_proj"]}})
    resolved = {n: plan.resolve(n) for n in LLAMA_LINEARS}
    assert all(r is not None and r.quant == QuantSpec() for r in resolved.values())
    lora = {n for n, r in resolved.items() if r.lora is not None}
    assert lora == {n for n in LLAMA_LINEARS if n.endswith(("q_proj", "v_proj"))}
    assert resolved["model.layers.0.self_attn.q_proj"] == ResolvedLayer(
        "model.layers.0.self_attn.q_proj", QuantSpec(), LoRASpec(r=16, alpha=32))
    assert plan.resolve("lm_head") is None
    assert plan.quant_targets() == ("*_proj",) and plan.lora_targets() == ("q_proj", "v_proj")


def test_rules_last_match_wins():
    plan = Plan.from_dict({
        "targets": ["*_proj"], "quant": {}, "lora": {"r": 8, "alpha": 16},
        "rules": [
            {"targets": ["*.layers.0.*"], "lora": {"r": 4}, "quant": {"block_size": 32}},
            {"targets": ["*.layers.0.mlp.*"], "lora": {"alpha": 2}},
            {"targets": ["down_proj"], "lora": False, "quant": {"format": "none"}},
            {"targets": ["re:.*layers\\.2\\.self_attn\\.o_proj"], "quant": False},
        ]})
    q0 = plan.resolve("model.layers.0.self_attn.q_proj")
    assert (q0.lora.r, q0.lora.alpha, q0.quant.block_size) == (4, 16, 32)
    up0 = plan.resolve("model.layers.0.mlp.up_proj")
    # the later rule replaces (base + earlier rule) by base + its own overrides, per section
    assert (up0.lora.r, up0.lora.alpha, up0.quant.block_size) == (8, 2, 32)
    assert plan.resolve("model.layers.0.mlp.down_proj") is None
    o2 = plan.resolve("model.layers.2.self_attn.o_proj")
    assert o2.quant is None and o2.lora == LoRASpec()
    assert plan.resolve("model.layers.1.self_attn.q_proj") == ResolvedLayer(
        "model.layers.1.self_attn.q_proj", QuantSpec(), LoRASpec())


def test_rules_without_sections_use_defaults_and_per_section_targets_survive():
    plan = Plan.from_dict({"rules": [{"targets": "q_proj", "lora": {"r": 2}}, {"targets": "v_proj", "quant": {}}]})
    assert plan.resolve("a.q_proj") == ResolvedLayer("a.q_proj", None, LoRASpec(r=2))
    assert plan.resolve("a.v_proj") == ResolvedLayer("a.v_proj", QuantSpec(), None)
    assert plan.resolve("a.k_proj") is None
    dense = Plan.from_dict({"targets": "q_proj", "quant": {"format": "none"}, "lora": {}})
    assert dense.resolve("x.q_proj") == ResolvedLayer("x.q_proj", None, LoRASpec())


def test_all_patterns_report_their_origin():
    plan = Plan.from_dict(FULL)
    assert plan.all_patterns() == (
        ("*.q_proj", "targets"), ("re:.*\\.v_proj", "targets"), ("*_proj", "quant.targets"),
        ("*.layers.0.*", "rules[0].targets"), ("lm_head", "rules[1].targets"), ("*.down_proj", "rules[2].targets"))
    own = Plan.from_dict({"targets": "x", "quant": {"targets": "a"}, "lora": {}})
    assert own.all_patterns() == (("x", "targets"), ("a", "quant.targets"))


# ---------------------------------------------------------------- module hygiene


def test_docstring_example_runs():
    result = doctest.testmod(plan_mod, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_plan_module_does_not_import_torch():
    for mod in (plan_mod, __import__("peftfx.plan_io", fromlist=["_"])):
        tree = ast.parse(Path(mod.__file__).read_text())
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert not any(n.split(".")[0] == "torch" for n in names)


def test_public_names():
    for name in plan_mod.__all__:
        assert hasattr(plan_mod, name)
    assert {Rule, PromptTuningSpec, AdapterSpec} <= {getattr(plan_mod, n) for n in plan_mod.__all__}
