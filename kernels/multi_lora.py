"""Gathered batched LoRA (BGMV): one frozen base, many adapters, one adapter per batch row.

Math (``n`` adapter slots, ranks padded to ``R = max r_i`` with zeros, which changes nothing)::

    x [B, T, K], ids [B] (int64, -1 = no adapter), A [n, R, K], Bw [n, N, R], s [n]
    delta[b] = s[ids[b]] · (x[b] · A[ids[b]]ᵀ) · Bw[ids[b]]ᵀ          (0 where ids[b] = -1)   -> [B, T, N]

``ids = -1`` is routed without Python branching: the index is clamped to slot 0 and the scale
gathered as 0, so the whole op is a fixed sequence of tensor ops (graph-compile clean). Zero-padded
rank rows/columns contribute exactly 0, so adapters of different ranks share one stack.

Pieces:

- :func:`multi_lora_ref`: the pure-PyTorch reference (the CPU path and the test oracle): gather the
  ``B`` per-row adapters (``[B, R, K]`` and ``[B, N, R]``: per *row*, not per token, so the gather
  is small) and run two batched matmuls.
- ``peftfx::multi_lora``: a ``torch.library`` custom op with ``register_fake`` (shape) and
  ``register_autograd`` (grads for x, A and B; the backward is the reference math with index_add
  scatters), dispatched by :func:`backend_for`: CUDA -> Triton (``multi_lora_triton``), CPU ->
  the PyTorch path (for both the ``cpu`` and ``reference`` backends); ``PEFTFX_KERNELS`` forces one (Triton on CPU needs
  ``TRITON_INTERPRET=1`` set before triton is imported).
- :class:`MultiLoRALinear`: the module ``compile_multi`` swaps in (frozen base + stacked adapters).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from peftfx.errors import KernelError
from peftfx.kernels.backend import backend_for  # one backend switch for every op
from peftfx.kernels.dtypes import accumulate_dtype

__all__ = ["multi_lora_ref", "multi_lora", "MultiLoRALinear"]


def _gather(ids: Tensor, lora_A: Tensor, lora_B: Tensor, scalings: Tensor):
    """Per-row adapter tensors: A_g [B, R, K], B_g [B, N, R], s_g [B] (0 for id -1), slots [B]."""
    slots = ids.clamp(min=0)
    s_g = torch.where(ids >= 0, scalings.index_select(0, slots), torch.zeros((), dtype=scalings.dtype,
                                                                             device=scalings.device))
    return lora_A.index_select(0, slots), lora_B.index_select(0, slots), s_g, slots


def multi_lora_ref(x: Tensor, ids: Tensor, lora_A: Tensor, lora_B: Tensor, scalings: Tensor) -> Tensor:
    """``delta [B, T, N]`` = per-row ``s·(x·Aᵀ)·Bᵀ`` of adapter ``ids[b]`` (zero for ``-1``).

    Args:
        x: ``[B, T, K]``. ids: ``[B]`` int64 in ``[-1, n)``. lora_A: ``[n, R, K]``.
        lora_B: ``[n, N, R]``. scalings: ``[n]`` float.
    """
    dt = accumulate_dtype(x)
    a_g, b_g, s_g, _ = _gather(ids, lora_A.to(dt), lora_B.to(dt), scalings.to(dt))
    xa = torch.bmm(x.to(dt), a_g.transpose(1, 2))  # [B, T, R]
    return (torch.bmm(xa, b_g.transpose(1, 2)) * s_g[:, None, None]).to(x.dtype)


def _check(x: Tensor, ids: Tensor, lora_A: Tensor, lora_B: Tensor, scalings: Tensor) -> None:
    """Shape/dtype checks that need no tensor values (so they cost no sync and no graph break)."""
    if x.dim() != 3 or ids.dim() != 1 or ids.dtype != torch.int64 or x.shape[0] != ids.shape[0]:
        raise KernelError(f"multi_lora needs x [B, T, K] and int64 ids [B], got x {list(x.shape)}, "
                          f"ids {ids.dtype} {list(ids.shape)}")
    if lora_A.dim() != 3 or lora_B.dim() != 3 or lora_A.shape[0] != lora_B.shape[0] \
            or lora_A.shape[1] != lora_B.shape[2] or lora_A.shape[2] != x.shape[2] \
            or tuple(scalings.shape) != (lora_A.shape[0],):
        raise KernelError(f"multi_lora stacks disagree: x {list(x.shape)}, A {list(lora_A.shape)} (want "
                          f"[n, R, {x.shape[2]}]), B {list(lora_B.shape)} (want [n, N, R]), "
                          f"scalings {list(scalings.shape)} (want [n])")


@torch.library.custom_op("peftfx::multi_lora", mutates_args=())
def _multi_lora_op(x: Tensor, ids: Tensor, lora_A: Tensor, lora_B: Tensor, scalings: Tensor) -> Tensor:
    _check(x, ids, lora_A, lora_B, scalings)
    if backend_for(x) == "triton":
        from peftfx.kernels.multi_lora_triton import multi_lora_triton  # lazy: Triton is optional

        return multi_lora_triton(x, ids, lora_A, lora_B, scalings)
    return multi_lora_ref(x, ids, lora_A, lora_B, scalings)


@_multi_lora_op.register_fake
def _(x, ids, lora_A, lora_B, scalings):
    return x.new_empty(x.shape[0], x.shape[1], lora_B.shape[1])


def _setup_context(ctx, inputs, output):
    x, ids, lora_A, lora_B, scalings = inputs
    ctx.save_for_backward(x, ids, lora_A, lora_B, scalings)


def _backward(ctx, dy):
    """dx = s·(dy·B_g)·A_g; dA[i] = Σ_{b: id=i} s·(dy_b·B_g)ᵀ·x_b; dB[i] = Σ s·dy_bᵀ·(x_b·A_gᵀ)."""
    x, ids, lora_A, lora_B, scalings = ctx.saved_tensors
    dt = accumulate_dtype(x)
    a_g, b_g, s_g, slots = _gather(ids, lora_A.to(dt), lora_B.to(dt), scalings.to(dt))
    xf, dyf = x.to(dt), dy.to(dt) * s_g[:, None, None]
    dxa = torch.bmm(dyf, b_g)  # [B, T, R]
    dx = dA = dB = None
    if ctx.needs_input_grad[0]:
        dx = torch.bmm(dxa, a_g).to(x.dtype)
    if ctx.needs_input_grad[2]:  # rows with id -1 carry s_g = 0, so scattering them into slot 0 adds 0
        dA = torch.zeros_like(lora_A, dtype=dt).index_add_(0, slots, torch.bmm(dxa.transpose(1, 2), xf))
        dA = dA.to(lora_A.dtype)
    if ctx.needs_input_grad[3]:
        xa = torch.bmm(xf, a_g.transpose(1, 2))
        dB = torch.zeros_like(lora_B, dtype=dt).index_add_(0, slots, torch.bmm(dyf.transpose(1, 2), xa))
        dB = dB.to(lora_B.dtype)
    return dx, None, dA, dB, None


_multi_lora_op.register_autograd(_backward, setup_context=_setup_context)


def multi_lora(x: Tensor, ids: Tensor, lora_A: Tensor, lora_B: Tensor, scalings: Tensor) -> Tensor:
    """``delta [..., N]`` for ``x [B, ..., K]`` with one adapter id per leading row (see module docstring).

    Leading dims after the batch are flattened (``[B, T, K]``); a 2-D ``x [B*T, K]`` whose rows
    are batch-major (GPT-2's Conv1D flattens ``[B, T, K]`` that way) is viewed as ``[B, T, K]``.
    """
    k = x.shape[-1]
    x3 = x.reshape(ids.shape[0], -1, k)
    out = torch.ops.peftfx.multi_lora(x3, ids, lora_A, lora_B, scalings)
    return out.reshape(*x.shape[:-1], lora_B.shape[1])


class MultiLoRALinear(nn.Module):
    """A frozen base linear plus ``n`` stacked LoRA adapters selected per batch row.

    ``y[b] = base(x[b]) + s_i · (x[b]·A_iᵀ)·B_iᵀ`` with ``i = adapter_ids[b]`` (no term for -1).

    Buffers (inference: nothing trains): ``lora_A [n, R, in]``, ``lora_B [n, out, R]``,
    ``lora_scaling [n]``; ``ranks`` lists each slot's true rank (0: slot empty or not targeting
    this layer). ``base`` is any module computing the frozen ``x -> [..., out]`` (a quantize-only
    ``QLoRALinear``).
    """

    def __init__(self, base: nn.Module, in_features: int, out_features: int, *, n_slots: int = 0,
                 name: str | None = None) -> None:
        super().__init__()
        self.base, self.in_features, self.out_features, self.name = base, in_features, out_features, name
        device = next(iter(base.buffers()), torch.empty(0)).device
        self.ranks: list[int] = [0] * n_slots
        self.register_buffer("lora_A", torch.zeros(n_slots, 1, in_features, device=device))
        self.register_buffer("lora_B", torch.zeros(n_slots, out_features, 1, device=device))
        self.register_buffer("lora_scaling", torch.zeros(n_slots, device=device))

    @property
    def n_slots(self) -> int:
        return self.lora_A.shape[0]

    def resize(self, n_slots: int, rank: int) -> None:
        """Grow/shrink the stacks to ``n_slots`` slots and padded rank ``rank`` (>= every slot's rank)."""
        rank = max(rank, 1, *self.ranks[:n_slots]) if self.ranks else max(rank, 1)
        keep, r_keep = min(n_slots, self.n_slots), min(rank, self.lora_A.shape[1])
        a = self.lora_A.new_zeros(n_slots, rank, self.in_features)
        b = self.lora_B.new_zeros(n_slots, self.out_features, rank)
        s = self.lora_scaling.new_zeros(n_slots)
        a[:keep, :r_keep] = self.lora_A[:keep, :r_keep]
        b[:keep, :, :r_keep] = self.lora_B[:keep, :, :r_keep]
        s[:keep] = self.lora_scaling[:keep]
        self.lora_A, self.lora_B, self.lora_scaling = a, b, s
        self.ranks = (self.ranks + [0] * n_slots)[:n_slots]

    def set_slot(self, slot: int, lora_A: Tensor | None, lora_B: Tensor | None, scaling: float) -> None:
        """Write adapter ``(A [r, in], B [out, r], s)`` into ``slot`` (None clears the slot)."""
        if lora_A is None:
            r = 0
        else:
            r = lora_A.shape[0]
            if tuple(lora_A.shape) != (r, self.in_features) or tuple(lora_B.shape) != (self.out_features, r):
                raise KernelError(f"{self.name or 'layer'}: adapter A {list(lora_A.shape)} / B "
                                  f"{list(lora_B.shape)} do not fit [r, {self.in_features}] / "
                                  f"[{self.out_features}, r]")
        if slot >= self.n_slots or r > self.lora_A.shape[1]:
            self.resize(max(slot + 1, self.n_slots), max(r, self.lora_A.shape[1]))
        with torch.no_grad():
            self.lora_A[slot].zero_()
            self.lora_B[slot].zero_()
            self.lora_scaling[slot] = float(scaling) if r else 0.0
            if r:
                self.lora_A[slot, :r] = lora_A.detach().to(self.lora_A)
                self.lora_B[slot, :, :r] = lora_B.detach().to(self.lora_B)
        self.ranks[slot] = r
        # drop rank padding nobody needs any more (after a large adapter is removed)
        needed = max(self.ranks, default=1) or 1
        if needed < self.lora_A.shape[1]:
            self.resize(self.n_slots, needed)

    def forward(self, x: Tensor, adapter_ids: Tensor) -> Tensor:
        """``x [B, ..., in]``, ``adapter_ids [B]`` int64 -> ``[B, ..., out]``."""
        y = self.base(x)
        if self.n_slots == 0:  # a shape test, not a value test: compiled graphs stay branch-free on ids
            return y
        return y + multi_lora(x, adapter_ids, self.lora_A, self.lora_B, self.lora_scaling).to(y.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, ranks={self.ranks}"
