"""emit: dead-code elimination, drop attributes nothing reads, recompile, return the trainable module.

Separate from the passes so every plan ends the same way: after emit the GraphModule holds only
tensors its graph reads (released dense weights are gone for good), is in the source model's
train/eval mode, carries the plan and the pass report in ``gm.meta``, pickles with its graph and
refuses dtype casts its graph cannot run (:mod:`peftfx.compiled_module`).
"""
from __future__ import annotations

from torch.fx import GraphModule

from peftfx.compiled_module import install
from peftfx.graph import delete_attr

__all__ = ["emit", "REPORT_KEY", "PLAN_KEY"]

REPORT_KEY = "peftfx.report"
PLAN_KEY = "peftfx.plan"


def _drop_unread_tensors(gm: GraphModule) -> list[str]:
    """Delete parameters/buffers that no ``get_attr`` reads and no called module owns."""
    read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    called = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    dropped = []
    names = [n for n, _ in gm.named_parameters(remove_duplicate=False)]
    names += [n for n, _ in gm.named_buffers(remove_duplicate=False)]
    for name in names:
        if name in read or any(name.startswith(c + ".") for c in called):
            continue
        delete_attr(gm, name)
        dropped.append(name)
    return dropped


def emit(gm: GraphModule, *, training: bool, plan, records: list) -> GraphModule:
    """Finish a rewritten graph: DCE, drop unread tensors and modules, recompile, restore mode."""
    gm.graph.eliminate_dead_code()
    dropped = _drop_unread_tensors(gm)
    gm.delete_all_unused_submodules()
    gm.graph.lint()
    gm.recompile()
    gm.train(training)
    gm.meta[PLAN_KEY] = plan
    gm.meta[REPORT_KEY] = list(records)
    gm.meta["peftfx.dropped"] = dropped
    return install(gm)
