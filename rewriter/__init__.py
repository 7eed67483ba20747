"""peftfx: compile a PyTorch model plus a plan into a trainable torch.fx GraphModule.

Public names are re-exported lazily so that ``import peftfx.kernels`` stays light (no
transformers, no fx passes).
"""
from __future__ import annotations

import importlib
from typing import Any

from peftfx.errors import CheckpointError, KernelError, PeftfxError, PlanError, RewriteError, TraceError

__version__ = "0.1.0"

_LAZY = {
    "compile": "peftfx.api",
    "trainable_parameters": "peftfx.api",
    "report": "peftfx.api",
    "Plan": "peftfx.plan",
    "QuantSpec": "peftfx.plan",
    "LoRASpec": "peftfx.plan",
    "PrefixTuningSpec": "peftfx.plan",
    "PromptTuningSpec": "peftfx.plan",
    "AdapterSpec": "peftfx.plan",
    # adapters that travel (peftfx.io)
    "save_adapters": "peftfx.io.checkpoint",
    "load_adapters": "peftfx.io.checkpoint",
    "save_model": "peftfx.io.checkpoint",
    "load_model": "peftfx.io.checkpoint",
    "export_peft": "peftfx.io.peft_io",
    "import_peft": "peftfx.io.peft_io",
    "merge": "peftfx.io.merging",
    "load": "peftfx.io.streaming",
    "unmerge": "peftfx.io.merging",
    # one base, many adapters (peftfx.serve)
    "compile_multi": "peftfx.serve.multi_adapter",
    "adapter_index": "peftfx.serve.multi_adapter",
    "add_adapter": "peftfx.serve.multi_adapter",
    "remove_adapter": "peftfx.serve.multi_adapter",
    "generate": "peftfx.serve.generation",
}

__all__ = [
    "PeftfxError",
    "PlanError",
    "TraceError",
    "RewriteError",
    "KernelError",
    "CheckpointError",
    "__version__",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        try:
            module = importlib.import_module(_LAZY[name])
        except ModuleNotFoundError as exc:
            if exc.name != _LAZY[name]:
                raise
            raise AttributeError(f"peftfx.{name} is not available in this build ({exc.name} missing)") from None
        value = getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'peftfx' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
