"""peftfx::linear_cross_entropy against the unfused chain
``F.cross_entropy(F.linear(h, w, b)[.float()].view(-1, V), t)``: bitwise logits and loss, gradients
to float rounding, float64 gradcheck, opcheck, and that no ``[N, V]`` tensor is saved for backward
or allocated by it."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from peftfx.errors import KernelError
from peftfx.kernels import fused_linear_ce, fused_ops
from peftfx.kernels.fused_linear_ce import chunk_rows, linear_cross_entropy

TOL = {torch.float32: 1e-6, torch.float64: 1e-12}


def _unfused(h, w, t, b=None, *, ignore_index=-100, reduction="mean", logits_dtype=None):
    logits = F.linear(h, w, b)
    if logits_dtype is not None:
        logits = logits.to(logits_dtype)
    return logits, F.cross_entropy(logits.view(-1, w.shape[0]), t, ignore_index=ignore_index, reduction=reduction)


def _inputs(shape, vocab, dtype, *, bias=True, every=3, ignore_index=-100, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*shape, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(vocab, shape[-1], generator=g) * 0.3).to(dtype).requires_grad_()
    b = torch.randn(vocab, generator=g).to(dtype).requires_grad_() if bias else None
    t = torch.randint(0, vocab, (h[..., 0].numel(),), generator=g)
    if every:
        t[::every] = ignore_index
    return h, w, b, t


def _close(got, expected, dtype, factor=1.0):
    """Within ``TOL`` relative to the tensor's largest entry (reduction order differs, nothing else)."""
    scale = expected.abs().max().clamp_min(1e-30)
    assert ((got - expected).abs().max() / scale).item() <= factor * TOL[dtype], (got - expected).abs().max()


CASES = [  # (hidden shape, vocab, ignore_index, every k-th target ignored)
    ((2, 37, 16), 300, -100, 4),
    ((5, 8), 13, 0, 3),           # 2-D hidden; ignore_index inside the class range
    ((3, 11, 24), 96, -100, 0),   # nothing ignored
]


@pytest.mark.parametrize("shape,vocab,ignore_index,every", CASES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rows", [None, 1, 7])  # the default rule; 1-row chunks; a ragged tail
@pytest.mark.parametrize("head", ["trainable", "frozen"])  # recompute in backward / grad_hidden in forward
def test_matches_the_unfused_chain(shape, vocab, ignore_index, every, reduction, dtype, bias, rows, head,
                                   monkeypatch):
    if rows is not None:
        monkeypatch.setattr(fused_linear_ce, "chunk_rows", lambda n, v, h: rows)
    h, w, b, t = _inputs(shape, vocab, dtype, bias=bias, every=every, ignore_index=ignore_index)
    if head == "frozen":
        w.requires_grad_(False)
        if b is not None:
            b.requires_grad_(False)
    ref_logits, ref = _unfused(h, w, t, b, ignore_index=ignore_index, reduction=reduction)
    logits, loss = linear_cross_entropy(h, w, t, b, ignore_index=ignore_index, reduction=reduction)
    assert torch.equal(logits, ref_logits) and torch.equal(loss, ref)  # forward: the same aten ops, bitwise
    params = tuple(p for p in (h, w, b) if p is not None and p.requires_grad)
    dy = torch.tensor(0.37, dtype=dtype)
    for got, expected in zip(torch.autograd.grad(loss, params, dy), torch.autograd.grad(ref, params, dy)):
        assert got.dtype == expected.dtype and got.shape == expected.shape
        # frozen: d loss / d hidden was computed for an upstream 1 and is scaled by dy afterwards,
        # one rounding more than scaling first (exact for loss.backward()'s dy = 1, tested below)
        _close(got, expected, dtype, 2.0 if head == "frozen" else 1.0)
    if head == "frozen":
        (g1,) = torch.autograd.grad(linear_cross_entropy(h, w, t, b, ignore_index=ignore_index,
                                                         reduction=reduction)[1], h)
        ref = _unfused(h, w, t, b, ignore_index=ignore_index, reduction=reduction)[1]
        _close(g1, torch.autograd.grad(ref, h)[0], dtype)
    if every:  # ignored rows send nothing back to their hidden state
        (g,) = torch.autograd.grad(linear_cross_entropy(h, w, t, b, ignore_index=ignore_index)[1], h)
        assert not g.reshape(-1, shape[-1])[::every].any()


def test_bf16_head_with_float_upcast_matches_the_unfused_chain():
    """HF's ``logits.float()`` before the loss: bf16 matmuls, fp32 logits and loss."""
    h, w, b, t = _inputs((2, 9, 32), 200, torch.bfloat16)
    ref_logits, ref = _unfused(h, w, t, b, logits_dtype=torch.float32)
    logits, loss = linear_cross_entropy(h, w, t, b, logits_dtype=torch.float32)
    assert logits.dtype == torch.float32 and torch.equal(logits, ref_logits) and torch.equal(loss, ref)
    got, expected = torch.autograd.grad(loss, (h, w, b)), torch.autograd.grad(ref, (h, w, b))
    assert all(g.dtype == torch.bfloat16 for g in got)
    assert torch.equal(got[0], expected[0])  # one bf16 matmul per row either way
    for g, e in zip(got[1:], expected[1:]):  # summed over rows in fp32 here, in the matmul there
        torch.testing.assert_close(g.float(), e.float(), rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("frozen", [False, True])
def test_gradients_through_the_logits_and_the_loss_add_up(frozen):
    """A caller that backpropagates through the returned logits as well (or only through them)."""
    h, w, b, t = _inputs((3, 7, 16), 50, torch.float64)
    params = (h,) if frozen else (h, w, b)
    if frozen:
        w.requires_grad_(False)
        b.requires_grad_(False)
    ref_logits, ref = _unfused(h, w, t, b)
    logits, loss = linear_cross_entropy(h, w, t, b)
    for combine in (lambda lg, ls: ls + (lg ** 2).mean(), lambda lg, ls: lg.sin().sum()):
        expected = torch.autograd.grad(combine(ref_logits, ref), params, retain_graph=True)
        got = torch.autograd.grad(combine(logits, loss), params, retain_graph=True)
        for g, e in zip(got, expected):
            _close(g, e, torch.float64)


def test_frozen_head_gets_no_weight_gradient_and_partial_needs():
    h, w, b, t = _inputs((2, 5, 8), 20, torch.float32)
    w.requires_grad_(False)
    b.requires_grad_(False)
    _, loss = linear_cross_entropy(h, w, t, b)
    loss.backward()
    assert h.grad is not None and w.grad is None and b.grad is None
    h2 = h.detach()  # only the head trains (train_modules on lm_head, blocks frozen)
    w.requires_grad_(True)
    _, loss = linear_cross_entropy(h2, w, t, b)
    (gw,) = torch.autograd.grad(loss, w)
    _close(gw, torch.autograd.grad(_unfused(h2, w, t, b)[1], w)[0], torch.float32)


def test_gradcheck_float64():
    h, w, b, t = _inputs((3, 5, 4), 7, torch.float64, every=4)
    for reduction in ("mean", "sum"):
        assert torch.autograd.gradcheck(lambda *a, r=reduction: linear_cross_entropy(a[0], a[1], t, a[2], reduction=r),
                                        (h, w, b))


def test_opcheck():
    h, w, b, t = _inputs((2, 6, 8), 12, torch.float32)
    torch.library.opcheck(torch.ops.peftfx.linear_cross_entropy.default, (h, w, b, t, -100, "mean", None))
    quick = ("test_schema", "test_faketensor")  # the full set (aot dispatch) once above is enough
    torch.library.opcheck(torch.ops.peftfx.linear_cross_entropy.default,
                          (h, w, None, t.clamp(min=0), 3, "sum", torch.float64), test_utils=quick)
    args = (torch.tensor(1.5), None, h.detach(), w.detach(), b.detach(), t, torch.tensor(8.0), -100, "mean", None, 5,
            [True, True, True])
    torch.library.opcheck(torch.ops.peftfx.linear_cross_entropy_backward.default, args, test_utils=quick)
    args = (*args[:-1], [True, False, False])
    torch.library.opcheck(torch.ops.peftfx.linear_cross_entropy_backward.default, args, test_utils=quick)


def test_saves_no_vocab_sized_tensor():
    h, w, b, t = _inputs((4, 32, 16), 500, torch.float32)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
        logits, _ = linear_cross_entropy(h, w, t, b)
    assert logits.shape == (4, 32, 500)
    assert not [s for s in saved if s.dim() > 1 and s.shape[-1] == 500]  # nothing [N, V] or [..., V]
    assert any(s.data_ptr() == h.data_ptr() for s in saved)  # the hidden states instead
    w.requires_grad_(False)  # a frozen head keeps d loss / d hidden instead: the same size
    b.requires_grad_(False)
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
        linear_cross_entropy(h, w, t, b)
    activations = [s for s in saved if s.dim() > 1 and s.data_ptr() != w.data_ptr()]
    assert [s.shape for s in activations] == [h.shape] and activations[0].data_ptr() != h.data_ptr()
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
        _unfused(h, w, t, b)
    assert [s for s in saved if s.dim() > 1 and s.shape[-1] == 500]  # the chain does keep one


@pytest.mark.parametrize("frozen", [False, True])
def test_step_peak_holds_no_vocab_sized_tensor(frozen, monkeypatch):
    """Measured with the CPU allocator's events: forward, drop the logits, backward."""
    from peftfx.inspect.estimate import measure_peak

    # a floor scaled down with the shapes (8 MiB chunks would be the whole [512, 4096] here)
    monkeypatch.setattr(fused_linear_ce, "MIN_CHUNK_ELEMENTS", 1 << 14)

    n, hidden, vocab = 512, 64, 4096
    h, w, _, t = _inputs((n, hidden), vocab, torch.float32, bias=False)
    w.requires_grad_(not frozen)
    full = n * vocab * 4

    def step(fn):
        def run():
            fn(h, w, t)[1].backward()  # the logits are dropped here, as model(**batch).loss.backward() does
            h.grad = None
        return run

    fused, unfused = measure_peak(step(linear_cross_entropy)), measure_peak(step(_unfused))
    assert unfused >= 2 * full
    # the forward's logits and one log_softmax chunk of its loss; the backward's chunk temporaries
    # (recomputed logits, log_softmax, its gradient) and the hidden gradient are smaller
    rows = chunk_rows(n, vocab, hidden)
    assert fused <= full + fused_ops.CHUNK_ELEMENTS * 4 + 3 * rows * vocab * 4 + 2 * n * hidden * 4 + 64 * 1024
    assert fused < 1.25 * full


def test_chunk_rows_follows_ligers_rule_above_a_floor():
    assert chunk_rows(2048, 8192, 1024) == 256  # 8 chunks
    assert chunk_rows(8192, 32000, 4096) == 1024  # Llama-7B's head at 8k tokens: 8 chunks
    assert chunk_rows(128, 8192, 1024) == 128  # Liger's 16 rows would be slow: the floor (256) caps at 128
    assert chunk_rows(4096, 152064, 1024) == 28  # Qwen's vocab: 149 chunks, above the floor (13 rows)
    assert chunk_rows(10, 50, 100) == 10 and chunk_rows(0, 50, 10) == 1 and chunk_rows(7, 1000, 1) == 7


def test_bad_inputs_raise_kernel_errors():
    h, w, t = torch.randn(2, 3, 8), torch.randn(10, 8), torch.zeros(6, dtype=torch.long)
    with pytest.raises(KernelError, match="reduction"):
        linear_cross_entropy(h, w, t, reduction="none")
    with pytest.raises(KernelError, match="one dtype"):
        linear_cross_entropy(h, w.double(), t)
    with pytest.raises(KernelError, match=r"weight \[V, H\]"):
        linear_cross_entropy(h, torch.randn(10, 7), t)
    with pytest.raises(KernelError, match="bias"):
        linear_cross_entropy(h, w, t, torch.randn(9))
    with pytest.raises(KernelError, match=r"int64 \[N=6\]"):
        linear_cross_entropy(h, w, t[:5])
    with pytest.raises(KernelError, match="logits_dtype"):
        linear_cross_entropy(h, w, t, logits_dtype=torch.int32)


@pytest.mark.parametrize("frozen", [False, True])
def test_a_second_backward_raises(frozen):
    h, w, b, t = _inputs((2, 3, 8), 10, torch.float64)
    w.requires_grad_(not frozen)
    _, loss = linear_cross_entropy(h, w, t, b)
    with pytest.raises((KernelError, RuntimeError)):
        (g,) = torch.autograd.grad(loss, h, create_graph=True)
        g.sum().backward()
