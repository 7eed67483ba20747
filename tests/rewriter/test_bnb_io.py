"""bitsandbytes Linear4bit state-dict layout: our bytes equal what bitsandbytes writes, read back
bit-exactly, and run in bitsandbytes' own Linear4bit with our outputs."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from peftfx.io.bnb_io import bnb_state_dict, from_bnb, to_bnb, to_linear4bit
from peftfx.kernels.modules import qlora_layers
from peftfx.errors import CheckpointError
from peftfx.kernels import quantizer
from peftfx.kernels.modules import QLoRALinear
from tests.rewriter.travel_cases import fresh, same_bytes

# odd sizes: blocks cross rows, a partial last block, and > 256 blocks for two nested scales
SHAPES = [(40, 72), (33, 17), (130, 256)]


def _bnb_linear4bit(w: torch.Tensor, b: torch.Tensor, fmt: str, dq: bool):
    bnb = pytest.importorskip("bitsandbytes")
    lin = bnb.nn.Linear4bit(w.shape[1], w.shape[0], bias=True, compute_dtype=torch.float32,
                            compress_statistics=dq, quant_type=fmt)
    lin.load_state_dict({"weight": w, "bias": b})
    return lin.to("cpu")  # quantizes


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("fmt,dq", [("nf4", True), ("nf4", False), ("fp4", True)])
def test_layout_is_bitsandbytes_own(shape, fmt, dq):
    w, b = torch.randn(shape), torch.randn(shape[0])
    theirs = _bnb_linear4bit(w, b, fmt, dq).state_dict(prefix="layer.")
    qw = quantizer.quantize(w, fmt, block_size=64, double_quant=dq)
    ours = to_bnb(qw, b, prefix="layer.")
    assert ours.keys() == theirs.keys()
    assert all(same_bytes(ours[k], theirs[k]) for k in ours)  # the quant-state JSON bytes too
    back, bias = from_bnb(theirs, prefix="layer.")
    assert back.shape == qw.shape and back.double_quant == dq and same_bytes(bias, b)
    assert all(same_bytes(back.tensors()[k], v) for k, v in qw.tensors().items())


# in_features a multiple of the block size: bitsandbytes 0.50.2's native CPU dequant kernel
# decodes blocks that cross rows wrongly (its own quantize->dequantize of a [48, 80] weight is off
# by ~2), so only row-aligned blocks make bnb a fair oracle for the forward.
@pytest.mark.parametrize("dq,shape", [(True, (48, 128)), (False, (40, 64))])
def test_linear4bit_with_our_codes_matches_our_layer(dq, shape):
    pytest.importorskip("bitsandbytes")
    w, b = torch.randn(shape), torch.randn(shape[0])
    ours = QLoRALinear(quantizer.quantize(w, "nf4", double_quant=dq), b, r=None)
    lin = to_linear4bit(ours).eval()
    x = torch.randn(2, 5, shape[1])
    with torch.no_grad():
        # same codes, same fp32 values; the sums differ in order only (BLAS vs peftfx's native decode
        # matmul for these M <= 16 rows): a few ulps of |y| (~30 here)
        tol = 4e-6 * max(1.0, lin(x).abs().max().item())
        assert (lin(x) - ours(x)).abs().max().item() <= tol
        assert (lin(x) - ours(x)).abs().max().item() <= tol  # again: no lossy CPU repack on reuse
    sd = lin.state_dict()
    back, _ = from_bnb(sd)
    assert all(same_bytes(back.tensors()[k], v) for k, v in ours.quantized_weight().tensors().items())


def test_bnb_state_dict_of_a_compiled_model():
    gm, _ = fresh("llama", "nf4")
    sd = bnb_state_dict(gm)
    for fqn, m in qlora_layers(gm).items():
        assert f"{fqn}.weight.quant_state.bitsandbytes__nf4" in sd and f"{fqn}.weight_scales" not in sd
        assert same_bytes(sd[f"{fqn}.weight"].reshape(-1), m.weight)
        assert same_bytes(sd[f"{fqn}.lora_A"], m.lora_A)  # adapters keep their names
        qw, _ = from_bnb(sd, prefix=f"{fqn}.")
        assert all(same_bytes(qw.tensors()[k], v) for k, v in m.quantized_weight().tensors().items())
    assert "model.embed_tokens.weight" in sd


def test_bad_bnb_input():
    qw = quantizer.quantize(torch.randn(16, 32), "nf4", double_quant=True)
    sd = to_bnb(qw)
    with pytest.raises(CheckpointError, match="expected exactly one"):
        from_bnb({k: v for k, v in sd.items() if "quant_state" not in k})
    with pytest.raises(CheckpointError, match="missing.*nested_absmax"):
        from_bnb({k: v for k, v in sd.items() if k != "weight.nested_absmax"})
    with pytest.raises(CheckpointError, match="quant_map is not bitsandbytes' nf4"):
        from_bnb({**sd, "weight.quant_map": torch.linspace(-1, 1, 16)})
    with pytest.raises(CheckpointError, match="does not describe a valid nf4"):
        from_bnb({**sd, "weight": sd["weight"][:-1]})
    with pytest.raises(CheckpointError, match="quant-state JSON"):
        from_bnb({**sd, "weight.quant_state.bitsandbytes__nf4": torch.tensor([0xFF, 0x00], dtype=torch.uint8)})
    with pytest.raises(CheckpointError, match="nf4/fp4 only"):
        to_bnb(quantizer.quantize(torch.randn(16, 32), "int8"))
    with pytest.raises(CheckpointError, match="only nf4/fp4"):
        to_linear4bit(QLoRALinear(torch.randn(8, 8), None, r=None))
    assert isinstance(to_linear4bit(QLoRALinear(qw, None, r=2, alpha=2)), nn.Linear)
