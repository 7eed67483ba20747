"""Gathered batched LoRA: reference vs per-row math, the custom op (opcheck, autograd), Triton vs reference.

The Triton part runs under TRITON_INTERPRET=1 on the CPU (tests/conftest.py turns it on when there is no GPU) or
natively on a GPU when the environment sets TRITON_INTERPRET=0.
"""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given, settings, strategies as st

from peftfx.errors import KernelError
from peftfx.kernels.multi_lora import MultiLoRALinear, multi_lora, multi_lora_ref

from tests.kernels.triton_env import DEVICE, INTERPRET, NO_DEVICE, NO_DEVICE_REASON


def _stacks(n: int, ranks: list[int], k: int, out: int, *, dtype=torch.float32, device="cpu", seed=0):
    """Stacked A [n, R, k] / B [n, out, R] with slot i zero beyond rank ranks[i]; scalings [n]."""
    g = torch.Generator().manual_seed(seed)
    r_max = max(ranks)
    a = torch.zeros(n, r_max, k)
    b = torch.zeros(n, out, r_max)
    for i, r in enumerate(ranks):
        a[i, :r] = torch.randn(r, k, generator=g)
        b[i, :, :r] = torch.randn(out, r, generator=g)
    s = torch.rand(n, generator=g) + 0.5
    return a.to(device, dtype), b.to(device, dtype), s.to(device)


def _per_row(x, ids, a, b, s):
    """The math one row at a time, in float64: the oracle for the reference."""
    rows = []
    for i in range(x.shape[0]):
        slot = int(ids[i])
        if slot < 0:
            rows.append(torch.zeros(x.shape[1], b.shape[1], dtype=torch.float64))
        else:
            rows.append(float(s[slot]) * (x[i].double() @ a[slot].double().T) @ b[slot].double().T)
    return torch.stack(rows)


@st.composite
def cases(draw, max_dim=48):
    n = draw(st.integers(1, 4))
    return dict(
        bsz=draw(st.integers(1, 5)), t=draw(st.integers(1, 9)), k=draw(st.integers(1, max_dim)),
        out=draw(st.integers(1, max_dim)), n=n, ranks=draw(st.lists(st.integers(1, 8), min_size=n, max_size=n)),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def _inputs(c, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(c["seed"])
    a, b, s = _stacks(c["n"], c["ranks"], c["k"], c["out"], dtype=dtype, device=device, seed=c["seed"])
    x = torch.randn(c["bsz"], c["t"], c["k"], generator=g).to(device, dtype)
    ids = torch.randint(-1, c["n"], (c["bsz"],), generator=g).to(device)
    return x, ids, a, b, s


@settings(max_examples=20)
@given(cases())
def test_reference_matches_per_row_math(c):
    x, ids, a, b, s = _inputs(c)
    got = multi_lora_ref(x, ids, a, b, s)
    torch.testing.assert_close(got.double(), _per_row(x, ids, a, b, s), atol=1e-4, rtol=1e-5)
    if (ids < 0).any():  # base-model rows get exactly no LoRA term
        assert got[ids < 0].abs().max().item() == 0


def test_op_opcheck_and_grads_match_autograd_through_reference():
    c = dict(bsz=4, t=3, k=10, out=7, n=3, ranks=[2, 4, 3], seed=1)
    x, ids, a, b, s = _inputs(c, dtype=torch.float64)
    ids = torch.tensor([2, -1, 0, 2])
    torch.library.opcheck(torch.ops.peftfx.multi_lora.default, (x, ids, a, b, s))
    leaves = [t.clone().requires_grad_() for t in (x, a, b)]
    dy = torch.randn(4, 3, 7, dtype=torch.float64)
    (torch.ops.peftfx.multi_lora(leaves[0], ids, leaves[1], leaves[2], s) * dy).sum().backward()
    ref_leaves = [t.clone().requires_grad_() for t in (x, a, b)]
    (multi_lora_ref(ref_leaves[0], ids, ref_leaves[1], ref_leaves[2], s) * dy).sum().backward()
    for got, want in zip(leaves, ref_leaves):
        torch.testing.assert_close(got.grad, want.grad)
    assert leaves[2].grad[1].abs().max() == 0  # slot 1 served no row


def test_wrapper_views_flattened_batch_major_rows_and_checks_shapes():
    c = dict(bsz=3, t=4, k=6, out=5, n=2, ranks=[1, 3], seed=2)
    x, ids, a, b, s = _inputs(c)
    full = multi_lora(x, ids, a, b, s)
    flat = multi_lora(x.reshape(12, 6), ids, a, b, s)  # GPT-2's Conv1D flattens [B, T, K] to [B*T, K]
    torch.testing.assert_close(flat, full.reshape(12, 5))
    with pytest.raises(KernelError, match=r"want \[n, R, 6\]"):
        torch.ops.peftfx.multi_lora(x, ids, a[:, :, :5], b, s)
    with pytest.raises(KernelError, match="int64 ids"):
        torch.ops.peftfx.multi_lora(x, ids.int(), a, b, s)


def test_module_slots_pad_ranks_and_compile_without_graph_breaks():
    base = torch.nn.Linear(6, 5)
    m = MultiLoRALinear(base, 6, 5, n_slots=0)
    x = torch.randn(3, 4, 6)
    ids = torch.tensor([0, -1, 1])
    torch.testing.assert_close(m(x, ids), base(x))  # no slots: the base alone
    a0, b0 = torch.randn(2, 6), torch.randn(5, 2)
    a1, b1 = torch.randn(4, 6), torch.randn(5, 4)
    m.set_slot(0, a0, b0, 0.5)
    m.set_slot(1, a1, b1, 2.0)
    assert m.ranks == [2, 4] and m.lora_A.shape == (2, 4, 6)
    want = base(x) + torch.stack([0.5 * x[0] @ a0.T @ b0.T, torch.zeros(4, 5), 2.0 * x[2] @ a1.T @ b1.T])
    torch.testing.assert_close(m(x, ids), want)
    compiled = torch.compile(m, fullgraph=True, backend="eager", dynamic=True)
    torch.testing.assert_close(compiled(x, ids), want)
    torch.testing.assert_close(compiled(x, torch.tensor([1, 1, 0])), m(x, torch.tensor([1, 1, 0])))
    m.set_slot(1, None, None, 0.0)  # removing the rank-4 adapter shrinks the padding back
    assert m.ranks == [2, 0] and m.lora_A.shape == (2, 2, 6)
    torch.testing.assert_close(m(x, torch.tensor([1, 1, 1])), base(x))
    with pytest.raises(KernelError, match=r"\[5, r\]"):
        m.set_slot(0, a0, b1, 1.0)


# ---------------------------------------------------------------- Triton vs reference


def _triton():
    pytest.importorskip("triton")
    if NO_DEVICE:
        pytest.skip(NO_DEVICE_REASON)
    from peftfx.kernels.multi_lora_triton import multi_lora_triton

    return multi_lora_triton


# (dtype, atol, rtol): fp32 runs IEEE dots; half types round x and the output to 8-11 mantissa bits
TOLERANCES = [(torch.float32, 1e-4, 1e-4), (torch.float16, 2e-2, 2e-2), (torch.bfloat16, 1e-1, 2e-2)]


@settings(max_examples=12 if INTERPRET else 50)
@given(cases(max_dim=80), st.sampled_from(TOLERANCES))
def test_triton_matches_reference(c, tol):
    multi_lora_triton = _triton()
    dtype, atol, rtol = tol
    x, ids, a, b, s = _inputs(c, dtype=dtype, device=DEVICE)
    got = multi_lora_triton(x, ids, a, b, s)
    want = multi_lora_ref(x.float(), ids, a.float(), b.float(), s)
    assert got.dtype == dtype and got.shape == want.shape
    torch.testing.assert_close(got.float(), want, atol=atol * max(1.0, want.abs().max().item() / 10), rtol=rtol)
    if (ids < 0).any():
        assert got[ids < 0].abs().max().item() == 0


def test_triton_through_the_op_and_odd_shapes():
    _triton()
    c = dict(bsz=2, t=19, k=70, out=33, n=3, ranks=[1, 17, 5], seed=3)  # R=17 pads to 32, T tail
    x, ids, a, b, s = _inputs(c, device=DEVICE)
    ids = torch.tensor([1, -1], device=DEVICE)
    old = os.environ.get("PEFTFX_KERNELS")
    os.environ["PEFTFX_KERNELS"] = "triton"
    try:
        got = torch.ops.peftfx.multi_lora(x, ids, a, b, s)
    finally:
        os.environ.pop("PEFTFX_KERNELS") if old is None else os.environ.__setitem__("PEFTFX_KERNELS", old)
    torch.testing.assert_close(got, multi_lora_ref(x, ids, a, b, s), atol=1e-4, rtol=1e-4)
