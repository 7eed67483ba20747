"""Memory planner: what one training step costs before and after a plan, without allocating it.

* :mod:`~peftfx.memory.storage` — bytes and bits per weight of quantized layers.
* :mod:`~peftfx.memory.allocator` — the simulated allocator (live-bytes peak of a step on
  fake tensors, host offload included), the analytic optimizer, and :func:`measure_peak` for real steps.
* :mod:`~peftfx.inspect.estimate.twin` — the model's fake twin, compiled with the plan's own passes.
* :mod:`~peftfx.inspect.estimate.results` — :class:`Breakdown`, :class:`Estimate` and their rendering.
* :mod:`~peftfx.inspect.estimate.run` — :func:`estimate` (and ``fit=``: the cheapest ``[memory]``
  settings and the largest batch for a memory size).

How the tests measure the real peak (``measure_peak``): the torch profiler with
``profile_memory=True`` records every CPU allocator allocation and free as a ``[memory]`` event with
its signed size; integrating them in time order gives the live bytes, and its maximum over a
training step (forward, backward, ``optimizer.step()``, ``zero_grad``) plus the bytes alive
before the step (parameters, buffers, inputs, optimizer state from a warm-up step) is the peak.
"""
from peftfx.inspect.estimate.results import Estimate, render_estimate
from peftfx.inspect.estimate.run import MEMORY_SETTINGS, estimate
from peftfx.memory.allocator import OPTIMIZERS, loss_of, measure_peak
from peftfx.memory.breakdown import Breakdown
from peftfx.memory.storage import bits_per_param, format_bytes, quant_storage, quantized_nbytes
from peftfx.memory.twin import step_breakdown

__all__ = ["quant_storage", "quantized_nbytes", "bits_per_param", "Breakdown", "Estimate", "estimate",
           "loss_of", "measure_peak", "format_bytes", "OPTIMIZERS", "MEMORY_SETTINGS", "render_estimate",
           "step_breakdown"]
