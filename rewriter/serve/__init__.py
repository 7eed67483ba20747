"""``peftfx.serve``: using what was trained.

* :mod:`~peftfx.serve.multi_adapter` — one quantized base, many LoRA adapters, chosen per batch row
  (``compile_multi``, ``add_adapter``, ``remove_adapter``, ``adapter_index``).
"""
