"""Hugging Face PEFT adapter directories, both ways: ``adapter_model.safetensors`` + ``adapter_config.json``.

Tensor names and shapes are PEFT's (what ``PeftModel.save_pretrained`` writes for the default
adapter, and what vLLM / LoRAX read):

* LoRA: ``base_model.model.<module>.lora_A.weight`` ``[r, in]`` and ``...lora_B.weight``
  ``[out, r]`` (GPT-2's Conv1D too: PEFT's ``fan_in_fan_out`` only transposes the base weight);
* prompt tuning: ``prompt_embeddings`` ``[P, hidden]``;
* prefix tuning: ``prompt_embeddings`` ``[P, layers * 2 * kv_heads * head_dim]``.

``adapter_config.json``: when ``peft`` is installed the config object is built by peft itself and
written with its own ``save_pretrained`` (peft 0.21 writes *every* field, sorted, plus
``peft_version`` and, without a task type, ``auto_mapping``), so the file is byte-for-byte what a
PEFT-trained adapter of the same shape carries. Without ``peft`` only the fields that differ from
PEFT's defaults are written, which PEFT fills back in on load.

Per-layer rank or alpha (plan ``rules``) become ``rank_pattern`` / ``alpha_pattern`` entries keyed
by the full module name; alpha is chosen so that PEFT's scaling equals ours exactly.
"""
from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from peftfx.emit import PLAN_KEY
from peftfx.errors import CheckpointError
from peftfx.io.checkpoint import read_safetensors
from peftfx.kernels.modules import qlora_layers
from peftfx.kernels.prompt_modules import PrefixKV, ReparamPrefixKV, SoftPrompt
from peftfx.passes.causal_attention import is_sdpa
from peftfx.passes.prefix_tuning import (
    load_prefix_prompt_embeddings,
    prefix_prompt_embeddings,
)

__all__ = ["export_peft", "import_peft", "CONFIG_NAME", "WEIGHTS_NAME", "peft_key", "lora_config_fields"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^base_model\.model\.(?P<fqn>.+)\.lora_(?P<ab>[AB])\.weight$")
# LoRA config fields peftfx cannot honour on import: (field, value PEFT uses when it is off)
_UNSUPPORTED = (("use_dora", False), ("lora_bias", False), ("bias", "none"), ("modules_to_save", None),
                ("layer_replication", None), ("target_parameters", None), ("trainable_token_indices", None),
                ("alora_invocation_tokens", None), ("use_qalora", False), ("use_bdlora", None))


def peft_key(fqn: str, ab: str) -> str:
    """PEFT's safetensors key for ``lora_A`` / ``lora_B`` of module ``fqn``."""
    return f"{_PREFIX}{fqn}.lora_{ab}.weight"


def _site_kinds(gm: nn.Module) -> dict[str, str]:
    """``{fqn: "linear" | "addmm"}`` from swap_linear's report (addmm = GPT-2 Conv1D)."""
    records = getattr(gm, "meta", {}).get("peftfx.report") or []
    return {n["target"]: n.get("kind", "linear") for r in records if r.name == "swap_linear"
            for n in r.notes if "target" in n}


def _root_class(gm: nn.Module) -> tuple[str, str] | None:
    """``(class name, module)`` of the model that was compiled, from export's module stack."""
    for node in getattr(gm, "graph", None).nodes if hasattr(gm, "graph") else ():
        for path, qualname in (node.meta.get("nn_module_stack") or {}).values():
            if path == "" and isinstance(qualname, str) and "." in qualname:
                module, _, cls = qualname.rpartition(".")
                return cls, module
    return None


def _short_targets(gm: nn.Module, fqns: list[str]) -> list[str]:
    """Leaf names (``q_proj``) when they select exactly ``fqns`` among gm's modules, else the FQNs."""
    leaves = sorted({f.rpartition(".")[2] for f in fqns})
    hit = {n for n, _ in gm.named_modules() if n and n.rpartition(".")[2] in leaves}
    return leaves if hit == set(fqns) else sorted(fqns)


def lora_config_fields(gm: nn.Module) -> dict[str, Any]:
    """The LoraConfig fields that describe ``gm``'s LoRA layers (PEFT's names)."""
    layers = qlora_layers(gm, with_lora=True)
    if not layers:
        raise CheckpointError("no LoRA layers to export (the plan has no lora section or targets)")
    rslora = Counter(m.use_rslora for m in layers.values()).most_common(1)[0][0]
    ranks = {f: m.r for f, m in layers.items()}
    # alpha such that PEFT's scaling (alpha/r or alpha/sqrt(r)) equals ours for every layer
    alphas = {f: (m.alpha if m.use_rslora == rslora else m.scaling * (math.sqrt(m.r) if rslora else m.r))
              for f, m in layers.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    dropout = Counter(getattr(m.lora_dropout, "p", 0.0) for m in layers.values()).most_common(1)[0][0]
    kinds = _site_kinds(gm)
    plan = getattr(gm, "meta", {}).get(PLAN_KEY)
    init = plan.lora.init if plan is not None and plan.lora is not None else "default"
    return {
        "r": r,
        "lora_alpha": alpha,
        "target_modules": _short_targets(gm, list(layers)),
        "lora_dropout": dropout,
        "use_rslora": rslora,
        # PEFT flips this per layer anyway (True for Conv1D, False for Linear); say what GPT-2 needs
        "fan_in_fan_out": any(kinds.get(f) == "addmm" for f in layers),
        "rank_pattern": {f: v for f, v in ranks.items() if v != r},
        "alpha_pattern": {f: v for f, v in alphas.items() if v != alpha},
        # PEFT's spelling: True is Kaiming-uniform A (our "default"); other inits keep their name
        "init_lora_weights": True if init == "default" else init,
    }


# PEFT's defaults for the fields peftfx writes (used when peft is not installed: only differences
# are written, as peft fills the rest in on load).
_LORA_DEFAULTS = {"r": 8, "lora_alpha": 8, "lora_dropout": 0.0, "use_rslora": False, "fan_in_fan_out": False,
                  "rank_pattern": {}, "alpha_pattern": {}, "bias": "none", "init_lora_weights": True}


def _write_config(directory: Path, peft_type: str, fields: dict[str, Any], auto_mapping: dict | None,
                  *, use_peft: bool = True) -> dict:
    """Write ``adapter_config.json`` as peft's ``PeftModel.save_pretrained`` does; returns the dict."""
    cfg_cls = None
    if use_peft:
        try:
            import peft

            cfg_cls = {"LORA": peft.LoraConfig, "PROMPT_TUNING": peft.PromptTuningConfig,
                       "PREFIX_TUNING": peft.PrefixTuningConfig}[peft_type]
        except ImportError:
            cfg_cls = None
    if cfg_cls is not None:
        cfg = cfg_cls(**fields)
        cfg.inference_mode = True  # save_pretrained flips it on, as PEFT does
        cfg.save_pretrained(str(directory), auto_mapping_dict=auto_mapping)
        return json.loads((directory / CONFIG_NAME).read_text())
    out = {k: v for k, v in fields.items() if _LORA_DEFAULTS.get(k, object()) != v and v is not None}
    out.update(peft_type=peft_type, inference_mode=True)
    if auto_mapping is not None:
        out["auto_mapping"] = auto_mapping
    (directory / CONFIG_NAME).write_text(json.dumps(out, indent=2, sort_keys=True))
    return out


def _write_weights(directory: Path, tensors: dict[str, Tensor]) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu().clone() for k, v in tensors.items()}, str(directory / WEIGHTS_NAME),
              metadata={"format": "pt"})


def export_peft(gm: nn.Module, directory: str | os.PathLike, *, task_type: str | None = None,
                base_model_name_or_path: str | None = None, method: str | None = None) -> Path:
    """Write ``gm``'s adapter as a PEFT adapter directory (loadable by ``PeftModel.from_pretrained``).

    Args:
        gm: a module from :func:`peftfx.compile`.
        directory: created if needed.
        task_type: PEFT task type (e.g. ``"CAUSAL_LM"``); None writes ``auto_mapping`` as PEFT does.
        base_model_name_or_path: recorded in the config (PEFT reads it to find the base).
        method: ``"lora"``, ``"prompt"`` or ``"prefix"`` when ``gm`` carries more than one (PEFT
            stores one method per adapter directory).

    Returns:
        The directory.

    Example::

        >>> peftfx.export_peft(gm, "out/peft")                                      # doctest: +SKIP
        >>> model = peft.PeftModel.from_pretrained(base, "out/peft")                # doctest: +SKIP
    """
    directory = Path(directory)
    methods = _methods(gm)
    if method is None:
        if len(methods) != 1:
            raise CheckpointError(f"the module carries {sorted(methods) or 'no adapters'}; PEFT stores one method per "
                                  f"adapter directory: pass method= one of {sorted(methods)}" if methods else
                                  "nothing to export: the module has no LoRA, prompt or prefix adapters")
        method = next(iter(methods))
    if method not in methods:
        raise CheckpointError(f"method {method!r} not present in the module (it has {sorted(methods)})")
    directory.mkdir(parents=True, exist_ok=True)
    root = _root_class(gm)
    auto_mapping = ({"base_model_class": root[0], "parent_library": root[1]}
                    if task_type is None and root is not None else None)
    common = {"task_type": task_type, "base_model_name_or_path": base_model_name_or_path}
    if method == "lora":
        tensors = {}
        for fqn, m in qlora_layers(gm, with_lora=True).items():
            tensors[peft_key(fqn, "A")] = m.lora_A
            tensors[peft_key(fqn, "B")] = m.lora_B
        _write_weights(directory, tensors)
        _write_config(directory, "LORA", {**lora_config_fields(gm), **common}, auto_mapping)
    else:
        if task_type is None:
            task_type = _default_task(root)
            common["task_type"] = task_type
        peft_type, fields, tensors = _export_prompt(gm, method)
        _write_weights(directory, tensors)
        _write_config(directory, peft_type, {**fields, **common}, None)
    return directory


# ---------------------------------------------------------------- prompt / prefix tuning


def _prompt_modules(gm: nn.Module) -> dict[str, list[nn.Module]]:
    found: dict[str, list[nn.Module]] = {"prompt": [], "prefix": []}
    for m in gm.modules():
        if isinstance(m, SoftPrompt):
            found["prompt"].append(m)
        elif isinstance(m, (PrefixKV, ReparamPrefixKV)):
            found["prefix"].append(m)
    return found


def _methods(gm: nn.Module) -> set[str]:
    found = {k for k, v in _prompt_modules(gm).items() if v}
    return found | ({"lora"} if qlora_layers(gm, with_lora=True) else set())


def _default_task(root: tuple[str, str] | None) -> str:
    # prompt learning needs a task-specific PeftModel (a plain PeftModel would not prepend anything)
    if root is not None and root[0].endswith(("ForCausalLM", "LMHeadModel")):
        return "CAUSAL_LM"
    raise CheckpointError(f"pass task_type= for prompt/prefix export of {root[0] if root else 'this model'} "
                          f"(e.g. 'CAUSAL_LM', 'SEQ_CLS'): PEFT picks the model wrapper from it")


def _attention_shape(gm: nn.Module) -> tuple[int, int | None]:
    """(number of SDPA calls, query heads) read off the graph, as PEFT reads them off the config."""
    sdpa = [n for n in gm.graph.nodes if is_sdpa(n)]
    query = (sdpa[0].args[0] if sdpa[0].args else sdpa[0].kwargs["query"]) if sdpa else None
    q = query.meta.get("val") if query is not None else None
    return len(sdpa), (int(q.shape[1]) if isinstance(q, Tensor) else None)


def _export_prompt(gm: nn.Module, method: str) -> tuple[str, dict, dict[str, Tensor]]:
    if method == "prompt":
        (sp,) = _prompt_modules(gm)["prompt"]
        tokens, hidden = sp.prompt_embeddings.shape
        layers, heads = _attention_shape(gm)
        fields = {"num_virtual_tokens": tokens, "token_dim": hidden, "num_transformer_submodules": 1,
                  "num_attention_heads": heads, "num_layers": layers}
        return "PROMPT_TUNING", fields, {"prompt_embeddings": sp.prompt_embeddings}

    mods = _prompt_modules(gm)["prefix"]
    table = prefix_prompt_embeddings(gm)  # folded through the reparametrization MLP when present
    n_kv, d = mods[0].n_kv_heads, mods[0].head_dim
    fields = {"num_virtual_tokens": table.shape[0], "num_layers": len(mods), "num_attention_heads": n_kv,
              "token_dim": n_kv * d, "encoder_hidden_size": n_kv * d, "num_transformer_submodules": 1,
              "prefix_projection": False}
    return "PREFIX_TUNING", fields, {"prompt_embeddings": table}


def _prompt_plan(gm: nn.Module, cfg: dict, tensors: dict[str, Tensor], where: Path) -> list:
    """Check a PEFT prompt/prefix adapter against gm; ``[(param, tensor)]`` or a deferred loader."""
    method = "prompt" if cfg["peft_type"] == "PROMPT_TUNING" else "prefix"
    if method not in _methods(gm):
        raise CheckpointError(f"{where}: a {cfg['peft_type']} adapter needs a module compiled with a "
                              f"'{method}' plan section (tokens = {cfg.get('num_virtual_tokens')})")
    if set(tensors) != {"prompt_embeddings"}:
        raise CheckpointError(f"{where}: expected exactly ['prompt_embeddings'], found {sorted(tensors)}")
    t = tensors["prompt_embeddings"]
    if method == "prompt":
        (sp,) = _prompt_modules(gm)["prompt"]
        want, target = sp.prompt_embeddings.shape, sp.prompt_embeddings
    else:
        want, target = prefix_prompt_embeddings(gm).shape, None
    if t.shape != want or not t.dtype.is_floating_point:
        raise CheckpointError(f"{where}: prompt_embeddings is {t.dtype} {list(t.shape)}, this module expects "
                              f"{list(want)} ({method} tuning with num_virtual_tokens={want[0]})")
    if target is not None:
        return [(target, t)]
    return [(None, lambda: _load_prefix(gm, t))]


def _load_prefix(gm: nn.Module, table: Tensor) -> None:
    load_prefix_prompt_embeddings(gm, table)


# ---------------------------------------------------------------- import


def _pattern_value(patterns: dict[str, Any], fqn: str, default: Any) -> Any:
    """PEFT's ``get_pattern_key``: the first pattern matching a dotted suffix of ``fqn`` wins."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", fqn):
            return value
    return default


def _read_dir(directory: Path) -> tuple[dict, dict[str, Tensor]]:
    cfg_path = directory / CONFIG_NAME
    if not cfg_path.is_file():
        raise CheckpointError(f"{directory}: no {CONFIG_NAME}; not a PEFT adapter directory")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path}: not valid JSON ({e})") from None
    if not (directory / WEIGHTS_NAME).is_file():
        hint = " (only adapter_model.bin found: re-save it with safe_serialization=True)" \
            if (directory / "adapter_model.bin").is_file() else ""
        raise CheckpointError(f"{directory}: no {WEIGHTS_NAME}{hint}")
    tensors, _ = read_safetensors(directory / WEIGHTS_NAME)
    return cfg, tensors


def _lora_plan(gm: nn.Module, cfg: dict, tensors: dict[str, Tensor], where: Path) -> list[tuple[Tensor, Tensor]]:
    """Check a PEFT LoRA adapter against gm and return ``[(target param, source tensor)]``; copy nothing."""
    bad = [f"{f}={cfg[f]!r}" for f, off in _UNSUPPORTED if cfg.get(f, off) not in (off, [], {}, None, False)]
    if bad:
        raise CheckpointError(f"{where}: PEFT LoRA options peftfx does not support: {', '.join(bad)}")
    layers = qlora_layers(gm, with_lora=True)
    found: dict[str, dict[str, Tensor]] = {}
    unknown = []
    for key, t in tensors.items():
        m = _LORA_KEY.match(key)
        if m is None or m["fqn"] not in layers:
            unknown.append(key)
        else:
            found.setdefault(m["fqn"], {})[m["ab"]] = t
    missing = [peft_key(f, ab) for f in sorted(layers) for ab in "AB" if ab not in found.get(f, {})]
    if missing or unknown:
        raise CheckpointError(f"{where}: adapter keys do not match the compiled LoRA layers; missing {missing}, "
                              f"unexpected {sorted(unknown)}. Compile with the same targets")
    errs = []
    r0, a0 = cfg.get("r", 8), cfg.get("lora_alpha", 8)
    rslora = bool(cfg.get("use_rslora", False))
    for fqn, m in sorted(layers.items()):
        for ab, param in (("A", m.lora_A), ("B", m.lora_B)):
            t = found[fqn][ab]
            if t.shape != param.shape or not t.dtype.is_floating_point:
                errs.append(f"{peft_key(fqn, ab)}: file {t.dtype} {list(t.shape)} vs model {param.dtype} "
                            f"{list(param.shape)}")
        r = _pattern_value(cfg.get("rank_pattern") or {}, fqn, r0)
        alpha = _pattern_value(cfg.get("alpha_pattern") or {}, fqn, a0)
        s = alpha / math.sqrt(r) if rslora else alpha / r
        if r != m.r or not math.isclose(s, m.scaling, rel_tol=1e-6):
            errs.append(f"{fqn}: PEFT r={r} scaling={s:g} vs compiled r={m.r} scaling={m.scaling:g} "
                        f"(compile with lora r={r}, alpha={alpha}, use_rslora={rslora})")
    if errs:
        raise CheckpointError(f"{where}: adapter does not fit: " + "; ".join(errs))
    return [(p, found[f][ab]) for f, m in layers.items() for ab, p in (("A", m.lora_A), ("B", m.lora_B))]


def import_peft(gm: nn.Module, directory: str | os.PathLike) -> dict:
    """Load a PEFT adapter directory (LoRA, prompt or prefix tuning) into ``gm``, or change nothing.

    Args:
        gm: compiled with a plan of the same method, targets, rank and scaling.
        directory: holds ``adapter_config.json`` and ``adapter_model.safetensors``.

    Returns:
        The adapter config dict.

    Raises:
        CheckpointError: unsupported PEFT options, missing/extra keys, shape or scaling
            mismatch, corrupt file. All checks run before anything is copied.
    """
    directory = Path(directory)
    cfg, tensors = _read_dir(directory)
    peft_type = cfg.get("peft_type")
    if peft_type == "LORA":
        pairs = _lora_plan(gm, cfg, tensors, directory)
    elif peft_type in ("PROMPT_TUNING", "PREFIX_TUNING"):
        pairs = _prompt_plan(gm, cfg, tensors, directory)
    else:
        raise CheckpointError(f"{directory}: peft_type {peft_type!r} is not supported "
                              f"(LORA, PROMPT_TUNING, PREFIX_TUNING)")
    with torch.no_grad():
        for param, src in pairs:
            if param is None:
                src()  # prefix tensors: loaded through the pass's own layout helper
            else:
                param.copy_(src)
    return cfg
