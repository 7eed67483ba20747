from __future__ import annotations

import pytest
import torch

from peftfx.errors import KernelError
from peftfx.kernels.formats import FORMATS, FP4_CODE, NF4_CODE, QuantizedWeight
from peftfx.kernels.quantizer import quantize


def test_codebooks_match_bitsandbytes():
    F = pytest.importorskip("bitsandbytes.functional")
    assert torch.equal(NF4_CODE, F.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(FP4_CODE, F.get_4bit_type("fp4", device="cpu"))
    assert torch.equal(quantize.__globals__["DYNAMIC_CODE"], F.create_dynamic_map())


def test_formats_tuple():
    assert FORMATS == ("none", "nf4", "fp4", "int8", "int8-zeropoint", "llm-int8")


@pytest.mark.parametrize("fmt,dq,bits", [("nf4", False, 4.5), ("nf4", True, 4.127), ("int8", False, 8.5),
                                         ("int8-zeropoint", False, 9.0), ("llm-int8", False, 8.03)])
def test_storage_size(fmt, dq, bits):
    qw = quantize(torch.randn(128, 1024), fmt, block_size=64, double_quant=dq)
    assert qw.bits_per_param() == pytest.approx(bits, abs=0.01)
    assert qw.double_quant == dq
    assert qw.nbytes() == sum(t.numel() * t.element_size() for t in qw.tensors().values())


def test_from_tensors_roundtrip():
    qw = quantize(torch.randn(33, 47), "nf4", block_size=32, double_quant=True)
    back = QuantizedWeight.from_tensors("nf4", qw.tensors(), qw.shape, block_size=32, block_size2=256)
    assert back.double_quant and torch.equal(back.packed, qw.packed)


@pytest.mark.parametrize("mutate,match", [
    (lambda t: t.update(packed=t["packed"][:-1]), "packed weight has"),
    (lambda t: t.update(scales=t["scales"][:-1]), "scales length"),
    (lambda t: t.update(packed=t["packed"].to(torch.int8)), "must be torch.uint8"),
    (lambda t: t.update(scales=t["scales"].double()), "must be float32"),
])
def test_inconsistent_metadata(mutate, match):
    tensors = dict(quantize(torch.randn(16, 40), "fp4", block_size=32).tensors())
    mutate(tensors)
    with pytest.raises(KernelError, match=f"model.fc1.*{match}"):
        QuantizedWeight.from_tensors("fp4", tensors, (16, 40), block_size=32, name="model.fc1")


def test_bad_metadata_format_and_block():
    qw = quantize(torch.randn(16, 40), "int8", block_size=32)
    with pytest.raises(KernelError, match="'l1'.*block size 48"):
        QuantizedWeight.from_tensors("int8", qw.tensors(), (16, 40), block_size=48, name="l1")
    with pytest.raises(KernelError, match="'l1'.*unknown quantized format 'nf5'"):
        QuantizedWeight.from_tensors("nf5", qw.tensors(), (16, 40), name="l1")
