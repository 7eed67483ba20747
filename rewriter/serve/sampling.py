"""Next-token choice: greedy, or sampling with temperature / top-k / top-p (transformers' order and semantics).

``next_tokens(logits [B, V], settings, generator) -> [B]``. Warping follows transformers'
``TemperatureLogitsWarper`` -> ``TopKLogitsWarper`` -> ``TopPLogitsWarper`` (top-p keeps the smallest
set of tokens whose probability reaches ``top_p``, always at least one), then one
``torch.multinomial`` draw per row from ``generator``, so a seeded generator reproduces the tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from peftfx.serve.kv_cache import GenerationError

__all__ = ["Sampling", "next_tokens"]


@dataclass(frozen=True)
class Sampling:
    """How to pick the next token; validated on construction (a clear GenerationError naming the value)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self) -> None:
        if not self.do_sample:
            return
        if not self.temperature > 0:
            raise GenerationError(f"do_sample=True needs temperature > 0, got temperature={self.temperature!r} "
                                  "(use do_sample=False for greedy decoding)")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise GenerationError(f"top_p must be in (0, 1], got top_p={self.top_p!r}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise GenerationError(f"top_k must be a positive int, got top_k={self.top_k!r}")


def _warp(logits: Tensor, s: Sampling) -> Tensor:
    logits = logits / s.temperature
    if s.top_k is not None and s.top_k < logits.shape[-1]:
        kth = torch.topk(logits, s.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p is not None and s.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cumulative <= (1 - s.top_p)
        remove_sorted[..., -1:] = False  # keep at least the most likely token
        remove = remove_sorted.scatter(-1, order, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def next_tokens(logits: Tensor, s: Sampling, generator: torch.Generator | None = None) -> Tensor:
    """``[B, V]`` logits -> ``[B]`` int64 token ids (argmax, or one draw per row)."""
    logits = logits.float()
    if not s.do_sample:
        return logits.argmax(dim=-1)
    probs = _warp(logits, s).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
