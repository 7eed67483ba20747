"""One (quantized) base model serving many named LoRA adapters in one batch.

``compile_multi(model, {"sql": plan_a, "chat": "runs/chat/", ...}, example_inputs=...)`` compiles
the model once with the union of the adapters' targets (the frozen base quantized as the plans say;
they must agree layer by layer), then swaps every LoRA-targeted layer for a
:class:`~peftfx.kernels.multi_lora.MultiLoRALinear` holding the quantize-only base plus the
adapters stacked and zero-padded to the largest rank. The graph gains one input, ``adapter_ids``
(int64 ``[B]``, one id per row; ``-1`` = the base model), routed to every such layer, whose
gathered batched LoRA (``peftfx::multi_lora``) applies each row's adapter with no Python branch on
the ids (``torch.compile(fullgraph=True)`` traces it in one graph).

Adding the input edits the pytree codegen of the exported module: the keyword-argument spec of
``pytree_info.in_spec`` is rebuilt with an extra ``adapter_ids`` leaf (from a dummy unflatten /
re-flatten, so nested input specs survive) and ``orig_args`` gains the name; ``recompile()``
regenerates ``forward`` and refreshes ``_in_spec``, which export's input check compares against.

``adapter_ids`` is keyword-only in practice (trace.py checks call signatures). Ids are validated eagerly by a forward pre-hook (a clear :class:`AdapterIdError`, one device sync
for min/max) that is skipped while ``torch.compile`` traces: a compiled caller validates with
:func:`check_adapter_ids` before calling. ``add_adapter`` / ``remove_adapter`` rewrite slot
tensors in place (no re-tracing); a removed adapter's slot serves the base model until reused.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor, nn
from torch.fx import GraphModule
from torch.utils import _pytree as pytree

from peftfx.api import as_plan
from peftfx.api import compile as compile_plan
from peftfx.errors import CheckpointError, PeftfxError, PlanError
from peftfx.graph import set_submodule
from peftfx.io.checkpoint import ADAPTER_FILE, base_fingerprint, read_safetensors
from peftfx.kernels.modules import QLoRALinear, init_lora_, qlora_layers
from peftfx.kernels.multi_lora import MultiLoRALinear
from peftfx.plan import Plan, Rule
from peftfx.targets import LINEAR_TYPES
from peftfx.trace import SIGNATURE_KEY

__all__ = ["compile_multi", "adapter_index", "add_adapter", "remove_adapter", "check_adapter_ids",
           "adapter_names", "AdapterIdError", "META_KEY", "IDS_ARG"]

META_KEY = "peftfx.multi"
IDS_ARG = "adapter_ids"


class AdapterIdError(PeftfxError, IndexError):
    """An ``adapter_ids`` entry names no adapter slot (or the ids tensor is malformed)."""


# ---------------------------------------------------------------- sources: plans, folders, compiled modules


def _from_folder(path: Path) -> tuple[Plan, dict[str, tuple[Tensor, Tensor, float]], dict]:
    file = path / ADAPTER_FILE
    if not file.is_file():
        raise CheckpointError(f"{path} holds no {ADAPTER_FILE}; pass a folder written by peftfx.save_adapters "
                              "or a plan")
    tensors, meta = read_safetensors(file)
    try:
        plan = Plan.from_dict(json.loads(meta["peftfx.plan"]))
        layers = json.loads(meta["peftfx.layers"])
        fingerprint = json.loads(meta.get("peftfx.fingerprint", "{}"))
    except (KeyError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: header lacks a readable plan/layers entry ({e}); re-save it") from None
    weights = {}
    for key in tensors:
        if key.endswith(".lora_A"):
            fqn = key[: -len(".lora_A")]
            if f"{fqn}.lora_B" not in tensors or fqn not in layers:
                raise CheckpointError(f"{file}: {fqn}.lora_A has no matching lora_B / layer entry")
            weights[fqn] = (tensors[key], tensors[f"{fqn}.lora_B"], float(layers[fqn]["scaling"]))
    return plan, weights, fingerprint


def _from_module(gm: nn.Module) -> tuple[Plan, dict[str, tuple[Tensor, Tensor, float]]]:
    plan = getattr(gm, "meta", {}).get("peftfx.plan")
    if plan is None:
        raise PlanError("an adapter given as a module must come from peftfx.compile (it has no plan attached)")
    weights = {n: (m.lora_A, m.lora_B, float(m.scaling)) for n, m in qlora_layers(gm, with_lora=True).items()}
    return plan, weights


def _load_source(name: str, source: Any) -> tuple[Plan, dict | None, dict]:
    """(plan, {fqn: (A, B, scaling)} or None for fresh adapters, base fingerprint or {})."""
    if isinstance(source, nn.Module):
        plan, weights = _from_module(source)
        return _check_plan(name, plan), weights, {}
    if isinstance(source, (str, os.PathLike)) and Path(source).is_dir():
        plan, weights, fingerprint = _from_folder(Path(source))
        return _check_plan(name, plan), weights, fingerprint
    try:
        plan = as_plan(source)
    except PlanError as e:
        raise PlanError(f"adapter {name!r}: {e}") from None
    return _check_plan(name, plan), None, {}


def _check_plan(name: str, plan: Plan) -> Plan:
    extra = [s for s in ("prefix", "prompt", "adapter") if getattr(plan, s) is not None]
    if plan.train_top_layers or plan.train_modules:
        extra.append("train_top_layers/train_modules")
    if extra:
        raise PlanError(f"adapter {name!r}: compile_multi serves LoRA adapters only; its plan also has "
                        f"{', '.join(extra)} (compile that one on its own with peftfx.compile)")
    if plan.lora is None and not any(r.lora for r in plan.rules):
        raise PlanError(f"adapter {name!r}: the plan has no lora section, so there is nothing to serve")
    return plan


# ---------------------------------------------------------------- per-layer resolution


def _linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if type(m).__name__ in LINEAR_TYPES]


def _resolve(plan: Plan, names: list[str]) -> tuple[dict, dict]:
    """({fqn: QuantSpec | None}, {fqn: LoRASpec}) over the model's linear names."""
    quant, lora = {}, {}
    for fqn in names:
        layer = plan.resolve(fqn)
        quant[fqn] = None if layer is None else layer.quant
        if layer is not None and layer.lora is not None:
            lora[fqn] = layer.lora
    return quant, lora


def _check_quant(name: str, quant: dict, base: dict, owner: str) -> None:
    for fqn, spec in quant.items():
        if fqn in base and base[fqn] != spec:
            raise PlanError(f"adapters {owner!r} and {name!r} disagree on the frozen base of {fqn}: "
                            f"{_qdesc(base[fqn])} vs {_qdesc(spec)}; all adapters share one base, so give them "
                            "the same quant section (and rules)")


def _qdesc(spec) -> str:
    return "dense (no quant)" if spec is None else f"quant {spec.to_dict()}"


def _union_plan(base_quant: dict, lora_layers: list[str]) -> Plan:
    """Exact-name rules: each layer's agreed quant, plus a rank-1 LoRA on layers some adapter targets."""
    rules = []
    for fqn, spec in base_quant.items():
        quant = None if spec is None else {k: v for k, v in spec.to_dict().items() if k != "targets"}
        lora = {"r": 1} if fqn in lora_layers else None
        if quant is not None or lora is not None:
            rules.append(Rule(targets=("re:" + re.escape(fqn),), quant=quant, lora=lora))
    return Plan(rules=tuple(rules))


# ---------------------------------------------------------------- graph surgery


def _add_ids_input(gm: GraphModule) -> torch.fx.Node:
    """A new ``adapter_ids`` placeholder, also added as a keyword to the module's pytree signature."""
    graph = gm.graph
    info = getattr(graph._codegen, "pytree_info", None)
    if info is None or info.in_spec is None:
        raise PeftfxError("compile_multi needs the pytree signature torch.export gives; this module has none")
    if IDS_ARG in info.orig_args:
        raise PlanError(f"the model already takes an input named {IDS_ARG!r}; rename it to use compile_multi")
    args, kwargs = pytree.tree_unflatten([0] * info.in_spec.num_leaves, info.in_spec)
    if not isinstance(kwargs, dict):
        raise PeftfxError(f"unexpected input spec {info.in_spec}: expected (args, kwargs)")
    in_spec = pytree.tree_structure((args, {**kwargs, IDS_ARG: 0}))
    graph._codegen.pytree_info = info._replace(orig_args=[*info.orig_args, IDS_ARG], in_spec=in_spec)
    # trace.py's call-signature check compares kwargs names with the captured ones
    n_args, names = gm.meta.get(SIGNATURE_KEY, (len(args), tuple(kwargs)))
    gm.meta[SIGNATURE_KEY] = (n_args, (*names, IDS_ARG))
    last = [n for n in graph.nodes if n.op == "placeholder"][-1]
    with graph.inserting_after(last):
        node = graph.placeholder(IDS_ARG)
    node.meta["peftfx.pass"] = "compile_multi"
    return node


def _install(gm: GraphModule, lora_layers: list[str]) -> None:
    """Swap each LoRA layer's QLoRALinear for a MultiLoRALinear fed the ids input."""
    ids = _add_ids_input(gm)
    for fqn in lora_layers:
        old = gm.get_submodule(fqn)
        weight = old.quantized_weight() if old.format != "none" else old.weight
        base = QLoRALinear(weight, old.bias, r=None, name=fqn, compute_dtype=getattr(old, "compute_dtype", None))
        set_submodule(gm, fqn, MultiLoRALinear(base, old.in_features, old.out_features, name=fqn))
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target in lora_layers:
            node.args = (node.args[0], ids)
    gm.graph.lint()
    gm.recompile()
    gm.register_forward_pre_hook(_ids_pre_hook, with_kwargs=True, prepend=True)


def _multi_layers(gm: nn.Module) -> dict[str, MultiLoRALinear]:
    return {n: m for n, m in gm.named_modules() if isinstance(m, MultiLoRALinear)}


def _meta(gm: nn.Module) -> dict:
    meta = getattr(gm, "meta", {}).get(META_KEY)
    if meta is None:
        raise PlanError("this module was not produced by peftfx.compile_multi")
    return meta


# ---------------------------------------------------------------- ids validation


def check_adapter_ids(gm: nn.Module, adapter_ids: Any, batch: int | None = None) -> None:
    """Raise :class:`AdapterIdError` unless ``adapter_ids`` is int64 ``[B]`` with values in ``[-1, n)``."""
    slots = _meta(gm)["slots"]
    if not isinstance(adapter_ids, Tensor) or adapter_ids.dim() != 1 or adapter_ids.dtype != torch.int64:
        desc = f"{adapter_ids.dtype} {list(adapter_ids.shape)}" if isinstance(adapter_ids, Tensor) \
            else type(adapter_ids).__name__
        raise AdapterIdError(f"{IDS_ARG} must be an int64 tensor of shape [batch], got {desc}; e.g. "
                             f"torch.tensor([peftfx.adapter_index(gm, 'name'), -1])")
    if batch is not None and adapter_ids.shape[0] != batch:
        raise AdapterIdError(f"{IDS_ARG} has {adapter_ids.shape[0]} entries but the batch has {batch} rows")
    if adapter_ids.numel() == 0:
        return
    lo, hi = int(adapter_ids.min()), int(adapter_ids.max())
    if lo < -1 or hi >= len(slots):
        bad_pos = int(torch.nonzero((adapter_ids < -1) | (adapter_ids >= len(slots)))[0])
        bad = int(adapter_ids[bad_pos])
        valid = ", ".join(f"{i}={n}" for i, n in enumerate(slots) if n is not None) or "none loaded"
        top = f"0..{len(slots) - 1}" if slots else "no adapter slots"
        raise AdapterIdError(f"{IDS_ARG}[{bad_pos}] = {bad} is out of range: valid ids are -1 (base model) and "
                             f"{top} ({valid}); map names with peftfx.adapter_index(gm, name)")


def _ids_pre_hook(module: nn.Module, args: tuple, kwargs: dict):
    if torch.compiler.is_compiling():
        return None  # traced callers validate eagerly with check_adapter_ids (no data-dependent branch here)
    if IDS_ARG not in kwargs:
        raise AdapterIdError(f"missing {IDS_ARG}: call the module with the keyword {IDS_ARG}=torch.tensor([...]) "
                             "(one id per row, -1 = base model)")
    ids = kwargs[IDS_ARG]
    first = next((v for v in [*args, *kwargs.values()] if isinstance(v, Tensor) and v is not ids and v.dim()), None)
    check_adapter_ids(module, ids, None if first is None else first.shape[0])
    return None


# ---------------------------------------------------------------- public API


def compile_multi(model: nn.Module, adapters: Mapping[str, Any], *, example_inputs: Any,
                  release_source_weights: bool = True) -> GraphModule:
    """Compile ``model`` once and serve several named LoRA adapters from it, one adapter per batch row.

    Args:
        model: the base model (as for :func:`peftfx.compile`).
        adapters: ``{name: source}``; a source is a plan (Plan, dict, .toml/.json path: fresh
            adapters, B = 0), a folder written by :func:`peftfx.save_adapters`, or a module from
            :func:`peftfx.compile` (its trained LoRA weights). Ranks and targets may differ; the
            plans must quantize every layer the same way.
        example_inputs: the model's inputs, as for :func:`peftfx.compile` (without ``adapter_ids``).
        release_source_weights: free quantized layers' full-precision weights in ``model``.

    Returns:
        A GraphModule in eval mode taking the model's inputs plus ``adapter_ids`` (int64 ``[B]``;
        ``-1`` = base model, else ``peftfx.adapter_index(gm, name)``).

    Example::

        >>> gm = peftfx.compile_multi(model, {"a": plan_a, "b": plan_b}, example_inputs=inputs)  # doctest: +SKIP
        >>> ids = torch.tensor([peftfx.adapter_index(gm, "b"), -1])                            # doctest: +SKIP
        >>> out = gm(**inputs, adapter_ids=ids)                                                  # doctest: +SKIP
    """
    if not adapters:
        raise PlanError("compile_multi needs at least one adapter: {name: plan or saved folder}")
    names = _linear_names(model)
    loaded = {name: _load_source(name, src) for name, src in adapters.items()}
    base_quant: dict = {}
    lora_layers: set[str] = set()
    owner = None
    for name, (plan, _, _) in loaded.items():
        quant, lora = _resolve(plan, names)
        if owner is None:
            base_quant, owner = quant, name
        _check_quant(name, quant, base_quant, owner)
        lora_layers |= set(lora)
    ordered = [n for n in names if n in lora_layers]
    gm = compile_plan(model, _union_plan(base_quant, ordered), example_inputs=example_inputs,
                      release_source_weights=release_source_weights, snapshots=False)
    _install(gm, ordered)
    for p in gm.parameters():
        p.requires_grad_(False)
    gm.meta[META_KEY] = {"slots": [], "plans": {}, "base_quant": base_quant, "linear_names": names,
                         "owner": owner}
    for name, source in loaded.items():
        _add_loaded(gm, name, source)
    return gm.eval()


def adapter_names(gm: nn.Module) -> list[str | None]:
    """Slot names by id (None for a freed slot)."""
    return list(_meta(gm)["slots"])


def adapter_index(gm: nn.Module, name: str) -> int:
    """The ``adapter_ids`` value that selects adapter ``name``."""
    slots = _meta(gm)["slots"]
    if name not in slots:
        loaded = [n for n in slots if n is not None]
        raise PlanError(f"no adapter named {name!r}; loaded: {loaded} (-1 selects the base model)")
    return slots.index(name)


def add_adapter(gm: nn.Module, name: str, source: Any) -> int:
    """Load adapter ``name`` from ``source`` (see :func:`compile_multi`) into a free slot; returns its id."""
    return _add_loaded(gm, name, _load_source(name, source))


def _add_loaded(gm: nn.Module, name: str, loaded: tuple) -> int:
    meta = _meta(gm)
    plan, weights, fingerprint = loaded
    if name in meta["slots"]:
        raise PlanError(f"an adapter named {name!r} is already loaded (id {meta['slots'].index(name)}); "
                        "remove_adapter it first or pick another name")
    quant, lora = _resolve(plan, meta["linear_names"])
    _check_quant(name, quant, meta["base_quant"], meta["owner"])
    layers = _multi_layers(gm)
    outside = sorted(set(lora) - set(layers))
    if outside:
        raise PlanError(f"adapter {name!r} puts LoRA on {outside[:4]} which no adapter targeted at compile_multi "
                        "time, so the compiled base has no slot there; include such an adapter when compiling")
    if weights is not None:
        missing = sorted(set(lora) - set(weights))
        if missing:
            raise CheckpointError(f"adapter {name!r}: its plan targets {missing[:4]} but no LoRA weights for them "
                                  "were found in the source")
    _check_fingerprint(gm, name, fingerprint)
    slot = meta["slots"].index(None) if None in meta["slots"] else len(meta["slots"])
    for fqn, layer in layers.items():
        if fqn not in lora:
            layer.set_slot(slot, None, None, 0.0)
        elif weights is not None:
            layer.set_slot(slot, *weights[fqn])
        else:
            layer.set_slot(slot, *_fresh(lora[fqn], layer))
    if slot == len(meta["slots"]):
        meta["slots"].append(name)
    else:
        meta["slots"][slot] = name
    meta["plans"][name] = plan
    return slot


def _fresh(spec, layer: MultiLoRALinear) -> tuple[Tensor, Tensor, float]:
    """PEFT's initialization (:func:`init_lora_`), B zero, so the adapter starts as the base."""
    spec.check_fits(layer.in_features, layer.out_features, layer.name)
    a = torch.empty(spec.r, layer.in_features, device=layer.lora_A.device)
    b = torch.empty(layer.out_features, spec.r, device=a.device)
    init_lora_(a, b, spec.init, name=layer.name)
    return a, b, spec.scaling


def _check_fingerprint(gm: nn.Module, name: str, saved: dict) -> None:
    """Refuse adapters saved on another frozen base (compares checkpoint.base_fingerprint per layer)."""
    if not saved:
        return
    now = {fqn.removesuffix(".base"): v for fqn, v in base_fingerprint(gm).items()}
    for fqn, info in saved.items():
        if fqn in now and now[fqn]["sha256"] != info.get("sha256"):
            raise CheckpointError(f"adapter {name!r} was trained on a different frozen base at {fqn} (its "
                                  "fingerprint differs); load it on the model it was saved from")


def remove_adapter(gm: nn.Module, name: str) -> None:
    """Unload adapter ``name``; its id selects the base model until :func:`add_adapter` reuses the slot."""
    slot = adapter_index(gm, name)
    for layer in _multi_layers(gm).values():
        layer.set_slot(slot, None, None, 0.0)
    meta = _meta(gm)
    meta["slots"][slot] = None
    meta["plans"].pop(name, None)
