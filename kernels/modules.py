"""Modules the passes insert: :class:`QLoRALinear` (and :class:`LoRALinear`, its dense-weight alias).

``forward`` is one ``peftfx::qlora_linear`` call, so the module is usable through ``call_module`` in a
``torch.fx.GraphModule`` and appears as a single node under ``torch.export``. The frozen weight lives
in buffers (uint8/int8 packed bytes for quantized formats) so the state dict holds the packed form;
only ``lora_A`` / ``lora_B`` are parameters.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from peftfx.errors import KernelError
from peftfx.kernels import ops
from peftfx.kernels.dtypes import check_compute_dtype, resolve_compute_dtype
from peftfx.kernels.choices import LORA_INITS
from peftfx.kernels.formats import QuantizedWeight, layer_prefix

__all__ = ["QLoRALinear", "LoRALinear", "LORA_INITS", "init_lora_", "qlora_layers"]


def init_lora_(lora_A: Tensor, lora_B: Tensor, init: str = "default", *, name: str | None = None) -> None:
    """PEFT's ``reset_lora_parameters``, in place: ``lora_A [r, in]`` and ``lora_B [out, r]``.

    ``"default"`` (PEFT's ``init_lora_weights=True``): A Kaiming-uniform with ``a=sqrt(5)``, as
    ``nn.Linear``, i.e. U(-1/sqrt(in), 1/sqrt(in)). ``"gaussian"``: A ~ N(0, std=1/r). B is zero
    either way, so a fresh adapter leaves the base model's output unchanged. The draws match
    PEFT's for the same RNG state.
    """
    with torch.no_grad():
        if init == "default":
            nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5))
        elif init == "gaussian":
            nn.init.normal_(lora_A, std=1 / lora_A.shape[0])
        else:
            allowed = ", ".join(map(repr, LORA_INITS))
            raise KernelError(f"{layer_prefix(name)}LoRA init {init!r} is not one of {allowed}")
        lora_B.zero_()


class QLoRALinear(nn.Module):
    """Frozen (quantized) linear + trainable low-rank adapter.

    ``y = x @ deq(W).T + b + s * (dropout(x) @ lora_A.T) @ lora_B.T`` with ``s = alpha / r``
    (``alpha / sqrt(r)`` with rsLoRA). x ``[..., in]`` -> y ``[..., out]``.

    Args:
        weight: a :class:`QuantizedWeight`, or a dense ``[out, in]`` tensor (format ``"none"``).
        bias: ``[out]`` or None (kept as a frozen buffer).
        r: LoRA rank; None means quantize-only (no adapter parameters).
        alpha: LoRA alpha. dropout: dropout on the adapter input. use_rslora: ``s = alpha / sqrt(r)``.
        init: how ``lora_A`` starts, one of :data:`LORA_INITS` (see :func:`init_lora_`); B starts at zero.
        name: the layer FQN, used in error messages.
        lora_dtype: dtype of the adapter parameters (fp32 by default, like PEFT's adapter autocast).
        compute_dtype: dtype of the frozen base GEMM: None (the input's), a dtype name, or ``"auto"``
            (bf16 where the device has fast bf16 GEMMs, e.g. AMX CPUs; see :mod:`peftfx.kernels.cpu_gemm`).

    A module dtype cast (``.to(dtype)``, ``.half()``, ``.bfloat16()``) casts the adapter and the bias but
    never the quantization state (:attr:`QUANT_STATE`) or the packed codes: they keep their dtype bit for
    bit (fp32 scales, as bitsandbytes keeps its absmax), so the dequantized weight does not move.
    Device moves apply to everything.

    Example::

        >>> from peftfx.kernels.quantizer import quantize
        >>> m = QLoRALinear(quantize(torch.randn(32, 16), "nf4"), None, r=4, alpha=8)
        >>> m(torch.randn(2, 16)).shape
        torch.Size([2, 32])
    """

    def __init__(self, weight: QuantizedWeight | Tensor, bias: Tensor | None = None, *, r: int | None,
                 alpha: float = 1.0, dropout: float = 0.0, use_rslora: bool = False, name: str | None = None,
                 lora_dtype: torch.dtype = torch.float32, compute_dtype: str | torch.dtype | None = None,
                 init: str = "default") -> None:
        super().__init__()
        where = layer_prefix(name)
        self.name = name
        check_compute_dtype(compute_dtype, where)
        if isinstance(compute_dtype, torch.dtype):
            compute_dtype = str(compute_dtype).removeprefix("torch.")
        self.compute_dtype = compute_dtype
        if isinstance(weight, QuantizedWeight):
            weight.validate(name)
            self.format = weight.format
            self.out_features, self.in_features = weight.shape
            self.block_size, self.block_size2 = weight.block_size, weight.block_size2
            self.threshold = weight.threshold
            self.weight_dtype = weight.dtype
            self.register_buffer("weight", weight.packed)
            self.register_buffer("weight_scales", weight.scales)
            self._buffer_or_none("weight_scales2", weight.scales2)
            self._buffer_or_none("weight_offset", weight.offset)
        elif isinstance(weight, Tensor) and weight.dim() == 2 and weight.dtype.is_floating_point:
            self.format = "none"
            self.out_features, self.in_features = weight.shape
            self.block_size, self.block_size2, self.threshold = 64, 256, 0.0
            self.weight_dtype = weight.dtype
            self.register_buffer("weight", weight.detach())
            # The op signature needs a scales tensor; keep it out of the state dict.
            self.register_buffer("weight_scales", torch.empty(0, device=weight.device), persistent=False)
            self._buffer_or_none("weight_scales2", None)
            self._buffer_or_none("weight_offset", None)
        else:
            desc = f"{weight.dtype} {list(weight.shape)}" if isinstance(weight, Tensor) else type(weight).__name__
            raise KernelError(f"{where}weight must be a QuantizedWeight or a 2-D float tensor, got {desc}")
        if bias is not None:
            if tuple(bias.shape) != (self.out_features,):
                raise KernelError(f"{where}bias shape {list(bias.shape)} != [{self.out_features}]")
            bias = bias.detach()
        self._buffer_or_none("bias", bias)

        device = self.weight.device
        self.r = r
        self.alpha = alpha
        self.use_rslora = use_rslora
        if r is None:
            self.scaling = 0.0
            self.register_parameter("lora_A", None)
            self.register_parameter("lora_B", None)
            self.lora_dropout = nn.Identity()
            return
        if not isinstance(r, int) or r <= 0 or r > min(self.in_features, self.out_features):
            raise KernelError(f"{where}LoRA rank r={r!r} must be an int in [1, "
                              f"{min(self.in_features, self.out_features)}] for a "
                              f"[{self.out_features}, {self.in_features}] weight")
        if not 0.0 <= dropout < 1.0:
            raise KernelError(f"{where}LoRA dropout {dropout!r} must be in [0, 1)")
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=device, dtype=lora_dtype))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, device=device, dtype=lora_dtype))
        init_lora_(self.lora_A, self.lora_B, init, name=name)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    # fp32 buffers the packed codes are decoded with; a dtype cast must not round them (see _apply)
    QUANT_STATE = ("weight_scales", "weight_scales2", "weight_offset")

    def _apply(self, fn, recurse: bool = True):
        """nn.Module._apply, except that the quantization state and the packed codes keep their dtype.

        ``.to(dtype)`` / ``.half()`` would round the fp32 scales; ``.type(dtype)`` would even turn the
        packed bytes into floats. Device moves still apply to every buffer.
        """
        kept = self.QUANT_STATE + (("weight",) if self.format != "none" else ())
        state = {n: t for n in kept if (t := self._buffers.get(n)) is not None}
        super()._apply(fn, recurse)
        for name, old in state.items():
            new = self._buffers[name]
            if new.dtype != old.dtype:  # fn cast the dtype: redo it as a pure device move from the original
                self._buffers[name] = old.to(device=new.device)
        return self

    def _buffer_or_none(self, name: str, t: Tensor | None) -> None:
        # torch.export mishandles buffers registered as None: keep absent ones plain attributes.
        if t is None:
            object.__setattr__(self, name, None)
        else:
            self.register_buffer(name, t)

    def quantized_weight(self) -> QuantizedWeight | None:
        """The frozen weight as a :class:`QuantizedWeight` (None for format ``"none"``)."""
        if self.format == "none":
            return None
        return QuantizedWeight(self.format, self.weight, self.weight_scales, self.weight_scales2,
                               self.weight_offset, (self.out_features, self.in_features), self.block_size,
                               self.block_size2, self.weight_dtype, self.threshold)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        """deq(W) ``[out, in]`` (the dense weight itself for format ``"none"``)."""
        if self.format == "none":
            return self.weight if dtype is None else self.weight.to(dtype)
        return ops.dequantize(self.quantized_weight(), dtype, name=self.name)

    def forward(self, x: Tensor) -> Tensor:
        if self.format != "none" and not all(t is None or t.is_contiguous() for t in (
                self.weight, self.weight_scales, self.weight_scales2, self.weight_offset)):
            ops.check_weight_storage(self.quantized_weight(), x, self.name)  # names this layer
        x_lora = None
        if self.lora_A is not None and isinstance(self.lora_dropout, nn.Dropout) and self.training:
            x_lora = self.lora_dropout(x)
        return torch.ops.peftfx.qlora_linear(
            x, self.weight, self.weight_scales, self.weight_scales2, self.weight_offset, self.bias, self.lora_A,
            self.lora_B, x_lora, float(self.scaling), self.format, self.block_size, self.block_size2,
            self.out_features, self.in_features, float(self.threshold),
            resolve_compute_dtype(getattr(self, "compute_dtype", None), x.device))

    def extra_repr(self) -> str:
        return (f"format={self.format}, in_features={self.in_features}, out_features={self.out_features}, "
                f"r={self.r}, alpha={self.alpha}, bias={self.bias is not None}"
                + (f", compute_dtype={self.compute_dtype}" if getattr(self, "compute_dtype", None) else ""))


class LoRALinear(QLoRALinear):
    """:class:`QLoRALinear` with a dense frozen weight (format ``"none"``); same code path."""

    def __init__(self, weight: Tensor, bias: Tensor | None = None, **kwargs) -> None:
        if not isinstance(weight, Tensor):
            raise KernelError(f"{layer_prefix(kwargs.get('name'))}LoRALinear takes a dense weight tensor")
        super().__init__(weight, bias, **kwargs)


def qlora_layers(model: nn.Module, *, with_lora: bool = False) -> dict[str, QLoRALinear]:
    """``{fqn: QLoRALinear}`` of every swapped layer of ``model`` in module order; with
    ``with_lora=True`` only those that carry LoRA factors (quantize-only layers left out)."""
    return {n: m for n, m in model.named_modules()
            if isinstance(m, QLoRALinear) and (not with_lora or m.r is not None)}
