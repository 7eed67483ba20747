"""peftfx.kernels.adam8bit_compiled: the inductor-compiled CPU update against the eager reference.

Bound on the parameter. The compiled kernel runs the reference's ops in the reference's order with the same
fp32 roundings (fused multiply-adds where ATen's vectorized loops use them), so m, v, the absmax and the codes
are bit-identical. The one op that differs is ``sqrt``: inductor's is correctly rounded, eager ``torch.sqrt``
(MKL vector math) may be off by one ulp (2**-23 relative). Then ``d = sqrt(v) + eps_hat`` differs by a
relative 2**-23, the update ``u = (-step_size m) / d`` by at most ``|u| 2**-22`` after its own rounding, and
``p' = p (1 - lr wd) + u`` by that plus one rounding of the sum: ``|p'_c - p'_e| <= |u| 2**-22 + ulp(p')``,
with ``ulp`` in the parameter's dtype (a bf16 parameter rounds once more, to its own ulp). The test allows
``|u| 2**-21 + ulp(p')`` (``|u|`` from the eager result, which is itself within an ulp of the true ``|u|``).

One compiled function serves every test (dynamic block count); fp32 and bf16 compile once each (~10-25 s
cold on 2 cores, less from inductor's on-disk cache).
"""
from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import example, given, settings, strategies as st
from torch._dynamo.utils import counters

import peftfx.kernels.adam8bit_compiled as compiled_mod
from peftfx.kernels.adam8bit_compiled import COMPILE_ENV, adamw8bit_step_compiled_, reset_fallback
from peftfx.kernels.blockwise8bit import (
    SIGNED_MAP, UNSIGNED_MAP, AdamWHyper, adamw8bit_step_, adamw8bit_step_reference, quantize_blockwise,
)
from peftfx.optim import AdamW8bit


def _random_state(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    c1, a1 = quantize_blockwise(torch.randn(n, generator=g) * 1e-2, SIGNED_MAP)
    c2, a2 = quantize_blockwise(torch.rand(n, generator=g) * 1e-4, UNSIGNED_MAP)
    return torch.stack([c1, c2]), torch.stack([a1, a2])


def _ulp(x: torch.Tensor) -> torch.Tensor:
    """fp32 size of one unit in the last place of ``x`` in its own dtype."""
    up = torch.nextafter(x.abs(), torch.tensor(float("inf"), dtype=x.dtype))
    return (up.float() - x.abs().float())


def _check_against_reference(n: int, dtype: torch.dtype, wd: float, step: int, seed: int, lr: float = 1e-3):
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(n, generator=g).to(dtype)
    grad = (torch.randn(n, generator=g) * 1e-2).to(dtype)
    codes, absmax = _random_state(n, seed)
    h = AdamWHyper(lr, 0.9, 0.999, 1e-8, wd, step)
    fast = [p.clone(), grad, codes.clone(), absmax.clone()]
    ref = [p.clone(), grad, codes.clone(), absmax.clone()]
    adamw8bit_step_compiled_(*fast, h)
    adamw8bit_step_reference(*ref, h)
    assert torch.equal(fast[2], ref[2]), "codes differ"
    assert torch.equal(fast[3].view(torch.int32), ref[3].view(torch.int32)), "absmax differs"
    u = ref[0].float() - p.float() * (1 - lr * wd)
    bound = u.abs() * 2.0**-21 + _ulp(ref[0])
    assert torch.all((fast[0].float() - ref[0].float()).abs() <= bound)


@example(n=2 * 256, dtype=torch.float32, wd=0.0, step=1, seed=0)
@example(n=70_000 + 17, dtype=torch.float32, wd=0.1, step=3, seed=1)  # tail of 17 (eager) after 273 blocks
@example(n=5 * 256 + 255, dtype=torch.bfloat16, wd=0.1, step=7, seed=2)
@example(n=300, dtype=torch.float32, wd=0.0, step=2, seed=3)  # one whole block: all eager
@given(n=st.integers(1, 9000), dtype=st.sampled_from([torch.float32, torch.bfloat16]), wd=st.sampled_from([0.0, 0.1]),
       step=st.integers(1, 50), seed=st.integers(0, 2**16))
@settings(max_examples=15)
def test_compiled_step_equals_the_eager_reference(n, dtype, wd, step, seed):
    """State codes and absmax bit for bit; the parameter within the sqrt bound (module docstring)."""
    _check_against_reference(n, dtype, wd, step, seed)


@pytest.mark.slow
@given(n=st.integers(1, 200_000), dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       wd=st.sampled_from([0.0, 0.1]), step=st.integers(1, 1000), seed=st.integers(0, 2**16))
@settings(max_examples=60)
def test_compiled_step_equals_the_eager_reference_wide(n, dtype, wd, step, seed):
    _check_against_reference(n, dtype, wd, step, seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_code_decodes_and_both_extreme_codes_encode_as_the_reference(dtype):
    """The state holds each of the 256 codes of both moments (every map entry is read through the kernel's
    int32-word unpacking and int32 -> int64 index path; the examples n = 70_017 and 1535 above start moment 2's
    row mid-word), and the new codes include 0 and 255 of both moments (written through its
    int32 -> fp32 -> uint8 path): codes and absmax bit for bit, the parameter within the sqrt bound."""
    n = 16 * 256
    codes = torch.arange(256, dtype=torch.uint8).repeat(2, n // 256)
    codes[1] = codes[1].view(16, 256)[torch.randperm(16)].reshape(-1).roll(37)  # moment 2's codes unaligned to 1's
    g = torch.Generator().manual_seed(5)
    absmax = torch.rand(2, n // 256, generator=g) * 1e-3 + 1e-6
    p = torch.randn(n, generator=g).to(dtype)
    grad = (torch.randn(n, generator=g) * 1e-3).to(dtype)
    grad[::256] = 1.0  # one large gradient per block: the block's absmax, code 255 (m > 0, v) and code 0 (m < 0)
    grad[128::512] = -1.0
    h = AdamWHyper(1e-3, 0.9, 0.999, 1e-8, 0.1, 4)
    fast = [p.clone(), grad, codes.clone(), absmax.clone()]
    ref = [p.clone(), grad, codes.clone(), absmax.clone()]
    adamw8bit_step_compiled_(*fast, h)
    adamw8bit_step_reference(*ref, h)
    assert {0, 255} <= set(ref[2][0].unique().tolist()) and 255 in ref[2][1].unique().tolist()
    assert torch.equal(fast[2], ref[2]), "codes differ"
    assert torch.equal(fast[3].view(torch.int32), ref[3].view(torch.int32)), "absmax differs"
    u = ref[0].float() - p.float() * (1 - 1e-3 * 0.1)
    assert torch.all((fast[0].float() - ref[0].float()).abs() <= u.abs() * 2.0**-21 + _ulp(ref[0]))


def test_codes_stored_at_an_odd_offset_update_as_the_reference():
    """State codes that start mid-word (a loaded state dict can view a larger buffer) are copied before the
    kernel reads them as int32 words: same state as the reference, and no fallback to eager."""
    n = 8 * 256
    codes, absmax = _random_state(n, 11)
    shifted = torch.empty(2 * n + 1, dtype=torch.uint8)[1:].view(2, n).copy_(codes)
    assert shifted.storage_offset() % 4 == 1
    g = torch.Generator().manual_seed(11)
    p, grad = torch.randn(n, generator=g), torch.randn(n, generator=g) * 1e-2
    h = AdamWHyper(1e-3, 0.9, 0.999, 1e-8, 0.1, 3)
    fast = [p.clone(), grad, shifted, absmax.clone()]
    ref = [p.clone(), grad, codes.clone(), absmax.clone()]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        adamw8bit_step_compiled_(*fast, h)
    adamw8bit_step_reference(*ref, h)
    assert torch.equal(fast[2], ref[2]) and torch.equal(fast[3], ref[3])


def test_no_recompile_across_tensor_sizes_and_a_learning_rate_schedule():
    params = [torch.nn.Parameter(torch.randn(s)) for s in [(64, 100), (4096 + 300,), (513, 77), (3, 2000)]]
    opt = AdamW8bit(params, lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 / (s + 1))
    graphs = []
    for _ in range(4):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        sched.step()
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[1:] == [graphs[0]] * 3, graphs  # the first step may compile (fp32), later ones never


def _train(params_seed: int, steps: int = 3) -> list[torch.Tensor]:
    torch.manual_seed(params_seed)
    params = [torch.nn.Parameter(torch.randn(n)) for n in (4096, 70_000 + 17)]
    opt = AdamW8bit(params, lr=1e-2)
    for i in range(steps):
        g = torch.Generator().manual_seed(i)
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    return [t.clone() for p in params for t in (p.detach(), opt.state[p]["codes"], opt.state[p]["absmax"])]


def test_env_var_selects_the_eager_path(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the compiled update ran although PEFTFX_OPTIM_COMPILE=0")

    eager_run = []
    monkeypatch.setenv(COMPILE_ENV, "0")
    monkeypatch.setattr(compiled_mod, "adamw8bit_step_compiled_", refuse)
    monkeypatch.setattr(compiled_mod, "adamw8bit_step_", lambda *a: (eager_run.append(1), adamw8bit_step_(*a)))
    eager = _train(0)
    assert eager_run
    monkeypatch.undo()
    compiled = _train(0)
    for a, b in zip(eager[1::3] + eager[2::3], compiled[1::3] + compiled[2::3]):  # codes, absmax: bit for bit
        assert torch.equal(a, b)
    for a, b in zip(eager[0::3], compiled[0::3]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_a_failing_compile_falls_back_to_eager_with_one_warning(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no working C++ compiler")

    monkeypatch.setattr(compiled_mod, "adamw8bit_step_compiled_", broken)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fallback = _train(0, steps=3)
        msgs = [str(w.message) for w in caught if "compiling the CPU 8-bit AdamW update failed" in str(w.message)]
        assert len(msgs) == 1 and "no working C++ compiler" in msgs[0]
        assert not compiled_mod.compile_enabled()
    finally:
        reset_fallback()
    monkeypatch.undo()
    monkeypatch.setenv(COMPILE_ENV, "0")
    eager = _train(0, steps=3)
    for a, b in zip(fallback, eager):
        assert torch.equal(a, b)
