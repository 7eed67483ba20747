"""Compiled tiny models shared by the adapters-that-travel tests (checkpoint, peft_io, merge).

Compiling costs seconds, so each (model, format) is compiled once per test session and every
test works on a deep copy with random non-zero LoRA tensors.
"""
from __future__ import annotations

import copy
import functools

import torch

import peftfx
from tests.model_zoo import make_case

__all__ = ["compiled", "fresh", "plan_for", "randomize", "same_bytes", "PROMPT_TOKENS"]


PROMPT_TOKENS = 3


def plan_for(name: str, fmt: str) -> dict:
    """LoRA r=4 on attention with base ``fmt`` ("none" | "nf4"), or "prompt" / "prefix" tuning."""
    if fmt in ("prompt", "prefix"):
        return {fmt: {"tokens": PROMPT_TOKENS}}
    targets = make_case(name).attn_targets
    plan = {"targets": targets, "lora": {"r": 4, "alpha": 8}}
    if fmt != "none":
        plan["quant"] = {"format": fmt, "double_quant": True}
    return plan


@functools.lru_cache(maxsize=None)
def compiled(name: str, fmt: str):
    """``(gm, case)`` for a tiny ``name`` model compiled with :func:`plan_for` (cached)."""
    case = make_case(name)
    gm = peftfx.compile(case.model, plan_for(name, fmt), example_inputs=case.inputs)
    return gm, case


def randomize(gm, seed: int = 1) -> None:
    """Non-zero A and B so LoRA changes the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in peftfx.trainable_parameters(gm).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def fresh(name: str, fmt: str, seed: int = 1):
    """A deep copy of the cached compile with random LoRA tensors, and its case."""
    gm, case = compiled(name, fmt)
    gm = copy.deepcopy(gm)
    randomize(gm, seed)
    return gm, case


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit equality (packed codes can read as NaN, so torch.equal is not enough)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.detach().reshape(-1).view(torch.uint8), b.detach().reshape(-1).view(torch.uint8))
