"""Scaled dot-product attention that runs the causal kernel when its mask is exactly the causal mask.

``torch.export`` captures Hugging Face's mask construction as graph ops, so a compiled decoder
hands SDPA an explicit boolean ``[batch, 1, S, S]`` mask on every call, even when it is the plain
causal mask (no padding). Eager transformers drops such a mask and calls SDPA with
``is_causal=True``. With a boolean mask, aten turns it into a float ``[batch, 1, S, S]`` tensor on
every call (16 MiB at 2048 tokens, quadratic in S, and one more per block recompute) and the CPU
flash kernel computes every key block; with ``is_causal`` it skips the blocks above the diagonal
(fwd + bwd of one Llama-1024 layer's attention at 2048 tokens, one thread: 0.98 s -> 0.55 s) and
the results are the same (the skipped blocks only add exact zeros; bitwise equal in our checks).

:func:`scaled_dot_product_attention` (the ``causal_attention`` pass puts it in place of
``aten.scaled_dot_product_attention``) checks the mask on each call: a boolean square mask equal to
the lower triangle selects ``is_causal=True`` without the mask; anything else (padding, prefixes,
sliding windows, decode steps) calls aten with the mask as given. The check is one ``[S, S]``
comparison per mask: every block of a step, and a checkpointed block's recompute, slice their mask
from the same tensor the root built, so the answer is reused while that base tensor is alive and
the view is the same window of it, unchanged (same ``_version``, which views share and in-place
writes bump): a step compares once, not twice per block (8 x 3.5 ms at 2048 tokens in the 4-layer
bench). On fake tensors (the memory estimate) values are unknown: ``size_only_mask``
(set by the pass when the mask is computed from sizes only, no input data) picks the causal path,
else the masked one.
"""
from __future__ import annotations

import threading
import weakref

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

__all__ = ["scaled_dot_product_attention", "is_causal_mask"]


_LAST_CHECK = threading.local()  # .entry: (weakref to the mask's base tensor, the view's key, the answer)


def _view_key(mask: Tensor) -> tuple:
    # data_ptr too: ``base.data = other`` swaps the memory without moving the version
    return mask.data_ptr(), mask.storage_offset(), tuple(mask.shape), mask.stride(), mask._version


def is_causal_mask(mask: Tensor | None, q_len: int, k_len: int, size_only_mask: bool = False) -> bool:
    """Whether boolean ``mask`` (``[..., q_len, k_len]``) is the causal lower triangle in every batch and head.

    The answer for the last mask checked (per thread) is kept while that very tensor is alive and not
    written in place (its ``_version``), so the same mask sliced by every block costs one comparison."""
    if mask is None or mask.dtype != torch.bool or q_len != k_len or tuple(mask.shape[-2:]) != (q_len, k_len):
        return False
    if is_fake(mask):
        return size_only_mask
    cached = not mask.is_inference()  # inference tensors keep no version counter
    base = mask if mask._base is None else mask._base  # views: the tensor that owns the memory
    entry = getattr(_LAST_CHECK, "entry", None)
    if cached and entry is not None and entry[0]() is base and entry[1] == _view_key(mask):
        return entry[2]
    tril = torch.ones(q_len, k_len, dtype=torch.bool, device=mask.device).tril_()
    causal = bool(torch.equal(mask, tril.expand_as(mask)))
    if cached:
        _LAST_CHECK.entry = (weakref.ref(base), _view_key(mask), causal)
    return causal


def scaled_dot_product_attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None,
                                 dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
                                 enable_gqa: bool = False, *, size_only_mask: bool = False) -> Tensor:
    """``aten.scaled_dot_product_attention`` with the same arguments; a mask that is exactly causal
    becomes ``is_causal=True`` (see the module docstring). Shapes: query ``[B, H, S, D]``, key and
    value ``[B, H_kv, S_kv, D]`` -> ``[B, H, S, D]``."""
    if isinstance(query, torch.fx.Proxy):  # a GraphModule re-traced from its code (unpickling): stay one call
        kwargs = dict(query=query, key=key, value=value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                      scale=scale, enable_gqa=enable_gqa, size_only_mask=size_only_mask)
        return query.tracer.create_proxy("call_function", scaled_dot_product_attention, (), kwargs)
    sdpa = torch.ops.aten.scaled_dot_product_attention.default
    if not is_causal and is_causal_mask(attn_mask, query.shape[-2], key.shape[-2], size_only_mask):
        return sdpa(query, key, value, None, dropout_p, True, scale=scale, enable_gqa=enable_gqa)
    return sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)
