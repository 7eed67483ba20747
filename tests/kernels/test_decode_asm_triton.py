"""The inline-PTX NF4/FP4 decode (kernels/decode_asm_triton.py), checked without a GPU.

The interpreter cannot run inline assembly, so the PTX string the compiled kernels embed is parsed back
here and emulated instruction by instruction (``prmt`` byte permutes with their sign-replicate mode,
``lop3`` truth tables, ``fma.rn.{f16,bf16}x2`` as one rounding of the exact product) on every byte value
in every position of the packed register, against the oracle's codebooks (``formats.NF4_CODE`` /
``FP4_CODE``). A wrong selector, table byte or operand order changes some output and fails. That the
kernels compile with it for sm_80 / sm_90 is test_aot_resources.py's job; on a CUDA machine
(bench/gpu_check.sh) the last test runs the same PTX on the device, which also checks how Triton packs
the elements into the asm's registers.
"""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

from peftfx.kernels import decode_asm_triton as dat
from peftfx.kernels.decode_triton import interpreting
from peftfx.kernels.formats import code_for

_LINE = re.compile(r"^([a-z0-9.]+)\s+(.*);$")
_MASK = 0xFFFFFFFF


def _prmt(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """PTX ``prmt.b32 d, a, b, c`` (default mode): byte i of d is byte ``c[4i+2:4i]`` of {b, a}, or that
    byte's sign replicated when bit ``4i+3`` of c is set."""
    src = [(a >> (8 * j)) & 0xFF for j in range(4)] + [(b >> (8 * j)) & 0xFF for j in range(4)]
    src = np.stack(src)  # [8, n]
    out = np.zeros_like(a)
    for i in range(4):
        sel = (c >> (4 * i)) & 0xF
        byte = np.take_along_axis(src, (sel & 7)[None, :], axis=0)[0]
        byte = np.where(sel & 8, np.where(byte & 0x80, 0xFF, 0x00), byte)
        out |= byte << (8 * i)
    return out


def _lop3(a, b, c, lut: int):
    out = np.zeros_like(a)
    for idx in range(8):
        if lut >> idx & 1:
            out |= (a if idx & 4 else ~a) & (b if idx & 2 else ~b) & (c if idx & 1 else ~c)
    return out & _MASK


def _fma_x2(a, b, c, dtype: torch.dtype):
    """Per 16-bit half: round(a*b + c) once (a*b of two fp16/bf16 values is exact in fp32)."""
    def halves(x):
        h = torch.from_numpy(np.stack([x & 0xFFFF, x >> 16]).astype(np.int32)).to(torch.int16)
        return h.view(dtype).float()

    r = (halves(a) * halves(b) + halves(c)).to(dtype).view(torch.int16).to(torch.int64).numpy() & 0xFFFF
    return (r[0] | (r[1] << 16)).astype(np.int64)


def emulate(ptx: str, operands: dict[str, np.ndarray], dtype: torch.dtype) -> dict[str, np.ndarray]:
    """Run the inline-asm body ``ptx`` on int64 arrays of 32-bit words; operands ``$i`` by position."""
    regs = {f"${i}": operands.get(name) for i, name in enumerate(dat.OPERANDS)}

    shape = operands["P"].shape

    def val(tok: str):
        return np.full(shape, int(tok, 16), dtype=np.int64) if tok.startswith("0x") else regs[tok]

    for raw in ptx.splitlines():
        line = raw.strip()
        if line in ("{", "}") or line.startswith(".reg"):
            continue
        m = _LINE.match(line)
        assert m, f"unparsed PTX line {line!r}"
        op, args = m.group(1), [a.strip() for a in m.group(2).split(",")]
        dst, src = args[0], [val(a) for a in args[1:]]
        if op == "mov.b32":
            res = src[0]
        elif op == "and.b32":
            res = src[0] & src[1]
        elif op == "shr.u32":
            res = (src[0] & _MASK) >> int(args[2], 16)
        elif op == "lop3.b32":
            res = _lop3(src[0], src[1], src[2], int(args[4], 16))
        elif op == "prmt.b32":
            res = _prmt(src[0], src[1], src[2])
        elif op in ("fma.rn.f16x2", "fma.rn.bf16x2"):
            assert op == ("fma.rn.f16x2" if dtype == torch.float16 else "fma.rn.bf16x2")
            res = _fma_x2(src[0], src[1], src[2], dtype)
        else:
            raise AssertionError(f"the emulator does not know {op}")
        regs[dst] = res.astype(np.int64) & _MASK
    return {name: regs[f"${i}"] for i, name in enumerate(dat.OPERANDS)}


def _bits16(values: torch.Tensor) -> np.ndarray:
    return values.view(torch.int16).to(torch.int64).numpy() & 0xFFFF


def _decode(ptx: str, dtype: torch.dtype, scales: torch.Tensor):
    """(hi, lo) decoded values [256, 4] for packed words holding every byte value at every position."""
    v = np.arange(256, dtype=np.int64)
    byte = np.stack([(v + 67 * j) % 256 for j in range(4)], axis=1)  # [256, 4]: byte j of word v
    words = sum(byte[:, j] << (8 * j) for j in range(4))
    s = _bits16(scales.to(dtype))  # [256, 4] per element scales
    pair = lambda x, j: x[:, j] | (x[:, j + 1] << 16)
    out = emulate(ptx, {"P": words, "S0": pair(s, 0), "S1": pair(s, 2)}, dtype)

    def unpack(r0, r1):
        halves = np.stack([r0 & 0xFFFF, r0 >> 16, r1 & 0xFFFF, r1 >> 16], axis=1)
        return torch.from_numpy(halves.astype(np.int32)).to(torch.int16).view(dtype)

    return byte, unpack(out["HI0"], out["HI1"]), unpack(out["LO0"], out["LO1"])


FORMATS = ["nf4", "fp4"]
DTYPES = [torch.float16, torch.bfloat16]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_table_lookup_is_the_codebook_for_every_byte(fmt, dtype):
    code = code_for(fmt)
    byte, hi, lo = _decode(dat.render(code, dtype), dtype, torch.ones(256, 4))
    byte = torch.from_numpy(byte)
    want = code.to(dtype)
    assert torch.equal(hi.view(torch.int16), want[byte >> 4].view(torch.int16))  # bit for bit, -0.0 included
    assert torch.equal(lo.view(torch.int16), want[byte & 0xF].view(torch.int16))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_scaled_values_match_the_oracle(fmt, dtype):
    code = code_for(fmt)
    g = torch.Generator().manual_seed(0)
    scales = torch.rand(256, 4, generator=g) * 0.2 + 1e-3  # real absmax range of LLM weights
    byte, hi, lo = _decode(dat.render(code, dtype), dtype, scales)
    byte = torch.from_numpy(byte)
    for got, q in ((hi, byte >> 4), (lo, byte & 0xF)):
        # exactly round(round(code) * round(scale)) in dtype ...
        exact = (code.to(dtype).float()[q] * scales.to(dtype).float()).to(dtype)
        assert torch.equal(got.view(torch.int16), exact.view(torch.int16))
        # ... which is within 1.5 ulp of the oracle's fp32 code * absmax rounded once
        oracle = code[q] * scales
        ulp = torch.finfo(dtype).eps * oracle.abs().clamp_min(torch.finfo(dtype).tiny)
        assert ((got.float() - oracle).abs() <= 1.5 * ulp + 1e-30).all()


@pytest.mark.parametrize("bad", [("0x00007351", "0x00007315"), ("0x00006240", "0x00006204"), ("0x44444444", "0x88888888"),
                                 ("0x77777777", "0x33333333")])
def test_a_wrong_selector_constant_fails(bad):
    """The emulation is sensitive to every selector of the program: mutate one and the lookup breaks."""
    code = code_for("nf4")
    ptx = dat.render(code, torch.bfloat16)
    assert bad[0] in ptx
    byte, hi, lo = _decode(ptx.replace(bad[0], bad[1]), torch.bfloat16, torch.ones(256, 4))
    byte = torch.from_numpy(byte)
    want = code.to(torch.bfloat16)
    assert not (torch.equal(hi, want[byte >> 4]) and torch.equal(lo, want[byte & 0xF]))


def test_table_words_reject_a_wrong_codebook():
    with pytest.raises(ValueError, match="16-entry"):
        dat.table_words(torch.zeros(8), torch.float16)


@triton.jit
def _decode_kernel(b_ptr, s_ptr, hi_ptr, lo_ptr, CODEBOOK: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    hi, lo = dat.decode_pairs(tl.load(b_ptr + offs), tl.load(s_ptr + offs), CODEBOOK, s_ptr.dtype.element_ty)
    tl.store(hi_ptr + offs, hi)
    tl.store(lo_ptr + offs, lo)


@pytest.mark.skipif(interpreting() or not torch.cuda.is_available(), reason="runs the inline PTX on a CUDA GPU")
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_inline_ptx_on_the_gpu(fmt, dtype):
    code = code_for(fmt)
    g = torch.Generator().manual_seed(1)
    byte = torch.arange(1024) % 256
    byte = byte[torch.randperm(1024, generator=g)].to(torch.uint8)
    scales = (torch.rand(1024, generator=g) * 0.2 + 1e-3).to(dtype)
    hi = torch.empty(1024, dtype=dtype, device="cuda")
    lo = torch.empty_like(hi)
    _decode_kernel[(1,)](byte.cuda(), scales.cuda(), hi, lo, CODEBOOK=0 if fmt == "nf4" else 1, BLOCK=1024)
    q = byte.long()
    for got, nib in ((hi, q >> 4), (lo, q & 0xF)):
        want = (code.to(dtype).float()[nib] * scales.float()).to(dtype)
        assert torch.equal(got.cpu().view(torch.int16), want.view(torch.int16))
