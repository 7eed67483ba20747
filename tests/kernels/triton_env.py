"""Where the Triton tests run: in the interpreter on the CPU (tests/conftest.py sets
TRITON_INTERPRET=1 before triton is imported when there is no GPU), or natively on CUDA when the
environment sets TRITON_INTERPRET=0 (bench/gpu_check.sh does)."""
from __future__ import annotations

import os

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"
NO_DEVICE = not INTERPRET and not torch.cuda.is_available()
NO_DEVICE_REASON = "native Triton needs CUDA (set TRITON_INTERPRET=1 to run on the CPU)"
