"""Pass infrastructure: order from declared constraints, duplicate names refused, fx provenance."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import peftfx
import peftfx.passes  # noqa: F401  (registers the built-in passes)
from peftfx import pass_manager
from peftfx.errors import RewriteError
from peftfx.pass_manager import PassResult, PassSpec, register_pass, registered_passes, unregister_pass


def _spec(name, after=(), before=()):
    return PassSpec(name, "*", lambda gm, ctx: PassResult(gm, False), "", tuple(after), tuple(before))


def test_builtin_order_follows_the_declared_constraints():
    names = [s.name for s in registered_passes()]
    assert names[0] == "swap_linear" and names.index("freeze") < names.index("activation_checkpoint")
    for spec in registered_passes():
        for other in spec.after:
            assert other in names, f"{spec.name} is ordered after unknown pass {other!r}"
            assert names.index(other) < names.index(spec.name)
        for other in spec.before:
            assert other in names, f"{spec.name} is ordered before unknown pass {other!r}"
            assert names.index(spec.name) < names.index(other)


def test_topological_order_breaks_ties_by_name_and_honours_before():
    reg = {s.name: s for s in (_spec("c", after=("a",)), _spec("b"), _spec("a", before=("b",)), _spec("d"))}
    assert [s.name for s in pass_manager._ordered(reg)] == ["a", "b", "c", "d"]


def test_a_cycle_is_refused_with_the_passes_named():
    reg = {s.name: s for s in (_spec("x", after=("y",)), _spec("y", after=("x",)), _spec("z"))}
    with pytest.raises(RewriteError, match=r"cycle among \['x', 'y'\]"):
        pass_manager._ordered(reg)


def test_a_second_registration_under_one_name_raises():
    with pytest.raises(RewriteError, match="'freeze' is already registered"):
        @register_pass("*")
        def freeze(gm, ctx):  # noqa: ARG001
            return PassResult(gm, False)


def test_a_registered_pass_runs_where_its_constraints_put_it():
    seen = []

    @register_pass("*", after=("swap_linear",), before=("freeze",), name="probe_between")
    def probe(gm, ctx):
        seen.append([s.name for s in registered_passes()])
        return PassResult(gm, False)

    try:
        model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
        peftfx.compile(model, {"targets": ["0"], "lora": {"r": 2}}, example_inputs=(torch.randn(2, 8),))
        order = seen[0]
        assert order.index("swap_linear") < order.index("probe_between") < order.index("freeze")
    finally:
        unregister_pass("probe_between")


def test_replacements_come_from_fx_provenance():
    """The report's [old, new] pairs are read from node.meta['from_node'], written by torch.fx."""
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    gm = peftfx.compile(model, {"targets": ["0", "2"], "quant": {"format": "nf4"}},
                        example_inputs=(torch.randn(2, 8),))
    swap = next(r for r in peftfx.report(gm) if r.name == "swap_linear")
    assert len(swap.replaced) == 2 and all(old in swap.erased and new in swap.created for old, new in swap.replaced)
    for old, new in swap.replaced:
        node = next(n for n in gm.graph.nodes if n.name == new)
        assert any(s.name == old and s.pass_name == "swap_linear" for s in node.meta["from_node"])
