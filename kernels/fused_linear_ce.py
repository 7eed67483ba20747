"""``peftfx::linear_cross_entropy``: the LM head and its cross-entropy loss, with a backward in row chunks.

Replaces ``logits = linear(hidden, weight, bias)`` [``.to(dtype)``] followed by
``cross_entropy(logits.view(-1, V), target)`` (the ``fuse_linear_cross_entropy`` pass rewrites the
graph to call it). The idea is Liger-Kernel's / unsloth's "fused linear cross entropy"; unlike
theirs, the forward still returns the logits, so the compiled module's outputs do not change.

    hidden [..., H], weight [V, H], bias [V] | None, target [N] int64 (N = hidden.numel() / H)
    -> (logits [..., V] in ``logits_dtype`` (or hidden's), loss [], total_weight [])

What autograd saves, and what the backward holds:

* the unfused chain saves the logits (or log_softmax's output: ``[N, V]``) for the loss, and its
  backward materializes the ``[N, V]`` gradient of the logits (and, with an upcast, its copy in the
  head's dtype) before the head's matmuls read it.
* this op saves no ``[N, V]`` tensor. When the caller drops the logits (the usual
  ``model(**batch).loss.backward()``) they are freed right after the forward. What it keeps
  depends on whether the head trains:

  - **frozen head** (QLoRA: weight and bias need no gradient): right after the forward, while
    the logits exist, it computes ``d loss / d hidden`` for an upstream gradient of 1 chunk by
    chunk (``peftfx::linear_cross_entropy_grad_hidden``) and keeps that ``[..., H]`` tensor
    (the size of ``hidden``); backward scales it by the loss's gradient (and adds
    ``grad_logits @ weight`` if the caller backpropagates through the logits too). No logits are
    recomputed: the head costs the two matmuls it costs unfused.
  - **trainable head** (``train_modules``, tied embeddings that train): it keeps ``hidden``
    (which the head's own backward keeps anyway), the weight, the bias and the targets. The
    backward walks row chunks: recompute the chunk's logits with the same ``linear``, take the
    loss gradient of those rows (:func:`peftfx.kernels.fused_ops.cross_entropy_grad_rows`, the
    ops autograd runs), add the rows of the logits' own upstream gradient, cast to the head's
    dtype, then ``grad_hidden[rows] = d @ weight``, ``grad_weight += d^T @ hidden[rows]``,
    ``grad_bias += d.sum(0)`` (weight and bias gradients accumulated in fp32 and cast once).

  Chunks are :func:`chunk_rows` rows: ``ceil(V / H)`` chunks (Liger's rule: a chunk's logits
  about as large as ``hidden``), at least :data:`MIN_CHUNK_ELEMENTS` logits each. Nothing
  ``[N, V]``-sized is allocated besides the forward's logits.

Numerics: the logits and the loss are bitwise the unfused graph's (the forward runs the same aten
ops). Gradients agree to float rounding, not bitwise: the weight gradient is a sum over chunks of
partial products instead of one matmul, a chunk's recomputed logits may round differently from the
full matmul's rows, and a frozen head's hidden gradient is scaled after the matmul, not before.
The backward has no derivative: a second backward through the loss (``create_graph=True``)
raises.

Pure PyTorch: the same code runs on CPU and CUDA (matmuls, row reductions).
"""
from __future__ import annotations

import torch
from torch import Tensor

from peftfx.errors import KernelError
from peftfx.kernels.fused_ops import check_reduction, cross_entropy_grad_rows, nll_of_logits

__all__ = ["MIN_CHUNK_ELEMENTS", "chunk_rows", "linear_cross_entropy"]

aten = torch.ops.aten


MIN_CHUNK_ELEMENTS = 1 << 21
"""A chunk's logits hold at least this many elements (8 MiB of fp32) when there are enough rows:
short sequences split by Liger's rule alone run matmuls of a few rows (16 rows of a 1024 x 8192 head
took 2.2x the time of 128-row chunks on one CPU core)."""


def chunk_rows(tokens: int, vocab: int, hidden: int) -> int:
    """Rows per chunk: ``ceil(V / H)`` chunks, so one chunk's logits ``[rows, V]`` are about the size
    of the hidden states ``[tokens, H]`` (Liger-Kernel's rule), but at least
    :data:`MIN_CHUNK_ELEMENTS` logits (and at least 1 row)."""
    chunks = max(1, -(-vocab // max(hidden, 1)))
    return max(1, -(-tokens // chunks), min(tokens, MIN_CHUNK_ELEMENTS // max(vocab, 1)))


def _check(hidden: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor, reduction: str,
           logits_dtype: torch.dtype | None) -> None:
    check_reduction(reduction, "linear_cross_entropy")
    if hidden.dim() < 1 or not hidden.dtype.is_floating_point or weight.dim() != 2 \
            or weight.dtype != hidden.dtype or weight.shape[1] != hidden.shape[-1]:
        raise KernelError(f"linear_cross_entropy: hidden [..., H] and weight [V, H] must be float tensors of one "
                          f"dtype, got {hidden.dtype} {list(hidden.shape)} and {weight.dtype} {list(weight.shape)}")
    if bias is not None and (bias.shape != weight.shape[:1] or bias.dtype != weight.dtype):
        raise KernelError(f"linear_cross_entropy: bias must be [{weight.shape[0]}] {weight.dtype}, got "
                          f"{bias.dtype} {list(bias.shape)}")
    tokens = hidden.shape[:-1].numel()
    if target.dim() != 1 or target.dtype != torch.long or target.shape[0] != tokens:
        raise KernelError(f"linear_cross_entropy: target must be int64 [N={tokens}] (one per row of hidden), got "
                          f"{target.dtype} {list(target.shape)}")
    if logits_dtype is not None and not logits_dtype.is_floating_point:
        raise KernelError(f"linear_cross_entropy: logits_dtype must be a float dtype, got {logits_dtype}")


@torch.library.custom_op("peftfx::linear_cross_entropy", mutates_args=())
def _linear_cross_entropy_op(hidden: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor,
                             ignore_index: int, reduction: str,
                             logits_dtype: torch.dtype | None) -> tuple[Tensor, Tensor, Tensor]:
    _check(hidden, weight, bias, target, reduction, logits_dtype)
    logits = aten.linear(hidden, weight, bias)  # the full matmul: bitwise the unfused logits
    if logits_dtype is not None:
        logits = logits.to(logits_dtype)  # HF's `logits.float()` before the loss
    loss, total_weight = nll_of_logits(logits.reshape(-1, weight.shape[0]), target, ignore_index, reduction)
    return logits, loss, total_weight


@_linear_cross_entropy_op.register_fake
def _(hidden, weight, bias, target, ignore_index, reduction, logits_dtype):
    _check(hidden, weight, bias, target, reduction, logits_dtype)
    dtype = logits_dtype or hidden.dtype
    logits = hidden.new_empty((*hidden.shape[:-1], weight.shape[0]), dtype=dtype)
    return logits, logits.new_empty(()), logits.new_empty(())


@torch.library.custom_op("peftfx::linear_cross_entropy_backward", mutates_args=())
def _linear_cross_entropy_backward_op(grad_loss: Tensor, grad_logits: Tensor | None, hidden: Tensor, weight: Tensor,
                                      bias: Tensor | None, target: Tensor, total_weight: Tensor, ignore_index: int,
                                      reduction: str, logits_dtype: torch.dtype | None, rows: int,
                                      needs: list[bool]) -> list[Tensor]:
    """``[grad_hidden, grad_weight, grad_bias]``, each only where ``needs`` (hidden, weight, bias) says so.

    ``rows``: rows per chunk (0: :func:`chunk_rows`). ``grad_logits``: the upstream gradient of the
    logits output ``[..., V]``, None when the caller did not backpropagate through them.
    """
    vocab, width = weight.shape
    h2 = hidden.reshape(-1, width)
    n = h2.shape[0]
    g2 = None if grad_logits is None else grad_logits.reshape(n, vocab)
    need_h, need_w, need_b = needs
    accumulate = torch.float64 if weight.dtype == torch.float64 else torch.float32
    grad_h = hidden.new_empty(hidden.shape) if need_h else None  # written through its [N, H] view
    grad_w = torch.zeros(weight.shape, dtype=accumulate, device=weight.device) if need_w else None
    grad_b = torch.zeros(vocab, dtype=accumulate, device=weight.device) if need_b else None
    step = rows if rows > 0 else chunk_rows(n, vocab, width)
    for s in range(0, n, step):
        e = min(n, s + step)
        logits = aten.linear(h2[s:e], weight, bias)
        if logits_dtype is not None:
            logits = logits.to(logits_dtype)
        d = cross_entropy_grad_rows(grad_loss, logits, target[s:e], total_weight, ignore_index, reduction)
        del logits
        if g2 is not None:
            d += g2[s:e]  # the logits' two uses sum their gradients, as autograd accumulates them
        d = d.to(weight.dtype)  # the upcast's backward
        if need_h:
            torch.mm(d, weight, out=grad_h.view(n, width)[s:e])
        if need_w:
            part = torch.mm(d.t(), h2[s:e])
            grad_w += part
            del part
        if need_b:
            grad_b += d.sum(0, dtype=accumulate)
        del d  # before the next chunk's are allocated
    out = []
    if need_h:
        out.append(grad_h)
    if need_w:
        out.append(grad_w.to(weight.dtype))
    if need_b:
        out.append(grad_b.to(weight.dtype))
    return out


@_linear_cross_entropy_backward_op.register_fake
def _(grad_loss, grad_logits, hidden, weight, bias, target, total_weight, ignore_index, reduction, logits_dtype,
      rows, needs):
    return [t.new_empty(t.shape) for t, need in zip((hidden, weight, bias), needs) if need]


@torch.library.custom_op("peftfx::linear_cross_entropy_grad_hidden", mutates_args=())
def _grad_hidden_op(logits: Tensor, weight: Tensor, target: Tensor, total_weight: Tensor, ignore_index: int,
                    reduction: str) -> Tensor:
    """d loss / d hidden ``[..., H]`` for an upstream gradient of 1, from the forward's logits
    ``[..., V]`` chunk by chunk (a frozen head's whole backward, done while the logits exist)."""
    vocab, width = weight.shape
    l2 = logits.reshape(-1, vocab)
    n = l2.shape[0]
    valid = target != ignore_index
    # nll_loss_backward's per-row factor (1 / total_weight for mean, 1 for sum; 0 for ignored rows)
    # and log_softmax's backward, d = onehot(-g) + exp(lsm) * g, written over the chunk's log_softmax:
    # one chunk temporary, not three (this runs at the end of the forward, where every saved
    # activation is alive)
    g = torch.where(valid, 1.0 / total_weight if reduction == "mean" else 1.0, 0.0).to(logits.dtype)[:, None]
    safe = torch.where(valid, target, 0)[:, None]
    grad_h = logits.new_empty((*logits.shape[:-1], width), dtype=weight.dtype)
    step = chunk_rows(n, vocab, width)
    for s in range(0, n, step):
        e = min(n, s + step)
        d = aten._log_softmax(l2[s:e], 1, False).exp_().mul_(g[s:e])
        d.scatter_add_(1, safe[s:e], -g[s:e])
        torch.mm(d.to(weight.dtype), weight, out=grad_h.view(n, width)[s:e])
        del d  # before the next chunk's is allocated
    return grad_h


@_grad_hidden_op.register_fake
def _(logits, weight, target, total_weight, ignore_index, reduction):
    return logits.new_empty((*logits.shape[:-1], weight.shape[1]), dtype=weight.dtype)


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, target, ignore_index, reduction, logits_dtype = inputs
    ctx.options = (ignore_index, reduction, logits_dtype)
    ctx.mark_non_differentiable(output[2])
    # an unused logits output gets no zero-filled [N, V] gradient: it stays None
    ctx.set_materialize_grads(False)
    trains_head = ctx.needs_input_grad[1] or (bias is not None and ctx.needs_input_grad[2])
    ctx.precomputed = ctx.needs_input_grad[0] and not trains_head
    if ctx.precomputed:
        # a frozen head (QLoRA): the loss's gradient w.r.t. hidden is computed now, from the logits
        # the forward just made, for an upstream gradient of 1 (backward scales it): no logits
        # recompute, and it is the same size as the hidden states the other path keeps
        grad_h1 = torch.ops.peftfx.linear_cross_entropy_grad_hidden(output[0], weight, target, output[2],
                                                                   ignore_index, reduction)
        ctx.save_for_backward(grad_h1, weight)
        return
    # a trainable head: not the logits; the backward recomputes them chunk by chunk from hidden
    ctx.save_for_backward(hidden, weight, bias, target, output[2])


def _precomputed_backward(ctx, grad_logits, grad_loss):
    if torch.is_grad_enabled():  # create_graph: grad_h1 carries no graph, a second derivative would be 0
        raise KernelError("linear_cross_entropy: the loss is differentiable once; a second backward "
                          "(create_graph=True) needs the unfused head (fuse_linear_cross_entropy off)")
    grad_h1, weight = ctx.saved_tensors
    grad_h = grad_h1 * grad_loss if grad_loss is not None else torch.zeros_like(grad_h1)
    if grad_logits is not None:  # the logits' own gradient goes through the head's matmul
        grad_h = grad_h + torch.matmul(grad_logits.to(weight.dtype), weight)
    return (grad_h,) + (None,) * 6


def _backward(ctx, grad_logits, grad_loss, _grad_total_weight):
    if ctx.precomputed:
        return _precomputed_backward(ctx, grad_logits, grad_loss)
    hidden, weight, bias, target, total_weight = ctx.saved_tensors
    needs = [bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1]),
             bias is not None and bool(ctx.needs_input_grad[2])]
    grads = [None] * 7
    if not any(needs):
        return tuple(grads)
    if grad_loss is None:  # only the logits were backpropagated: the loss contributes nothing
        grad_loss = torch.zeros((), dtype=total_weight.dtype, device=total_weight.device)
    found = iter(torch.ops.peftfx.linear_cross_entropy_backward(
        grad_loss, grad_logits, hidden, weight, bias, target, total_weight, *ctx.options, 0, needs))
    for i, need in enumerate(needs):
        if need:
            grads[i] = next(found)
    return tuple(grads)


torch.library.register_autograd("peftfx::linear_cross_entropy", _backward, setup_context=_setup_context)


def linear_cross_entropy(hidden: Tensor, weight: Tensor, target: Tensor, bias: Tensor | None = None, *,
                         ignore_index: int = -100, reduction: str = "mean",
                         logits_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """``(logits, loss)``: ``logits = F.linear(hidden, weight, bias)`` (cast to ``logits_dtype`` if
    given) and ``F.cross_entropy(logits.view(-1, V), target, ...)``, saving no ``[N, V]`` tensor for
    backward.

    Example::

        >>> h, w, t = torch.randn(2, 3, 8), torch.randn(10, 8), torch.tensor([1, 2, -100, 4, 5, 9])
        >>> logits, loss = linear_cross_entropy(h, w, t)
        >>> torch.equal(loss, torch.nn.functional.cross_entropy(torch.nn.functional.linear(h, w).view(-1, 10), t))
        True
    """
    logits, loss, _ = torch.ops.peftfx.linear_cross_entropy(hidden, weight, bias, target, int(ignore_index),
                                                             reduction, logits_dtype)
    return logits, loss
