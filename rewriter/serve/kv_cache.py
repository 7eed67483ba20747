"""The generation step graph: prefill and one-token decode in one captured graph with a static KV cache.

A Hugging Face decoder is exported once more, through :func:`peftfx.recapture.recapture` (so the
plan's passes rewrite it and bind it to the compiled module's own quantized layers and adapters),
with this call signature::

    step(inputs_embeds [B, S, H], attention_mask [B, L], position_ids [B, S], write_at [S],
         keys [B, n_kv, L, D] * layers, values [B, n_kv, L, D] * layers[, adapter_ids [B]])
        -> logits [B, 1, vocab]   (of the last position)

``keys`` / ``values`` are the cache, written in place at slots ``write_at`` (``index_copy_``; the
exported graph keeps the in-place op, so a step copies nothing but the new K/V). ``B``, ``S`` (>= 1)
and ``L`` are dynamic: one graph serves prefill (S = prompt length) and decode (S = 1) for every
batch size and cache length. The cache is a :class:`GraphKVCache` built inside the traced forward
around the input tensors (``GraphKVCache``, made by ``_cache_classes``); the attention mask is the model's own (``create_causal_mask`` over slot
indices, padding from ``attention_mask``), positions are the explicit ``position_ids``. ``L`` may be
a prefix view of a longer cache (``cache[:, :, :L]``, what :mod:`peftfx.serve.generation` passes: the
slots written so far), so attention reads only those; the writes land in the full cache.

After capture, :mod:`peftfx.serve.step_rewrite` removes the per-token Python that does no math.

The step graph starts at ``inputs_embeds`` because prompt tuning prepends its soft prompt to the
embeddings and prefix tuning writes its prefixes into cache slots: both happen outside the graph
(:mod:`peftfx.serve.generation`), so the prefix / prompt passes do not run on it. A multi-adapter
module's ``adapter_ids`` is routed to every :class:`~peftfx.kernels.multi_lora.MultiLoRALinear`.

Step graphs are cached per compiled module (weakly keyed: a merged copy captures its own).
"""
from __future__ import annotations

import copy
import inspect
import weakref
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.fx import GraphModule

from peftfx.errors import PeftfxError
from peftfx.kernels.multi_lora import MultiLoRALinear
from peftfx.recapture import recapture, source_model
from peftfx.serve.multi_adapter import IDS_ARG
from peftfx.serve.step_rewrite import call_linears_directly, drop_no_op_nodes

__all__ = ["GenerationError", "CacheGeometry", "cache_geometry", "check_decoder", "step_graph", "new_cache",
           "is_multi", "IDS_INPUT"]

IDS_INPUT = IDS_ARG  # the keyword a multi-adapter module takes its per-row adapter ids by
_STEPS: "weakref.WeakKeyDictionary[nn.Module, GraphModule]" = weakref.WeakKeyDictionary()


class GenerationError(PeftfxError, ValueError):
    """Bad input to generation (lengths, sampling settings, a model that cannot generate)."""


def _cache_classes():
    """(layer class, cache class) built on transformers' Cache API (imported lazily: transformers is heavy)."""
    from transformers.cache_utils import Cache, CacheLayerMixin

    class GraphKVLayer(CacheLayerMixin):
        """One layer's cache: given ``[B, n_kv, L, D]`` tensors, written in place at ``write_at`` slots."""

        is_sliding = False
        is_compileable = True

        def __init__(self, keys: Tensor, values: Tensor, write_at: Tensor) -> None:
            super().__init__()
            self.keys, self.values, self.write_at = keys, values, write_at
            self.is_initialized = True

        def lazy_initialization(self, key_states, value_states) -> None:  # tensors exist already
            return None

        def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs):
            self.keys.index_copy_(2, self.write_at, key_states)
            self.values.index_copy_(2, self.write_at, value_states)
            return self.keys, self.values

        def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
            return self.keys.shape[2], 0  # the mask spans every slot; causality hides the unwritten ones

        def get_seq_length(self):
            return self.write_at[0]  # the first query's slot: the mask's query offset

        def get_max_length(self) -> int:
            return self.keys.shape[2]

    class GraphKVCache(Cache):
        """A transformers ``Cache`` over caller-owned tensors (one :class:`GraphKVLayer` per layer)."""

        def __init__(self, keys: list[Tensor], values: list[Tensor], write_at: Tensor) -> None:
            super().__init__(layers=[GraphKVLayer(k, v, write_at) for k, v in zip(keys, values)])

    return GraphKVLayer, GraphKVCache


@dataclass(frozen=True)
class CacheGeometry:
    """Per-layer cache shape ``[B, n_kv_heads, L, head_dim]`` and the longest sequence the model takes."""

    layers: int
    kv_heads: int
    head_dim: int
    max_positions: int | None


def _text_config(model: nn.Module):
    config = getattr(model, "config", None)
    if config is None:
        raise GenerationError(f"{type(model).__name__} has no Hugging Face config: generation needs a decoder "
                              "language model (a transformers *ForCausalLM)")
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def check_decoder(model: nn.Module) -> None:
    """GenerationError unless ``model`` is a decoder-only causal LM."""
    config = _text_config(model)
    can = getattr(model, "can_generate", lambda: False)()
    if getattr(config, "is_encoder_decoder", False) or not can:
        kind = "an encoder-decoder" if getattr(config, "is_encoder_decoder", False) else "an encoder-only"
        raise GenerationError(f"{type(model).__name__} is {kind} model: generation needs a decoder (a decoder-only "
                              "causal LM such as *ForCausalLM / GPT2LMHeadModel)")


def cache_geometry(model: nn.Module) -> CacheGeometry:
    """Cache shape from the model's config (GQA and explicit ``head_dim`` included)."""
    config = _text_config(model)
    heads = getattr(config, "num_attention_heads", None)
    layers = getattr(config, "num_hidden_layers", None)
    if not heads or not layers:
        raise GenerationError(f"{type(config).__name__} names no num_attention_heads / num_hidden_layers; cannot "
                              "size the KV cache")
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    max_positions = getattr(config, "max_position_embeddings", None)
    return CacheGeometry(int(layers), int(kv_heads), int(head_dim), max_positions)


def new_cache(geometry: CacheGeometry, batch: int, length: int, *, dtype: torch.dtype,
              device: torch.device) -> tuple[list[Tensor], list[Tensor]]:
    """Zeroed ``(keys, values)``: one ``[batch, n_kv, length, head_dim]`` tensor per layer each."""
    shape = (batch, geometry.kv_heads, length, geometry.head_dim)
    keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(geometry.layers)]
    values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(geometry.layers)]
    return keys, values


def _step_view(model: nn.Module) -> nn.Module:
    """``model`` (same submodules, same parameter names) with the step signature as its forward."""
    cls = type(model)
    _, cache_cls = _cache_classes()
    keep_last = "logits_to_keep" in inspect.signature(cls.forward).parameters

    def forward(self, inputs_embeds, attention_mask, position_ids, write_at, keys, values, adapter_ids=None):
        out = cls.forward(self, inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                          cache=cache_cls(keys, values, write_at), use_cache=True,
                          **({"logits_to_keep": 1} if keep_last else {}))
        logits = out.logits if hasattr(out, "logits") else out[0]
        return logits[:, -1:]

    step_cls = type(f"{cls.__name__}Step", (cls,), {"forward": forward})
    view = copy.copy(model)  # shallow: _modules/_parameters are the model's own dicts
    view.__class__ = step_cls
    return view


def _example(model: nn.Module, geometry: CacheGeometry, multi: bool) -> tuple[dict, dict]:
    """Example inputs (batch 2, 3 new tokens, 8 slots) and their dynamic dims."""
    from torch.export import Dim

    emb = model.get_input_embeddings()
    weight = emb.weight
    batch, seq, slots = 2, 3, 8
    keys, values = new_cache(geometry, batch, slots, dtype=weight.dtype, device=weight.device)
    example = {
        "inputs_embeds": torch.zeros(batch, seq, weight.shape[1], dtype=weight.dtype, device=weight.device),
        "attention_mask": torch.ones(batch, slots, dtype=torch.long, device=weight.device),
        "position_ids": torch.arange(seq, device=weight.device).expand(batch, seq).contiguous(),
        "write_at": torch.arange(seq, device=weight.device),
        "keys": keys, "values": values,
    }
    b, s, length = Dim("batch", min=1), Dim("new_tokens", min=1), Dim("slots", min=2)
    kv = [{0: b, 2: length}] * geometry.layers
    dynamic = {"inputs_embeds": {0: b, 1: s}, "attention_mask": {0: b, 1: length}, "position_ids": {0: b, 1: s},
               "write_at": {0: s}, "keys": kv, "values": list(kv)}
    if multi:
        example[IDS_INPUT] = torch.zeros(batch, dtype=torch.long, device=weight.device)
        dynamic[IDS_INPUT] = {0: b}
    return example, dynamic


def _route_ids(step: GraphModule) -> None:
    """Feed the ``adapter_ids`` input to every MultiLoRALinear call (swap_linear bound them one-input)."""
    ids = next(n for n in step.graph.nodes if n.op == "placeholder" and n.name == IDS_INPUT)
    for node in step.graph.nodes:
        if node.op == "call_module" and isinstance(step.get_submodule(node.target), MultiLoRALinear):
            node.args = (node.args[0], ids)
    step.graph.lint()
    step.recompile()


def is_multi(gm: nn.Module) -> bool:
    return any(isinstance(m, MultiLoRALinear) for m in gm.modules())


def step_graph(gm: GraphModule) -> GraphModule:
    """The cached step graph of ``gm`` (captured and bound on first use)."""
    step = _STEPS.get(gm)
    if step is not None:
        return step
    model = source_model(gm)
    check_decoder(model)
    multi = is_multi(gm)
    geometry = cache_geometry(model)
    example, dynamic = _example(model, geometry, multi)
    step = recapture(gm, _step_view(model), example, dynamic_shapes=dynamic, skip_sections=("prefix", "prompt"))
    if multi:
        _route_ids(step)
    drop_no_op_nodes(step)  # the step runs once per token: no per-call Python that does no math
    call_linears_directly(step)
    _STEPS[gm] = step
    return step
