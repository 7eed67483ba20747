from __future__ import annotations

import pytest
import torch

from peftfx.errors import KernelError
from peftfx.kernels import ops
from peftfx.kernels.backend import backend_for
from peftfx.kernels import reference as R
from peftfx.kernels import quantizer

FMTS = ["none", "nf4", "fp4", "int8", "int8-zeropoint", "llm-int8"]


def _weight(fmt, out_f=12, in_f=20, dtype=torch.float32, dq=False):
    w = torch.randn(out_f, in_f, dtype=dtype)
    return w if fmt == "none" else quantizer.quantize(w, fmt, block_size=16, double_quant=dq)


def _args(x, weight, bias, A, B, xl, s=2.0):
    if isinstance(weight, torch.Tensor):
        return (x, weight, torch.empty(0), None, None, bias, A, B, xl, s, "none", 64, 256, *weight.shape, 0.0)
    return (x, weight.packed, weight.scales, weight.scales2, weight.offset, bias, A, B, xl, s, weight.format,
            weight.block_size, weight.block_size2, *weight.shape, weight.threshold)


@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch):
    monkeypatch.setenv("PEFTFX_KERNELS", "cpu")


# Every bias x LoRA combination on the dense and NF4+DQ paths; one full combination per other format
# (opcheck costs ~1 s a case on a shared CPU).
OPCHECK_CASES = (
    [(f, dq, b, lora) for f, dq in [("none", False), ("nf4", True)] for b in (False, True)
     for lora in ("none", "x", "x_lora")]
    + [(f, False, True, "x_lora") for f in ["nf4", "fp4", "int8", "int8-zeropoint", "llm-int8"]]
    + [("llm-int8", False, False, "x")]
)


@pytest.mark.parametrize("fmt,dq,bias,lora", OPCHECK_CASES)
def test_opcheck_qlora_linear(fmt, dq, bias, lora):
    weight = _weight(fmt, dq=dq)
    x = torch.randn(2, 3, 20, requires_grad=True)
    b = torch.randn(12) if bias else None
    A = B = xl = None
    if lora != "none":
        A = torch.randn(4, 20, requires_grad=True)
        B = torch.randn(12, 4, requires_grad=True)
    if lora == "x_lora":
        xl = torch.randn(2, 3, 20, requires_grad=True)
    torch.library.opcheck(torch.ops.peftfx.qlora_linear.default, _args(x, weight, b, A, B, xl))


@pytest.mark.parametrize("fmt,dq", [("nf4", True), ("fp4", False), ("int8", False), ("int8-zeropoint", False),
                                    ("llm-int8", False)])
def test_opcheck_dequantize(fmt, dq):
    qw = _weight(fmt, 9, 40, dq=dq)
    for dtype in (torch.float32, torch.bfloat16):
        torch.library.opcheck(torch.ops.peftfx.dequantize.default,
                              (qw.packed, qw.scales, qw.scales2, qw.offset, qw.format, qw.block_size,
                               qw.block_size2, *qw.shape, dtype))
        assert torch.equal(ops.dequantize(qw, dtype), R.dequantize(qw, dtype))


@pytest.mark.parametrize("fmt", ["none", "nf4"])
@pytest.mark.parametrize("with_x_lora", [False, True])
def test_gradcheck_float64(fmt, with_x_lora):
    w = torch.randn(6, 10, dtype=torch.float64)
    weight = w if fmt == "none" else quantizer.quantize(w, "nf4", block_size=16, double_quant=True)
    x = torch.randn(3, 10, dtype=torch.float64, requires_grad=True)
    xl = torch.randn(3, 10, dtype=torch.float64, requires_grad=True) if with_x_lora else None
    A = torch.randn(2, 10, dtype=torch.float64, requires_grad=True)
    B = torch.randn(6, 2, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(6, dtype=torch.float64)
    if xl is None:
        fn = lambda x, A, B: ops.qlora_linear(x, weight, bias, A, B, 0.75)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (x, A, B))
    else:
        fn = lambda x, xl, A, B: ops.qlora_linear(x, weight, bias, A, B, 0.75, xl)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (x, xl, A, B))


@pytest.mark.parametrize("fmt", FMTS)
def test_wrapper_matches_reference_and_only_lora_grads(fmt):
    weight = _weight(fmt)
    x = torch.randn(4, 1, 20, requires_grad=True)
    A = torch.randn(3, 20, requires_grad=True)
    B = torch.randn(12, 3, requires_grad=True)
    y = ops.qlora_linear(x, weight, None, A, B, 0.5)
    assert y.shape == (4, 1, 12)
    torch.testing.assert_close(y, R.qlora_forward_ref(x, weight, None, A, B, 0.5))
    y.square().sum().backward()
    dx, _, dA, dB = R.qlora_backward_ref(2 * y.detach(), x.detach(), weight, A.detach(), B.detach(), 0.5)
    torch.testing.assert_close(x.grad, dx)
    torch.testing.assert_close(A.grad, dA)
    torch.testing.assert_close(B.grad, dB)


def test_quantize_only_no_lora():
    qw = _weight("nf4")
    x = torch.randn(5, 20)
    torch.testing.assert_close(ops.qlora_linear(x, qw, None, None, None, 0.0), x @ R.dequantize(qw).t())


def test_bf16_input_with_fp32_adapters():
    qw = _weight("nf4", dtype=torch.bfloat16)
    x = torch.randn(3, 20, dtype=torch.bfloat16, requires_grad=True)
    A = torch.randn(2, 20, requires_grad=True)
    B = torch.randn(12, 2, requires_grad=True)
    y = ops.qlora_linear(x, qw, None, A, B, 1.0)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and A.grad.dtype == torch.float32 and B.grad.dtype == torch.float32


def test_backward_saves_packed_not_dequantized():
    qw = _weight("nf4", 64, 64)
    x = torch.randn(2, 64, requires_grad=True)
    A = torch.randn(2, 64, requires_grad=True)
    B = torch.randn(64, 2, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        ops.qlora_linear(x, qw, None, A, B, 1.0)
    assert any(t.dtype == torch.uint8 for t in saved)
    assert not any(t.shape == (64, 64) and t.is_floating_point() for t in saved)


def test_backend_selection(monkeypatch):
    t = torch.zeros(1)
    monkeypatch.delenv("PEFTFX_KERNELS", raising=False)
    assert backend_for(t) == "cpu"
    for forced in ("triton", "reference", "cpu"):
        monkeypatch.setenv("PEFTFX_KERNELS", forced)
        assert backend_for(t) == forced
    monkeypatch.setenv("PEFTFX_KERNELS", "cuda")
    with pytest.raises(KernelError, match="PEFTFX_KERNELS"):
        backend_for(t)


@pytest.mark.parametrize("fmt", ["nf4", "int8-zeropoint", "llm-int8"])
def test_each_backend_name_runs_what_it_says(monkeypatch, fmt):
    """'cpu' runs cpu_gemm, 'reference' runs the oracle: the op's output equals the module it names."""
    from peftfx.kernels import cpu_gemm, quantizer

    torch.manual_seed(0)
    qw = quantizer.quantize(torch.randn(24, 40), fmt)
    x, A, B = torch.randn(3, 40), torch.randn(4, 40), torch.randn(24, 4)
    calls = []
    for module, fn in ((cpu_gemm, "qlora_forward"), (R, "qlora_forward_ref")):
        real = getattr(module, fn)
        monkeypatch.setattr(module, fn, lambda *a, _r=real, _n=fn, **k: calls.append(_n) or _r(*a, **k))
    for forced, expected in (("cpu", "qlora_forward"), ("reference", "qlora_forward_ref")):
        monkeypatch.setenv("PEFTFX_KERNELS", forced)
        calls.clear()
        ops.qlora_linear(x, qw, None, A, B, 0.5)
        assert calls[0] == expected, (forced, calls)


@pytest.mark.parametrize("case,match", [
    ("x_dim", r"input last dim \[19\] != in_features 20"),
    ("x_int", "input must be floating point"),
    ("lora_A", r"lora_A shape \[4, 19\] != \[r, 20\]"),
    ("lora_B", r"lora_B shape \[12, 3\] != \[12, 4\]"),
    ("bias", r"bias shape \[11\] != \[12\]"),
    ("only_A", "both be given"),
    ("packed_dtype", "packed weight must be torch.uint8"),
    ("x_lora", "x_lora shape"),
])
def test_bad_inputs_name_the_layer(case, match):
    qw = _weight("nf4")
    x, A, B, bias, xl = torch.randn(2, 20), torch.randn(4, 20), torch.randn(12, 4), None, None
    if case == "x_dim":
        x = torch.randn(2, 19)
    elif case == "x_int":
        x = torch.ones(2, 20, dtype=torch.long)
    elif case == "lora_A":
        A = torch.randn(4, 19)
    elif case == "lora_B":
        B = torch.randn(12, 3)
    elif case == "bias":
        bias = torch.randn(11)
    elif case == "only_A":
        B = None
    elif case == "packed_dtype":
        qw.packed = qw.packed.to(torch.int8)
    elif case == "x_lora":
        xl = torch.randn(3, 20)
    with pytest.raises(KernelError, match=match) as info:
        ops.qlora_linear(x, qw, bias, A, B, 1.0, xl, name="blocks.2.attn.q_proj")
    assert "blocks.2.attn.q_proj" in str(info.value)


def test_triton_backend_is_lazy(monkeypatch):
    """Forcing triton imports peftfx.kernels.qlora_triton only when the op runs."""
    import importlib.util

    monkeypatch.setenv("PEFTFX_KERNELS", "triton")
    x = torch.randn(2, 20)
    if importlib.util.find_spec("peftfx.kernels.qlora_triton") is None:
        with pytest.raises(ImportError):
            ops.qlora_linear(x, _weight("nf4"), None, None, None, 0.0)


def test_frozen_layer_does_not_keep_its_input_for_backward():
    """Quantize-only layers need no x for dx = dy·deq(W): nothing goes through the saved-tensor hooks
    (so activation checkpointing's recompute can stop before them), and backward still works."""
    from peftfx.kernels import reference as ref
    from peftfx.kernels.modules import QLoRALinear

    torch.manual_seed(0)
    layer = QLoRALinear(quantizer.quantize(torch.randn(32, 64), "nf4", double_quant=True), None, r=None, alpha=1.0)
    x = torch.randn(8, 16, 64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    assert saved == []
    y.sum().backward()
    want = torch.ones(8, 16, 32) @ ref.dequantize(layer.quantized_weight())
    torch.testing.assert_close(x.grad, want, atol=1e-5, rtol=1e-5)
