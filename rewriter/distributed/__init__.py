"""``peftfx.distributed``: compiled models under DDP and FSDP2 (see :mod:`~peftfx.distributed.wrappers`).

* :mod:`~peftfx.distributed.wrappers` — ``ddp``, ``shard``, saving and sync checks across ranks.
* :mod:`~peftfx.distributed.base_sharding` — the packed quantized base as FSDP2-shardable frozen
  storage, gathered as raw bytes and never cast.
* :mod:`~peftfx.distributed.blocks` — outlining transformer blocks of a flat graph into submodules,
  the unit FSDP2 shards (and activation checkpointing recomputes).

The wrappers' names are re-exported lazily: ``peftfx.io.checkpoint`` imports ``base_sharding``, and
an eager import of ``wrappers`` here (which imports ``peftfx.io.checkpoint``) would make that a cycle.
"""
from __future__ import annotations

import importlib
from typing import Any

__all__ = ["ddp", "shard", "keep_adapters_in_graph", "full_adapter_state_dict", "save_adapters", "check_in_sync",
           "unwrap", "ANCHOR_ATTR"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        value = getattr(importlib.import_module("peftfx.distributed.wrappers"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'peftfx.distributed' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
