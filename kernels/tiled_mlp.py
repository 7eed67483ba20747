"""A transformer block's MLP run in token chunks that keeps only its input for backward (a tiled MLP).

In a checkpointed block the step's peak is the MLP's backward: gate, up, their gradients and the
gradient of down_proj's input are five ``[tokens, intermediate]`` tensors alive at once (Llama:
intermediate ~2.7x hidden, so each is ~2.7 hidden states). :class:`TiledMLP` takes the place of an
outlined MLP (a ``GraphModule`` at ``model.layers.3.mlp`` whose graph is the MLP's ops, see
:mod:`peftfx.passes.tile_mlp`) and, when grad is enabled, runs it as ALST's ``TiledMLP`` (Snowflake's
Arctic Long Sequence Training) does:

* forward: the MLP on row chunks of its input under ``no_grad``, each chunk's result copied into
  the output; nothing inside is kept for backward, only the input ``x``;
* backward: per chunk, the MLP again with grad enabled on that chunk of ``x``, then
  ``torch.autograd.grad`` of it against the chunk of the output gradient: the chunk of ``x``'s
  gradient is written into place, the trainable parameters' gradients (LoRA factors, trained
  biases) are summed over the chunks and returned as gradients of inputs of the autograd
  function, so autograd accumulates each parameter once per step, as for the untiled MLP (DDP's
  and FSDP2's hooks see one gradient).

So the backward holds ``x``, its gradient and one chunk's intermediates instead of the whole
sequence's. Chunks split the sequence dim (``x.dim() - 2``: ``[batch, seq, hidden]`` inputs keep
their batch); :func:`tile_tokens` sizes them.

Two details make it cost no more time than the checkpointed untiled MLP:

* ``x`` is saved by a separate identity function (``_KeepInput``) called *before* the chunks run,
  and the tiled function reads it back through that node. Inside a checkpointed block, autograd's
  saved-tensor hooks see ``x`` as the block's last saved tensor, so the block's recompute in
  backward stops right there (torch's early stop) without running the MLP: the MLP runs once in
  forward and once, chunk by chunk, in backward, the same count as the untiled checkpointed block
  (whose recompute runs gate and up because ``act_mul`` saves them).
* with one chunk (short sequences) the MLP runs as it is (the untiled graph, bitwise): tiling it
  would hold the chunk's output and ``x``'s gradient besides what the untiled backward holds.

Dropout inside the MLP (LoRA dropout on its linears): each chunk draws its own mask, so masks
differ from the untiled graph's (same distribution); the RNG state at the forward is restored for
the backward's chunks, so the recomputed masks are the forward's and gradients are exact. Outputs
and gradients otherwise equal the untiled MLP's (the same ops on row slices: bitwise with one
chunk; parameter gradients are sums over chunks, within rounding otherwise).
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Callable

import torch
from torch import nn
from torch.fx import GraphModule
from torch.fx.graph_module import _USER_PRESERVED_ATTRIBUTES_KEY as _PRESERVED

from peftfx.errors import KernelError, PlanError
from peftfx.kernels.ops import output_unused

__all__ = ["TiledMLP", "MIN_TILE_TOKENS", "tile_tokens", "in_tiled_forward"]

MIN_TILE_TOKENS = 512
"""Fewest tokens per chunk: below this a chunk's GEMMs get thin and each call's dequantization of
the frozen weight (once per call on CPU, re-read per call on GPU) stops being amortized."""

_IN_TILED_FORWARD: contextvars.ContextVar[bool] = contextvars.ContextVar("peftfx_tiled_forward", default=False)


def in_tiled_forward() -> bool:
    """True while a :class:`TiledMLP` runs its chunks without grad (selective checkpointing must not
    cache those ops' outputs: the tiled backward recomputes them)."""
    return _IN_TILED_FORWARD.get()


def tile_tokens(tokens: int, hidden: int, intermediate: int, min_tokens: int = MIN_TILE_TOKENS) -> int:
    """Tokens per chunk: ``max(min_tokens, ceil(tokens * hidden / intermediate))``.

    A chunk's ``[chunk, intermediate]`` tensor then holds no more than one ``[tokens, hidden]``
    hidden state (ALST's rule, ``ceil(seq / hidden)`` chunks, bounds it by a weight matrix instead),
    so the MLP's five backward intermediates cost about five hidden states however long the
    sequence: ``ceil(intermediate / hidden)`` chunks (3 for Llama's 2.7x, 4 for GPT-2's 4x) once the
    sequence is long enough, one chunk below ``min_tokens`` per chunk.
    """
    return max(min_tokens, -(-tokens * hidden // max(intermediate, 1)))


def _rng_state(device: torch.device) -> tuple:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


@contextlib.contextmanager
def _replayed_rng(state: tuple | None, device: torch.device):
    """Run with the RNG as it was at ``state`` (None: as it is), then put the caller's state back."""
    if state is None:
        yield
        return
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type="cuda"):
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], device)
        yield


class _KeepInput(torch.autograd.Function):
    """Identity that saves ``x`` for the tiled backward (see the module docstring for why apart)."""

    @staticmethod
    def forward(ctx, x, *anchors):
        # anchors: trainable parameters, given only when x does not require grad, so that the
        # output has a grad_fn holding x
        ctx.save_for_backward(x)
        ctx.anchors = len(anchors)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return (grad,) + (None,) * ctx.anchors


class _TiledRun(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kept, mlp, args, x_needs_grad, *params):
        # args without x: a reference here would keep every block's MLP input alive until backward,
        # past the checkpoint's hooks; backward reads x back through the _KeepInput node
        ctx.mlp, ctx.x_needs_grad, ctx.keep = mlp, x_needs_grad, kept.grad_fn
        ctx.args = tuple(None if i == mlp.x_index else a for i, a in enumerate(args))
        ctx.rng = _rng_state(kept.device) if mlp.draws_random() else None
        token = _IN_TILED_FORWARD.set(True)
        try:
            return mlp.run_chunks(kept, args, None)
        finally:
            _IN_TILED_FORWARD.reset(token)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.keep.saved_tensors  # inside a checkpointed block: recomputes the block up to x
        mlp, needs = ctx.mlp, ctx.needs_input_grad[4:]
        params = mlp.trainable()
        if len(params) != len(needs):
            raise KernelError(f"TiledMLP ({mlp.extra_repr()}): its trainable parameters changed between forward "
                              "and backward (requires_grad switched mid-step); change them before the forward")
        wanted = [p for p, n in zip(params, needs) if n]
        one = len(mlp.chunks(x)) == 1  # x's gradient is the chunk's: no buffer to copy it into
        grad_x = torch.empty_like(x) if ctx.x_needs_grad and not one else None
        sums: list[torch.Tensor | None] = [None] * len(wanted)

        def backward_chunk(xc: torch.Tensor, args: tuple, start: int, size: int) -> None:
            dim = mlp.chunk_dim(x)
            xc = xc.detach().requires_grad_(ctx.x_needs_grad)
            with torch.enable_grad(), mlp.last_linear_unused():
                yc = mlp.graph_call(args[:mlp.x_index] + (xc,) + args[mlp.x_index + 1:])
            inputs = ([xc] if ctx.x_needs_grad else []) + wanted
            grads = torch.autograd.grad(yc, inputs, grad.narrow(dim, start, size), allow_unused=True)
            nonlocal grad_x
            if ctx.x_needs_grad:
                if one:
                    grad_x = grads[0]
                else:
                    grad_x.narrow(dim, start, size).copy_(grads[0])
                grads = grads[1:]
            for i, g in enumerate(grads):
                if g is not None:
                    sums[i] = g if sums[i] is None else sums[i].add_(g)

        with _replayed_rng(ctx.rng, x.device):
            mlp.run_chunks(x, ctx.args, backward_chunk)
        it = iter(sums)
        return (grad_x, None, None, None) + tuple(next(it) if n else None for n in needs)


class TiledMLP(GraphModule):
    """An outlined MLP's graph, run in token chunks that keep only its input (see the module docstring).

    Args:
        mlp: the outlined MLP (a ``GraphModule`` whose children are the MLP's own: same names,
            same tensors).
        x_index: which graph input is the hidden state ``[..., seq, hidden]``.
        sym_dims: ``{input index: dim of x}`` for graph inputs that are sizes of ``x`` (GPT-2's
            reshapes); a chunk gets its own sizes there.
        intermediate: the MLP's widest feature size (for :func:`tile_tokens`).
        enabled: False runs the graph as it is (the untiled MLP, bitwise).

    ``min_tokens`` (an attribute, default :data:`MIN_TILE_TOKENS`) is the fewest tokens per chunk.
    """

    def __init__(self, mlp: GraphModule, *, x_index: int, sym_dims: dict[int, int], intermediate: int,
                 enabled: bool = True, last_linear: str | None = None) -> None:
        super().__init__(mlp, mlp.graph, class_name=f"Tiled{type(mlp).__name__}")
        for attr in ("_modules", "_parameters", "_buffers"):  # the MLP's own children and tensors
            getattr(self, attr).clear()
            getattr(self, attr).update(getattr(mlp, attr))
        self._non_persistent_buffers_set = set(mlp._non_persistent_buffers_set)
        self.train(mlp.training)
        self.meta = dict(getattr(mlp, "meta", {}))
        self.meta[_PRESERVED] = {"x_index": x_index, "sym_dims": dict(sym_dims), "intermediate": intermediate,
                                 "enabled": bool(enabled), "min_tokens": MIN_TILE_TOKENS, "last_linear": last_linear}
        for k, v in self.meta[_PRESERVED].items():
            setattr(self, k, v)

    def set_tiling(self, enabled: bool, min_tokens: int | None = None) -> None:
        """Tile (True) or run the MLP as it is (False); ``min_tokens``: fewest tokens per chunk."""
        if min_tokens is not None and not (isinstance(min_tokens, int) and min_tokens >= 1):
            raise PlanError(f"TiledMLP ({self.extra_repr()}): min_tokens (memory.tile_tokens) must be an int >= 1, "
                            f"got {min_tokens!r}")
        self.enabled = bool(enabled)
        if min_tokens is not None:
            self.min_tokens = int(min_tokens)
        self.meta[_PRESERVED].update(enabled=self.enabled, min_tokens=self.min_tokens)

    def recompile(self):
        # as CheckpointedBlock: keep GraphModule's generated forward as _graph_forward
        code = super().recompile()
        cls = type(self)
        cls._graph_forward = cls.__dict__["forward"]
        cls.forward = TiledMLP._tiled_forward
        return code

    def last_linear_unused(self):
        """While the backward rebuilds a chunk's graph: the last linear (down_proj), whose output only
        roots the graph, skips its matmul (its backward reads its input and weights, not its output).
        The untiled block's recompute skips it the same way (torch's early stop)."""
        if self.last_linear is None:
            return contextlib.nullcontext()
        return output_unused(self.get_submodule(self.last_linear).weight)

    def graph_call(self, args: tuple) -> Any:
        return type(self)._graph_forward(self, *args)

    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def draws_random(self) -> bool:
        return self.training and any(isinstance(m, nn.Dropout) and m.p > 0 for m in self.modules())

    @staticmethod
    def chunk_dim(x: torch.Tensor) -> int:
        return max(x.dim() - 2, 0)

    def chunks(self, x: torch.Tensor) -> list[tuple[int, int]]:
        """``[(start, size), ...]`` along :meth:`chunk_dim`, near-equal sizes."""
        dim = self.chunk_dim(x)
        length = x.shape[dim]
        tokens = x.numel() // max(x.shape[-1], 1)
        rows = tile_tokens(tokens, x.shape[-1], self.intermediate, self.min_tokens)
        n = max(1, min(length, -(-tokens // rows)))
        step = -(-length // n)
        return [(s, min(step, length - s)) for s in range(0, length, step)]

    def run_chunks(self, x: torch.Tensor, args: tuple,
                   each: Callable[[torch.Tensor, tuple, int, int], None] | None) -> torch.Tensor | None:
        """The graph on each chunk of ``x`` (``args`` with x and its sizes replaced); with ``each`` None
        the results are gathered into one output, else ``each(chunk, args, start, size)`` is called."""
        dim = self.chunk_dim(x)
        spans = self.chunks(x)
        out = None
        for start, size in spans:
            xc = x.narrow(dim, start, size)
            if dim > 0 and x.shape[0] > 1:
                xc = xc.contiguous()  # rows of one chunk apart in memory: the linears want them dense
            call = list(args)
            call[self.x_index] = xc
            for i, d in self.sym_dims.items():
                call[i] = xc.shape[d]
            if each is not None:
                each(xc, tuple(call), start, size)
                continue
            yc = self.graph_call(tuple(call))
            if len(spans) == 1:
                return yc
            if out is None:
                shape = list(yc.shape)
                shape[dim] = x.shape[dim]
                out = yc.new_empty(shape)
            out.narrow(dim, start, size).copy_(yc)
            del yc
        return out

    def _tiled_forward(self, *args: Any) -> Any:
        x = args[self.x_index]
        params = self.trainable()
        if not self.enabled or not torch.is_grad_enabled() or not (x.requires_grad or params) \
                or len(self.chunks(x)) == 1:
            return self.graph_call(args)  # one chunk: the untiled MLP is as cheap and keeps two hidden states less
        anchors = () if x.requires_grad else tuple(params[:1])
        kept = _KeepInput.apply(x, *anchors)
        return _TiledRun.apply(kept, self, args, x.requires_grad, *params)

    def __reduce__(self) -> tuple[Any, ...]:
        rebuild, args = super().__reduce__()
        state = dict(self.meta[_PRESERVED])
        return _rebuild, (rebuild, args, state)

    def extra_repr(self) -> str:
        return f"enabled={self.enabled}, min_tokens={self.min_tokens}, intermediate={self.intermediate}"


def _rebuild(rebuild: Callable, args: tuple, state: dict) -> TiledMLP:
    """Unpickle: GraphModule's own rebuild of the graph code, wrapped again."""
    mlp = TiledMLP(rebuild(*args), x_index=state["x_index"], sym_dims=state["sym_dims"],
                   intermediate=state["intermediate"], last_linear=state.get("last_linear"))
    mlp.set_tiling(state["enabled"], state["min_tokens"])
    return mlp

