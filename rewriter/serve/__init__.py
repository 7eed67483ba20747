"""``peftfx.serve``: using what was trained.

* :mod:`~peftfx.serve.multi_adapter` — one quantized base, many LoRA adapters, chosen per batch row
  (``compile_multi``, ``add_adapter``, ``remove_adapter``, ``adapter_index``).
* :mod:`~peftfx.serve.generation` — ``generate``: KV-cache decoding with the compiled module's own
  weights and adapters (LoRA in every format, merged, prefix / prompt tuning, bottleneck, multi-adapter).
* :mod:`~peftfx.serve.kv_cache` — the step graph (prefill + decode, static cache written in place).
* :mod:`~peftfx.serve.step_rewrite` — per-token clean-up of the step graph (no-op nodes, direct linear calls).
* :mod:`~peftfx.serve.sampling` — greedy / temperature / top-k / top-p next-token choice.
* :mod:`~peftfx.serve.generate_cli` — the ``peftfx generate`` command.
"""
