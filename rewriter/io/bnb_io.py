"""NF4/FP4 bases in bitsandbytes' ``Linear4bit`` state-dict layout, both ways.

Our packed bytes are already bitsandbytes' bytes (same codebook order, even element in the high
nibble, blocks crossing rows); only the container differs. For a layer prefix ``p`` bitsandbytes
0.45+ writes (``QuantState.as_dict(packed=True)`` plus the ``Params4bit`` data)::

    p.weight                                uint8 [ceil(out*in/2), 1]   packed codes
    p.weight.absmax                         fp32 [n_blocks] (uint8 codes with double quant)
    p.weight.quant_map                      fp32 [16]                   the NF4/FP4 codebook
    p.weight.nested_absmax                  fp32 [ceil(n_blocks/bs2)]   double quant only
    p.weight.nested_quant_map               fp32 [256]                  double quant only
    p.weight.quant_state.bitsandbytes__nf4  uint8 [*]  UTF-8 JSON: quant_type, blocksize, dtype,
                                            shape, and nested_blocksize/_dtype/_offset with DQ
    p.bias                                  (optional)

Double-quant ``absmax`` codes are ``absmax - offset`` quantized with the dynamic map, exactly
:class:`~peftfx.kernels.formats.QuantizedWeight`'s ``scales``/``scales2``/``offset``; so both
directions copy bytes and never re-quantize. bitsandbytes itself is only imported by
:func:`to_linear4bit` (a ready ``bnb.nn.Linear4bit``, e.g. to run PEFT over our base).
"""
from __future__ import annotations

import json
from typing import Mapping

import torch
from torch import Tensor, nn

from peftfx.errors import CheckpointError, KernelError
from peftfx.kernels.formats import DYNAMIC_CODE, QuantizedWeight, code_for
from peftfx.kernels.modules import qlora_layers

__all__ = ["to_bnb", "from_bnb", "bnb_state_dict", "to_linear4bit", "BNB_FORMATS"]

BNB_FORMATS = ("nf4", "fp4")


def _dtype_name(dtype: torch.dtype) -> str:
    # bitsandbytes writes str(dtype).strip("torch."): kept verbatim so our bytes match theirs.
    return str(dtype).strip("torch.")


def _bnb_code(fmt: str) -> Tensor:
    # bitsandbytes' fp4 map holds +0.0 where ours holds -0.0 (index 8): same codes, other bytes
    return code_for(fmt) + 0.0


def _pack_json(d: dict) -> Tensor:
    """bitsandbytes.utils.pack_dict_to_tensor: UTF-8 JSON bytes as a uint8 tensor."""
    return torch.tensor(list(json.dumps(d).encode("utf-8")), dtype=torch.uint8)


def _unpack_json(t: Tensor, key: str) -> dict:
    try:
        return json.loads(bytes(t.detach().cpu().to(torch.uint8).numpy()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{key}: not bitsandbytes' packed quant-state JSON ({e}); the file is corrupt") from None


def to_bnb(qw: QuantizedWeight, bias: Tensor | None = None, *, prefix: str = "") -> dict[str, Tensor]:
    """One NF4/FP4 layer in bitsandbytes ``Linear4bit`` state-dict layout.

    Args:
        qw: an ``nf4``/``fp4`` :class:`QuantizedWeight` (with or without double quantization).
        bias: ``[out]`` or None.
        prefix: the layer name with a trailing dot (``"model.layers.0.self_attn.q_proj."``) or ``""``.

    Returns:
        ``{prefix + key: tensor}`` with the keys in the module docstring; tensors share storage with
        ``qw`` where the layouts agree (the packed bytes are a view).
    """
    if qw.format not in BNB_FORMATS:
        raise CheckpointError(f"{prefix or 'layer'}: bitsandbytes Linear4bit stores nf4/fp4 only, got {qw.format!r}")
    w = f"{prefix}weight"
    out = {w: qw.packed.reshape(-1, 1), f"{w}.absmax": qw.scales, f"{w}.quant_map": _bnb_code(qw.format)}
    info = {"quant_type": qw.format, "blocksize": qw.block_size, "dtype": _dtype_name(qw.dtype),
            "shape": [int(qw.shape[0]), int(qw.shape[1])]}
    if qw.double_quant:
        out[f"{w}.nested_absmax"] = qw.scales2
        out[f"{w}.nested_quant_map"] = DYNAMIC_CODE.clone()
        info.update(nested_blocksize=qw.block_size2, nested_dtype="float32", nested_offset=float(qw.offset.item()))
    out[f"{w}.quant_state.bitsandbytes__{qw.format}"] = _pack_json(info)
    if bias is not None:
        out[f"{prefix}bias"] = bias
    return out


def from_bnb(state: Mapping[str, Tensor], *, prefix: str = "") -> tuple[QuantizedWeight, Tensor | None]:
    """Read one layer written by bitsandbytes (or :func:`to_bnb`) back into a :class:`QuantizedWeight`.

    Args:
        state: a state dict holding the keys in the module docstring under ``prefix``.
        prefix: the layer name with a trailing dot, or ``""``.

    Returns:
        ``(qw, bias)``; the packed bytes are copied unchanged (bit-exact).

    Raises:
        CheckpointError: a key is missing, the quant-state JSON is corrupt, the codebook is not
            bitsandbytes' NF4/FP4 (or dynamic) map, or the tensors do not fit the recorded shape.
    """
    w = f"{prefix}weight"
    qs_keys = [k for k in state if k.startswith(f"{w}.quant_state.bitsandbytes__")]
    if len(qs_keys) != 1:
        raise CheckpointError(f"{prefix or 'layer'}: expected exactly one '{w}.quant_state.bitsandbytes__<nf4|fp4>' "
                              f"entry, found {qs_keys}; is this a bitsandbytes 4-bit checkpoint?")
    info = _unpack_json(state[qs_keys[0]], qs_keys[0])
    fmt = info.get("quant_type")
    if fmt not in BNB_FORMATS or qs_keys[0].rsplit("__", 1)[1] != fmt:
        raise CheckpointError(f"{qs_keys[0]}: quant_type {fmt!r} is not one of {BNB_FORMATS}")
    nested = "nested_blocksize" in info
    need = [w, f"{w}.absmax", f"{w}.quant_map"] + ([f"{w}.nested_absmax", f"{w}.nested_quant_map"] if nested else [])
    missing = [k for k in need if k not in state]
    if missing:
        raise CheckpointError(f"{prefix or 'layer'}: bitsandbytes keys missing: {missing}")
    if not torch.equal(state[f"{w}.quant_map"].float().cpu(), code_for(fmt)):
        raise CheckpointError(f"{w}.quant_map is not bitsandbytes' {fmt} codebook; custom codebooks are not supported")
    if nested and not torch.equal(state[f"{w}.nested_quant_map"].float().cpu(), DYNAMIC_CODE):
        raise CheckpointError(f"{w}.nested_quant_map is not bitsandbytes' dynamic map; cannot decode the absmax")
    try:
        dtype = getattr(torch, info["dtype"])
        tensors = {"packed": state[w].reshape(-1).clone(), "scales": state[f"{w}.absmax"].clone()}
        if nested:
            tensors["scales2"] = state[f"{w}.nested_absmax"].clone()
            tensors["offset"] = torch.tensor(float(info["nested_offset"]), dtype=torch.float32)
        qw = QuantizedWeight.from_tensors(fmt, tensors, tuple(info["shape"]), block_size=int(info["blocksize"]),
                                          block_size2=int(info.get("nested_blocksize", 256)), dtype=dtype,
                                          name=prefix.rstrip(".") or None)
    except (KernelError, KeyError, AttributeError, TypeError, ValueError) as e:
        raise CheckpointError(f"{prefix or 'layer'}: bitsandbytes state does not describe a valid {fmt} "
                              f"weight: {e}") from None
    bias = state.get(f"{prefix}bias")
    return qw, (bias.clone() if bias is not None else None)


def bnb_state_dict(gm: nn.Module) -> dict[str, Tensor]:
    """``gm.state_dict()`` with every NF4/FP4 base layer in bitsandbytes' layout.

    This is the layout a ``transformers`` model quantized with ``BitsAndBytesConfig(load_in_4bit=True)``
    saves, so the frozen base can be served by bitsandbytes without re-quantizing. LoRA tensors
    keep their peftfx names (export them with :func:`peftfx.export_peft`).
    """
    sd = gm.state_dict()
    for fqn, m in qlora_layers(gm).items():
        if m.format not in BNB_FORMATS:
            continue
        for key in [k for k in sd if k.startswith(fqn + ".weight") or k == fqn + ".bias"]:
            del sd[key]
        sd.update(to_bnb(m.quantized_weight(), m.bias, prefix=fqn + "."))
    return sd


def to_linear4bit(module: nn.Module, *, compute_dtype: torch.dtype | None = None, exact: bool = True) -> nn.Module:
    """A ``bitsandbytes.nn.Linear4bit`` holding ``module``'s exact codes (no LoRA; base only).

    Args:
        module: an NF4/FP4 :class:`~peftfx.kernels.modules.QLoRALinear`.
        compute_dtype: the matmul dtype (defaults to the original weight dtype).
        exact: keep bitsandbytes off its CPU inference fast path. On CPUs with AVX512-BF16,
            bnb 0.50 repacks the weight on the first eval-mode no-grad call into a layout with
            bf16 absmax, which moves outputs by ~1e-3; with ``exact`` the codes stay ours.
    """
    import bitsandbytes as bnb

    qw = module.quantized_weight()
    if qw is None or qw.format not in BNB_FORMATS:
        raise CheckpointError(f"{module.name or 'layer'}: only nf4/fp4 layers map to Linear4bit, got {module.format!r}")
    dev = qw.packed.device
    lin = bnb.nn.Linear4bit(qw.shape[1], qw.shape[0], bias=module.bias is not None,
                            compute_dtype=compute_dtype or qw.dtype, compress_statistics=qw.double_quant,
                            quant_type=qw.format, device="meta")
    state = {k: v.to(dev) for k, v in to_bnb(qw).items()}
    data = state.pop("weight")
    lin.weight = bnb.nn.Params4bit.from_prequantized(data.clone(), state, requires_grad=False, device=dev, module=lin)
    lin.bias = nn.Parameter(module.bias.detach().clone(), requires_grad=False) if module.bias is not None else None
    if exact:
        lin.support_avx512bf16_for_cpu = False
    return lin
