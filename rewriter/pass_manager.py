"""Pass contract, registry keyed by plan section, ordering, lint/recompile and per-pass snapshots.

A pass is a plain function ``(gm, ctx) -> PassResult(gm, modified)`` registered for the plan
section it serves (``@register_pass("lora", order=20)``); ``compile()`` never names a concrete
pass. After each pass the manager lints and recompiles the graph, stamps the nodes the pass
created with ``meta["peftfx.pass"]``, and records a :class:`PassRecord` (nodes created / erased,
notes, the graph code before and after) that ``peftfx inspect`` renders.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

from torch import nn
from torch.fx import GraphModule

from peftfx.errors import PeftfxError, RewriteError
from peftfx.graph import PASS_KEY

__all__ = ["PassResult", "PassContext", "PassRecord", "PassSpec", "register_pass", "registered_passes", "run_passes",
           "shared_module", "SHARE_OPTION", "SKIP_OPTION"]


class PassResult(NamedTuple):
    graph_module: GraphModule
    modified: bool


@dataclass
class PassContext:
    """What a pass may read besides the graph: the plan, the source model, inputs, notes out."""

    plan: Any
    model: nn.Module | None = None
    example_inputs: Any = None
    options: dict = field(default_factory=dict)
    targets: list = field(default_factory=list)  # resolved by the target pass, read by swap passes
    notes: list[dict] = field(default_factory=list)  # per-pass details, reset for each pass

    def note(self, **details: Any) -> None:
        """Record one fact for the report (a target swapped, a prefix inserted, ...)."""
        self.notes.append(details)


@dataclass
class PassSpec:
    name: str
    section: str  # plan attribute that switches the pass on; "*" = always
    order: int
    fn: Callable[[GraphModule, PassContext], PassResult]
    doc: str


@dataclass
class PassRecord:
    """What one pass did, for ``peftfx.report`` and the inspection CLI."""

    name: str
    section: str
    modified: bool
    seconds: float
    created: list[str]
    erased: list[str]
    notes: list[dict]
    code_before: str
    code_after: str


_REGISTRY: dict[str, PassSpec] = {}

# PassContext.options key: a compiled GraphModule whose adapter / quantized modules a new capture of
# the same model binds to (generation graphs, other call signatures) instead of building copies.
SHARE_OPTION = "share_modules_with"
# PassContext.options key: plan sections whose passes do not run on this capture
SKIP_OPTION = "skip_sections"


def shared_module(ctx: PassContext, name: str, build: Callable[[], nn.Module]) -> nn.Module:
    """The module a pass installs at ``name``: ``build()``, or the same object from the compiled
    module named by ``ctx.options[SHARE_OPTION]`` (no second copy of packed weights or adapters).

    Raises:
        RewriteError: binding is requested and that module has nothing at ``name`` (the new capture
            differs from the compiled one, so its adapters would silently start fresh).
    """
    source = ctx.options.get(SHARE_OPTION)
    if source is None:
        return build()
    try:
        return source.get_submodule(name)
    except AttributeError:
        raise RewriteError(f"the new capture has a module {name!r} that the compiled module lacks; binding "
                           "it to the compiled adapters is impossible (the model changed since compile?)") from None


def register_pass(section: str, *, order: int, name: str | None = None):
    """Register ``fn`` as the pass serving plan ``section`` (``"*"``: always runs), run by ``order``."""

    def deco(fn):
        pass_name = name or fn.__name__
        _REGISTRY[pass_name] = PassSpec(pass_name, section, order, fn, (fn.__doc__ or "").strip().split("\n")[0])
        return fn

    return deco


def registered_passes() -> list[PassSpec]:
    """All registered passes in run order."""
    import peftfx.passes  # noqa: F401  (registration happens at import)

    return sorted(_REGISTRY.values(), key=lambda p: p.order)


def _active(spec: PassSpec, plan: Any) -> bool:
    if spec.section == "*":
        return True
    return any(getattr(plan, s, None) not in (None, (), [], False) for s in spec.section.split("|"))


def run_passes(gm: GraphModule, ctx: PassContext, *, snapshots: bool = True) -> tuple[GraphModule, list[PassRecord]]:
    """Run every pass whose plan section is present, in order; lint + recompile after each."""
    records: list[PassRecord] = []
    skipped = ctx.options.get(SKIP_OPTION, ())
    for spec in registered_passes():
        if not _active(spec, ctx.plan) or spec.section in skipped:
            continue
        before_nodes = {id(n): n.name for n in gm.graph.nodes}
        code_before = gm.code if snapshots else ""
        ctx.notes = []
        start = time.perf_counter()
        try:
            result = spec.fn(gm, ctx)
            gm = result.graph_module
            gm.graph.lint()
            gm.recompile()
        except PeftfxError as exc:
            done = ", ".join(r.name for r in records) or "none"
            exc.args = (f"{exc.args[0] if exc.args else exc}\n  (in pass {spec.name}; passes already run: {done})",)
            raise
        except Exception as exc:  # noqa: BLE001 - wrapped with the pass name
            done = ", ".join(r.name for r in records) or "none"
            raise RewriteError(f"pass {spec.name} failed: {type(exc).__name__}: {exc} (passes already run: {done})") from exc
        after = {id(n): n for n in gm.graph.nodes}
        created = [n for k, n in after.items() if k not in before_nodes]
        for node in created:
            node.meta.setdefault(PASS_KEY, spec.name)
        records.append(
            PassRecord(
                name=spec.name,
                section=spec.section,
                modified=bool(result.modified),
                seconds=time.perf_counter() - start,
                created=[n.name for n in created],
                erased=[name for k, name in before_nodes.items() if k not in after],
                notes=list(ctx.notes),
                code_before=code_before,
                code_after=gm.code if snapshots else "",
            )
        )
    return gm, records
