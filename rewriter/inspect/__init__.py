"""``peftfx.inspect``: seeing what a plan does before and after it runs.

* :mod:`~peftfx.inspect.cli` — the ``peftfx`` command (``inspect``, ``estimate``, ``passes``).
* :mod:`~peftfx.inspect.model_source` — building a model from a config file, a local folder or a factory.
* :mod:`~peftfx.inspect.reporting` — the per-pass report of a compiled model and its renderings.
* :mod:`~peftfx.inspect.estimate` — memory of a plan measured on a fake-tensor twin, no real allocation.
* :mod:`~peftfx.inspect.fsdp_estimate` — the per-rank peak under FSDP2 (``estimate --world-size``).
"""
