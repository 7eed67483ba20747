"""``peftfx.memory``: what a training step costs in memory, measured on fake tensors.

* :mod:`~peftfx.memory.storage` — bytes of each quantized storage format; ``format_bytes``.
* :mod:`~peftfx.memory.allocator` — the simulated allocator (live-bytes peak of forward + backward,
  saved activations, host offload), the analytic optimizer, and ``measure_peak`` for real steps.
* :mod:`~peftfx.memory.breakdown` — ``Breakdown``, the bytes of one step by kind.
* :mod:`~peftfx.memory.twin` — fake twins of modules and ``step_breakdown``.

Below the passes (``activation_checkpoint`` fits a budget with it) and above the kernels; the
plan-level estimate and its CLI live in :mod:`peftfx.inspect.estimate`.
"""
