"""Inspection data: what each pass did to a compiled module, as JSON-able dicts and readable text.

:func:`build_report` turns ``peftfx.report(gm)`` (one :class:`~peftfx.pass_manager.PassRecord`
per pass) into a versioned dict: per pass the nodes created / erased / replaced, each swapped
target with its weight shape, activation shapes, format, bits per weight and kernel; which plan
patterns selected which layers (and which selected nothing); and the trainable parameter count.
:func:`pass_diff` is a unified diff of one pass's graph code, :func:`write_dot` a Graphviz file
written without any graphviz dependency (``.svg`` goes through ``torch.fx``'s drawer and pydot).
"""
from __future__ import annotations

import difflib
from typing import Any

from torch import nn
from torch.fx import GraphModule

from peftfx.api import report
from peftfx.errors import PeftfxError, PlanError
from peftfx.graph import PASS_KEY
from peftfx.kernels.backend import backend_for
from peftfx.plan import match

__all__ = ["REPORT_SCHEMA_VERSION", "build_report", "pass_diff", "render_report",
           "write_dot", "write_graph"]

REPORT_SCHEMA_VERSION = 1
def _shape(val: Any) -> list | None:
    shape = getattr(val, "shape", None)
    return None if shape is None else [int(str(d)) if str(d).isdigit() else str(d) for d in shape]


def _target_row(gm: GraphModule, note: dict) -> dict:
    """A swap note plus the activation shapes of its call and the kernel that runs it."""
    row = dict(note)
    calls = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == note["target"]]
    if calls:
        node = calls[0]
        x = node.args[0] if node.args else None
        row["input_shape"] = _shape(getattr(x, "meta", {}).get("val"))
        row["output_shape"] = _shape(node.meta.get("val"))
        row["calls"] = len(calls)
    try:
        module = gm.get_submodule(note["target"])
    except AttributeError:
        module = None
    if module is not None and getattr(module, "weight", None) is not None:
        row["kernel"] = f"{note.get('kernel', type(module).__name__)} -> peftfx::qlora_linear " \
                        f"({backend_for(module.weight)})"
        if row.get("bits_per_param") is None:
            qw = module.quantized_weight() if hasattr(module, "quantized_weight") else None
            if qw is not None:
                row["bits_per_param"] = round(qw.bits_per_param(), 4)
    return row


def _parameter_counts(gm: nn.Module) -> tuple[int, int]:
    """(trainable, total) where a quantized layer counts its ``out x in`` weights, as in the source model."""
    trainable = sum(p.numel() for p in gm.parameters() if p.requires_grad)
    total = sum(p.numel() for p in gm.parameters())
    for m in gm.modules():
        if hasattr(m, "quantized_weight") and hasattr(m, "out_features"):
            total += m.out_features * m.in_features + (m.bias.numel() if getattr(m, "bias", None) is not None else 0)
    return trainable, total


def build_report(gm: GraphModule, *, model: str | None = None) -> dict:
    """The inspection report of a module compiled by :func:`peftfx.compile` (JSON-serializable).

    Raises:
        PlanError: ``gm`` was not produced by ``peftfx.compile``.
    """
    records = report(gm)
    plan = gm.meta.get("peftfx.plan")
    passes, targets = [], []
    for rec in records:
        rows = [_target_row(gm, n) for n in rec.notes if "target" in n]
        targets += [r["target"] for r in rows]
        passes.append({
            "name": rec.name, "section": rec.section, "modified": rec.modified, "seconds": round(rec.seconds, 4),
            "created": list(rec.created), "erased": list(rec.erased), "replaced": [list(pair) for pair in rec.replaced],
            "targets": rows, "notes": [n for n in rec.notes if "target" not in n],
        })
    patterns = []
    if plan is not None:
        for pattern, where in plan.all_patterns():
            hits = [t for t in targets if match(pattern, t)]
            patterns.append({"pattern": pattern, "from": where, "matched": len(hits)})
    trainable, total = _parameter_counts(gm)
    return {
        "schema": "peftfx.inspect",
        "schema_version": REPORT_SCHEMA_VERSION,
        "model": model or type(gm).__name__,
        "plan": None if plan is None else plan.to_dict(),
        "passes": passes,
        "patterns": patterns,
        "unmatched_patterns": [p["pattern"] for p in patterns if not p["matched"]],
        "trainable": {"parameters": trainable, "total": total,
                      "percent": round(100.0 * trainable / total, 4) if total else 0.0},
        "dropped_attributes": list(gm.meta.get("peftfx.dropped", [])),
    }


def pass_diff(gm: GraphModule, name: str, *, context: int = 2) -> str:
    """Unified diff of the graph code before and after pass ``name`` (PlanError if it did not run)."""
    records = report(gm)
    for rec in records:
        if rec.name == name:
            if not rec.code_before and not rec.code_after:
                return f"(no snapshots kept for pass {name}: compile with snapshots=True)"
            diff = difflib.unified_diff(rec.code_before.splitlines(), rec.code_after.splitlines(),
                                        f"before {name}", f"after {name}", lineterm="", n=context)
            return "\n".join(diff) or f"(pass {name} did not change the graph code)"
    ran = ", ".join(r.name for r in records) or "none"
    raise PlanError(f"pass {name!r} did not run for this plan; passes that ran: {ran}")


def _fmt_shape(shape: list | None) -> str:
    return "?" if shape is None else "[" + ", ".join(str(d) for d in shape) + "]"


def render_report(rep: dict) -> str:
    """Human-readable text of :func:`build_report`'s dict."""
    out = [f"peftfx inspect: {rep['model']}"]
    for p in rep["passes"]:
        out.append(f"\npass {p['name']} (plan section {p['section']}, {p['seconds'] * 1000:.0f} ms): "
                   f"{len(p['created'])} nodes created, {len(p['erased'])} erased, {len(p['replaced'])} replaced")
        for old, new in p["replaced"][:8]:
            out.append(f"  replaced {old} -> {new}")
        if len(p["replaced"]) > 8:
            out.append(f"  ... and {len(p['replaced']) - 8} more")
        for t in p["targets"]:
            bits = f", {t['bits_per_param']:.3f} bits/param" if t.get("bits_per_param") else ""
            r = f", r={t['r']}" if t.get("r") else ""
            out.append(f"  {t['target']}: weight {_fmt_shape(t.get('shape'))}, x {_fmt_shape(t.get('input_shape'))}"
                       f" -> {_fmt_shape(t.get('output_shape'))}, format {t.get('format')}{bits}{r}, "
                       f"kernel {t.get('kernel')}")
        for note in p["notes"]:
            out.append("  " + ", ".join(f"{k}={v}" for k, v in note.items()))
    if rep["patterns"]:
        out.append("\npatterns:")
        for p in rep["patterns"]:
            out.append(f"  {p['pattern']!r} (from {p['from']}): {p['matched']} layer(s)")
    out.append("patterns that matched nothing: " + (", ".join(map(repr, rep["unmatched_patterns"])) or "none"))
    t = rep["trainable"]
    out.append(f"trainable parameters: {t['parameters']:,} of {t['total']:,} ({t['percent']:.4f}%)")
    return "\n".join(out)


def _dot_quote(s: str) -> str:
    """A DOT string literal; real newlines become DOT's ``\\n`` line breaks."""
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def write_dot(gm: GraphModule, path: str) -> None:
    """A Graphviz ``.dot`` file of ``gm``'s graph; nodes a pass created are filled (no pydot needed)."""
    lines = ["digraph peftfx {", "  node [shape=box, fontname=monospace, fontsize=10];"]
    for n in gm.graph.nodes:
        target = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target))
        label = f"{n.name}\n{n.op}: {target}"
        val = n.meta.get("val")
        if getattr(val, "shape", None) is not None:
            label += f"\n{_fmt_shape(_shape(val))}"
        style = ""
        if n.meta.get(PASS_KEY):
            style = f', style=filled, fillcolor="#ffd27f", tooltip={_dot_quote(n.meta[PASS_KEY])}'
        lines.append(f"  {_dot_quote(n.name)} [label={_dot_quote(label)}{style}];")
        for src in n.all_input_nodes:
            lines.append(f"  {_dot_quote(src.name)} -> {_dot_quote(n.name)};")
    lines.append("}")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def write_graph(gm: GraphModule, path: str) -> None:
    """Render the rewritten graph to ``.dot`` (always available) or ``.svg`` (needs pydot + graphviz)."""
    if path.endswith(".dot"):
        write_dot(gm, path)
        return
    if not path.endswith(".svg"):
        raise PlanError(f"--graph {path!r}: use a .svg or .dot file name")
    try:
        import pydot  # noqa: F401
        from torch.fx.passes.graph_drawer import FxGraphDrawer
    except ImportError:
        raise PeftfxError(f"--graph {path}: SVG rendering needs pydot and graphviz, which are not installed; "
                          "run `pip install pydot` (and install graphviz's `dot`), or write a .dot file "
                          "instead (--graph graph.dot) and render it elsewhere") from None
    try:
        FxGraphDrawer(gm, "peftfx").get_main_dot_graph().write_svg(path)
    except Exception as exc:  # noqa: BLE001 - pydot raises plain errors when `dot` is missing
        raise PeftfxError(f"--graph {path}: graphviz failed ({type(exc).__name__}: {exc}); install graphviz's "
                          "`dot` or write a .dot file instead") from None
