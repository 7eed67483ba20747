"""Modules the prefix- and prompt-tuning passes insert: learned K/V prefixes and soft prompts.

Shapes: B batch, S sequence, H query heads, n_kv key/value heads, D head dim, P prefix/prompt
tokens, L attention calls ("layers").

* :class:`PrefixKV` holds one attention call's prefix, ``key``/``value`` ``[n_kv, P, D]``, and
  concatenates it in front of that call's K/V ``[B, H_k, S, D]`` along the sequence axis
  (``repeat_interleave`` over heads when K/V arrive repeated for GQA, as ``repeat_kv`` does), and
  extends the attention mask by P leading columns the query can always see.
* :class:`PrefixEncoder` is Li & Liang's reparametrization: an embedding ``[P, n_kv*D]`` through a
  tanh MLP to every call's K/V at once, ``[P, L*2*n_kv*D]`` in PEFT's ``prompt_embeddings`` layout
  (``view(P, L*2, n_kv, D)``; row ``2l`` is call l's keys, ``2l+1`` its values).
  :class:`ReparamPrefixKV` reads its call's slice of that table; folding replaces both with plain
  :class:`PrefixKV` tensors.
* :class:`SoftPrompt` holds a prompt ``[P, hidden]`` and prepends it to token embeddings.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from peftfx.errors import KernelError

__all__ = [
    "PrefixKV",
    "PrefixEncoder",
    "ReparamPrefixKV",
    "SoftPrompt",
    "concat_prefix",
    "extend_attention_mask",
    "split_prompt_embeddings",
]


def concat_prefix(states: Tensor, prefix: Tensor, n_rep: int = 1) -> Tensor:
    """``[B, H, S, D]`` states with ``[n_kv, P, D]`` ``prefix`` in front: ``[B, H, P+S, D]``.

    ``H = n_kv * n_rep``; head ``h`` reads prefix head ``h // n_rep`` (``repeat_kv``'s order).
    """
    if n_rep > 1:
        prefix = prefix.repeat_interleave(n_rep, dim=0)
    prefix = prefix.to(states.dtype).unsqueeze(0).expand(states.shape[0], -1, -1, -1)
    return torch.cat([prefix, states], dim=-2)


def extend_attention_mask(
    attn_mask: Tensor | None, tokens: int, query: Tensor, key: Tensor, *, is_causal: bool = False
) -> Tensor | None:
    """The SDPA mask for keys ``[P prefix, S_k real]``: P visible columns in front.

    Args:
        attn_mask: SDPA's mask (bool: True = attend; float: added to scores), last dim S_k, or None.
        tokens: P.
        query: ``[..., L, D]``; key: ``[..., S_k, D]`` (real keys, before the prefix).
        is_causal: whether the call used SDPA's causal flag (top-left aligned on the real keys);
            it becomes an explicit bool mask ``[L, P+S_k]``: prefix columns True, real column j
            visible from row i iff j <= i (for L == S_k: aligned to the end of the keys).

    Returns:
        ``attn_mask`` with P leading columns (True for bool, 0.0 for float masks), the explicit
        causal mask, or None when there is no mask and no causal flag (the prefix needs none).
    """
    if is_causal:
        rows = torch.arange(query.shape[-2], device=query.device)
        cols = torch.arange(key.shape[-2], device=query.device)
        causal = cols.unsqueeze(0) <= rows.unsqueeze(1)
        return torch.nn.functional.pad(causal, (tokens, 0), value=True)
    if attn_mask is None:
        return None
    if attn_mask.shape[-1] != key.shape[-2]:  # a mask broadcast over keys: make the key dim real
        attn_mask = attn_mask.expand(*attn_mask.shape[:-1], key.shape[-2])
    value = True if attn_mask.dtype == torch.bool else 0.0
    return torch.nn.functional.pad(attn_mask, (tokens, 0), value=value)


class PrefixKV(nn.Module):
    """One attention call's learned prefix.

    Args:
        n_kv_heads: heads of the K/V projection (before any GQA repeat).
        tokens: P.
        head_dim: D.
        n_rep: query heads per K/V head when K/V reach SDPA already repeated (GQA), else 1.
        is_causal: whether the attention call used SDPA's causal flag (see
            :func:`extend_attention_mask`).
        key, value: initial ``[n_kv, P, D]`` tensors; default N(0, 0.02^2) (small, so the frozen
            model's behaviour barely changes before training).

    Forward: ``(query [B,H,L,D], key [B,H_k,S,D], value [B,H_k,S,D], attn_mask | None)`` ->
    ``(key [B,H_k,P+S,D], value [B,H_k,P+S,D], attn_mask [.., L, P+S] | None)``.
    """

    PEFTFX_TRAINABLE = ("key", "value")

    def __init__(self, n_kv_heads: int, tokens: int, head_dim: int, *, n_rep: int = 1, is_causal: bool = False,
                 key: Tensor | None = None, value: Tensor | None = None, device=None, dtype=None) -> None:
        super().__init__()
        self.n_kv_heads, self.tokens, self.head_dim = n_kv_heads, tokens, head_dim
        self.n_rep, self.is_causal = n_rep, is_causal
        shape = (n_kv_heads, tokens, head_dim)
        self.key = nn.Parameter(_init(key, shape, device, dtype))
        self.value = nn.Parameter(_init(value, shape, device, dtype))

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None):
        return attach_prefix(query, key, value, attn_mask, self.key, self.value, self.n_rep, self.is_causal)

    def extra_repr(self) -> str:
        return f"n_kv_heads={self.n_kv_heads}, tokens={self.tokens}, head_dim={self.head_dim}, n_rep={self.n_rep}"


def attach_prefix(query, key, value, attn_mask, prefix_key, prefix_value, n_rep, is_causal):
    """Shared body of :class:`PrefixKV` and :class:`ReparamPrefixKV`."""
    mask = extend_attention_mask(attn_mask, prefix_key.shape[1], query, key, is_causal=is_causal)
    return concat_prefix(key, prefix_key, n_rep), concat_prefix(value, prefix_value, n_rep), mask


def _init(t: Tensor | None, shape: tuple, device, dtype) -> Tensor:
    if t is None:
        return torch.randn(shape, device=device, dtype=dtype) * 0.02
    if tuple(t.shape) != tuple(shape):
        raise KernelError(f"prefix init has shape {tuple(t.shape)}, expected {tuple(shape)}")
    return t.detach().clone().to(device=device or t.device, dtype=dtype or t.dtype)


class PrefixEncoder(nn.Module):
    """Li & Liang reparametrization: ``tanh`` MLP from a prefix embedding to every call's K/V.

    ``forward() -> [P, L*2*n_kv*D]`` = ``W2 · tanh(W1 · E + b1) + b2`` with ``E`` ``[P, n_kv*D]``,
    ``W1`` ``[hidden, n_kv*D]``, ``W2`` ``[L*2*n_kv*D, hidden]`` (PEFT's ``PrefixEncoder`` with
    ``prefix_projection=True``). Parameters live on this module itself (not on child Linears) so
    ``PEFTFX_TRAINABLE`` names them.
    """

    PEFTFX_TRAINABLE = ("embedding", "weight1", "bias1", "weight2", "bias2")

    def __init__(self, tokens: int, n_layers: int, n_kv_heads: int, head_dim: int, hidden: int,
                 *, device=None, dtype=None) -> None:
        super().__init__()
        self.tokens, self.n_layers, self.n_kv_heads, self.head_dim = tokens, n_layers, n_kv_heads, head_dim
        token_dim, out = n_kv_heads * head_dim, n_layers * 2 * n_kv_heads * head_dim
        kw = {"device": device, "dtype": dtype}
        self.embedding = nn.Parameter(torch.randn(tokens, token_dim, **kw))
        # nn.Linear's default init (Kaiming-uniform weight, uniform bias), as PEFT's transform
        self.weight1 = nn.Parameter(_uniform((hidden, token_dim), token_dim, kw))
        self.bias1 = nn.Parameter(_uniform((hidden,), token_dim, kw))
        self.weight2 = nn.Parameter(_uniform((out, hidden), hidden, kw))
        self.bias2 = nn.Parameter(_uniform((out,), hidden, kw))

    def forward(self) -> Tensor:
        h = torch.tanh(torch.nn.functional.linear(self.embedding, self.weight1, self.bias1))
        return torch.nn.functional.linear(h, self.weight2, self.bias2)

    def layer_kv(self, table: Tensor, layer: int) -> tuple[Tensor, Tensor]:
        """Call ``layer``'s ``(key, value)`` ``[n_kv, P, D]`` from a ``[P, L*2*n_kv*D]`` table."""
        return split_prompt_embeddings(table, self.n_layers, self.n_kv_heads, self.head_dim, layer)


def split_prompt_embeddings(table: Tensor, n_layers: int, n_kv_heads: int, head_dim: int, layer: int):
    """``(key, value)`` ``[n_kv, P, D]`` of ``layer`` from PEFT's ``[P, L*2*n_kv*D]`` layout."""
    kv = table.view(table.shape[0], n_layers * 2, n_kv_heads, head_dim)
    return kv[:, 2 * layer].transpose(0, 1), kv[:, 2 * layer + 1].transpose(0, 1)


def _uniform(shape: tuple, fan_in: int, kw: dict) -> Tensor:
    bound = 1.0 / math.sqrt(fan_in)
    return torch.empty(shape, **kw).uniform_(-bound, bound)


class ReparamPrefixKV(nn.Module):
    """A :class:`PrefixKV` whose prefix is call ``layer``'s slice of a :class:`PrefixEncoder` table.

    Forward: ``(query, key, value, attn_mask, table [P, L*2*n_kv*D])`` -> as :class:`PrefixKV`.
    No parameters of its own.
    """

    def __init__(self, layer: int, n_layers: int, n_kv_heads: int, head_dim: int, *, n_rep: int = 1,
                 is_causal: bool = False) -> None:
        super().__init__()
        self.layer, self.n_layers, self.n_kv_heads, self.head_dim = layer, n_layers, n_kv_heads, head_dim
        self.n_rep, self.is_causal = n_rep, is_causal

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None, table: Tensor):
        pk, pv = split_prompt_embeddings(table, self.n_layers, self.n_kv_heads, self.head_dim, self.layer)
        return attach_prefix(query, key, value, attn_mask, pk, pv, self.n_rep, self.is_causal)

    def extra_repr(self) -> str:
        return f"layer={self.layer}, n_kv_heads={self.n_kv_heads}, head_dim={self.head_dim}, n_rep={self.n_rep}"


class SoftPrompt(nn.Module):
    """A soft prompt ``prompt_embeddings`` ``[P, hidden]`` (PEFT's saved key) prepended to embeddings.

    Forward: ``embeds [B, S, hidden]`` -> ``[B, P+S, hidden]`` (prompt first, in ``embeds``' dtype).
    """

    PEFTFX_TRAINABLE = ("prompt_embeddings",)

    def __init__(self, init: Tensor) -> None:
        super().__init__()
        self.prompt_embeddings = nn.Parameter(init.detach().clone())

    @property
    def tokens(self) -> int:
        return self.prompt_embeddings.shape[0]

    def forward(self, embeds: Tensor) -> Tensor:
        prompt = self.prompt_embeddings.to(embeds.dtype).unsqueeze(0).expand(embeds.shape[0], -1, -1)
        return torch.cat([prompt, embeds], dim=1)

    def extra_repr(self) -> str:
        return f"tokens={self.prompt_embeddings.shape[0]}, hidden={self.prompt_embeddings.shape[1]}"
