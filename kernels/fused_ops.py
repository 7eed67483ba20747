"""Ops that save less for backward at the same numerics: ``peftfx::act_mul`` and ``peftfx::cross_entropy``.

Both replace a chain of aten ops whose autograd keeps more than the backward needs (the
``fuse_activations`` pass rewrites the graph to call them). Each forward runs the very aten ops of
the chain it replaces, so its result is bitwise the same; each backward recomputes what it did not
save with the same ops autograd would have run, so gradients are bitwise the same as well.

**act_mul** (gated MLPs: Llama/Mistral/Qwen SwiGLU ``silu(gate) * up``, Gemma GeGLU
``gelu_tanh(gate) * up``): gate, up ``[..., I]`` -> ``[..., I]``. Autograd on the chain saves gate
(for the activation's backward), act(gate) and up (for the product's): three ``[tokens, I]``
tensors. ``act_mul`` saves gate and up and recomputes act(gate) in backward:

    d_up   = dy * act(gate)
    d_gate = act_backward(dy * up, gate)      # aten.silu_backward / aten.gelu_backward

**cross_entropy** (``aten.cross_entropy_loss`` = ``nll_loss(log_softmax(logits, 1), target)``,
weight None, no label smoothing, reduction mean or sum): logits ``[N, C]``, target ``[N]`` int64 ->
``(loss [], total_weight [])`` like ``aten.nll_loss_forward``. Autograd on the chain saves
log_softmax's ``[N, C]`` output, and its backward holds that, nll_loss's ``[N, C]`` one-hot grad and
log_softmax's ``[N, C]`` result at once. This op saves the logits instead (the same size; they are
also the model's output, so while the caller holds them they cost nothing extra) and the ``[N]``
targets. Forward and backward walk row chunks of about :data:`CHUNK_ELEMENTS` elements,
recomputing log_softmax per chunk, so the backward holds the ``[N, C]`` gradient and two
chunk-sized temporaries. log_softmax is computed row by row and nll_loss reads only the target
entry of each row, so chunking changes no bit (the tests check it). The backward is itself an op
without a derivative: a second backward through the loss (``create_graph=True``) raises.

Pure PyTorch: the same code runs on CPU and CUDA (elementwise ops and row reductions).
"""
from __future__ import annotations

import torch
from torch import Tensor

from peftfx.errors import KernelError

__all__ = [
    "ACTIVATIONS",
    "CHUNK_ELEMENTS",
    "REDUCTIONS",
    "act_mul",
    "apply_activation",
    "check_reduction",
    "cross_entropy",
    "cross_entropy_grad_rows",
    "nll_of_logits",
]

aten = torch.ops.aten

ACTIVATIONS = ("silu", "gelu", "gelu_tanh")
REDUCTIONS = ("mean", "sum")  # aten's Reduction enum: none=0, mean=1, sum=2
_REDUCTION_ENUM = {"mean": 1, "sum": 2}
CHUNK_ELEMENTS = 1 << 18  # ~1 MiB of fp32 per cross-entropy row chunk: bounds the two temporaries


# ----------------------------------------------------------------------------------------- act_mul
def apply_activation(x: Tensor, act: str) -> Tensor:
    """``act(x)`` through the aten op the model's graph called (``aten.silu`` / ``aten.gelu``)."""
    if act == "silu":
        return aten.silu(x)
    if act == "gelu":
        return aten.gelu(x)
    if act == "gelu_tanh":
        return aten.gelu(x, approximate="tanh")
    raise KernelError(f"act_mul: unknown activation {act!r}; expected one of {ACTIVATIONS}")


def _activation_backward(grad: Tensor, x: Tensor, act: str) -> Tensor:
    # what autograd's derivative formulas call (derivatives.yaml), so d_gate is bitwise the unfused
    # graph's: gelu -> gelu_backward(approximate); silu -> silu_backward, which has no derivative
    # itself, so under create_graph (grad mode on) the composite formula autograd uses instead
    if act == "silu":
        if torch.is_grad_enabled():
            sigmoid = x.sigmoid()
            return grad * sigmoid * (1.0 + x * (1.0 - sigmoid))
        return aten.silu_backward(grad, x)
    return aten.gelu_backward(grad, x, approximate="tanh" if act == "gelu_tanh" else "none")


def _activation_backward_(grad: Tensor, x: Tensor, act: str) -> Tensor:
    """:func:`_activation_backward` written into ``grad`` (a temporary the caller owns) where no
    graph is being built; elementwise, so reading and writing the same element is safe."""
    if torch.is_grad_enabled():
        return _activation_backward(grad, x, act)
    if act == "silu":
        return aten.silu_backward.grad_input(grad, x, grad_input=grad)
    return aten.gelu_backward.grad_input(grad, x, approximate="tanh" if act == "gelu_tanh" else "none",
                                         grad_input=grad)


def _check_act_mul(gate: Tensor, up: Tensor, act: str) -> None:
    if act not in ACTIVATIONS:
        raise KernelError(f"act_mul: unknown activation {act!r}; expected one of {ACTIVATIONS}")
    if gate.shape != up.shape or gate.dtype != up.dtype or not gate.dtype.is_floating_point:
        raise KernelError(f"act_mul: gate and up must be floating tensors of one shape and dtype, got "
                          f"{gate.dtype} {list(gate.shape)} and {up.dtype} {list(up.shape)}")


@torch.library.custom_op("peftfx::act_mul", mutates_args=())
def _act_mul_op(gate: Tensor, up: Tensor, act: str) -> Tensor:
    _check_act_mul(gate, up, act)
    # contiguous: the fake impl promises a dense row-major result whatever the inputs' strides
    return (apply_activation(gate, act) * up).contiguous()


@_act_mul_op.register_fake
def _(gate, up, act):
    _check_act_mul(gate, up, act)
    return torch.empty_like(gate, memory_format=torch.contiguous_format)


def _act_mul_setup_context(ctx, inputs, output):
    gate, up, act = inputs
    # act(gate) is not kept: backward recomputes it (one elementwise op) from gate
    ctx.save_for_backward(gate, up)
    ctx.act = act


def _act_mul_backward(ctx, dy):
    gate, up = ctx.saved_tensors
    d_gate = d_up = None
    # d_gate first, written over its own temporary: with gate, up and dy alive, the backward holds
    # at most two more [tokens, I] tensors (d_gate, then d_up) instead of three; in a checkpointed
    # block this is the step's peak. Same kernels, same values.
    if ctx.needs_input_grad[0]:
        d_gate = _activation_backward_(dy * up, gate, ctx.act)
    if ctx.needs_input_grad[1]:
        d_up = apply_activation(gate, ctx.act).mul_(dy)  # in place: no second [tokens, I] temporary
    return d_gate, d_up, None


torch.library.register_autograd("peftfx::act_mul", _act_mul_backward, setup_context=_act_mul_setup_context)


def act_mul(gate: Tensor, up: Tensor, act: str = "silu") -> Tensor:
    """``act(gate) * up`` for gate, up ``[..., I]`` (same shape and dtype) -> ``[..., I]``, saving only
    gate and up for backward.

    Example::

        >>> g, u = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
        >>> torch.equal(act_mul(g, u, "silu"), torch.nn.functional.silu(g) * u)
        True
    """
    return torch.ops.peftfx.act_mul(gate, up, act)


# ----------------------------------------------------------------------------------- cross_entropy
def _row_chunks(n: int, c: int):
    rows = max(1, CHUNK_ELEMENTS // max(c, 1))
    for start in range(0, n, rows):
        yield start, min(n, start + rows)


def check_reduction(reduction: str, op: str = "cross_entropy") -> None:
    """A :class:`KernelError` unless ``reduction`` is one the chunked loss implements (mean, sum)."""
    if reduction not in REDUCTIONS:
        raise KernelError(f"{op}: reduction {reduction!r} not supported; expected one of {REDUCTIONS}")


def _check_cross_entropy(logits: Tensor, target: Tensor, reduction: str) -> None:
    check_reduction(reduction)
    if logits.dim() != 2 or not logits.dtype.is_floating_point:
        raise KernelError(f"cross_entropy: logits must be a 2-D float tensor [N, C], got {logits.dtype} "
                          f"{list(logits.shape)}")
    if target.dim() != 1 or target.dtype != torch.long or target.shape[0] != logits.shape[0]:
        raise KernelError(f"cross_entropy: target must be int64 [N={logits.shape[0]}], got {target.dtype} "
                          f"{list(target.shape)}")


def nll_of_logits(logits: Tensor, target: Tensor, ignore_index: int, reduction: str) -> tuple[Tensor, Tensor]:
    """``(loss, total_weight)`` of ``nll_loss(log_softmax(logits, 1), target)`` for logits ``[N, C]``,
    log_softmax computed in row chunks (bitwise the unchunked result; see the module docstring)."""
    n, c = logits.shape
    valid = target != ignore_index
    safe = torch.where(valid, target, 0)  # ignored rows read column 0; nll_loss skips them below
    picked = logits.new_empty(n, 1)  # log_softmax(logits)[i, target[i]]
    for s, e in _row_chunks(n, c):
        lsm = aten._log_softmax(logits[s:e], 1, False)
        torch.gather(lsm, 1, safe[s:e, None], out=picked[s:e])
        del lsm  # before the next chunk's is allocated
    # nll_loss over the picked column: the same values in the same order as over the full [N, C]
    # log_softmax, so the same sum. Ignored rows get target -1 and ignore_index -1 (0 is the column).
    loss, total_weight = aten.nll_loss_forward(picked, torch.where(valid, 0, -1), None,
                                               _REDUCTION_ENUM[reduction], -1)
    return loss, total_weight


def cross_entropy_grad_rows(grad: Tensor, logits_rows: Tensor, target_rows: Tensor, total_weight: Tensor,
                            ignore_index: int, reduction: str, out: Tensor | None = None) -> Tensor:
    """d loss / d logits for a block of rows ``[n, C]`` of the logits (``out`` if given), as autograd
    computes it for the whole ``[N, C]``: log_softmax recomputed, nll_loss_backward, its backward.
    Holds two ``[n, C]`` temporaries besides the result."""
    lsm = aten._log_softmax(logits_rows, 1, False)  # recomputed, bitwise the forward's
    onehot = aten.nll_loss_backward(grad, lsm, target_rows, None, _REDUCTION_ENUM[reduction], ignore_index,
                                    total_weight)
    if out is None:
        return aten._log_softmax_backward_data(onehot, lsm, 1, logits_rows.dtype)
    return aten._log_softmax_backward_data.out(onehot, lsm, 1, logits_rows.dtype, out=out)


@torch.library.custom_op("peftfx::cross_entropy", mutates_args=())
def _cross_entropy_op(logits: Tensor, target: Tensor, ignore_index: int, reduction: str) -> tuple[Tensor, Tensor]:
    _check_cross_entropy(logits, target, reduction)
    return nll_of_logits(logits, target, ignore_index, reduction)


@_cross_entropy_op.register_fake
def _(logits, target, ignore_index, reduction):
    _check_cross_entropy(logits, target, reduction)
    return logits.new_empty(()), logits.new_empty(())


@torch.library.custom_op("peftfx::cross_entropy_backward", mutates_args=())
def _cross_entropy_backward_op(grad: Tensor, logits: Tensor, target: Tensor, total_weight: Tensor,
                               ignore_index: int, reduction: str) -> Tensor:
    """d loss / d logits ``[N, C]`` for upstream ``grad`` ``[]``, chunk by chunk, as autograd computes it."""
    n, c = logits.shape
    out = torch.empty_like(logits, memory_format=torch.contiguous_format)
    for s, e in _row_chunks(n, c):  # two chunk temporaries at most, freed before the next chunk
        cross_entropy_grad_rows(grad, logits[s:e], target[s:e], total_weight, ignore_index, reduction, out=out[s:e])
    return out


@_cross_entropy_backward_op.register_fake
def _(grad, logits, target, total_weight, ignore_index, reduction):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _cross_entropy_setup_context(ctx, inputs, output):
    logits, target, ignore_index, reduction = inputs
    # the logits instead of log_softmax's output: the same size, and alive anyway while the
    # caller holds the model output; total_weight is the mean's divisor nll_loss_backward needs
    ctx.save_for_backward(logits, target, output[1])
    ctx.options = (ignore_index, reduction)
    ctx.mark_non_differentiable(output[1])


def _cross_entropy_backward(ctx, grad, _grad_total_weight):
    if not ctx.needs_input_grad[0]:
        return None, None, None, None
    logits, target, total_weight = ctx.saved_tensors
    d_logits = torch.ops.peftfx.cross_entropy_backward(grad, logits, target, total_weight, *ctx.options)
    return d_logits, None, None, None


torch.library.register_autograd("peftfx::cross_entropy", _cross_entropy_backward,
                                setup_context=_cross_entropy_setup_context)


def cross_entropy(logits: Tensor, target: Tensor, *, ignore_index: int = -100, reduction: str = "mean") -> Tensor:
    """``F.cross_entropy(logits, target, ignore_index=..., reduction=...)`` for logits ``[N, C]`` and
    int64 target ``[N]`` -> loss ``[]``, saving the logits (not log_softmax's output) for backward.

    Example::

        >>> x, t = torch.randn(6, 10), torch.tensor([1, 2, -100, 4, 5, 9])
        >>> torch.equal(cross_entropy(x, t), torch.nn.functional.cross_entropy(x, t))
        True
    """
    return torch.ops.peftfx.cross_entropy(logits, target, int(ignore_index), reduction)[0]
