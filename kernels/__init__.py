"""peftfx.kernels: quantization formats, the pure-PyTorch reference path, Triton kernels,
torch.library ops and the modules the passes insert.

Importable without Triton or CUDA, and never imports from ``peftfx.passes`` or the rewriter.
"""
