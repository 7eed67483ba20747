"""The plan: what to quantize, where to put LoRA, prefixes, soft prompts and bottleneck adapters.

Every spec is a frozen dataclass validated in ``__post_init__``; a bad value raises
:class:`~peftfx.errors.PlanError` naming the key, the value and what is allowed. Plans round-trip
exactly through ``to_dict()`` / JSON / TOML and carry a ``version``.

**Target patterns** (``targets``, ``quant.targets``, ``lora.targets``, ``rules[i].targets``) are
matched against module names (FQNs such as ``model.layers.0.self_attn.q_proj``):

* ``"re:<regex>"``: the regex must match the *whole* name (``re.fullmatch``, as PEFT does).
* a pattern with glob characters (``*?[``): :func:`fnmatch.fnmatchcase` over the whole name;
  ``*`` also crosses dots, so ``*.q_proj`` matches ``model.layers.0.self_attn.q_proj``.
* a plain name: equal to the module name or to a dotted suffix of it, PEFT's ``target_modules``
  semantics: ``q_proj`` matches every ``...q_proj`` and ``self_attn.q_proj`` every
  ``...self_attn.q_proj``, but ``layers.1.mlp`` does not match ``layers.11.mlp``.

This module imports no torch: resolution is a pure function of the plan and a module name.

(Over 400 lines on purpose: the plan is one public schema, every section spec, the rules and their
resolution, read top to bottom beside the plan reference in the README; parsing and value checks
live in :mod:`peftfx.plan_io`.)
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any, ClassVar

from peftfx.errors import PlanError
from peftfx.kernels.choices import COMPUTE_DTYPE_CHOICES, LORA_INITS
from peftfx.kernels.choices import FORMATS as QUANT_FORMATS
from peftfx.plan_io import (
    FrozenDict,
    check_block,
    check_bool,
    check_choice,
    check_int,
    check_keys,
    check_num,
    check_size,
    dumps_json,
    dumps_toml,
    load_plan_file,
    plain,
)

__all__ = [
    "PLAN_VERSION", "QUANT_FORMATS", "QuantSpec", "LoRASpec", "PrefixTuningSpec", "PromptTuningSpec",
    "AdapterSpec", "MemorySpec", "CHECKPOINT_MODES", "OFFLOAD_MODES", "Rule", "Plan", "ResolvedLayer", "match", "matches_any", "check_pattern",
]

PLAN_VERSION = 1
CHECKPOINT_MODES = ("off", "blocks", "selective")
OFFLOAD_MODES = ("none", "cpu")
_GLOB_CHARS = frozenset("*?[")


# ---------------------------------------------------------------- patterns


@functools.lru_cache(maxsize=1024)
def _regex(source: str) -> re.Pattern[str]:
    return re.compile(source)


def check_pattern(pattern: Any, where: str = "targets") -> str:
    """Return ``pattern`` if it is a usable target pattern, else raise PlanError naming it."""
    if not isinstance(pattern, str) or not pattern or pattern == "re:":
        raise PlanError(f"{where}: each pattern must be a non-empty string, got {pattern!r}")
    if pattern.startswith("re:"):
        try:
            _regex(pattern[3:])
        except re.error as e:
            raise PlanError(f"{where}: regex {pattern!r} does not compile: {e}") from None
    return pattern


def match(pattern: str, name: str) -> bool:
    """Whether target ``pattern`` selects module ``name`` (see the module docstring)."""
    if pattern.startswith("re:"):
        return _regex(pattern[3:]).fullmatch(name) is not None
    if _GLOB_CHARS.isdisjoint(pattern):
        return name == pattern or name.endswith("." + pattern)
    return fnmatchcase(name, pattern)


def matches_any(patterns: Iterable[str] | None, name: str) -> bool:
    """Whether any of ``patterns`` selects ``name`` (``None`` or empty selects nothing)."""
    return any(match(p, name) for p in patterns or ())


def _targets(where: str, value: Any, *, optional: bool) -> tuple[str, ...] | None:
    """Normalize a string or list of patterns to a tuple; None stays None when ``optional``."""
    if value is None and optional:
        return None
    if isinstance(value, str):
        value = (value,)
    if not isinstance(value, (list, tuple)):
        raise PlanError(f"{where} must be a pattern or a list of patterns, got {value!r}")
    if optional and not value:
        raise PlanError(f"{where} is empty: leave it out to use the top-level targets")
    return tuple(check_pattern(p, where) for p in value)


# ---------------------------------------------------------------- section specs


class _Spec:
    """Shared dict I/O of the section specs; ``_section`` names the plan key in messages."""

    _section: ClassVar[str] = ""

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))  # type: ignore[arg-type]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Any:
        """Build the spec from a plan section; unknown keys raise PlanError."""
        if not isinstance(d, Mapping):
            raise PlanError(f"{cls._section} must be a table/object, got {d!r}")
        check_keys(d, cls.field_names(), cls._section)
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            if f.default is dataclasses.MISSING and f.name not in d:
                raise PlanError(f"{cls._section}.{f.name} is required (e.g. {cls._section} = {{{f.name} = 16}})")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        """JSON/TOML-friendly dict; ``None`` fields are left out (TOML has no null)."""
        return {n: plain(v) for n in self.field_names() if (v := getattr(self, n)) is not None}


@dataclass(frozen=True)
class QuantSpec(_Spec):
    """How to store frozen weights: block-wise 4-bit (NF4/FP4) or 8-bit.

    Args:
        format: one of :data:`QUANT_FORMATS`; ``"none"`` keeps the weight dense.
        block_size: elements per absmax block (power of two in [16, 4096]).
        double_quant: quantize the absmax vector to 8 bits in blocks of ``block_size2``.
        block_size2: block size of the second-level quantization.
        threshold: outlier magnitude for ``llm-int8`` (columns above it stay in 16 bits).
        compute_dtype: dtype of the frozen base GEMM: ``float32 | float16 | bfloat16``, ``auto`` (bf16
            where the device has fast bf16 GEMMs: AMX/AVX512-BF16 CPUs, sm80+ GPUs; the input's dtype
            elsewhere), or None for the input's dtype. LoRA, bias and outputs keep the input's dtype.
        targets: patterns for this section; None means the plan's top-level targets.
    """

    _section: ClassVar[str] = "quant"
    format: str = "nf4"
    block_size: int = 64
    double_quant: bool = True
    block_size2: int = 256
    threshold: float = 6.0
    compute_dtype: str | None = None
    targets: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        check_choice("quant.format", self.format, QUANT_FORMATS)
        check_block("quant.block_size", self.block_size)
        check_bool("quant.double_quant", self.double_quant)
        check_block("quant.block_size2", self.block_size2)
        check_num("quant.threshold", self.threshold, gt=0)
        if self.compute_dtype is not None:
            dtype = self.compute_dtype
            if type(dtype).__name__ == "dtype":  # a torch.dtype, accepted without importing torch
                dtype = str(dtype)
            if isinstance(dtype, str):
                dtype = dtype.removeprefix("torch.")
            object.__setattr__(self, "compute_dtype", check_choice("quant.compute_dtype", dtype, COMPUTE_DTYPE_CHOICES))
        object.__setattr__(self, "targets", _targets("quant.targets", self.targets, optional=True))


@dataclass(frozen=True)
class LoRASpec(_Spec):
    """Low-rank adapters ``y += s · B(A(dropout(x)))`` with ``s = alpha/r`` (``alpha/sqrt(r)`` with rsLoRA).

    Args:
        r: rank (>= 1; ``r <= min(in, out)`` is checked per layer by :meth:`check_fits`).
        alpha: scaling numerator (> 0).
        dropout: dropout on the LoRA input, in [0, 1).
        use_rslora: scale by ``alpha/sqrt(r)`` (rank-stabilized LoRA).
        targets: patterns for this section; None means the plan's top-level targets.
        init: how A starts (B starts at zero), PEFT's ``init_lora_weights``: ``"default"``
            (Kaiming-uniform, as ``nn.Linear``) or ``"gaussian"`` (N(0, std=1/r)); see
            :func:`peftfx.kernels.modules.init_lora_`, which compile and multi-adapter both call.
    """

    _section: ClassVar[str] = "lora"
    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    use_rslora: bool = False
    targets: tuple[str, ...] | None = None
    init: str = "default"

    def __post_init__(self) -> None:
        check_int("lora.r", self.r, 1)
        check_num("lora.alpha", self.alpha, gt=0)
        check_num("lora.dropout", self.dropout, ge=0, lt=1)
        check_bool("lora.use_rslora", self.use_rslora)
        check_choice("lora.init", self.init, LORA_INITS)
        object.__setattr__(self, "targets", _targets("lora.targets", self.targets, optional=True))

    @property
    def scaling(self) -> float:
        """The factor ``s`` applied to the low-rank term."""
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def check_fits(self, in_features: int, out_features: int, layer_name: str) -> None:
        """Raise PlanError if rank ``r`` exceeds ``min(in_features, out_features)`` of ``layer_name``."""
        limit = min(in_features, out_features)
        if self.r > limit:
            raise PlanError(f"lora.r = {self.r} is larger than min(in_features={in_features}, "
                            f"out_features={out_features}) = {limit} for layer {layer_name!r}; "
                            f"use r <= {limit} or a rule with a smaller r for this layer")


@dataclass(frozen=True)
class PrefixTuningSpec(_Spec):
    """Learned key/value prefixes of ``tokens`` positions on every SDPA attention call.

    Args:
        tokens: prefix length P (>= 1).
        reparametrize: train through an MLP (Li & Liang), folded into plain tensors for export.
        hidden: hidden size of the reparametrization MLP.
        init: ``"random"``, the only choice: each prefix starts at N(0, 0.02²) (small, so the
            frozen model barely changes before training); with ``reparametrize`` the MLP starts as
            PEFT's (N(0, 1) embedding, ``nn.Linear`` init). Other values are refused.
    """

    _section: ClassVar[str] = "prefix"
    tokens: int
    reparametrize: bool = False
    hidden: int = 512
    init: str = "random"

    def __post_init__(self) -> None:
        check_int("prefix.tokens", self.tokens, 1)
        check_bool("prefix.reparametrize", self.reparametrize)
        check_int("prefix.hidden", self.hidden, 1)
        check_choice("prefix.init", self.init, ("random",))


@dataclass(frozen=True)
class PromptTuningSpec(_Spec):
    """A soft prompt of ``tokens`` embeddings in front of the input embeddings.

    Args:
        tokens: prompt length P (>= 1).
        init: ``"random"`` (random vocabulary rows) or ``"text"`` (embeddings of a text,
            repeated or truncated to P).
        init_text: the text for ``init="text"`` (needs a tokenizer at compile time).
        init_token_ids: token ids for ``init="text"``, used instead of tokenizing ``init_text``.
    """

    _section: ClassVar[str] = "prompt"
    tokens: int
    init: str = "random"
    init_text: str | None = None
    init_token_ids: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        check_int("prompt.tokens", self.tokens, 1)
        check_choice("prompt.init", self.init, ("random", "text"))
        if self.init_text is not None and (not isinstance(self.init_text, str) or not self.init_text):
            raise PlanError(f"prompt.init_text must be a non-empty string, got {self.init_text!r}")
        if self.init_token_ids is not None:
            ids = self.init_token_ids
            if not isinstance(ids, (list, tuple)) or not ids:
                raise PlanError(f"prompt.init_token_ids must be a non-empty list of token ids, got {ids!r}")
            object.__setattr__(self, "init_token_ids", tuple(check_int("prompt.init_token_ids[]", i, 0) for i in ids))
        given = self.init_text is not None or self.init_token_ids is not None
        if self.init == "text" and not given:
            raise PlanError("prompt.init = 'text' needs prompt.init_text or prompt.init_token_ids")
        if self.init != "text" and given:
            raise PlanError(f"prompt.init_text / prompt.init_token_ids are only used with init = 'text', "
                            f"but prompt.init = {self.init!r}")


@dataclass(frozen=True)
class AdapterSpec(_Spec):
    """Houlsby bottleneck adapters (down, nonlinearity, zero-init up, residual). Plan key ``adapter``.

    Args:
        size: bottleneck width (>= 1).
        where: any of ``"attn"`` (after the attention output) and ``"mlp"`` (after the MLP).
        layers: block indices (>= 0) to adapt; None means every block.
        nonlinearity: ``gelu | relu | silu | tanh``.
    """

    _section: ClassVar[str] = "adapter"
    size: int = 64
    where: tuple[str, ...] = ("attn", "mlp")
    layers: tuple[int, ...] | None = None
    nonlinearity: str = "gelu"

    def __post_init__(self) -> None:
        check_int("adapter.size", self.size, 1)
        where = (self.where,) if isinstance(self.where, str) else self.where
        if not isinstance(where, (list, tuple)) or not where:
            raise PlanError(f"adapter.where must be a non-empty list of 'attn' / 'mlp', got {self.where!r}")
        object.__setattr__(self, "where", tuple(check_choice("adapter.where[]", w, ("attn", "mlp")) for w in where))
        if self.layers is not None:
            layers = (self.layers,) if isinstance(self.layers, int) and not isinstance(self.layers, bool) \
                else self.layers
            if not isinstance(layers, (list, tuple)) or not layers:
                raise PlanError(f"adapter.layers must be a non-empty list of block indices, got {self.layers!r}")
            object.__setattr__(self, "layers", tuple(check_int("adapter.layers[]", i, 0) for i in layers))
        check_choice("adapter.nonlinearity", self.nonlinearity, ("gelu", "relu", "silu", "tanh"))


@dataclass(frozen=True)
class MemorySpec(_Spec):
    """Activation memory of training: recompute blocks in backward, offload what they keep. Plan key ``memory``.

    Args:
        checkpoint: ``"off"``; ``"blocks"`` (each transformer block recomputes its forward during
            backward; only its inputs stay alive); ``"selective"`` (per block, matmul and attention
            outputs are saved and the cheap ops between them recomputed).
        offload: ``"none"`` or ``"cpu"`` (checkpointed block inputs wait in pinned host memory
            between forward and backward; on CUDA only, accepted and ignored on CPU).
        budget: peak bytes one training step may use, as ``"24GiB"``, ``"500MB"`` or bytes; with
            ``"selective"`` the compiler picks per block what to save so that the estimated peak
            fits, and compile fails naming the smallest reachable peak when nothing fits.
        tile_mlp: ``"auto"`` (default: tile with ``checkpoint = "blocks"``, where the MLP's
            backward is the step's peak), ``true`` (tile with any checkpoint mode; with ``"off"``
            or ``"selective"`` the MLP is then recomputed in backward) or ``false``. A tiled MLP
            runs in token chunks and keeps only its input for backward
            (:mod:`peftfx.kernels.tiled_mlp`, :mod:`peftfx.passes.tile_mlp`).
        tile_tokens: fewest tokens per MLP chunk (default 512); chunks hold
            ``max(tile_tokens, ceil(tokens * hidden / intermediate))`` tokens, so one chunk's
            ``[chunk, intermediate]`` tensor is no larger than a hidden state.
    """

    _section: ClassVar[str] = "memory"
    checkpoint: str = "off"
    offload: str = "none"
    budget: str | int | None = None
    tile_mlp: bool | str = "auto"
    tile_tokens: int | None = None

    def __post_init__(self) -> None:
        check_choice("memory.checkpoint", self.checkpoint, CHECKPOINT_MODES)
        check_choice("memory.offload", self.offload, OFFLOAD_MODES)
        if self.budget is not None:
            check_size("memory.budget", self.budget)
        if not isinstance(self.tile_mlp, bool) and self.tile_mlp != "auto":
            raise PlanError(f"memory.tile_mlp must be true, false or 'auto'; got {self.tile_mlp!r}")
        if self.tile_tokens is not None:
            check_int("memory.tile_tokens", self.tile_tokens, 1)
        if self.offload != "none" and self.checkpoint == "off":
            raise PlanError(f"memory.offload = {self.offload!r} moves the inputs of checkpointed blocks, but "
                            "memory.checkpoint = 'off'; set checkpoint = 'blocks' or 'selective'")

    @property
    def tiles_mlp(self) -> bool:
        """Whether MLPs are tiled: ``tile_mlp``, with ``"auto"`` resolved (on with ``"blocks"`` only)."""
        return self.checkpoint == "blocks" if self.tile_mlp == "auto" else bool(self.tile_mlp)

    @property
    def budget_bytes(self) -> int | None:
        """``budget`` in bytes (None when unset)."""
        return None if self.budget is None else check_size("memory.budget", self.budget)


_SECTIONS: dict[str, type[_Spec]] = {"quant": QuantSpec, "lora": LoRASpec, "prefix": PrefixTuningSpec,
                                     "prompt": PromptTuningSpec, "adapter": AdapterSpec, "memory": MemorySpec}


# ---------------------------------------------------------------- rules and resolution


def _override(where: str, value: Any, spec: type[_Spec]) -> FrozenDict | bool | None:
    """Validate one rule override: None (untouched), False (off) or a partial section dict."""
    if value is None or value is False:
        return value
    if not isinstance(value, Mapping):
        raise PlanError(f"{where} must be a table of overrides or false, got {value!r}")
    check_keys(value, [n for n in spec.field_names() if n != "targets"], where)
    spec(**value)  # every check is per field, so merging onto the defaults validates the values
    return FrozenDict(value)


@dataclass(frozen=True)
class Rule:
    """Per-layer overrides: on modules matching ``targets``, merge ``quant``/``lora`` onto the section.

    ``quant``/``lora`` are partial dicts (``{"r": 4}``), ``False`` to switch the section off for
    these modules (``quant = {format = "none"}`` also switches quantization off), or None to
    leave that section alone. Later rules win over earlier ones, section by section.
    """

    targets: tuple[str, ...]
    quant: Mapping[str, Any] | bool | None = None
    lora: Mapping[str, Any] | bool | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", _targets("rule.targets", self.targets, optional=False))
        if not self.targets:
            raise PlanError("rule.targets is empty: a rule needs at least one pattern")
        object.__setattr__(self, "quant", _override("rule.quant", self.quant, QuantSpec))
        object.__setattr__(self, "lora", _override("rule.lora", self.lora, LoRASpec))
        if self.quant is None and self.lora is None:
            raise PlanError(f"rule for {list(self.targets)!r} sets neither quant nor lora")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Rule:
        """Build a rule from ``{"targets": ..., "quant": {...}, "lora": {...} | false}``."""
        if not isinstance(d, Mapping):
            raise PlanError(f"a rule must be a table/object, got {d!r}")
        check_keys(d, ("targets", "quant", "lora"), "rule")
        if "targets" not in d:
            raise PlanError("rule is missing 'targets'")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"targets": list(self.targets)}
        out.update({k: plain(v) for k in ("quant", "lora") if (v := getattr(self, k)) is not None})
        return out


@dataclass(frozen=True)
class ResolvedLayer:
    """What the plan does to one module: its quantization and LoRA (None = not applied).

    ``quant`` is None for dense layers (including ``format = "none"``); specs carry no targets.
    """

    name: str
    quant: QuantSpec | None
    lora: LoRASpec | None


@dataclass(frozen=True)
class Plan:
    """A parameter-efficient fine-tuning plan. Every section is optional, but a plan must do something.

    Args:
        targets: default patterns for ``quant`` and ``lora`` (required when either is given
            without its own ``targets``). A single string is accepted.
        quant, lora, prefix, prompt, adapter: the section specs (or dicts of their fields).
        memory: activation checkpointing / offload / budget (:class:`MemorySpec`); it changes how
            a step runs, not what trains, so it does not count as "doing something".
        rules: per-layer overrides, applied in order, the last match winning.
        train_top_layers: also train the top k transformer blocks (>= 0).
        train_modules: patterns of modules trained in full precision besides the adapters
            (PEFT's ``modules_to_save``), e.g. ``["classifier"]`` for a fresh task head.
        version: plan format version (at most :data:`PLAN_VERSION`).

    Example::

        >>> plan = Plan.from_dict({
        ...     "targets": ["*.q_proj", "*.k_proj", "*.v_proj", "*.o_proj"],
        ...     "quant": {"format": "nf4"},
        ...     "lora": {"r": 16, "alpha": 32, "targets": ["q_proj", "v_proj"]},
        ...     "rules": [{"targets": "re:.*layers[.]0[.].*", "lora": {"r": 4}}],
        ... })
        >>> plan.resolve("model.layers.3.self_attn.q_proj").lora.r
        16
        >>> plan.resolve("model.layers.0.self_attn.q_proj").lora.r
        4
        >>> plan.resolve("model.layers.3.self_attn.k_proj").lora is None
        True
        >>> Plan.from_dict(plan.to_dict()) == plan
        True
    """

    targets: tuple[str, ...] = ()
    quant: QuantSpec | None = None
    lora: LoRASpec | None = None
    prefix: PrefixTuningSpec | None = None
    prompt: PromptTuningSpec | None = None
    adapter: AdapterSpec | None = None
    memory: MemorySpec | None = None
    rules: tuple[Rule, ...] = ()
    train_top_layers: int | None = None
    train_modules: tuple[str, ...] = ()
    version: int = PLAN_VERSION

    def __post_init__(self) -> None:
        check_int("version", self.version, 1)
        if self.version > PLAN_VERSION:
            raise PlanError(f"plan version {self.version} is newer than this peftfx supports "
                            f"({PLAN_VERSION}); upgrade peftfx")
        targets = () if self.targets is None else self.targets  # JSON null = absent
        object.__setattr__(self, "targets", _targets("targets", targets, optional=False))
        for name, spec in _SECTIONS.items():
            value = getattr(self, name)
            if isinstance(value, Mapping):
                object.__setattr__(self, name, spec.from_dict(value))
            elif value is not None and not isinstance(value, spec):
                raise PlanError(f"{name} must be a {spec.__name__} or a table of its fields, got {value!r}")
        if not isinstance(self.rules, (list, tuple)):
            raise PlanError(f"rules must be a list of rules, got {self.rules!r}")
        rules = []
        for i, r in enumerate(self.rules):
            try:
                rules.append(r if isinstance(r, Rule) else Rule.from_dict(r))
            except PlanError as e:
                raise PlanError(f"rules[{i}]: {e}") from None
        object.__setattr__(self, "rules", tuple(rules))
        if self.train_top_layers is not None:
            check_int("train_top_layers", self.train_top_layers, 0)
        modules = () if self.train_modules is None else self.train_modules
        object.__setattr__(self, "train_modules", _targets("train_modules", modules, optional=False))
        for name in ("quant", "lora"):
            spec = getattr(self, name)
            if spec is not None and spec.targets is None and not self.targets:
                raise PlanError(f"{name} needs targets: set top-level 'targets' or '{name}.targets' "
                                f"(e.g. targets = ['*.q_proj', '*.v_proj'])")
        if not (self.quant or self.lora or self.prefix or self.prompt or self.adapter or self.rules
                or self.train_top_layers or self.train_modules):
            hint = " (targets alone only say where quant and lora apply)" if self.targets else ""
            raise PlanError("plan does nothing: give at least one of quant, lora, prefix, prompt, "
                            f"adapter, rules or train_top_layers > 0{hint}")
        if self.targets and not self._uses_top_level_targets():
            raise PlanError(f"targets {list(self.targets)!r} are given but unused: they apply to the "
                            f"quant and lora sections, and neither is present or both carry their own targets")

    def _uses_top_level_targets(self) -> bool:
        return any(s is not None and s.targets is None for s in (self.quant, self.lora))

    # -- I/O

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Plan:
        """Build and validate a plan from a dict (as read from TOML/JSON); unknown keys raise."""
        if not isinstance(d, Mapping):
            raise PlanError(f"a plan must be a table/object, got {type(d).__name__}")
        check_keys(d, [f.name for f in dataclasses.fields(cls)], "plan")
        return cls(**d)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Plan:
        """Read a ``.toml`` or ``.json`` plan file."""
        return cls.from_dict(load_plan_file(path))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable dict with ``version``; absent sections are left out."""
        out: dict[str, Any] = {"version": self.version}
        if self.targets:
            out["targets"] = list(self.targets)
        if self.train_top_layers is not None:
            out["train_top_layers"] = self.train_top_layers
        if self.train_modules:
            out["train_modules"] = list(self.train_modules)
        out.update({n: s.to_dict() for n in _SECTIONS if (s := getattr(self, n)) is not None})
        if self.rules:
            out["rules"] = [r.to_dict() for r in self.rules]
        return out

    def to_json(self, *, indent: int | None = 2) -> str:
        return dumps_json(self.to_dict(), indent=indent)

    def to_toml(self) -> str:
        return dumps_toml(self.to_dict())

    # -- resolution

    def quant_targets(self) -> tuple[str, ...]:
        """Patterns the ``quant`` section applies to (its own or the top-level ones; () if absent)."""
        return () if self.quant is None else (self.quant.targets or self.targets)

    def lora_targets(self) -> tuple[str, ...]:
        """Patterns the ``lora`` section applies to (its own or the top-level ones; () if absent)."""
        return () if self.lora is None else (self.lora.targets or self.targets)

    def all_patterns(self) -> tuple[tuple[str, str], ...]:
        """Every pattern in use with where it comes from, e.g. ``("*.q_proj", "lora.targets")``."""
        out: list[tuple[str, str]] = []
        if self._uses_top_level_targets():
            out += [(p, "targets") for p in self.targets]
        for name in ("quant", "lora"):
            spec = getattr(self, name)
            if spec is not None and spec.targets is not None:
                out += [(p, f"{name}.targets") for p in spec.targets]
        for i, rule in enumerate(self.rules):
            out += [(p, f"rules[{i}].targets") for p in rule.targets]
        return tuple(out)

    def resolve(self, module_name: str) -> ResolvedLayer | None:
        """What to do to ``module_name``: None when it gets neither quantization nor LoRA.

        The sections apply to their targets; then each matching rule, in order, replaces the
        section's setting for this module by the section (or the defaults, if the section is
        absent) with the rule's overrides merged on top, or switches it off.
        """
        quant = self.quant if matches_any(self.quant_targets(), module_name) else None
        lora = self.lora if matches_any(self.lora_targets(), module_name) else None
        for rule in self.rules:
            if not matches_any(rule.targets, module_name):
                continue
            if rule.quant is not None:
                quant = None if rule.quant is False else \
                    dataclasses.replace(self.quant or QuantSpec(), **rule.quant)
            if rule.lora is not None:
                lora = None if rule.lora is False else dataclasses.replace(self.lora or LoRASpec(), **rule.lora)
        if quant is not None:
            quant = None if quant.format == "none" else dataclasses.replace(quant, targets=None)
        if lora is not None:
            lora = dataclasses.replace(lora, targets=None)
        return None if quant is None and lora is None else ResolvedLayer(module_name, quant, lora)
