"""What an estimate returns: the estimate (per-configuration :class:`Breakdown`s) and its text rendering."""
from __future__ import annotations

from dataclasses import dataclass, field

from peftfx.memory.breakdown import Breakdown
from peftfx.memory.storage import format_bytes

__all__ = ["Breakdown", "Estimate", "render_estimate", "SCHEMA_VERSION"]

SCHEMA_VERSION = 1  # additive keys (memory, fit, offloaded) keep version 1: every old key means the same


@dataclass
class Estimate:
    """Before (full fine-tune) and after (the compiled plan) memory of one training step.

    ``memory`` holds the plan's checkpoint / offload settings as compiled (``{}`` without a
    ``[memory]`` section); ``fit`` what ``--fit`` found (None unless asked): every setting tried with
    its peak, the cheapest one that fits, and the largest batch that fits with it.
    """

    model: str
    batch: int | None
    seq: int | None
    optimizer: str
    dtype: str
    train_device: str
    before: Breakdown
    after: Breakdown | None
    layers: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    memory: dict = field(default_factory=dict)
    fit: dict | None = None

    def bits_per_param(self) -> dict[str, float]:
        """Storage bits per weight of the targeted layers, by format."""
        acc: dict[str, list[int]] = {}
        for row in self.layers:
            n = row["shape"][0] * row["shape"][1]
            a = acc.setdefault(row["format"], [0, 0])
            a[0] += row["weight_bytes"]
            a[1] += n
        return {k: round(8.0 * b / n, 3) for k, (b, n) in acc.items()}

    def to_dict(self) -> dict:
        return {"schema": "peftfx.estimate", "schema_version": SCHEMA_VERSION, "model": self.model,
                "batch": self.batch, "seq": self.seq, "optimizer": self.optimizer, "dtype": self.dtype,
                "train_device": self.train_device, "before": self.before.to_dict(),
                "after": None if self.after is None else self.after.to_dict(), "memory": self.memory,
                "fit": self.fit, "bits_per_param": self.bits_per_param(), "layers": self.layers,
                "notes": self.notes, "seconds": round(self.seconds, 2)}

    def render(self) -> str:
        """A human-readable table."""
        return render_estimate(self)


def render_estimate(est: Estimate) -> str:
    """Human-readable table of an :class:`Estimate`."""
    fb = format_bytes
    cols = [("before (full fine-tune)", est.before)] + ([("after (plan)", est.after)] if est.after else [])
    width = 30
    head = f"peftfx estimate: {est.model}, batch {est.batch} x seq {est.seq}, {est.optimizer}, " \
           f"{est.dtype}, {est.train_device} optimizer step"
    lines = [head, f"{'':<{width}}" + "".join(f"{c:>26}" for c, _ in cols)]

    def row(label: str, values: list[str]) -> None:
        lines.append(f"{label:<{width}}" + "".join(f"{v:>26}" for v in values))

    kinds = list(dict.fromkeys(k for _, b in cols for k in b.weights))
    row("weights", [fb(b.weight_bytes) for _, b in cols])
    for k in kinds:
        row(f"  {k}", [fb(b.weights[k]) if k in b.weights else "-" for _, b in cols])
    row("gradients", [fb(b.gradients) for _, b in cols])
    row("optimizer state", [fb(b.optimizer_state) for _, b in cols])
    row("activations (saved)", [fb(b.activations) for _, b in cols])
    row("total (sum of the above)", [fb(b.total) for _, b in cols])
    row("forward+backward peak", [fb(b.forward_backward_peak) for _, b in cols])
    row("optimizer step temporaries", [fb(b.optimizer_transient) for _, b in cols])
    if any(b.offloaded for _, b in cols):
        row("offloaded to host (not in peak)", [fb(b.offloaded) for _, b in cols])
    row("peak of one step", [fb(b.peak) for _, b in cols])
    row("trainable parameters", [f"{b.trainable_params:,}" for _, b in cols])
    if est.memory:
        lines.append("memory: " + ", ".join(f"{k} = {v!r}" for k, v in est.memory.items()))
    lines.append("largest single tensor:")
    for c, b in cols:
        lines.append(f"  {c}: {b.largest_tensor} ({fb(b.largest_tensor_bytes)})")
    for fmt, bits in est.bits_per_param().items():
        n = sum(r["shape"][0] * r["shape"][1] for r in est.layers if r["format"] == fmt)
        layers = sum(r["format"] == fmt for r in est.layers)
        lines.append(f"targeted layers in {fmt}: {layers} layers, {n:,} weights, {bits:.3f} bits/param")
    if est.fit is not None:
        lines += _render_fit(est.fit)
    lines += [f"note: {n}" for n in est.notes]
    lines.append(f"(estimated in {est.seconds:.1f} s on fake tensors; nothing was allocated)")
    return "\n".join(lines)


def _render_fit(fit: dict) -> list[str]:
    lines = [f"fit in {format_bytes(fit['budget'])} (batch {fit['batch']}):"]
    for s in fit["settings"]:
        mark = "fits" if s["fits"] else "too big"
        tiled = ", MLPs tiled" if s.get("tile_mlp") else ""
        lines.append(f"  checkpoint = {s['checkpoint']!r}, offload = {s['offload']!r}{tiled}: peak "
                     f"{format_bytes(s['peak'])} ({mark})")
    chosen = fit["chosen"]
    if chosen is None:
        lines.append("  nothing fits: lower the batch or sequence length, or use a smaller model")
    else:
        lines.append(f"  cheapest that fits: [memory] checkpoint = {chosen['checkpoint']!r}, "
                     f"offload = {chosen['offload']!r}; largest batch that fits with it: {fit['max_batch']}")
    return lines
