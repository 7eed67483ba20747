"""NF4/FP4 decode by byte permutes (``prmt``) in inline PTX: the compiled-GPU fast path of the 4-bit decode.

The select-tree decode (:func:`decode_triton.code_value`) costs about 20 SASS instructions per weight
element in the matmul inner loop. This module decodes 8 codes (4 packed bytes, one 32-bit register)
with 16 ``prmt`` byte permutes, 5 shift/logic ops and 4 paired multiplies, as Marlin-style
CUDA decoders do:

- the 16 table values, rounded to the activation dtype (fp16 or bf16), are split into their low and
  high bytes: 16 low bytes in 4 registers ``TL0..TL3`` and 16 high bytes in ``TH0..TH3`` (constants,
  hoisted out of the loop by ptxas);
- two packed bytes are 4 nibbles ``[l0, h0, l1, h1]`` in the low 16 bits of a register, exactly the
  4-nibble selector ``prmt`` reads. ``prmt`` picks among 8 bytes, so each code's low 3 bits select from
  entries 0-7 (``prmt TL0, TL1``) and 8-15 (``prmt TL2, TL3``), and a second ``prmt`` picks per byte
  between the two by the code's bit 3 (selector ``0x3210 | bit3 << 2`` per nibble);
- two more ``prmt`` interleave low and high bytes into the fp16/bf16 pairs ``(v(l0), v(l1))`` and
  ``(v(h0), v(h1))``;
- ``fma.rn.{f16x2,bf16x2} v, v, scale, -0.0`` multiplies two values by their block scale at once (the
  ``-0.0`` addend makes it an exactly rounded product; ``mul.bf16x2`` needs sm_90, ``fma`` runs on sm_80).

Numerics: each value is ``round(round(code) * round(absmax))`` in the activation dtype (the oracle rounds
``code * absmax`` once from fp32): at most ~1.5 ulp of fp16/bf16 apart, as bitsandbytes' half-precision
decode. fp32 activations keep the exact fp32 select tree.

The program is data (:data:`PROGRAM`, operands named) so that one source both renders the PTX string
(:func:`render`) and is what ``tests/kernels/test_decode_asm_triton.py`` emulates bit for bit on all 256
byte values against the oracle: a wrong selector or table constant fails there. The interpreter
(``TRITON_INTERPRET=1``) cannot run inline assembly; ``decode_triton.use_asm_decode`` is the one place
that picks this path.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from peftfx.kernels.formats import FP4_CODE, NF4_CODE

__all__ = ["PROGRAM", "OPERANDS", "NEG_ZERO_X2", "table_words", "render", "decode_pairs"]

# inline-asm operand order: outputs first (hi nibble values, then lo), then inputs (4 packed bytes,
# then the scales of elements (0, 1) and (2, 3) as two 16-bit pairs)
OPERANDS = ("HI0", "HI1", "LO0", "LO1", "P", "S0", "S1")
NEG_ZERO_X2 = 0x80008000  # -0.0 in both 16-bit halves (fp16 and bf16 alike)

# (opcode, destination, sources...); sources are register names, table words "TL0".."TH3" or ints.
# lop3 0xEA = (a & b) | c.  Selector words: bytes 0-3 of the first source, 4-7 of the second.
_HALF = [
    # (low-3-bit selector, bit-3 selector, hi output, lo output, scale pair)
    ("s7", "t", "HI0", "LO0", "S0"),      # bytes 0, 1 of P
    ("s7h", "th", "HI1", "LO1", "S1"),    # bytes 2, 3 of P
]
PROGRAM: list[tuple] = [
    ("and.b32", "s7", "P", 0x77777777),                  # code & 7 of all 8 nibbles
    ("shr.u32", "s7h", "s7", 16),                        # prmt reads selector bits 0-15 only
    ("shr.u32", "t", "P", 1),                            # code bit 3 -> nibble bit 2
    ("lop3.b32", "t", "t", 0x44444444, 0x32103210, 0xEA),  # nibble i: i | (bit3 ? 4 : 0)
    ("shr.u32", "th", "t", 16),
]
for _s7, _t, _hi, _lo, _sc in _HALF:
    PROGRAM += [
        ("prmt.b32", "la", "TL0", "TL1", _s7),   # low bytes of entries 0-7 at the 4 codes
        ("prmt.b32", "lb", "TL2", "TL3", _s7),   # ... of entries 8-15
        ("prmt.b32", "ha", "TH0", "TH1", _s7),   # high bytes, entries 0-7
        ("prmt.b32", "hb", "TH2", "TH3", _s7),
        ("prmt.b32", "l", "la", "lb", _t),       # per code: entries 8-15 when bit 3 is set
        ("prmt.b32", "h", "ha", "hb", _t),
        # l, h bytes are the codes [l0, h0, l1, h1]: pair (v(l0), v(l1)) = bytes l0 h0' l1 h1' ...
        ("prmt.b32", _lo, "l", "h", 0x6240),
        ("prmt.b32", _hi, "l", "h", 0x7351),
        ("fma.rn.x2", _lo, _lo, _sc, "NZ"),
        ("fma.rn.x2", _hi, _hi, _sc, "NZ"),
    ]
_TEMPS = ("s7", "s7h", "t", "th", "la", "lb", "ha", "hb", "l", "h")


def table_words(codebook: torch.Tensor, dtype: torch.dtype) -> dict[str, int]:
    """The constant registers of :data:`PROGRAM`: ``TL0..TL3`` / ``TH0..TH3``, the low / high bytes of a
    16-entry codebook rounded to ``dtype`` (entry ``4w + i`` in byte ``i`` of word ``w``), and ``NZ``."""
    if codebook.numel() != 16 or dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"need a 16-entry codebook and fp16/bf16, got {codebook.numel()} entries, {dtype}")
    bits = codebook.to(dtype).view(torch.int16).to(torch.int32).bitwise_and(0xFFFF).tolist()
    words = {}
    for w in range(4):
        entries = bits[4 * w:4 * w + 4]
        words[f"TL{w}"] = sum((e & 0xFF) << (8 * i) for i, e in enumerate(entries))
        words[f"TH{w}"] = sum((e >> 8) << (8 * i) for i, e in enumerate(entries))
    words["NZ"] = NEG_ZERO_X2  # fma's addend must be a register
    return words


def render(codebook: torch.Tensor, dtype: torch.dtype) -> str:
    """The PTX of :data:`PROGRAM` for one codebook and activation dtype (operands ``$0..$6``)."""
    words = table_words(codebook, dtype)
    suffix = "f16x2" if dtype == torch.float16 else "bf16x2"
    names = {n: f"${i}" for i, n in enumerate(OPERANDS)}
    regs = {n: f"%{n}" for n in _TEMPS + tuple(words)}

    def operand(x):
        if isinstance(x, int):
            return f"0x{x:08x}"
        return names.get(x) or regs[x]

    lines = ["{", ".reg .b32 " + ", ".join(regs[n] for n in _TEMPS + tuple(words)) + ";"]
    lines += [f"mov.b32 %{n}, 0x{v:08x};" for n, v in words.items()]
    for op, dst, *src in PROGRAM:
        op = op.replace("fma.rn.x2", f"fma.rn.{suffix}")
        lines.append(f"{op} {operand(dst)}, {', '.join(operand(s) for s in src)};")
    lines.append("}")
    return "\n".join(lines)


_NF4_F16 = tl.constexpr(render(NF4_CODE, torch.float16))
_NF4_BF16 = tl.constexpr(render(NF4_CODE, torch.bfloat16))
_FP4_F16 = tl.constexpr(render(FP4_CODE, torch.float16))
_FP4_BF16 = tl.constexpr(render(FP4_CODE, torch.bfloat16))
_CONSTRAINTS = tl.constexpr("=r,=r,=r,=r,r,r,r")


@triton.jit
def decode_pairs(byte, scale, CODEBOOK: tl.constexpr, OUT_DTYPE: tl.constexpr):
    """(values of the high nibbles, values of the low nibbles) of uint8 ``byte`` (any shape) times
    ``scale`` (same shape, OUT_DTYPE fp16/bf16), in OUT_DTYPE. CODEBOOK: 0 NF4, 1 FP4. GPU only."""
    if CODEBOOK == 0:
        if OUT_DTYPE == tl.float16:
            hi, lo = tl.inline_asm_elementwise(_NF4_F16, _CONSTRAINTS, [byte, scale], dtype=(scale.dtype, scale.dtype),
                                               is_pure=True, pack=4)
        else:
            hi, lo = tl.inline_asm_elementwise(_NF4_BF16, _CONSTRAINTS, [byte, scale],
                                               dtype=(scale.dtype, scale.dtype), is_pure=True, pack=4)
    else:
        if OUT_DTYPE == tl.float16:
            hi, lo = tl.inline_asm_elementwise(_FP4_F16, _CONSTRAINTS, [byte, scale], dtype=(scale.dtype, scale.dtype),
                                               is_pure=True, pack=4)
        else:
            hi, lo = tl.inline_asm_elementwise(_FP4_BF16, _CONSTRAINTS, [byte, scale],
                                               dtype=(scale.dtype, scale.dtype), is_pure=True, pack=4)
    return hi, lo
