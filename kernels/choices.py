"""The names a plan may give the kernels: storage formats, compute dtypes, LoRA initializations.

Plain strings with no torch import, so that :mod:`peftfx.plan` (which validates a plan before
torch is loaded) and the kernels read one list. :mod:`peftfx.kernels.formats` and
:mod:`peftfx.kernels.dtypes` attach the meaning (layouts, torch dtypes) to these names.
"""
from __future__ import annotations

__all__ = ["FORMATS", "COMPUTE_DTYPE_NAMES", "COMPUTE_DTYPE_CHOICES", "LORA_INITS"]

# "none" keeps a weight dense (LoRA on an unquantized layer); the rest are QuantizedWeight layouts.
FORMATS = ("none", "nf4", "fp4", "int8", "int8-zeropoint", "llm-int8")
# The base GEMM's dtype a plan may ask for; "auto" picks bf16 where the device has bf16 GEMM units.
COMPUTE_DTYPE_NAMES = ("float32", "float16", "bfloat16")
COMPUTE_DTYPE_CHOICES = ("auto", *COMPUTE_DTYPE_NAMES)
# How fresh LoRA factors start (PEFT's init_lora_weights=True / "gaussian"); B is zero either way.
LORA_INITS = ("default", "gaussian")
