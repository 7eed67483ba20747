"""``peftfx.io``: what travels in and out of a compiled model.

* :mod:`~peftfx.io.checkpoint` — peftfx's own adapter and whole-model files (safetensors + metadata,
  base fingerprints so an adapter refuses the wrong base).
* :mod:`~peftfx.io.peft_io` — Hugging Face PEFT's adapter format, both ways.
* :mod:`~peftfx.io.bnb_io` — bitsandbytes' packed 4-bit/8-bit state, both ways.
* :mod:`~peftfx.io.merging` — folding LoRA back into the base weight for deployment, and back out.
* :mod:`~peftfx.io.streaming` — ``peftfx.load``: compiling from a sharded Hugging Face folder, one
  dense layer in memory at a time.

The public functions are re-exported at the package top (``peftfx.save_adapters`` ...).
"""
