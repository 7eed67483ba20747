"""Pass contract, registry keyed by plan section, ordering, lint/recompile and per-pass snapshots.

A pass is a plain function ``(gm, ctx) -> PassResult(gm, modified)`` registered for the plan
section it serves, with the passes it must run after (and before)::

    @register_pass("prefix", after=("swap_linear",))
    def prefix_tuning(gm, ctx): ...

``compile()`` never names a concrete pass. The run order is a topological order of those
constraints (ties broken by name, so it is deterministic); a cycle or a second registration under
one name raises :class:`RewriteError`. A constraint naming a pass that is not registered orders
nothing (a test may unregister a pass); the suite checks that every name is a real pass. After each pass the
manager lints and recompiles the graph, stamps the nodes the pass created with
``meta["peftfx.pass"]``, and records a :class:`PassRecord` (nodes created / erased / replaced,
notes, the graph code before and after) that ``peftfx inspect`` renders. Which node replaced which
comes from torch.fx's own provenance (``node.meta["from_node"]``, written by
``GraphTransformObserver`` on ``replace_all_uses_with``), not from reading generated code.
"""
from __future__ import annotations

import contextlib
import heapq
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, NamedTuple

from torch import nn
from torch.fx import GraphModule
from torch.fx.passes.graph_transform_observer import GraphTransformObserver

from peftfx.errors import PeftfxError, RewriteError
from peftfx.graph import PASS_KEY

__all__ = ["PassResult", "PassContext", "PassRecord", "PassSpec", "register_pass", "unregister_pass", "registered_passes",
           "run_passes", "shared_module", "SHARE_OPTION", "SKIP_OPTION"]


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
    fn: Callable[[GraphModule, PassContext], PassResult]
    doc: str
    after: tuple[str, ...] = ()  # passes that must run before this one (when both run)
    before: tuple[str, ...] = ()  # passes that must run after this one


@dataclass
class PassRecord:
    """What one pass did, for ``peftfx.report`` and the inspection CLI."""

    name: str
    section: str
    modified: bool
    seconds: float
    created: list[str]
    erased: list[str]
    replaced: list[list[str]]  # [erased node, the created node that took over its uses]
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


def register_pass(section: str, *, after: tuple[str, ...] = (), before: tuple[str, ...] = (),
                  name: str | None = None):
    """Register ``fn`` as the pass serving plan ``section`` (``"*"``: always runs).

    ``after`` / ``before`` name passes this one must follow / precede; see the module docstring.
    """

    def deco(fn):
        pass_name = name or fn.__name__
        if pass_name in _REGISTRY:
            raise RewriteError(f"a pass named {pass_name!r} is already registered (by "
                               f"{_REGISTRY[pass_name].fn.__module__}); give the new one another name")
        doc = (fn.__doc__ or "").strip().split("\n")[0]
        _REGISTRY[pass_name] = PassSpec(pass_name, section, fn, doc, tuple(after), tuple(before))
        return fn

    return deco


def unregister_pass(name: str) -> None:
    """Remove a registered pass (tests and plugins that register temporary passes)."""
    _REGISTRY.pop(name, None)


def registered_passes() -> list[PassSpec]:
    """All registered passes in run order (see the module docstring).

    Registration happens when :mod:`peftfx.passes` is imported; :mod:`peftfx.api` imports it.
    """
    return _ordered(_REGISTRY)


def _ordered(registry: dict[str, PassSpec]) -> list[PassSpec]:
    """Kahn's algorithm over the after/before edges, smallest name first among the ready passes."""
    succ: dict[str, set[str]] = {n: set() for n in registry}
    for spec in registry.values():  # a constraint on a pass that is not registered orders nothing
        for other in spec.after:
            if other in registry:
                succ[other].add(spec.name)
        for other in spec.before:
            if other in registry:
                succ[spec.name].add(other)
    indegree = {n: 0 for n in registry}
    for targets in succ.values():
        for n in targets:
            indegree[n] += 1
    ready = [n for n, d in indegree.items() if d == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        n = heapq.heappop(ready)
        order.append(registry[n])
        for m in succ[n]:
            indegree[m] -= 1
            if indegree[m] == 0:
                heapq.heappush(ready, m)
    if len(order) != len(registry):
        stuck = sorted(n for n, d in indegree.items() if d > 0)
        raise RewriteError(f"the pass order constraints form a cycle among {stuck}")
    return order


@contextlib.contextmanager
def _observed(gm: GraphModule, pass_name: str) -> Iterator[None]:
    """Let torch.fx record ``meta["from_node"]`` provenance on the nodes ``pass_name`` creates/replaces."""
    from torch._inductor import config as inductor_config  # the observer reads this flag; imports torch._inductor

    with inductor_config.patch({"trace.provenance_tracking_level": 1}), GraphTransformObserver(gm, pass_name):
        yield


def _replacements(nodes, pass_name: str) -> list[list[str]]:
    """``[old, new]`` for every node of ``pass_name`` that took over all uses of an erased node."""
    pairs = []
    for node in nodes:
        for source in node.meta.get("from_node", []):
            if source.pass_name == pass_name and "replace" in [a.value for a in source.action]:
                pairs.append([source.name, node.name])
    return pairs


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
            with _observed(gm, spec.name):
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
        erased = [name for k, name in before_nodes.items() if k not in after]
        for node in created:
            node.meta.setdefault(PASS_KEY, spec.name)
        records.append(
            PassRecord(
                name=spec.name,
                section=spec.section,
                modified=bool(result.modified),
                seconds=time.perf_counter() - start,
                created=[n.name for n in created],
                erased=erased,
                replaced=[pair for pair in _replacements(created, spec.name) if pair[0] in erased],
                notes=list(ctx.notes),
                code_before=code_before,
                code_after=gm.code if snapshots else "",
            )
        )
    return gm, records
