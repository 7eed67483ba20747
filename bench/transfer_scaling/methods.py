"""The three ways to fine-tune a pre-trained tiny model: full, LoRA and NF4 QLoRA (both compiled by peftfx).

LoRA and QLoRA put rank-8 adapters (alpha 16, no dropout) on all seven decoder projections; QLoRA
also stores those projections in NF4 (block 64, double quantization, fp32 compute). Both also train
the byte embedding (tied with the output head; ``train_modules``, PEFT's ``modules_to_save``): bytes
such as ``_``, ``#``, ``{`` barely occur in Shakespeare, so for Python they are new tokens, which a
PEFT user trains. Norms stay frozen. ``peftfx.compile`` runs once per
(size, method); between dataset sizes the adapters are reset to their initial values (A random,
B zero), which is the compiled model straight after compile.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch

import peftfx

__all__ = ["METHODS", "PLANS", "Prepared", "prepare"]

METHODS = ("full", "lora", "qlora")
_PROJ = ["*.q_proj", "*.k_proj", "*.v_proj", "*.o_proj", "*.gate_proj", "*.up_proj", "*.down_proj"]
_LORA = {"r": 8, "alpha": 16, "dropout": 0.0}
_EMBED = ["model.embed_tokens"]  # tied with lm_head: one 256 x hidden matrix
PLANS = {
    "lora": {"targets": _PROJ, "train_modules": _EMBED, "lora": _LORA},
    "qlora": {"targets": _PROJ, "train_modules": _EMBED, "lora": _LORA,
              "quant": {"format": "nf4", "block_size": 64, "double_quant": True, "compute_dtype": "float32"}},
}


@dataclass
class Prepared:
    """A model ready to fine-tune: ``reset()`` restores its starting point (call before every run)."""

    model: torch.nn.Module
    params: list[torch.nn.Parameter]
    reset: Callable[[], None]
    trainable: int


def _snapshot(named: dict[str, torch.Tensor]) -> Callable[[], None]:
    start = {k: v.detach().clone() for k, v in named.items()}

    @torch.no_grad()
    def reset() -> None:
        for k, v in named.items():
            v.copy_(start[k])

    return reset


def prepare(method: str, pretrained: torch.nn.Module, seq: int) -> Prepared:
    """``method`` applied to a copy of ``pretrained`` (which is left untouched)."""
    model = copy.deepcopy(pretrained)
    if method == "full":
        named = dict(model.named_parameters())
        model.train()
    elif method in PLANS:
        # a contiguous example (a sliced view makes torch.export record its strides, see the issue 17 report)
        example = {"input_ids": torch.randint(0, 256, (2, seq), generator=torch.Generator().manual_seed(0))}
        model = peftfx.compile(model.eval(), PLANS[method], example_inputs=example, snapshots=False).train()
        named = peftfx.trainable_parameters(model)
    else:
        raise ValueError(f"unknown method {method!r}; one of {METHODS}")
    state = {**named, **dict(model.named_buffers())}  # buffers too: nothing may carry over between runs
    params = list(named.values())
    return Prepared(model, params, _snapshot(state), sum(p.numel() for p in params))
