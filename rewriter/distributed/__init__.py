"""``peftfx.distributed``: compiled models under DDP and FSDP2 (see :mod:`~peftfx.distributed.wrappers`).

* :mod:`~peftfx.distributed.wrappers` — ``ddp``, ``shard``, saving and sync checks across ranks.
* :mod:`~peftfx.distributed.base_sharding` — the packed base as FSDP2-sharded frozen storage
  (gathered as raw bytes, never cast), and gathering a sharded model's state.
* :mod:`~peftfx.distributed.blocks` — outlining transformer blocks of a flat graph into submodules,
  the unit FSDP2 shards (and activation checkpointing recomputes).
"""
from peftfx.distributed.wrappers import (
    ANCHOR_ATTR, check_in_sync, ddp, full_adapter_state_dict, keep_adapters_in_graph, save_adapters, shard, unwrap,
)

__all__ = ["ddp", "shard", "keep_adapters_in_graph", "full_adapter_state_dict", "save_adapters", "check_in_sync",
           "unwrap", "ANCHOR_ATTR"]
