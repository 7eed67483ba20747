"""Memory planner: what one training step costs before and after a plan, without allocating it.

How the estimate is made (nothing is materialized, so a 7B config runs on a laptop):

1. **A fake twin.** The model is deep-copied with every parameter and buffer replaced by a
   ``FakeTensor`` (``torch._subclasses.FakeTensorMode``): shapes, dtypes and strides, no storage.
   A model built under ``torch.device("meta")`` works the same way. Hugging Face code skips its
   data-dependent mask checks on fake tensors (``is_tracing``), so the real forward runs.
2. **The plan, applied to the twin.** Targeted linears become the real
   :class:`peftfx.kernels.modules.QLoRALinear` holding fake packed buffers whose sizes come from
   :func:`quant_storage` (the :class:`~peftfx.kernels.formats.QuantizedWeight` layout; a test checks
   it equals ``quantizer.quantize(...).nbytes()``), so the custom op ``peftfx::qlora_linear`` runs
   its ``register_fake`` impl and its ``register_autograd`` saves exactly what the kernels save
   (x, the LoRA factors and the packed weight, never deq(W)). Parameters are then frozen as the
   ``freeze`` pass does (adapters, ``train_top_layers``, ``train_modules`` train).
3. **A simulated allocator.** Forward + ``loss.backward()`` run under a ``TorchDispatchMode`` that
   adds each new output storage's bytes when an op creates it and subtracts them when the storage
   dies (a weakref finalizer on the storage; torch keeps one Python object per storage), giving
   the live-bytes peak of forward + backward (activations, transients, gradients). A
   ``saved_tensors_hooks`` pair sums the bytes autograd saves for backward (deduplicated by
   storage, parameters and buffers excluded): the "activations" line.
4. **The optimizer**, analytically, by :func:`peftfx.optim.optimizer_state_bytes` and
   :func:`~peftfx.optim.optimizer_step_bytes` (the one place that arithmetic lives): AdamW state = 2 x
   trainable bytes; ``adamw-8bit`` / ``paged-adamw-8bit`` (what :class:`peftfx.optim.AdamW8bit` allocates:
   256-element blocks, fp32 state below 4096 elements) ~2.03 bytes/param; the paged variants on ``cuda``
   keep their state in host memory and stage at most three tensors' state during the step; SGD none.
   The step's temporaries: torch's single-tensor AdamW (the CPU default) holds two temporaries the size
   of one parameter; the foreach AdamW (CUDA default) one copy of all of them.

The peak of a steady-state step (state exists, grads set to None before the forward) is
``weights + buffers + inputs + optimizer state + max(forward/backward peak, grads + step temporaries)``.

How the tests measure the real peak (``measure_peak``): the torch profiler with
``profile_memory=True`` records every CPU allocator allocation and free as a ``[memory]`` event with
its signed size; integrating them in time order gives the live bytes, and its maximum over a
training step (forward, backward, ``optimizer.step()``, ``zero_grad``) plus the bytes alive
before the step (parameters, buffers, inputs, optimizer state from a warm-up step) is the peak.
"""
from __future__ import annotations

import copy
import weakref
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

from peftfx.errors import PlanError
from peftfx.inspect.model_source import default_inputs
from peftfx.optim.state_bytes import OPTIMIZER_NAMES, optimizer_state_bytes, optimizer_step_bytes

__all__ = ["quant_storage", "quantized_nbytes", "bits_per_param", "Breakdown", "Estimate", "estimate",
           "loss_of", "measure_peak", "format_bytes", "OPTIMIZERS"]

OPTIMIZERS = OPTIMIZER_NAMES  # ("adamw", "sgd", "adamw-8bit", "paged-adamw", "paged-adamw-8bit")
_LINEAR_TYPES = ("Linear", "Conv1D", "NonDynamicallyQuantizableLinear")


# ---------------------------------------------------------------- quantized storage arithmetic


def quant_storage(format: str, shape: tuple[int, int], *, block_size: int = 64, double_quant: bool = True,
                  block_size2: int = 256) -> dict[str, tuple[int, torch.dtype]]:
    """``{tensor name: (numel, dtype)}`` of a :class:`QuantizedWeight` of ``shape`` in ``format``.

    Mirrors ``peftfx.kernels.formats``: 4-bit codes two per byte, one scale per block (fp32, or
    uint8 codes + fp32 second-level scales per ``block_size2`` blocks + an fp32 offset with double
    quantization); int8 one byte per weight; llm-int8 one fp32 scale per row.
    """
    out_f, in_f = shape
    n = out_f * in_f
    blocks = -(-n // block_size)
    if format in ("nf4", "fp4"):
        if double_quant:
            return {"packed": (-(-n // 2), torch.uint8), "scales": (blocks, torch.uint8),
                    "scales2": (-(-blocks // block_size2), torch.float32), "offset": (1, torch.float32)}
        return {"packed": (-(-n // 2), torch.uint8), "scales": (blocks, torch.float32)}
    if format == "int8":
        return {"packed": (n, torch.int8), "scales": (blocks, torch.float32)}
    if format == "int8-zeropoint":
        return {"packed": (n, torch.uint8), "scales": (blocks, torch.float32), "offset": (blocks, torch.float32)}
    if format == "llm-int8":
        return {"packed": (n, torch.int8), "scales": (out_f, torch.float32)}
    raise PlanError(f"quant.format {format!r} has no quantized storage")


def quantized_nbytes(format: str, shape: tuple[int, int], **kw: Any) -> int:
    """Exact storage bytes of a quantized ``[out, in]`` weight (packed codes and all scales)."""
    return sum(n * torch.empty(0, dtype=d).element_size() for n, d in quant_storage(format, shape, **kw).values())


def bits_per_param(format: str, shape: tuple[int, int], **kw: Any) -> float:
    """Storage bits per weight, e.g. 4.127 for NF4 with double quantization on large layers."""
    return 8.0 * quantized_nbytes(format, shape, **kw) / (shape[0] * shape[1])


def format_bytes(n: float) -> str:
    """``1536 -> '1.50 KiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} B" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"  # pragma: no cover


# ---------------------------------------------------------------- simulated allocator


class _Allocations(TorchDispatchMode):
    """Live bytes of storages created by ops (not in ``baseline``); freed when the storage dies."""

    def __init__(self, baseline: set[int]) -> None:
        super().__init__()
        self.baseline = baseline
        self.live: dict[int, int] = {}
        self.current = self.peak = 0
        self.largest = (0, "")

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage._cdata
            if key in self.baseline or key in self.live:
                continue  # a view, an in-place result, or a weight
            n = storage.nbytes()
            self.live[key] = n
            self.current += n
            self.peak = max(self.peak, self.current)
            if n > self.largest[0]:
                self.largest = (n, f"{func.__name__} output {list(t.shape)} {str(t.dtype).removeprefix('torch.')}")
            weakref.finalize(storage, self._free, key)
        return out


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def loss_of(out: Any) -> torch.Tensor:
    """The scalar a training step backpropagates: ``out.loss`` if present, else the sum of the first tensor."""
    loss = getattr(out, "loss", None)
    if loss is None and isinstance(out, dict):
        loss = out.get("loss")
    if loss is not None:
        return loss
    for t in tree_flatten(out.to_tuple() if hasattr(out, "to_tuple") else out)[0]:
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            return t.float().sum() if t.dim() else t
    raise PlanError(f"the model returned no floating-point tensor to backpropagate ({type(out).__name__})")


def _call(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


# ---------------------------------------------------------------- the twin and the plan


def _fake_twin(model: nn.Module, mode, dtype: torch.dtype | None) -> nn.Module:
    """A deep copy of ``model`` whose parameters and buffers are fake (no storage is copied)."""
    memo: dict[int, Any] = {}
    for p in model.parameters():
        cast = dtype if dtype is not None and p.is_floating_point() else None
        memo[id(p)] = nn.Parameter(_fake_like(mode, p, cast), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = _fake_like(mode, b)
    return copy.deepcopy(model, memo)


def _fake_like(mode, t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A fake CPU tensor shaped like ``t`` (which may be on meta or cpu).

    CPU rather than meta, so that dispatch picks the kernels training would run: on meta,
    ``scaled_dot_product_attention`` falls back to the math path that saves the ``[B*H, S, S]``
    attention weights, while CPU (and CUDA) use a flash kernel that saves only the output and
    its log-sum-exp.
    """
    with mode:
        if dtype is not None and dtype != t.dtype:
            return torch.empty(t.shape, dtype=dtype, device="cpu")
        return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="cpu")


def _linear_shape(module: nn.Module) -> tuple[int, int] | None:
    """(out, in) of a linear-like module (Conv1D stores its weight [in, out])."""
    if type(module).__name__ not in _LINEAR_TYPES or getattr(module, "weight", None) is None:
        return None
    w = module.weight
    return (w.shape[1], w.shape[0]) if type(module).__name__ == "Conv1D" else (w.shape[0], w.shape[1])


def _unmatched(plan, names: list[str]) -> list[str]:
    import difflib

    from peftfx.plan import match

    lines = []
    for pattern, where in plan.all_patterns():
        if not any(match(pattern, n) for n in names):
            core = pattern[3:] if pattern.startswith("re:") else pattern.replace("*", "").strip(".")
            close = difflib.get_close_matches(core, sorted({n.rsplit(".", 1)[-1] for n in names}), n=3, cutoff=0.4)
            lines.append(f"{pattern!r} (from {where}) matches no linear layer; closest: {', '.join(close) or '-'}")
    return lines


def _swap(twin: nn.Module, plan, mode) -> list[dict]:
    """Replace targeted linears of the fake twin with fake QLoRALinear modules; return one row per target."""
    from peftfx.kernels.formats import QuantizedWeight
    from peftfx.kernels.modules import QLoRALinear

    sites = {n: s for n, m in twin.named_modules() if (s := _linear_shape(m)) is not None}
    if plan.quant is not None or plan.lora is not None or plan.rules:
        bad = _unmatched(plan, list(sites))
        if bad:
            raise PlanError("the plan does not fit this model:\n  " + "\n  ".join(bad))
    rows = []
    for name, (out_f, in_f) in sites.items():
        resolved = plan.resolve(name)
        if resolved is None:
            continue
        old = twin.get_submodule(name)
        w = old.weight.detach()
        w = w.t() if type(old).__name__ == "Conv1D" else w
        bias = old.bias.detach() if getattr(old, "bias", None) is not None else None
        q, lora = resolved.quant, resolved.lora
        lora_kw = {"r": None, "alpha": 1.0}
        if lora is not None:
            lora.check_fits(in_f, out_f, name)
            lora_kw = {"r": lora.r, "alpha": lora.alpha, "dropout": lora.dropout, "use_rslora": lora.use_rslora}
        with mode:
            if q is None:
                weight = w
                nbytes = w.numel() * w.element_size()
            else:
                dq = bool(q.double_quant) and q.format in ("nf4", "fp4")
                spec = quant_storage(q.format, (out_f, in_f), block_size=q.block_size, double_quant=dq,
                                     block_size2=q.block_size2)
                tensors = {k: torch.empty(n if k != "offset" or n > 1 else (), dtype=d, device=w.device)
                           for k, (n, d) in spec.items()}
                weight = QuantizedWeight.from_tensors(q.format, tensors, (out_f, in_f), block_size=q.block_size,
                                                      block_size2=q.block_size2, dtype=w.dtype,
                                                      threshold=q.threshold if q.format == "llm-int8" else 0.0,
                                                      name=name)
                nbytes = weight.nbytes()
            module = QLoRALinear(weight, bias, name=name, **lora_kw)
        parent, _, leaf = name.rpartition(".")
        setattr(twin.get_submodule(parent) if parent else twin, leaf, module)
        rows.append({"target": name, "shape": [out_f, in_f], "format": module.format, "r": module.r,
                     "weight_bytes": nbytes, "bits_per_param": round(8.0 * nbytes / (out_f * in_f), 4)})
    return rows


def _freeze(twin: nn.Module, plan) -> None:
    """Only adapters (and the plan's top layers / train_modules) train, as the freeze pass decides."""
    from peftfx.passes.freeze import is_adapter_parameter, top_block_prefixes
    from peftfx.plan import match

    names = [n for n, _ in twin.named_parameters()]
    prefixes = top_block_prefixes(names, plan.train_top_layers or 0)
    owners = {n.rpartition(".")[0] for n in names}
    prefixes += [o + "." for p in plan.train_modules for o in owners if o and match(p, o)]
    for name, p in twin.named_parameters():
        p.requires_grad_(is_adapter_parameter(twin, name) or any(name.startswith(x) for x in prefixes))


# ---------------------------------------------------------------- results


@dataclass
class Breakdown:
    """Bytes of one training step's memory (one configuration: full fine-tune or the plan)."""

    weights: dict[str, int]  # by storage kind: "float32", "nf4", "lora (float32)", "buffers", ...
    gradients: int
    optimizer_state: int
    activations: int  # saved for backward
    forward_backward_peak: int  # live bytes above the weights during forward + backward
    optimizer_transient: int
    inputs: int
    peak: int
    total_params: int
    trainable_params: int
    largest_tensor: str
    largest_tensor_bytes: int

    @property
    def weight_bytes(self) -> int:
        return sum(self.weights.values())

    @property
    def total(self) -> int:
        """The textbook sum: weights + gradients + optimizer state + activations."""
        return self.weight_bytes + self.gradients + self.optimizer_state + self.activations

    def to_dict(self) -> dict:
        return {**asdict(self), "weight_bytes": self.weight_bytes, "total": self.total}


@dataclass
class Estimate:
    """Before (full fine-tune) and after (the plan) memory of one training step."""

    model: str
    batch: int | None
    seq: int | None
    optimizer: str
    dtype: str
    train_device: str
    before: Breakdown
    after: Breakdown | None
    layers: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def bits_per_param(self) -> dict[str, float]:
        """Storage bits per weight of the targeted layers, by format."""
        acc: dict[str, list[int]] = {}
        for row in self.layers:
            n = row["shape"][0] * row["shape"][1]
            a = acc.setdefault(row["format"], [0, 0])
            a[0] += row["weight_bytes"]
            a[1] += n
        return {k: round(8.0 * b / n, 3) for k, (b, n) in acc.items()}

    def to_dict(self) -> dict:
        return {"schema": "peftfx.estimate", "schema_version": 1, "model": self.model, "batch": self.batch,
                "seq": self.seq, "optimizer": self.optimizer, "dtype": self.dtype, "train_device": self.train_device,
                "before": self.before.to_dict(), "after": None if self.after is None else self.after.to_dict(),
                "bits_per_param": self.bits_per_param(), "layers": self.layers, "notes": self.notes,
                "seconds": round(self.seconds, 2)}

    def render(self) -> str:
        """A human-readable table."""
        from peftfx.inspect.reporting import render_estimate

        return render_estimate(self)


# ---------------------------------------------------------------- estimate


def _optimizer_bytes(params: list[torch.Tensor], optimizer: str, train_device: str) -> tuple[int, int]:
    """(state bytes, step temporaries) for the trainable ``params``."""
    return (optimizer_state_bytes(params, optimizer, train_device),
            optimizer_step_bytes(params, optimizer, train_device))


def _unique(tensors) -> list[torch.Tensor]:
    seen, out = set(), []
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _weights_by_kind(twin: nn.Module, params: list, buffers: list) -> dict[str, int]:
    """Bytes of parameters and buffers by kind: dtype (trainable), ``frozen <dtype>``, ``lora (<dtype>)``,
    a quantized format (packed codes + scales), or ``buffers`` (rotary tables and the like)."""
    dtype = lambda t: str(t.dtype).removeprefix("torch.")  # noqa: E731
    kinds: dict[int, str] = {}
    for m in twin.modules():
        if hasattr(m, "quantized_weight") and hasattr(m, "format"):  # QLoRALinear: weight buffers
            for name, b in m.named_buffers(recurse=False):
                kinds[id(b)] = f"frozen {dtype(b)}" if m.format == "none" or name == "bias" else m.format
    for name, p in twin.named_parameters():
        lora = name.rsplit(".", 1)[-1].startswith("lora_")
        kinds[id(p)] = f"lora ({dtype(p)})" if lora else dtype(p) if p.requires_grad else f"frozen {dtype(p)}"
    out: dict[str, int] = {}
    for t in params + buffers:
        kind = kinds.get(id(t), "buffers")
        out[kind] = out.get(kind, 0) + _nbytes(t)
    return out


def _measure(twin: nn.Module, inputs: Any, mode, optimizer: str, train_device: str) -> Breakdown:
    params = _unique(twin.parameters())
    buffers = _unique(twin.buffers())
    flat_inputs = [t for t in tree_flatten(inputs)[0] if isinstance(t, torch.Tensor)]
    baseline = {_storage_key(t) for t in params + buffers + flat_inputs}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key not in baseline:
            saved[key] = t.untyped_storage().nbytes()
        return t

    alloc = _Allocations(baseline)
    with mode, alloc:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = _call(twin, inputs)
        loss = loss_of(out)
        if loss.requires_grad:
            loss.backward()
        del out, loss
        for p in params:
            p.grad = None
    weights = _weights_by_kind(twin, params, buffers)
    trainable = [p for p in params if p.requires_grad]
    grads = sum(_nbytes(p) for p in trainable)
    state, transient = _optimizer_bytes(trainable, optimizer, train_device)
    input_bytes = sum(_nbytes(t) for t in flat_inputs)
    named = [(n, t) for n, t in list(twin.named_parameters()) + list(twin.named_buffers())]
    big_name, big = max(named, key=lambda nt: _nbytes(nt[1]), default=("-", torch.empty(0)))
    largest = (_nbytes(big), f"{big_name} {list(big.shape)} {str(big.dtype).removeprefix('torch.')}")
    if alloc.largest[0] > largest[0]:
        largest = alloc.largest
    peak = sum(weights.values()) + input_bytes + state + max(alloc.peak, grads + transient)
    return Breakdown(weights=weights, gradients=grads, optimizer_state=state, activations=sum(saved.values()),
                     forward_backward_peak=alloc.peak, optimizer_transient=transient, inputs=input_bytes, peak=peak,
                     total_params=sum(p.numel() for p in params), trainable_params=sum(p.numel() for p in trainable),
                     largest_tensor=largest[1], largest_tensor_bytes=largest[0])


def estimate(model: nn.Module, plan: Any = None, *, example_inputs: Any = None, batch: int | None = None,
             seq: int | None = None, optimizer: str = "adamw", dtype: torch.dtype | str | None = None,
             train_device: str = "cpu") -> Estimate:
    """Memory of one training step of ``model`` before (full fine-tune) and after ``plan``.

    Nothing is allocated: the model (real or built under ``torch.device("meta")``) is copied into
    fake tensors and run under a simulated allocator (see the module docstring).

    Args:
        model: the model; its weights are not read or changed.
        plan: a :class:`~peftfx.plan.Plan`, dict or plan file path; None estimates only "before".
        example_inputs: kwargs dict / args tuple / tensor; default :func:`default_inputs` of
            ``[batch, seq]`` (batch 2, sequence 8 unless given).
        batch, seq: sizes of the default inputs (used only when ``example_inputs`` is None).
        optimizer: ``adamw | sgd | adamw-8bit | paged-adamw | paged-adamw-8bit``.
        dtype: training dtype of the floating-point parameters (default: as they are).
        train_device: ``cpu`` (single-tensor AdamW) or ``cuda`` (foreach AdamW temporaries).

    Returns:
        An :class:`Estimate`; ``est.after.peak`` is the predicted peak bytes of a step.

    Example::

        >>> import torch, peftfx.estimate as E
        >>> m = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 4))
        >>> est = E.estimate(m, {"targets": ["0"], "quant": {"format": "nf4"}, "lora": {"r": 8}},
        ...                  example_inputs=(torch.randn(4, 256),))
        >>> est.bits_per_param()
        {'nf4': 4.127}
    """
    import time

    from torch._subclasses.fake_tensor import FakeTensorMode

    from peftfx.api import as_plan

    start = time.perf_counter()
    if optimizer not in OPTIMIZERS:
        raise PlanError(f"optimizer {optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
    if train_device not in ("cpu", "cuda"):
        raise PlanError(f"train_device {train_device!r} must be 'cpu' or 'cuda'")
    if isinstance(dtype, str):
        if dtype not in ("float32", "bfloat16", "float16"):
            raise PlanError(f"dtype {dtype!r} must be float32, bfloat16 or float16")
        dtype = getattr(torch, dtype)
    plan = None if plan is None else as_plan(plan)
    first = next(model.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    if example_inputs is None:
        with torch.device("meta") if device.type == "meta" else torch.device("cpu"):
            example_inputs = default_inputs(model, batch or 2, seq or 8, device=device)
    notes = []
    if plan is not None:
        notes += [f"plan section {s!r} is not modelled by the estimate (its parameters are not counted)"
                  for s in ("prefix", "prompt", "adapter") if getattr(plan, s, None) is not None]
    results = []
    rows: list[dict] = []
    for planned in ((False, True) if plan is not None else (False,)):
        mode = FakeTensorMode(allow_non_fake_inputs=False)
        twin = _fake_twin(model, mode, dtype)
        twin.train()
        config = getattr(twin, "config", None)
        if config is not None and getattr(config, "use_cache", False):
            config.use_cache = False
        if planned:
            rows = _swap(twin, plan, mode)
            _freeze(twin, plan)
        else:
            for p in twin.parameters():
                p.requires_grad_(p.is_floating_point())
        fake_inputs = tree_map(lambda t: _fake_like(mode, t) if isinstance(t, torch.Tensor) else t, example_inputs)
        results.append(_measure(twin, fake_inputs, mode, optimizer, train_device))
        del twin
    flat = [t for t in tree_flatten(example_inputs)[0] if isinstance(t, torch.Tensor)]
    b = flat[0].shape[0] if flat and flat[0].dim() >= 1 else None
    s = flat[0].shape[1] if flat and flat[0].dim() >= 2 else None
    name = type(model).__name__
    return Estimate(model=name, batch=b, seq=s, optimizer=optimizer,
                    dtype=str(dtype or (first.dtype if first is not None else torch.float32)).removeprefix("torch."),
                    train_device=train_device, before=results[0], after=results[1] if plan is not None else None,
                    layers=rows, notes=notes, seconds=time.perf_counter() - start)


def measure_peak(step: Callable[[], None], *, resident: int = 0) -> int:
    """Measured peak CPU bytes of ``step()``: ``resident`` + the max of the profiler's live allocations.

    ``torch.profiler.profile(profile_memory=True)`` records each CPU allocator allocation and free
    as a ``[memory]`` event with a signed byte count; their running sum in time order is the
    memory allocated since the profiler started, and its maximum the peak of ``step``. Pass the
    bytes already alive (parameters, buffers, inputs, optimizer state) as ``resident``. The cyclic
    garbage collector is run before and paused during ``step`` so that freeing unrelated garbage
    does not offset the count.
    """
    import gc

    from torch.profiler import ProfilerActivity, profile

    # Garbage from earlier work freed by a cyclic collection mid-step would read as negative
    # allocations and hide part of the peak: collect first, and keep the collector off meanwhile.
    gc.collect()
    gc.disable()
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            step()
    finally:
        gc.enable()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    live = peak = 0
    for _, n in events:
        live += n
        peak = max(peak, live)
    return resident + peak
