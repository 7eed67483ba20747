"""Paged optimizers on CUDA (run by bench/gpu_check.sh on a lent GPU; skipped on CPU-only machines):
state in pinned host memory, the same steps as the unpaged optimizer, less GPU memory at the step's peak."""
from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from peftfx.optim import AdamW8bit, PagedAdamW, PagedAdamW8bit

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="paged state streams to a CUDA device")


def _params(count: int, side: int, seed: int = 0) -> list[nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(side, side, generator=g).cuda()) for _ in range(count)]


def _steps(params: list[nn.Parameter], opt: torch.optim.Optimizer, n: int = 3) -> None:
    g = torch.Generator().manual_seed(1)
    for _ in range(n):
        for p in params:
            p.grad = (torch.randn(p.shape, generator=g) * 1e-3).cuda()
        opt.step()


def test_paged_8bit_equals_unpaged_and_keeps_its_state_pinned_on_the_host():
    a, b = _params(4, 512), _params(4, 512)
    oa, ob = AdamW8bit(a), PagedAdamW8bit(b)
    _steps(a, oa), _steps(b, ob)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    for pa, pb in zip(a, b):
        for k in ("codes", "absmax"):
            assert oa.state[pa][k].is_cuda
            host = ob.state[pb][k]
            assert host.device.type == "cpu" and host.is_pinned()
            assert torch.equal(host, oa.state[pa][k].cpu())


def test_paged_adamw_matches_torch_adamw():
    a, b = _params(3, 256), _params(3, 256)
    oa, ob = torch.optim.AdamW(a, lr=1e-3), PagedAdamW(b, lr=1e-3)
    _steps(a, oa), _steps(b, ob)
    assert all(torch.allclose(x, y, rtol=1e-5, atol=1e-6) for x, y in zip(a, b))
    assert all(ob.state[p]["exp_avg"].is_pinned() for p in b)


@pytest.mark.parametrize("paged,unpaged", [(PagedAdamW8bit, AdamW8bit), (PagedAdamW, torch.optim.AdamW)])
def test_paged_peak_gpu_memory_is_lower_by_about_the_state(paged, unpaged):
    peaks = {}
    for cls in (unpaged, paged):
        params = _params(16, 2048)
        opt = cls(params)
        _steps(params, opt, 1)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        _steps(params, opt, 1)
        torch.cuda.synchronize()
        peaks[cls] = torch.cuda.max_memory_allocated()
        state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values())
        del params, opt
        torch.cuda.empty_cache()
    # unpaged holds all 16 tensors' state on the GPU; paged at most ~3 tensors' worth while streaming
    assert peaks[paged] <= peaks[unpaged] - 0.6 * state, (peaks, state)


def test_state_saved_on_gpu_loads_on_cpu_bit_exactly():
    params = _params(2, 256)
    opt = AdamW8bit(params)
    _steps(params, opt)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, map_location="cpu")
    cpu_params = [nn.Parameter(p.detach().cpu()) for p in params]
    cpu_opt = AdamW8bit(cpu_params)
    cpu_opt.load_state_dict(sd)
    for p, q in zip(params, cpu_params):
        for k in ("codes", "absmax"):
            assert cpu_opt.state[q][k].device.type == "cpu"
            assert torch.equal(cpu_opt.state[q][k], opt.state[p][k].cpu())
