"""Error hierarchy: every failure a user can cause derives from :class:`PeftfxError`.

Messages name the offending layer / key / value and say what to do about it.
"""
from __future__ import annotations

__all__ = ["PeftfxError", "PlanError", "TraceError", "RewriteError", "KernelError", "CheckpointError",
           "ScalingError"]


class PeftfxError(Exception):
    """Base class of every error peftfx raises on bad input."""


class PlanError(PeftfxError, ValueError):
    """The plan is malformed or does not fit the model (bad value, pattern matching nothing)."""


class ScalingError(PlanError):
    """Bad measurements for :mod:`peftfx.scaling` (sizes, losses, a runs CSV, a scratch curve).

    A PlanError subclass so ``except PlanError``/``ValueError`` and the CLI's exit code 2 keep
    working, but its own class because the offending input is measured data, not a plan.
    """


class TraceError(PeftfxError, RuntimeError):
    """The model could not be captured into a graph."""


class RewriteError(PeftfxError, RuntimeError):
    """A pass could not rewrite the graph (missing attention, unsupported node, ...)."""


class KernelError(PeftfxError, ValueError):
    """A kernel got inputs it cannot take (dtype, shape, NaN/Inf, inconsistent metadata)."""


class CheckpointError(PeftfxError, ValueError):
    """A checkpoint or adapter file is corrupt or does not match the compiled model."""
