"""AdamW with block-wise 8-bit state (``AdamW8bit``) and paged variants (``PagedAdamW``, ``PagedAdamW8bit``).

Drop-in ``torch.optim.Optimizer``s: param groups, ``add_param_group``, LR schedulers (``lr`` lives in the
groups), ``zero_grad(set_to_none=...)``, closures, ``state_dict()`` / ``load_state_dict()`` and named
parameters (``AdamW8bit(model.named_parameters())``: errors then name the parameter).

State per parameter (``n`` elements of the local tensor: a DTensor shard under FSDP2 keeps the state of its
local shard only):

- 8-bit (``n_global >= min_8bit_size``): ``codes`` uint8 ``[2, n]`` (row 0 the first moment in the signed
  dynamic map, row 1 the second in the unsigned one) and ``absmax`` fp32 ``[2, ceil(n / 256)]``;
- fp32 (smaller tensors, and every tensor of ``PagedAdamW``): ``exp_avg``, ``exp_avg_sq`` fp32, param-shaped;
- ``step``: a float32 scalar on the host, as torch's AdamW.

The update is :mod:`peftfx.kernels.adam8bit_compiled`'s on the CPU (the reference's ops compiled by inductor
into one kernel per tensor; eager :mod:`peftfx.kernels.blockwise8bit` with ``PEFTFX_OPTIM_COMPILE=0``) or :mod:`peftfx.kernels.adam8bit_triton`'s
(CUDA): decoupled weight decay, bias correction, ``eps`` outside the square root, exactly torch's AdamW
formula with the moments read from and written back to their 8-bit codes.

Before any parameter changes, every gradient is checked: sparse gradients raise; a non-finite gradient
raises naming the parameter, or, with ``skip_nonfinite=True``, the whole step is skipped with a warning
(parameters, states and step counts untouched, as ``GradScaler`` does for overflowing steps).
"""
from __future__ import annotations

import functools
import warnings
from typing import Any, Callable, Iterable

import torch
from torch import Tensor

from peftfx.errors import CheckpointError, KernelError, PlanError
from peftfx.kernels.adam8bit_compiled import adamw8bit_step_cpu_
from peftfx.kernels.blockwise8bit import (
    MIN_8BIT_NUMEL, AdamWHyper, adamw8bit_step_reference, adamw32_step_, n_state_blocks, new_state,
)
from peftfx.optim.paging import StatePager, pinned_like

__all__ = ["AdamW8bit", "PagedAdamW", "PagedAdamW8bit"]

_FLOAT_PARAMS = (torch.float32, torch.bfloat16, torch.float16)


def _local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (FSDP2), else ``t``."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


class _BlockwiseAdamW(torch.optim.Optimizer):
    """AdamW whose state is 8-bit block-wise (``bits=8``) or fp32 (``bits=32``), optionally paged on CUDA."""

    bits = 8
    paged = False

    def __init__(self, params: Iterable[Any], lr: float | Tensor = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, *, min_8bit_size: int = MIN_8BIT_NUMEL,
                 skip_nonfinite: bool = False) -> None:
        _check_hyper(lr=float(lr), betas=betas, eps=eps, weight_decay=weight_decay)
        if min_8bit_size < 0:
            raise PlanError(f"min_8bit_size={min_8bit_size} must be >= 0 (elements below which state stays fp32)")
        self.min_8bit_size = int(min_8bit_size)
        self.skip_nonfinite = bool(skip_nonfinite)
        self._pagers: dict[str, StatePager] = {}
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)

    # ------------------------------------------------------------------------------------ param groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)  # normalizes the group (named pairs, defaults); undone on error
        group = self.param_groups[-1]
        try:
            _check_hyper(lr=float(group["lr"]), betas=group["betas"], eps=group["eps"],
                         weight_decay=group["weight_decay"])
            for i, p in enumerate(group["params"]):
                if p.dtype not in _FLOAT_PARAMS:
                    raise KernelError(f"{self._name(group, i)}: {type(self).__name__} updates float32/bfloat16/"
                                      f"float16 parameters, not {p.dtype}; leave integer and complex tensors out of "
                                      "the optimizer")
        except (KernelError, PlanError):
            self.param_groups.pop()
            raise

    @staticmethod
    def _name(group: dict[str, Any], i: int) -> str:
        names = group.get("param_names")
        p = group["params"][i]
        where = f"parameter {names[i]!r}" if names else f"parameter #{i} of its param group"
        return f"{where} (shape {tuple(p.shape)}, {p.dtype})"

    def _uses_8bit(self, p: Tensor) -> bool:
        return self.bits == 8 and p.numel() >= self.min_8bit_size

    # ------------------------------------------------------------------------------------ state
    def _state_device(self, local: Tensor) -> torch.device:
        return torch.device("cpu") if self.paged and local.is_cuda else local.device

    def _new_state(self, p: Tensor) -> dict[str, Tensor]:
        local = _local(p)
        device = self._state_device(local)
        if self._uses_8bit(p):
            codes, absmax = new_state(local.numel(), device)
            state = {"codes": codes, "absmax": absmax}
        else:
            state = {"exp_avg": torch.zeros(local.shape, dtype=torch.float32, device=device),
                     "exp_avg_sq": torch.zeros(local.shape, dtype=torch.float32, device=device)}
        if device.type == "cpu" and local.is_cuda:  # paged: pinned host memory
            state = {k: pinned_like(v).copy_(v) for k, v in state.items()}
        state["step"] = torch.tensor(0.0)
        return state

    # ------------------------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One AdamW step over every parameter with a gradient; returns ``closure()``'s loss if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = []  # (group, index, param, grad): every check runs before anything is written
        for group in self.param_groups:
            for i, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise KernelError(f"{self._name(group, i)} has a sparse gradient; {type(self).__name__} takes "
                                      "dense gradients (use nn.Embedding(sparse=False) or torch.optim.SparseAdam)")
                work.append((group, i, p, p.grad))
        bad = self._nonfinite([w[3] for w in work])
        if bad:
            names = ", ".join(self._name(work[j][0], work[j][1]) for j in bad)
            if not self.skip_nonfinite:
                raise KernelError(f"non-finite gradient (NaN, Inf, or |g| >= 1.8e19 whose square overflows fp32) in "
                                  f"{names}; nothing was updated. Lower the "
                                  "learning rate, use AMP's GradScaler, or pass skip_nonfinite=True to skip such steps")
            warnings.warn(f"{type(self).__name__}: skipped the step, non-finite gradient in {names}", stacklevel=2)
            return loss
        paged_jobs: dict[str, list] = {}
        for group, _, p, g in work:
            state = self.state[p]
            if not state:
                state.update(self._new_state(p))
            state["step"] += 1
            beta1, beta2 = group["betas"]
            h = AdamWHyper(float(group["lr"]), beta1, beta2, group["eps"], group["weight_decay"], int(state["step"]))
            local, glocal = _local(p), _local(g)
            tensors = {k: v for k, v in state.items() if k != "step"}
            if self.paged and local.is_cuda:  # the update runs later, on the state's GPU copy
                job = functools.partial(_update, local, glocal, h=h)
                paged_jobs.setdefault(str(local.device), []).append((tensors, job))
            else:
                _update(local, glocal, tensors, h=h)
        for device, jobs in paged_jobs.items():
            pager = self._pagers.get(device) or self._pagers.setdefault(device, StatePager(torch.device(device)))
            pager.run(jobs)
        return loss

    @staticmethod
    def _nonfinite(grads: list[Tensor]) -> list[int]:
        """Indices of gradients with a NaN/Inf or an element whose square overflows fp32 (|g| >= ~1.8e19 would
        make the second moment infinite). One dot product g.g per gradient and one host sync per device; a
        gradient whose g.g overflows while every g*g is finite is re-checked element-wise and passes."""
        by_device: dict[torch.device, list[int]] = {}
        for j, g in enumerate(grads):
            by_device.setdefault(_local(g).device, []).append(j)
        flat = [_local(g).reshape(-1) for g in grads]
        suspects = []
        for idx in by_device.values():
            squares = torch.stack([torch.dot(flat[j], flat[j]).float() for j in idx])
            suspects += [idx[k] for k in (~torch.isfinite(squares)).nonzero().flatten().tolist()]
        return sorted(j for j in suspects if not bool(torch.isfinite(flat[j].float().square()).all()))

    # ------------------------------------------------------------------------------------ checkpoints
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load ``state_dict`` (from :meth:`state_dict`, any device) keeping each state tensor's dtype and bytes.

        Raises:
            CheckpointError: a state entry does not fit its parameter (shape, dtype, 8-bit vs fp32 layout);
                nothing is loaded then.
        """
        saved = state_dict.get("state", {})
        params = [(g, i, p) for g in self.param_groups for i, p in enumerate(g["params"])]
        for key, entry in saved.items():
            if not isinstance(key, int) or not 0 <= key < len(params):
                raise CheckpointError(f"optimizer state key {key!r} names no parameter (this optimizer has "
                                      f"{len(params)}); load a state dict saved by an optimizer over the same "
                                      "parameters")
            self._check_entry(*params[key], entry)
        super().load_state_dict(state_dict)  # groups, hyperparameters; its dtype casts are undone below
        for key, entry in saved.items():
            p = params[key][2]
            device = self._state_device(_local(p))
            placed = {}
            for k, v in entry.items():
                if k == "step":
                    placed[k] = v.detach().to("cpu", torch.float32, copy=True)
                elif device.type == "cpu" and _local(p).is_cuda:
                    placed[k] = pinned_like(v).copy_(v)
                else:
                    placed[k] = v.detach().to(device, copy=True)
            self.state[p] = placed

    def _check_entry(self, group: dict[str, Any], i: int, p: Tensor, entry: dict[str, Tensor]) -> None:
        local = _local(p)
        if self._uses_8bit(p):
            n = local.numel()
            want = {"codes": ((2, n), torch.uint8), "absmax": ((2, n_state_blocks(n)), torch.float32)}
        else:
            want = {"exp_avg": (tuple(local.shape), torch.float32), "exp_avg_sq": (tuple(local.shape), torch.float32)}
        got = {k for k in entry if k != "step"}
        if got != set(want) or "step" not in entry:
            raise CheckpointError(f"{self._name(group, i)}: optimizer state has keys {sorted(entry)}, expected "
                                  f"{sorted(want) + ['step']} ({'8-bit' if 'codes' in want else 'fp32'} state); was "
                                  f"it saved by another optimizer or with another min_8bit_size?")
        for k, (shape, dtype) in want.items():
            if tuple(entry[k].shape) != shape or entry[k].dtype != dtype:
                raise CheckpointError(f"{self._name(group, i)}: state {k!r} is {tuple(entry[k].shape)} "
                                      f"{entry[k].dtype}, expected {shape} {dtype}; the checkpoint belongs to "
                                      "other parameters (or another sharding)")


def _update(p: Tensor, g: Tensor, state: dict[str, Tensor], *, h: AdamWHyper) -> None:
    """One fused update of local tensor ``p`` with ``state`` on ``p``'s device, in place."""
    if p.numel() == 0:
        return
    contiguous = p.is_contiguous()
    work = p if contiguous else p.contiguous()
    g = g.contiguous()
    if "codes" in state:
        if p.is_cuda:
            from peftfx.kernels.adam8bit_triton import adamw8bit_step_triton  # lazy: Triton is optional

            adamw8bit_step_triton(work, g, state["codes"], state["absmax"], h)
        elif p.device.type == "cpu":  # compiled by inductor, or eager (PEFTFX_OPTIM_COMPILE=0)
            adamw8bit_step_cpu_(work, g, state["codes"], state["absmax"], h)
        else:  # any other device: the plain oracle, in torch ops
            adamw8bit_step_reference(work, g, state["codes"], state["absmax"], h)
    else:
        adamw32_step_(work, g, state["exp_avg"], state["exp_avg_sq"], h)
    if not contiguous:
        p.copy_(work)


def _check_hyper(*, lr: float, betas: tuple[float, float], eps: float, weight_decay: float) -> None:
    if not lr >= 0:
        raise PlanError(f"lr={lr} must be >= 0")
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise PlanError(f"betas={tuple(betas)} must be two values in [0, 1)")
    if not eps >= 0:
        raise PlanError(f"eps={eps} must be >= 0")
    if not weight_decay >= 0:
        raise PlanError(f"weight_decay={weight_decay} must be >= 0")


class AdamW8bit(_BlockwiseAdamW):
    """AdamW with both moments block-wise 8-bit (~2.03 bytes/param of state instead of 8).

    Args:
        params: parameters, ``named_parameters()`` pairs, or param-group dicts, as any torch optimizer.
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW`` (defaults match it).
        min_8bit_size: tensors with fewer elements keep fp32 moments (bitsandbytes' 4096).
        skip_nonfinite: skip (with a warning) instead of raising when a gradient holds NaN/Inf.
    """

    bits, paged = 8, False


class PagedAdamW(_BlockwiseAdamW):
    """AdamW with fp32 moments that live in pinned host memory while parameters train on CUDA.

    On the CPU it is a plain fp32 AdamW (torch's update formula) with the same state dict.
    """

    bits, paged = 32, True


class PagedAdamW8bit(_BlockwiseAdamW):
    """:class:`AdamW8bit` whose 8-bit state lives in pinned host memory while parameters train on CUDA.

    On the CPU it is :class:`AdamW8bit`, step for step and byte for byte, with the same state dict.
    """

    bits, paged = 8, True
