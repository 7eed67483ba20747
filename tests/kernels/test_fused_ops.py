"""peftfx::act_mul and peftfx::cross_entropy against the aten chains they replace: bitwise forward and
gradients, float64 gradcheck, opcheck, and what autograd saves."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from peftfx.errors import KernelError
from peftfx.kernels import fused_ops
from peftfx.kernels.fused_ops import act_mul, cross_entropy

ACTS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
}
# odd sizes; a 0-token batch; 1-D
SHAPES = [(7,), (3, 5, 11), (2, 0, 4), (4, 9, 131)]
DTYPES = [torch.float32, torch.bfloat16, torch.float64]


def _saved_bytes(fn):
    """(bytes, shapes, fn()'s result): the distinct storages autograd saves while ``fn()`` runs."""
    seen: dict[int, int] = {}
    shapes: list[torch.Size] = []

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in seen:
            seen[st.data_ptr()] = st.nbytes()
            shapes.append(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), shapes, out


# ------------------------------------------------------------------------------------------ act_mul
@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_act_mul_is_bitwise_the_aten_chain(act, shape, dtype):
    gate = (torch.randn(shape) * 3).to(dtype).requires_grad_()
    up = torch.randn(shape).to(dtype).requires_grad_()
    dy = torch.randn(shape).to(dtype)
    ref = ACTS[act](gate) * up
    out = act_mul(gate, up, act)
    assert out.dtype == dtype and out.shape == ref.shape
    assert torch.equal(out, ref)
    expected = torch.autograd.grad(ref, (gate, up), dy)
    got = torch.autograd.grad(out, (gate, up), dy)
    for g, e in zip(got, expected):
        assert torch.equal(g, e)  # the same kernels in the same order: not just close


def test_act_mul_operand_order_and_partial_grads():
    gate, up = torch.randn(6, 10, requires_grad=True), torch.randn(6, 10)
    assert torch.equal(act_mul(gate, up), up * F.silu(gate))  # IEEE products commute
    (g,) = torch.autograd.grad(act_mul(gate, up).sum(), gate)
    (e,) = torch.autograd.grad((F.silu(gate) * up).sum(), gate)
    assert torch.equal(g, e)
    gate2 = gate.detach()
    up2 = up.clone().requires_grad_()
    (g,) = torch.autograd.grad(act_mul(gate2, up2).sum(), up2)
    assert torch.equal(g, F.silu(gate2))


@pytest.mark.parametrize("act", list(ACTS))
def test_act_mul_gradcheck_float64(act):
    gate = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    up = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda g, u: act_mul(g, u, act), (gate, up))
    # create_graph: the unfused chain is twice differentiable, so the fused op must be too
    assert torch.autograd.gradgradcheck(lambda g, u: act_mul(g, u, act), (gate, up))


@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
def test_act_mul_opcheck(act):
    gate, up = torch.randn(2, 5, 8, requires_grad=True), torch.randn(2, 5, 8, requires_grad=True)
    torch.library.opcheck(torch.ops.peftfx.act_mul.default, (gate, up, act))


def test_act_mul_saves_gate_and_up_only():
    gate, up = torch.randn(16, 64, requires_grad=True), torch.randn(16, 64, requires_grad=True)
    fused, _, _ = _saved_bytes(lambda: act_mul(gate, up))
    unfused, _, _ = _saved_bytes(lambda: F.silu(gate) * up)
    assert unfused == 3 * 16 * 64 * 4 and fused == 2 * 16 * 64 * 4


def test_act_mul_refuses_broadcast_dtype_mix_and_unknown_activation():
    with pytest.raises(KernelError, match="one shape and dtype"):
        act_mul(torch.randn(4, 8), torch.randn(1, 8))
    with pytest.raises(KernelError, match="one shape and dtype"):
        act_mul(torch.randn(4, 8), torch.randn(4, 8, dtype=torch.float64))
    with pytest.raises(KernelError, match="unknown activation"):
        act_mul(torch.randn(4, 8), torch.randn(4, 8), "relu")


# ------------------------------------------------------------------------------------ cross_entropy
CE_CASES = [  # (N, C, ignore_index, every k-th row ignored)
    (37, 1001, -100, 4),
    (64, 96, 0, 3),      # ignore_index inside the class range
    (5, 3, -100, 0),     # nothing ignored
    (300, 50, 7, 2),
]


@pytest.mark.parametrize("n,c,ignore_index,every", CE_CASES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunk", [fused_ops.CHUNK_ELEMENTS, 64])  # 64: many 1-row chunks
def test_cross_entropy_is_bitwise_f_cross_entropy(n, c, ignore_index, every, reduction, dtype, chunk, monkeypatch):
    monkeypatch.setattr(fused_ops, "CHUNK_ELEMENTS", chunk)
    logits = (torch.randn(n, c) * 4).to(dtype).requires_grad_()
    target = torch.randint(0, c, (n,))
    if every:
        target[::every] = ignore_index
    ref = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction=reduction)
    out = cross_entropy(logits, target, ignore_index=ignore_index, reduction=reduction)
    assert out.dtype == ref.dtype and out.shape == ()
    assert torch.equal(out, ref)
    dy = torch.tensor(0.37, dtype=dtype)
    (g,), (e,) = torch.autograd.grad(out, logits, dy), torch.autograd.grad(ref, logits, dy)
    assert torch.equal(g, e)
    if every:
        assert not g[::every].any()  # ignored rows get no gradient


def test_cross_entropy_all_rows_ignored_matches_torch():
    logits = torch.randn(4, 6, requires_grad=True)
    target = torch.full((4,), -100)
    out, ref = cross_entropy(logits, target), F.cross_entropy(logits, target)
    assert out.isnan() and ref.isnan()  # 0 / 0, as torch does
    assert torch.equal(torch.autograd.grad(out, logits)[0], torch.autograd.grad(ref, logits)[0])


def test_cross_entropy_gradcheck_float64():
    logits = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 4, -100, 2, 2, 1])
    for reduction in ("mean", "sum"):
        assert torch.autograd.gradcheck(lambda x: cross_entropy(x, target, reduction=reduction), (logits,))


@pytest.mark.parametrize("ignore_index,reduction", [(-100, "mean"), (3, "sum")])
def test_cross_entropy_opcheck(ignore_index, reduction):
    logits = torch.randn(9, 12, requires_grad=True)
    target = torch.randint(0, 12, (9,))
    target[::3] = ignore_index
    torch.library.opcheck(torch.ops.peftfx.cross_entropy.default, (logits, target, ignore_index, reduction))
    grad, tw = torch.tensor(1.5), torch.tensor(6.0)
    torch.library.opcheck(torch.ops.peftfx.cross_entropy_backward.default,
                          (grad, logits.detach(), target, tw, ignore_index, reduction))


def test_cross_entropy_saves_logits_not_log_softmax():
    logits = torch.randn(32, 200, requires_grad=True)
    target = torch.randint(0, 200, (32,))
    _, shapes, _ = _saved_bytes(lambda: cross_entropy(logits, target))
    big = [s for s in shapes if s.numel() >= 32 * 200]
    assert big == [torch.Size([32, 200])]  # exactly one [N, C] tensor ...
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        cross_entropy(logits, target)
    assert any(t.untyped_storage().data_ptr() == logits.untyped_storage().data_ptr() for t in saved)  # ... the logits


def test_cross_entropy_backward_peak_is_one_gradient_plus_chunks():
    """Measured with the CPU allocator's events: the unfused backward holds three [N, C] tensors at
    once (log_softmax's saved output, nll's one-hot grad, the result); the fused one holds the result
    and two chunk-sized temporaries."""
    from peftfx.inspect.estimate import measure_peak

    n, c = 256, 4096
    logits = torch.randn(n, c, requires_grad=True)  # held by the caller, as a model output is
    target = torch.randint(0, c, (n,))
    full = n * c * 4

    def step(fn):
        def run():
            fn(logits, target).backward()
            logits.grad = None
        return run

    fused = measure_peak(step(lambda x, t: cross_entropy(x, t)))
    unfused = measure_peak(step(lambda x, t: F.cross_entropy(x, t)))
    assert unfused >= 3 * full
    assert fused <= full + 2 * fused_ops.CHUNK_ELEMENTS * 4 + 64 * 1024


def test_cross_entropy_rejects_what_it_does_not_implement():
    logits, target = torch.randn(4, 6), torch.tensor([1, 2, 3, 9])
    with pytest.raises((IndexError, RuntimeError), match="out of bounds"):
        cross_entropy(logits, target)  # an out-of-range class, refused as F.cross_entropy refuses it
    with pytest.raises(KernelError, match="reduction"):
        cross_entropy(logits, target.clamp(max=5), reduction="none")
    with pytest.raises(KernelError, match="2-D"):
        cross_entropy(torch.randn(2, 6, 3), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(KernelError, match="int64"):
        cross_entropy(logits, target.int())


def test_ops_run_on_meta_tensors():
    """The memory planner and meta-device models call the ops without data."""
    with torch.device("meta"):
        loss = cross_entropy(torch.randn(4, 10), torch.zeros(4, dtype=torch.long))
        y = act_mul(torch.randn(3, 5), torch.randn(3, 5), "gelu")
    assert loss.is_meta and loss.shape == () and y.is_meta and y.shape == (3, 5)


def test_act_mul_backward_holds_two_intermediates_beyond_its_inputs():
    """Measured with the CPU allocator's events: the output, its gradient, then d_gate (computed over
    its own temporary) and d_up; the old order held dy * up, d_gate and d_up at once. In a
    checkpointed block this backward is the step's peak."""
    from peftfx.inspect.estimate import measure_peak

    gate, up = torch.randn(256, 1024, requires_grad=True), torch.randn(256, 1024, requires_grad=True)
    full = 256 * 1024 * 4

    def step():
        y = act_mul(gate, up)
        y.backward(torch.ones_like(y))
        gate.grad = up.grad = None

    assert measure_peak(step) <= 4 * full + 64 * 1024
