"""Effective data: how much from-scratch data a fine-tuned model's loss is worth (Hernandez et al. 2021).

A *scratch curve* is the held-out loss of models trained from scratch on the target distribution at
several dataset sizes D (tokens): points ``(D, loss)`` with the loss falling as D grows. The
*effective data* D_E of a fine-tuned model is the from-scratch data that would reach the same loss;
D_T = D_E - D_F is what pre-training contributed ("effective data transferred"). D_T <= 0 means
pre-training did not help or hurt ("ossification").

D_E is read off the scratch curve by piecewise-linear interpolation in (log D, log loss): exact for a
power law ``loss = c * D**-a`` (a straight line in log-log), and the natural reading of a curve
measured at log-spaced sizes. A loss outside the curve's range cannot be interpolated; it raises
unless ``extrapolate=True``, which continues the first/last segment's power law.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from peftfx.errors import ScalingError

__all__ = ["ScratchCurve", "effective_data", "effective_data_transferred", "lower_envelope"]


def check_positive(name: str, value: object, where: str = "") -> float:
    """``value`` as a finite float > 0, else ScalingError naming ``name`` (and ``where``) and the value."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ScalingError(f"{name}{where} must be a number > 0, got {value!r}") from None
    if not math.isfinite(number) or number <= 0:
        raise ScalingError(f"{name}{where} must be a finite number > 0, got {value!r}: sizes and losses live "
                           "in log space (a loss is in nats or bits, a size counts tokens)")
    return number


def _points(curve: object) -> list[tuple[float, float]]:
    """``[(D, loss), ...]`` from a mapping ``{D: loss}``, a ScratchCurve or an iterable of pairs."""
    if isinstance(curve, ScratchCurve):
        return list(zip(curve.sizes, curve.losses))
    items = curve.items() if isinstance(curve, Mapping) else curve
    if not isinstance(items, Iterable) or isinstance(items, (str, bytes)):
        raise ScalingError(f"scratch curve must be a mapping {{D: loss}} or (D, loss) pairs, got {type(curve).__name__}")
    out = []
    for i, item in enumerate(items):
        try:
            size, loss = item
        except (TypeError, ValueError):
            raise ScalingError(f"scratch curve point {i} must be a (D, loss) pair, got {item!r}") from None
        out.append((check_positive("scratch curve size D", size, f" (point {i})"),
                    check_positive("scratch curve loss", loss, f" (point {i}, D={size!r})")))
    return out


@dataclass(frozen=True)
class ScratchCurve:
    """A validated from-scratch data -> loss curve: sizes strictly increasing, losses strictly decreasing.

    Build with :meth:`of` from a mapping ``{D: loss}`` or ``(D, loss)`` pairs in any order.
    """

    sizes: tuple[float, ...]
    losses: tuple[float, ...]

    @classmethod
    def of(cls, curve: object) -> "ScratchCurve":
        if isinstance(curve, ScratchCurve):
            return curve
        points = sorted(_points(curve))
        if len(points) < 2:
            raise ScalingError(f"a scratch curve needs at least 2 (D, loss) points to interpolate, got {len(points)}")
        for (d0, l0), (d1, l1) in zip(points, points[1:]):
            if d0 == d1:
                raise ScalingError(f"scratch curve has two points at D={d0:g} (losses {l0:g} and {l1:g}): "
                                   "average repeated runs first")
            if l1 >= l0:
                raise ScalingError(
                    f"scratch curve is not decreasing: loss {l1:g} at D={d1:g} is not below {l0:g} at D={d0:g}; "
                    "more data must lower the from-scratch loss for D_E to be defined. Train the larger run "
                    "longer, or drop the points that do not improve (peftfx.scaling.lower_envelope)")
        return cls(tuple(d for d, _ in points), tuple(loss for _, loss in points))

    @property
    def loss_range(self) -> tuple[float, float]:
        """``(lowest, highest)`` loss on the curve: the losses D_E can be interpolated for."""
        return self.losses[-1], self.losses[0]

    def data_for_loss(self, loss: float, *, extrapolate: bool = False) -> float:
        """D at which the curve reaches ``loss`` (log-log interpolation; see the module docstring)."""
        loss = check_positive("fine-tuned loss", loss)
        low, high = self.loss_range
        if not low <= loss <= high and not extrapolate:
            side = "below the lowest" if loss < low else "above the highest"
            edge = low if loss < low else high
            raise ScalingError(
                f"fine-tuned loss {loss:g} is {side} from-scratch loss {edge:g} (scratch curve covers losses "
                f"{low:g}..{high:g} at D={self.sizes[0]:g}..{self.sizes[-1]:g}): D_E cannot be interpolated. "
                "Measure the scratch curve further, or pass extrapolate=True to continue its end segment's power law")
        # segment i joins points i and i+1; losses fall along it. Out of range: the end segment.
        i = 0
        while i < len(self.losses) - 2 and loss < self.losses[i + 1]:
            i += 1
        x0, x1 = math.log(self.sizes[i]), math.log(self.sizes[i + 1])
        y0, y1 = math.log(self.losses[i]), math.log(self.losses[i + 1])
        return math.exp(x0 + (math.log(loss) - y0) * (x1 - x0) / (y1 - y0))


def lower_envelope(curve: object) -> ScratchCurve:
    """The points of ``curve`` whose loss is below every smaller-D point's loss, as a ScratchCurve.

    A larger dataset can always be cut down to a smaller one, so the best achievable from-scratch loss
    never rises with D; a point that does not improve on a smaller D is noise (or too little training)
    and makes D_E ambiguous. Use this explicitly: :class:`ScratchCurve` itself rejects such curves.
    """
    best: dict[float, float] = {}
    for size, loss in _points(curve):  # repeated runs at one D: the best of them
        best[size] = min(loss, best.get(size, math.inf))
    kept: list[tuple[float, float]] = []
    for size in sorted(best):
        if not kept or best[size] < kept[-1][1]:
            kept.append((size, best[size]))
    return ScratchCurve.of(kept)


def effective_data(finetuned_loss: float, scratch_curve: object, *, extrapolate: bool = False) -> float:
    """D_E: the from-scratch dataset size whose loss equals ``finetuned_loss``.

    Args:
        finetuned_loss: held-out loss of the fine-tuned model (same units and eval set as the curve).
        scratch_curve: ``{D: loss}``, ``(D, loss)`` pairs or a :class:`ScratchCurve`.
        extrapolate: allow losses outside the curve's range (continues the end segment's power law).
    """
    return ScratchCurve.of(scratch_curve).data_for_loss(finetuned_loss, extrapolate=extrapolate)


def effective_data_transferred(finetuned_loss: float, scratch_curve: object, finetune_size: float, *,
                               extrapolate: bool = False) -> float:
    """D_T = D_E - D_F: the effective data pre-training contributed (<= 0: no transfer / ossification).

    ``finetune_size`` is D_F, the fine-tuning dataset size in the curve's units (tokens).

    >>> curve = {d: 10 * d ** -0.25 for d in (1e3, 1e4, 1e5)}
    >>> round(effective_data_transferred(10 * 2e4 ** -0.25, curve, 5e3))
    15000
    """
    d_f = check_positive("fine-tuning size D_F", finetune_size)
    return effective_data(finetuned_loss, scratch_curve, extrapolate=extrapolate) - d_f
