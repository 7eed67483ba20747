"""Shared test setup: deterministic seeds and hypothesis profiles ("ci" when $CI is set, else "dev")."""
from __future__ import annotations

import os
import random

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
