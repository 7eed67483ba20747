"""``torch.library`` custom ops: ``peftfx::qlora_linear`` (+ its backward) and ``peftfx::dequantize``.

FX, torch.export and torch.compile see each op as one opaque node (``register_fake`` gives shapes).
The backward saves x (only when the LoRA grads need it) or x_lora, the LoRA factors and the *packed*
weight, never deq(W): W is frozen, so dx recomputes deq(W) (in L2-sized tiles on the CPU path,
:mod:`cpu_gemm`). ``compute_dtype`` is the base GEMM's dtype (None: the input's).

Backend: :func:`peftfx.kernels.backend.backend_for` picks ``cpu`` (:mod:`cpu_gemm`, and the native
decoder of :mod:`cpu_native` for ``peftfx::dequantize`` where it is available), ``triton`` or
``reference`` (the oracle) per call. The Triton modules are imported lazily so this file works without
them.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from typing import Optional, Sequence

import torch
from torch import Tensor

from peftfx.errors import KernelError
from peftfx.kernels import cpu_gemm, cpu_native, reference
from peftfx.kernels.backend import backend_for
from peftfx.kernels.dtypes import COMPUTE_DTYPES, gemm_dtype
from peftfx.kernels.formats import FORMATS, QuantizedWeight, layer_prefix

__all__ = ["qlora_linear", "dequantize", "backend_for", "check_weight_storage", "output_unused"]

_UNUSED_OUTPUT: contextvars.ContextVar[tuple | None] = contextvars.ContextVar("peftfx_unused_output", default=None)


@contextlib.contextmanager
def output_unused(packed: Tensor):
    """Inside, ``qlora_linear`` calls on the layer whose frozen weight storage is ``packed`` return an
    uninitialized output instead of computing it; autograd still records them. For a caller that
    builds the graph only to backpropagate through it (the tiled MLP's chunk recompute): the
    backward reads the saved inputs and weights, never the output."""
    token = _UNUSED_OUTPUT.set((packed.untyped_storage()._cdata, tuple(packed.shape)))
    try:
        yield
    finally:
        _UNUSED_OUTPUT.reset(token)


def _triton_modules():
    """``(qlora_triton, quant_triton)``, imported on first use: Triton is optional and slow to import."""
    from peftfx.kernels import qlora_triton, quant_triton  # lazy: see the docstring

    return qlora_triton, quant_triton


def _weight_of(packed, scales, scales2, offset, format, block_size, block_size2, out_features, in_features,
               dtype=torch.float32, threshold=0.0) -> QuantizedWeight | Tensor:
    if format == "none":
        return packed
    return QuantizedWeight(format, packed, scales, scales2, offset, (out_features, in_features), block_size,
                           block_size2, dtype, threshold)


def _check(x: Tensor, weight: QuantizedWeight | Tensor, bias, lora_A, lora_B, x_lora, name=None,
           compute_dtype=None) -> None:
    where = layer_prefix(name)
    if compute_dtype is not None and (not isinstance(compute_dtype, torch.dtype)
                                      or compute_dtype not in COMPUTE_DTYPES.values()):
        raise KernelError(f"{where}compute_dtype {compute_dtype!r} must be None or one of "
                          f"{list(COMPUTE_DTYPES.values())}")
    if isinstance(weight, QuantizedWeight):
        check_weight_storage(weight, x, name)
        out_f, in_f = weight.shape
    else:
        if weight.dim() != 2 or not weight.dtype.is_floating_point:
            raise KernelError(f"{where}dense weight must be a 2-D float tensor, got {weight.dtype} "
                              f"{list(weight.shape)}")
        out_f, in_f = weight.shape
    if not x.dtype.is_floating_point:
        raise KernelError(f"{where}input must be floating point, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] != in_f:
        raise KernelError(f"{where}input last dim {list(x.shape)[-1:]} != in_features {in_f}")
    if x_lora is not None and x_lora.shape != x.shape:
        raise KernelError(f"{where}x_lora shape {list(x_lora.shape)} != x shape {list(x.shape)}")
    if bias is not None and tuple(bias.shape) != (out_f,):
        raise KernelError(f"{where}bias shape {list(bias.shape)} != [{out_f}]")
    if (lora_A is None) != (lora_B is None):
        raise KernelError(f"{where}lora_A and lora_B must both be given or both be None")
    if lora_A is not None:
        if lora_A.dim() != 2 or lora_A.shape[1] != in_f:
            raise KernelError(f"{where}lora_A shape {list(lora_A.shape)} != [r, {in_f}]")
        r = lora_A.shape[0]
        if tuple(lora_B.shape) != (out_f, r):
            raise KernelError(f"{where}lora_B shape {list(lora_B.shape)} != [{out_f}, {r}]")


def check_weight_storage(qw: QuantizedWeight, t: Tensor, name: str | None = None) -> None:
    """Raise :class:`KernelError` naming ``name`` when ``qw``'s metadata does not match its tensors, and on
    the cpu backend (inputs where ``t`` lives) when they are not contiguous: its decoders read flat arrays."""
    if backend_for(t) == "cpu":
        cpu_native.check_storage(qw, name)
    else:
        qw.validate(name)


def _to(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    return None if t is None else t.to(dtype)


# ------------------------------------------------------------------------------------ forward op
@torch.library.custom_op("peftfx::qlora_linear", mutates_args=())
def _qlora_linear_op(
    x: Tensor, packed: Tensor, scales: Tensor, scales2: Optional[Tensor], offset: Optional[Tensor],
    bias: Optional[Tensor], lora_A: Optional[Tensor], lora_B: Optional[Tensor], x_lora: Optional[Tensor],
    scaling: float, format: str, block_size: int, block_size2: int, out_features: int, in_features: int,
    threshold: float, compute_dtype: Optional[torch.dtype] = None,
) -> Tensor:
    unused = _UNUSED_OUTPUT.get()
    if unused is not None and unused == (packed.untyped_storage()._cdata, tuple(packed.shape)):
        return x.new_empty(*x.shape[:-1], out_features)  # output_unused: nobody reads it
    w = _weight_of(packed, scales, scales2, offset, format, block_size, block_size2, out_features, in_features,
                   x.dtype, threshold)
    if backend_for(x) == "triton":
        qlora_triton = _triton_modules()[0]
        k = x.shape[-1]
        # the kernels compute in their inputs' dtype (W tiles included): cast in, cast the result back
        cd = compute_dtype or x.dtype
        w = w if isinstance(w, Tensor) else dataclasses.replace(w, dtype=cd)
        xl = None if x_lora is None else x_lora.reshape(-1, k).to(cd)
        y = qlora_triton.qlora_forward_triton(x.reshape(-1, k).to(cd), w, _to(bias, cd), _to(lora_A, cd),
                                              _to(lora_B, cd), scaling, xl)
        return y.to(x.dtype).reshape(*x.shape[:-1], out_features)
    if backend_for(x) == "reference":
        return reference.qlora_forward_ref(x, w, bias, lora_A, lora_B, scaling, x_lora,
                                           gemm_dtype(x, compute_dtype))
    return cpu_gemm.qlora_forward(x, w, bias, lora_A, lora_B, scaling, x_lora, compute_dtype)


@_qlora_linear_op.register_fake
def _(x, packed, scales, scales2, offset, bias, lora_A, lora_B, x_lora, scaling, format, block_size,
      block_size2, out_features, in_features, threshold, compute_dtype=None):
    return x.new_empty(*x.shape[:-1], out_features)


# ----------------------------------------------------------------------------------- backward op
@torch.library.custom_op("peftfx::qlora_linear_backward", mutates_args=())
def _qlora_linear_backward_op(
    dy: Tensor, x: Tensor, packed: Tensor, scales: Tensor, scales2: Optional[Tensor], offset: Optional[Tensor],
    lora_A: Optional[Tensor], lora_B: Optional[Tensor], x_lora: Optional[Tensor], scaling: float, format: str,
    block_size: int, block_size2: int, out_features: int, in_features: int, threshold: float,
    needs: Sequence[bool], compute_dtype: Optional[torch.dtype] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dx_lora, dA, dB); outputs not needed (or without meaning) are empty tensors."""
    w = _weight_of(packed, scales, scales2, offset, format, block_size, block_size2, out_features, in_features,
                   x.dtype, threshold)
    needs = tuple(bool(n) for n in needs)
    if backend_for(x) == "triton":
        qlora_triton = _triton_modules()[0]
        k = x.shape[-1]
        cd = compute_dtype or x.dtype
        w = w if isinstance(w, Tensor) else dataclasses.replace(w, dtype=cd)
        dx, dxl, dA, dB = qlora_triton.qlora_backward_triton(
            dy.reshape(-1, out_features).to(cd), x.reshape(-1, k).to(cd), w, _to(lora_A, cd), _to(lora_B, cd), scaling,
            None if x_lora is None else x_lora.reshape(-1, k).to(cd), needs)
        dx = None if dx is None else dx.to(x.dtype).reshape(x.shape)
        dxl = None if dxl is None else dxl.to(x.dtype).reshape(x.shape)
        dA = None if dA is None else dA.to(lora_A.dtype)
        dB = None if dB is None else dB.to(lora_B.dtype)
    elif backend_for(x) == "reference":
        dx, dxl, dA, dB = reference.qlora_backward_ref(dy, x, w, lora_A, lora_B, scaling, x_lora, needs,
                                                       gemm_dtype(x, compute_dtype))
    else:
        dx, dxl, dA, dB = cpu_gemm.qlora_backward(dy, x, w, lora_A, lora_B, scaling, x_lora, needs, compute_dtype)
    # a fresh empty per missing output: custom op outputs may not alias each other
    return tuple(x.new_empty(0) if t is None else t.contiguous() for t in (dx, dxl, dA, dB))


@_qlora_linear_backward_op.register_fake
def _(dy, x, packed, scales, scales2, offset, lora_A, lora_B, x_lora, scaling, format, block_size, block_size2,
      out_features, in_features, threshold, needs, compute_dtype=None):
    has_lora = lora_A is not None and lora_B is not None
    dx = x.new_empty(x.shape) if needs[0] else x.new_empty(0)
    dxl = x.new_empty(x.shape) if needs[1] and has_lora and x_lora is not None else x.new_empty(0)
    dA = lora_A.new_empty(lora_A.shape) if needs[2] and has_lora else x.new_empty(0)
    dB = lora_B.new_empty(lora_B.shape) if needs[3] and has_lora else x.new_empty(0)
    return dx, dxl, dA, dB


def _setup_context(ctx, inputs, output):
    (x, packed, scales, scales2, offset, bias, lora_A, lora_B, x_lora, scaling, format, block_size, block_size2,
     out_features, in_features, threshold, compute_dtype) = inputs
    # dx = dy·deq(W) needs no x: only the LoRA grads read it, and only when x_lora is None. A
    # frozen (quantize-only) layer therefore keeps a zero-stride stand-in that carries x's shape
    # and dtype in one element, not the activation: what bitsandbytes' frozen 4-bit matmul saves.
    needs_x = lora_A is not None and x_lora is None
    ctx.meta = (scaling, format, block_size, block_size2, out_features, in_features, threshold, compute_dtype)
    ctx.has_bias = bias is not None
    ctx.frozen = None
    if lora_A is None and x_lora is None:
        # no adapter: the backward reads only the (constant) quantized storage and x's shape, so
        # nothing goes through autograd's saved-tensor hooks (references on ctx, as bitsandbytes'
        # MatMul4Bit keeps them). Activation checkpointing then stops its recompute before such a
        # layer when nothing after it is saved (a block's down_proj) instead of re-running its
        # dequantize + matmul only to re-obtain constants.
        ctx.frozen = ((packed, scales, scales2, offset), (x.shape, x.dtype, x.device))
        return
    x_saved = x if needs_x else torch.empty_strided(x.shape, (0,) * x.dim(), dtype=x.dtype, device=x.device)
    ctx.save_for_backward(x_saved, packed, scales, scales2, offset, lora_A, lora_B, x_lora)


def _backward(ctx, dy):
    if ctx.frozen is None:
        x, packed, scales, scales2, offset, lora_A, lora_B, x_lora = ctx.saved_tensors
    else:
        (packed, scales, scales2, offset), (shape, dtype, device) = ctx.frozen
        x = torch.empty_strided(shape, (0,) * len(shape), dtype=dtype, device=device)  # shape and dtype only
        lora_A = lora_B = x_lora = None
    scaling, format, block_size, block_size2, out_features, in_features, threshold, compute_dtype = ctx.meta
    n = ctx.needs_input_grad
    needs = [n[0], n[8], n[6], n[7]]
    dbias = None
    if ctx.has_bias and n[5]:
        dbias = dy.reshape(-1, out_features).sum(0)
    if not any(needs):
        return (None,) * 5 + (dbias,) + (None,) * 11
    dx, dxl, dA, dB = torch.ops.peftfx.qlora_linear_backward(
        dy, x, packed, scales, scales2, offset, lora_A, lora_B, x_lora, scaling, format, block_size, block_size2,
        out_features, in_features, threshold, needs, compute_dtype)
    return (dx if n[0] else None, None, None, None, None, dbias, dA if n[6] else None, dB if n[7] else None,
            dxl if n[8] else None) + (None,) * 8


torch.library.register_autograd("peftfx::qlora_linear", _backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------- dequantize op
@torch.library.custom_op("peftfx::dequantize", mutates_args=())
def _dequantize_op(packed: Tensor, scales: Tensor, scales2: Optional[Tensor], offset: Optional[Tensor],
                   format: str, block_size: int, block_size2: int, out_features: int, in_features: int,
                   dtype: torch.dtype) -> Tensor:
    if format == "none":
        return packed.to(dtype).clone()
    qw = _weight_of(packed, scales, scales2, offset, format, block_size, block_size2, out_features, in_features,
                    dtype)
    if backend_for(packed) == "triton":
        quant_triton = _triton_modules()[1]
        return quant_triton.dequantize_triton(qw, dtype)
    if backend_for(packed) == "cpu" and dtype in cpu_native.NATIVE_DTYPES and cpu_native.usable(qw):
        return cpu_native.dequantize(qw, dtype)
    return reference.dequantize(qw, dtype)


@_dequantize_op.register_fake
def _(packed, scales, scales2, offset, format, block_size, block_size2, out_features, in_features, dtype):
    return packed.new_empty((out_features, in_features), dtype=dtype)


# ----------------------------------------------------------------------------------- Python API
def qlora_linear(x: Tensor, weight: QuantizedWeight | Tensor, bias: Tensor | None, lora_A: Tensor | None,
                 lora_B: Tensor | None, scaling: float, x_lora: Tensor | None = None, *,
                 name: str | None = None, compute_dtype: torch.dtype | None = None) -> Tensor:
    """``x @ deq(W).T + bias + scaling * (x_lora @ A.T) @ B.T`` for x ``[..., in]`` -> ``[..., out]``.

    ``weight`` is a :class:`QuantizedWeight` or a dense frozen ``[out, in]`` tensor (format "none").
    ``compute_dtype`` is the dtype of the base GEMM (None: x's dtype; see :mod:`cpu_gemm`).

    Example::

        >>> from peftfx.kernels.quantizer import quantize
        >>> qw = quantize(torch.randn(32, 16), "nf4")
        >>> A, B = torch.randn(4, 16, requires_grad=True), torch.zeros(32, 4, requires_grad=True)
        >>> qlora_linear(torch.randn(2, 3, 16), qw, None, A, B, 2.0).shape
        torch.Size([2, 3, 32])
    """
    _check(x, weight, bias, lora_A, lora_B, x_lora, name, compute_dtype)
    if isinstance(weight, QuantizedWeight):
        return torch.ops.peftfx.qlora_linear(
            x, weight.packed, weight.scales, weight.scales2, weight.offset, bias, lora_A, lora_B, x_lora,
            float(scaling), weight.format, weight.block_size, weight.block_size2, weight.shape[0],
            weight.shape[1], float(weight.threshold), compute_dtype)
    empty = weight.new_empty(0, dtype=torch.float32)
    return torch.ops.peftfx.qlora_linear(
        x, weight, empty, None, None, bias, lora_A, lora_B, x_lora, float(scaling), "none", 64, 256,
        weight.shape[0], weight.shape[1], 0.0, compute_dtype)


def dequantize(qw: QuantizedWeight, dtype: torch.dtype | None = None, *, name: str | None = None) -> Tensor:
    """deq(W) ``[out, in]`` in ``dtype`` (default: the original weight dtype) through ``peftfx::dequantize``.

    On the cpu backend the native decoder runs where it is available (:mod:`cpu_native`); errors name
    ``name``.
    """
    if qw.format not in FORMATS or qw.format == "none":
        raise KernelError(f"{layer_prefix(name)}unknown quantized format {qw.format!r}")
    check_weight_storage(qw, qw.packed, name)
    return torch.ops.peftfx.dequantize(qw.packed, qw.scales, qw.scales2, qw.offset, qw.format, qw.block_size,
                                       qw.block_size2, qw.shape[0], qw.shape[1], dtype or qw.dtype)
