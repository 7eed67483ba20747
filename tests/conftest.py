"""Shared test setup: deterministic seeds and hypothesis profiles ("ci" when $CI is set, else "dev")."""
from __future__ import annotations

import os
import random

# Triton reads TRITON_INTERPRET when it is first imported, and any test module (or bitsandbytes)
# may import it first: without a GPU, every Triton test runs in the interpreter, so set it here,
# before anything else is imported. On a GPU machine the kernels run natively.
if os.environ.get("TRITON_INTERPRET") is None:
    import torch as _torch

    if not _torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch
from hypothesis import settings

settings.register_profile("ci", deadline=None, derandomize=True, max_examples=50)
settings.register_profile("dev", deadline=None, max_examples=25)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same RNG state."""
    torch.manual_seed(0)
    random.seed(0)
    yield
