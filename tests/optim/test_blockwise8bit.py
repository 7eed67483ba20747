"""peftfx.kernels.blockwise8bit: the maps, the table quantizer, the oracle and the CPU update."""
from __future__ import annotations

import pytest
import torch
from hypothesis import example, given, strategies as st

from peftfx.errors import KernelError
from peftfx.kernels.blockwise8bit import (
    BLOCK, SIGNED_MAP, UNSIGNED_MAP, AdamWHyper, adamw8bit_step_, adamw8bit_step_reference, code_table,
    dequantize_blockwise, lookup_codes, new_state, quantize_blockwise, sortable_bits,
)
from peftfx.kernels.formats import dynamic_map
from tests.optim.quant_bound import quantization_bound


@pytest.mark.parametrize("signed", [True, False])
def test_maps_are_byte_identical_to_bitsandbytes(signed):
    F = pytest.importorskip("bitsandbytes.functional")
    theirs = F.create_dynamic_map(signed=signed)
    ours = SIGNED_MAP if signed else UNSIGNED_MAP
    assert ours.dtype == theirs.dtype == torch.float32
    assert torch.equal(ours.view(torch.int32), theirs.view(torch.int32))
    assert torch.equal(dynamic_map(signed), ours)


def _searchsorted_codes(x: torch.Tensor, qmap: torch.Tensor) -> torch.Tensor:
    return torch.searchsorted((qmap[:-1] + qmap[1:]) / 2, x)


@pytest.mark.parametrize("qmap", [SIGNED_MAP, UNSIGNED_MAP], ids=["signed", "unsigned"])
def test_code_table_is_nearest_rounding_at_every_bucket_edge_and_midpoint(qmap):
    """The table equals searchsorted on the midpoints for every float in [-1, 1] that could go wrong:
    every bucket's two ends, each midpoint and its fp32 neighbours, plus random values."""
    table = code_table(qmap)
    h = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int64)
    keys = torch.cat([(h << 16), (h << 16) | 0xFFFF]).to(torch.int32)
    mids = (qmap[:-1] + qmap[1:]) / 2
    near = torch.cat([mids, torch.nextafter(mids, torch.tensor(2.0)), torch.nextafter(mids, torch.tensor(-2.0))])
    x = torch.cat([(keys ^ ((keys >> 31) & 0x7FFFFFFF)).view(torch.float32), near, torch.rand(20000) * 2 - 1,
                   torch.tensor([0.0, -0.0, 1.0, -1.0, 1e-30, -1e-30])])
    x = x[x.abs() <= 1]
    if qmap is UNSIGNED_MAP:
        x = x[x >= 0].abs()  # +0.0 only: the second moment is never -0.0
    assert torch.equal(lookup_codes(sortable_bits(x), table), _searchsorted_codes(x, qmap).to(torch.uint8))


def test_code_table_refuses_a_map_too_fine_for_16_bit_buckets():
    with pytest.raises(KernelError, match="two midpoints"):
        code_table(torch.linspace(0.5, 0.5 + 255 * 1e-7, 256))


@given(n=st.integers(1, 3 * BLOCK + 5), scale=st.floats(1e-8, 1e3), signed=st.booleans(), seed=st.integers(0, 2**16))
def test_blockwise_round_trip_error_is_half_a_map_gap(n, scale, signed, seed):
    """Nearest rounding: |deq - x| <= absmax * (gap between the map values around x / absmax) / 2."""
    qmap = SIGNED_MAP if signed else UNSIGNED_MAP
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed)) * scale
    x = x if signed else x.abs()
    codes, absmax = quantize_blockwise(x, qmap)
    assert codes.dtype == torch.uint8 and absmax.shape == (-(-n // BLOCK),)
    back = dequantize_blockwise(codes, absmax, qmap)
    a = absmax.repeat_interleave(BLOCK)[:n]
    assert torch.all((back - x).abs() <= quantization_bound(x, a, qmap) * (1 + 1e-5) + 1e-12 * a)


def test_new_state_dequantizes_to_zero():
    codes, absmax = new_state(1000)
    assert codes.shape == (2, 1000) and absmax.shape == (2, 4)
    assert torch.all(dequantize_blockwise(codes[0], absmax[0], SIGNED_MAP) == 0)
    assert torch.all(dequantize_blockwise(codes[1], absmax[1], UNSIGNED_MAP) == 0)


def _random_state(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    c1, a1 = quantize_blockwise(torch.randn(n, generator=g) * 1e-2, SIGNED_MAP)
    c2, a2 = quantize_blockwise(torch.rand(n, generator=g) * 1e-4, UNSIGNED_MAP)
    return torch.stack([c1, c2]), torch.stack([a1, a2])


@example(n=2 * 65536 + 257, dtype=torch.bfloat16, wd=0.1, step=3, seed=1)
@example(n=65536, dtype=torch.float32, wd=0.0, step=1, seed=2)
@given(n=st.integers(1, 70_000), dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       wd=st.sampled_from([0.0, 0.1]), step=st.integers(1, 50), seed=st.integers(0, 2**16))
def test_cpu_update_equals_the_oracle_bit_for_bit(n, dtype, wd, step, seed):
    """The chunked CPU path (table quantizer, preallocated buffers, both moments per op) equals the oracle
    (searchsorted, whole tensor) in every byte, across chunk boundaries (CHUNK = 65536) and short blocks."""
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(n, generator=g).to(dtype)
    grad = (torch.randn(n, generator=g) * 1e-2).to(dtype)
    codes, absmax = _random_state(n, seed)
    h = AdamWHyper(1e-3, 0.9, 0.999, 1e-8, wd, step)
    fast = [p.clone(), grad, codes.clone(), absmax.clone()]
    slow = [p.clone(), grad, codes.clone(), absmax.clone()]
    adamw8bit_step_(*fast, h)
    adamw8bit_step_reference(*slow, h)
    for a, b in zip(fast, slow):
        assert torch.equal(a, b)


def test_cpu_update_refuses_non_contiguous_tensors():
    p = torch.randn(64, 128).t()
    codes, absmax = new_state(p.numel())
    with pytest.raises(KernelError, match="contiguous"):
        adamw8bit_step_(p, torch.randn(64, 128).t(), codes, absmax, AdamWHyper(1e-3, 0.9, 0.999, 1e-8, 0, 1))
