"""Storage formats: the 4-bit codebooks and :class:`QuantizedWeight`, the frozen weight container.

Layouts (``numel = out_features * in_features``, weights flattened row-major, blocks may cross rows):

=================  ==========================================  ==========================================
format             ``packed``                                  ``scales`` / ``scales2`` / ``offset``
=================  ==========================================  ==========================================
nf4, fp4           uint8 ``[ceil(numel/2)]``, even element in  fp32 absmax ``[n_blocks]``; with double
                   the high nibble (bitsandbytes' layout)      quant: uint8 codes of ``absmax - offset``,
                                                               fp32 ``scales2 [ceil(n_blocks/bs2)]``,
                                                               fp32 scalar ``offset``
int8               int8 ``[numel]``                            fp32 ``absmax/127 [n_blocks]``
int8-zeropoint     uint8 ``[numel]``                           fp32 scale, fp32 integer zero point
                                                               (``offset``) per block
llm-int8           int8 ``[out, in]``                          fp32 row absmax ``[out]``
=================  ==========================================  ==========================================
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from peftfx.errors import KernelError
from peftfx.kernels.choices import FORMATS

__all__ = ["NF4_CODE", "FP4_CODE", "DYNAMIC_CODE", "dynamic_map", "FORMATS", "QuantizedWeight", "code_for",
           "layer_prefix", "check_block_size", "n_blocks_for", "table_on"]


# bitsandbytes.functional.get_4bit_type("nf4"): the 16 quantiles of N(0,1) scaled to [-1, 1].
NF4_CODE = torch.tensor(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    dtype=torch.float32,
)
# bitsandbytes.functional.get_4bit_type("fp4"): e2m1 values in bnb's index order, divided by 12.
FP4_CODE = torch.tensor(
    [0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0],
    dtype=torch.float32,
)
FP4_CODE.div_(FP4_CODE.abs().max())


def dynamic_map(signed: bool = True) -> Tensor:
    """bitsandbytes.functional.create_dynamic_map(signed, 7, 8): 256 sorted fp32 values in [-1, 1] or [0, 1].

    Seven decades 1e-6 .. 1, each split linearly (2**i values per sign in decade i when signed, 2**(i+1)
    unsigned), plus 0 and 1.0. Built with bitsandbytes' fp32 arithmetic so the bytes are identical.
    """
    data: list[float] = []
    for i in range(7):
        bounds = torch.linspace(0.1, 1, (2**i if signed else 2 ** (i + 1)) + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (-6 + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-6 + i)) * means).tolist()
    data += [0.0, 1.0]
    return torch.tensor(sorted(data), dtype=torch.float32)


DYNAMIC_CODE = dynamic_map(signed=True)  # the double-quant codebook

_BYTES_DTYPE = {"nf4": torch.uint8, "fp4": torch.uint8, "int8": torch.int8,
                "int8-zeropoint": torch.uint8, "llm-int8": torch.int8}


_device_tables: dict[tuple[str, torch.device], Tensor] = {}


def table_on(name: str, t: Tensor, device: torch.device) -> Tensor:
    """Constant table ``t`` on ``device``, copied there once and cached under ``name`` (CPU: ``t`` itself)."""
    if device.type == "cpu":
        return t
    key = (name, device)
    if key not in _device_tables:
        _device_tables[key] = t.to(device)
    return _device_tables[key]


def code_for(format: str) -> Tensor:
    """The 16-entry codebook of a 4-bit format."""
    return NF4_CODE if format == "nf4" else FP4_CODE


def layer_prefix(name: str | None) -> str:
    """``"layer 'x.q_proj': "`` for error messages, or ``""`` when the layer is unnamed."""
    return f"layer {name!r}: " if name else ""


@dataclass
class QuantizedWeight:
    """A frozen, quantized ``[out_features, in_features]`` weight (see the module docstring for layouts)."""

    format: str
    packed: Tensor
    scales: Tensor
    scales2: Tensor | None
    offset: Tensor | None
    shape: tuple[int, int]
    block_size: int = 64
    block_size2: int = 256
    dtype: torch.dtype = torch.float32
    threshold: float = 0.0

    @property
    def double_quant(self) -> bool:
        return self.format in ("nf4", "fp4") and self.scales2 is not None

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def n_blocks(self) -> int:
        if self.format == "llm-int8":
            return self.shape[0]
        return -(-self.numel // self.block_size)

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def tensors(self) -> dict[str, Tensor]:
        """Storage tensors by name (``packed``, ``scales``, and ``scales2`` / ``offset`` when present)."""
        out = {"packed": self.packed, "scales": self.scales}
        if self.scales2 is not None:
            out["scales2"] = self.scales2
        if self.offset is not None:
            out["offset"] = self.offset
        return out

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def bits_per_param(self) -> float:
        return 8.0 * self.nbytes() / max(self.numel, 1)

    def to(self, device: torch.device | str) -> QuantizedWeight:
        moved = {k: v.to(device) for k, v in self.tensors().items()}
        return QuantizedWeight.from_tensors(
            self.format, moved, self.shape, block_size=self.block_size, block_size2=self.block_size2,
            dtype=self.dtype, threshold=self.threshold)

    @classmethod
    def from_tensors(cls, format: str, tensors: dict[str, Tensor], shape, *, block_size: int = 64,
                     block_size2: int = 256, dtype: torch.dtype = torch.float32, threshold: float = 0.0,
                     name: str | None = None) -> QuantizedWeight:
        """Rebuild from :meth:`tensors` (e.g. a state dict) and metadata; validates consistency."""
        qw = cls(format, tensors["packed"], tensors["scales"], tensors.get("scales2"), tensors.get("offset"),
                 (int(shape[0]), int(shape[1])), int(block_size), int(block_size2), dtype, float(threshold))
        qw.validate(name)
        return qw

    def validate(self, name: str | None = None) -> None:
        """Raise :class:`KernelError` (naming ``name``) when the metadata does not match the tensors."""
        where = layer_prefix(name)
        if self.format not in FORMATS or self.format == "none":
            raise KernelError(f"{where}unknown quantized format {self.format!r}; expected one of {FORMATS[1:]}")
        out_f, in_f = self.shape
        if out_f <= 0 or in_f <= 0:
            raise KernelError(f"{where}bad weight shape {self.shape}")
        if self.format != "llm-int8":
            check_block_size(self.block_size, name)
        want = _BYTES_DTYPE[self.format]
        if self.packed.dtype != want:
            raise KernelError(f"{where}{self.format} packed weight must be {want}, got {self.packed.dtype}")
        n = self.numel
        n_packed = -(-n // 2) if self.format in ("nf4", "fp4") else n
        if self.packed.numel() != n_packed:
            raise KernelError(f"{where}{self.format} packed weight has {self.packed.numel()} elements; "
                              f"shape {self.shape} needs {n_packed}")
        if self.scales.numel() != self.n_blocks or self.scales.dim() != 1:
            raise KernelError(f"{where}scales length {self.scales.numel()} does not match shape {self.shape} "
                              f"and block size {self.block_size} ({self.n_blocks} blocks)")
        if self.double_quant:
            check_block_size(self.block_size2, name)
            if self.scales.dtype != torch.uint8:
                raise KernelError(f"{where}double-quantized scales must be uint8, got {self.scales.dtype}")
            n2 = -(-self.n_blocks // self.block_size2)
            if self.scales2.numel() != n2 or self.scales2.dtype != torch.float32:
                raise KernelError(f"{where}scales2 must be float32 [{n2}], got {self.scales2.dtype} "
                                  f"{list(self.scales2.shape)}")
            if self.offset is None or self.offset.numel() != 1:
                raise KernelError(f"{where}double quantization needs a scalar offset")
        elif self.scales.dtype != torch.float32:
            raise KernelError(f"{where}scales must be float32, got {self.scales.dtype}")
        if self.format == "int8-zeropoint":
            if self.offset is None or self.offset.numel() != self.n_blocks or self.offset.dtype != torch.float32:
                raise KernelError(f"{where}int8-zeropoint needs a float32 zero point per block "
                                  f"({self.n_blocks})")


def check_block_size(block_size: int, name: str | None = None) -> None:
    if not isinstance(block_size, int) or block_size < 16 or block_size & (block_size - 1):
        raise KernelError(f"{layer_prefix(name)}block size {block_size!r} must be a power of two >= 16")


def n_blocks_for(numel: int, block_size: int) -> int:
    return -(-numel // block_size)

