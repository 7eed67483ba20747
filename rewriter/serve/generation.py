"""``peftfx.generate``: KV-cache decoding with a compiled model's own weights and adapters.

One step graph (:mod:`peftfx.serve.kv_cache`) runs the prefill and every decode step; it is bound
to ``gm``'s modules, so nothing is copied and a training step shows in the next call. Semantics are
transformers' ``generate``: left padding (a padded row generates what it would alone: positions come
from ``cumsum(attention_mask) - 1``), per-row stop at ``eos_token_id`` with ``pad_token_id`` after,
the loop ending when every row has stopped; defaults for eos / pad come from the model's
``generation_config``.

Cache layout per row, slot by slot::

    [P prefix-tuning K/V][Q soft-prompt tokens][S prompt tokens, left padding first][new tokens]

* **Prefix tuning**: each attention layer's learned ``[n_kv, P, D]`` K/V are written into slots
  ``0..P-1`` before the prefill, visible to every query, and real tokens take positions
  ``P + cumsum(mask) - 1``. This is PEFT's prefix-tuning *forward* (the prefix as a cache of length
  P), which is also what peftfx trains; it is not PEFT's prefix-tuning ``generate``, whose first
  logits differ from its own forward.
* **Prompt tuning**: the soft prompt is prepended to the prompt's embeddings at prefill (positions
  ``0..Q-1``, before any padding, as PEFT does).
* **LoRA / quantized / merged / bottleneck**: live in the step graph itself.
* **Multi-adapter** (:func:`peftfx.compile_multi`): ``adapter_ids`` ``[B]`` picks each row's adapter
  (``-1`` = base) in every step.
"""
from __future__ import annotations

import contextlib
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from peftfx.kernels.prompt_modules import PrefixEncoder, PrefixKV, ReparamPrefixKV, SoftPrompt
from peftfx.recapture import source_model
from peftfx.serve.kv_cache import (
    IDS_INPUT,
    GenerationError,
    cache_geometry,
    check_decoder,
    is_multi,
    new_cache,
    step_graph,
)
from peftfx.serve.multi_adapter import AdapterIdError, check_adapter_ids
from peftfx.serve.sampling import Sampling, next_tokens

__all__ = ["generate", "GenerationError"]


def _prefix_kv(gm: nn.Module) -> list[tuple[Tensor, Tensor]]:
    """Each attention layer's prefix ``(key, value)`` ``[n_kv, P, D]``, in layer order (empty: none)."""
    sites = [m for m in gm.modules() if isinstance(m, (PrefixKV, ReparamPrefixKV))]
    if sites and isinstance(sites[0], ReparamPrefixKV):
        encoder = next(m for m in gm.modules() if isinstance(m, PrefixEncoder))
        table = encoder()
        return [encoder.layer_kv(table, site.layer) for site in sites]
    return [(site.key, site.value) for site in sites]


def _soft_prompt(gm: nn.Module) -> SoftPrompt | None:
    return next((m for m in gm.modules() if isinstance(m, SoftPrompt)), None)


@contextlib.contextmanager
def _eval_mode(*modules: nn.Module):
    """Every (shared) submodule in eval mode for the block, each one's own mode restored after."""
    modes = [(m, m.training) for root in modules for m in root.modules()]
    for m, _ in modes:
        m.training = False
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def _filled(keys: list[Tensor], values: list[Tensor], mask: Tensor, used: int) -> dict[str, Any]:
    """The step's cache inputs cut to the first ``used`` slots (views: writes land in the full cache).

    Attention then reads only the slots written so far instead of the whole ``[B, n_kv, L, D]`` cache,
    so a decode step costs what transformers' growing cache costs, without its copies. At least 2
    slots (the step graph's smallest cache length); an unwritten slot is hidden by causality anyway.
    """
    used = max(used, min(2, mask.shape[1]))
    return {"keys": [k[:, :, :used] for k in keys], "values": [v[:, :, :used] for v in values],
            "attention_mask": mask[:, :used]}


def _token_list(value: Any, name: str) -> list[int]:
    if value is None:
        return []
    values = [value] if isinstance(value, int) else list(value.tolist() if isinstance(value, Tensor) else value)
    if not all(isinstance(v, int) for v in values):
        raise GenerationError(f"{name} must be an int or a list of ints, got {value!r}")
    return values


def _check_inputs(input_ids: Any, attention_mask: Any, max_new_tokens: Any) -> Tensor:
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long \
            or input_ids.shape[1] == 0:
        desc = f"{input_ids.dtype} {list(input_ids.shape)}" if isinstance(input_ids, Tensor) else type(input_ids).__name__
        raise GenerationError(f"input_ids must be an int64 tensor [batch, seq >= 1], got {desc}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise GenerationError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if attention_mask is None:
        return torch.ones_like(input_ids)
    if not isinstance(attention_mask, Tensor) or tuple(attention_mask.shape) != tuple(input_ids.shape):
        shape = list(attention_mask.shape) if isinstance(attention_mask, Tensor) else type(attention_mask).__name__
        raise GenerationError(f"attention_mask must have input_ids' shape {list(input_ids.shape)}, got {shape}")
    mask = attention_mask.long()
    if bool((mask[:, 1:] < mask[:, :-1]).any()):
        row = int(torch.nonzero((mask[:, 1:] < mask[:, :-1]).any(1))[0])
        raise GenerationError(f"attention_mask row {row} has padding after a token (right padding); generation "
                              "needs left padding (tokenizer.padding_side = 'left')")
    if bool((mask.sum(1) == 0).any()):
        raise GenerationError(f"attention_mask row {int(torch.nonzero(mask.sum(1) == 0)[0])} has no token")
    return mask


def _check_adapter_ids(gm: nn.Module, adapter_ids: Any, batch: int) -> Tensor | None:
    if not is_multi(gm):
        if adapter_ids is not None:
            raise GenerationError("adapter_ids is only for modules from peftfx.compile_multi; this one serves one "
                                  "adapter")
        return None

    if adapter_ids is None:
        raise AdapterIdError(f"this module serves several adapters: pass {IDS_INPUT}=torch.tensor([...]) with one id "
                             "per row (-1 = base model; peftfx.adapter_index(gm, name))")
    check_adapter_ids(gm, adapter_ids, batch)
    return adapter_ids


def generate(gm: nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None, *, max_new_tokens: int,
             do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None,
             adapter_ids: Tensor | None = None, generator: torch.Generator | None = None,
             streamer: Any = None) -> Tensor:
    """Generate up to ``max_new_tokens`` tokens per row with a compiled decoder.

    Args:
        gm: a module from :func:`peftfx.compile` / :func:`peftfx.compile_multi` / :func:`peftfx.merge`
            of a decoder-only causal LM.
        input_ids: ``[B, S]`` int64, left-padded; attention_mask: ``[B, S]`` (1 = token), default all ones.
        max_new_tokens: tokens to add at most.
        do_sample / temperature / top_k / top_p: sampling (greedy by default), as in transformers.
        eos_token_id: int or ints that end a row (default: the model's generation_config).
        pad_token_id: written after a row ended (default: generation_config's, else the first eos).
        adapter_ids: ``[B]`` int64 adapter slot per row for a multi-adapter module (-1 = base model).
        generator: a ``torch.Generator`` for reproducible sampling.
        streamer: a transformers streamer: ``put(input_ids)`` once, ``put(new [B])`` per step, ``end()``.

    Returns:
        ``[B, S + n]`` int64: the prompt and ``n <= max_new_tokens`` new tokens (``n`` is smaller only
        when every row ended at eos).

    Raises:
        GenerationError: malformed inputs, sampling settings out of range, a sequence longer than the
            model's positions, or a model that is not a decoder.
        AdapterIdError: ``adapter_ids`` missing or out of range on a multi-adapter module.
    """
    sampling = Sampling(do_sample, temperature, top_k, top_p)
    model = source_model(gm)
    check_decoder(model)
    mask = _check_inputs(input_ids, attention_mask, max_new_tokens)
    batch, seq = input_ids.shape
    ids = _check_adapter_ids(gm, adapter_ids, batch)
    config = getattr(model, "generation_config", None)
    eos = _token_list(eos_token_id if eos_token_id is not None else getattr(config, "eos_token_id", None),
                      "eos_token_id")
    pad = pad_token_id if pad_token_id is not None else getattr(config, "pad_token_id", None)
    if pad is None and eos:
        pad = eos[0]
    prefix, soft = _prefix_kv(gm), _soft_prompt(gm)
    geometry = cache_geometry(model)
    if prefix and len(prefix) != geometry.layers:
        raise GenerationError(f"the module has {len(prefix)} prefix-tuned attention calls but the model has "
                              f"{geometry.layers} layers; cannot lay the prefixes into the cache")
    n_prefix = prefix[0][0].shape[1] if prefix else 0
    n_soft = soft.tokens if soft is not None else 0
    slots = n_prefix + n_soft + seq + max_new_tokens
    if geometry.max_positions is not None and slots > geometry.max_positions:
        extra = "".join(f" + {n} {what}" for n, what in ((n_prefix, "prefix"), (n_soft, "soft-prompt")) if n)
        raise GenerationError(
            f"prompt length {seq} + max_new_tokens {max_new_tokens}{extra} = {slots} exceeds the cache length "
            f"{geometry.max_positions} (the model's max_position_embeddings); shorten the prompt or lower "
            "max_new_tokens")
    if streamer is not None:
        streamer.put(input_ids.cpu())
    if max_new_tokens == 0:
        if streamer is not None:
            streamer.end()
        return input_ids
    step = step_graph(gm)
    embed = model.get_input_embeddings()
    device = embed.weight.device
    with torch.no_grad(), _eval_mode(gm, step):
        embeds = embed(input_ids)
        if soft is not None:
            embeds = soft(embeds)
        keys, values = new_cache(geometry, batch, slots, dtype=embeds.dtype, device=device)
        for (k_cache, v_cache), (k, v) in zip(zip(keys, values), prefix):
            k_cache[:, :, :n_prefix] = k.to(embeds.dtype)
            v_cache[:, :, :n_prefix] = v.to(embeds.dtype)
        prompt_mask = torch.cat([mask.new_ones(batch, n_soft), mask], dim=1)
        full_mask = mask.new_ones(batch, slots)
        full_mask[:, n_prefix:n_prefix + n_soft + seq] = prompt_mask
        positions = (n_prefix + prompt_mask.cumsum(1) - 1).masked_fill(prompt_mask == 0, 1)
        extra = {IDS_INPUT: ids} if ids is not None else {}
        slot = n_prefix + n_soft + seq
        logits = step(inputs_embeds=embeds, write_at=torch.arange(n_prefix, slot, device=device),
                      position_ids=positions, **_filled(keys, values, full_mask, slot), **extra)
        out, unfinished = [input_ids], torch.ones(batch, dtype=torch.bool, device=device)
        eos_t = torch.tensor(eos, device=device, dtype=torch.long)
        last = positions[:, -1:]
        for i in range(max_new_tokens):
            token = next_tokens(logits[:, -1], sampling, generator)
            if pad is not None:
                token = torch.where(unfinished, token, torch.full_like(token, pad))
            out.append(token[:, None])
            if streamer is not None:
                streamer.put(token.cpu())
            if eos:
                unfinished &= ~torch.isin(token, eos_t)
                if not bool(unfinished.any()):
                    break
            if i == max_new_tokens - 1:
                break
            last = last + 1
            logits = step(inputs_embeds=embed(token[:, None]), position_ids=last,
                          write_at=torch.tensor([slot], device=device),
                          **_filled(keys, values, full_mask, slot + 1), **extra)
            slot += 1
    if streamer is not None:
        streamer.end()
    return torch.cat(out, dim=1)
