"""peftfx: compile a PyTorch model plus a plan into a trainable torch.fx GraphModule."""
from __future__ import annotations

from peftfx.errors import CheckpointError, KernelError, PeftfxError, PlanError, RewriteError, TraceError

__version__ = "0.1.0"
__all__ = ["PeftfxError", "PlanError", "TraceError", "RewriteError", "KernelError", "CheckpointError", "__version__"]
