"""Shared benchmark plumbing: machine description, interleaved timing, peak memory, RESULTS.md, plots.

Timing: every contender runs once per round, rounds repeat ``reps`` (>= 5 for real runs) times, and
each contender's median is reported. Interleaving means a load spike on the shared machine hits all
sides of a ratio alike; ratios are always computed from medians of the same run.

Peak memory (``peak_bytes``): the torch profiler's ``[memory]`` events come from the c10 CPU
allocator itself, so they see every tensor allocation, including the ones made inside custom ops
(peftfx's row-chunk workspace, bitsandbytes' dequantized weights), which a ``TorchDispatchMode``
tracker would miss (modes are popped while an op runs) and ``tracemalloc`` does not see at all.
Peak = bytes resident before the call (parameters, gradients, buffers, optimizer state and any
side tensors passed in, de-duplicated by storage) + the highest running sum of allocation events
during the call. Memory not allocated through torch (Python objects, bnb's C++ scratch) is not
counted on either side.
"""
from __future__ import annotations

import os
import platform
import re
import statistics
import time
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import torch

__all__ = ["machine_info", "machine_markdown", "interleaved", "interleaved_wall_cpu", "peak_bytes", "resident_bytes",
           "markdown_table", "write_section", "bar_plot", "RESULTS"]

RESULTS = Path(__file__).with_name("RESULTS.md")


def _cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    m = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    return m.group(1).strip() if m else platform.machine()


def _cpu_flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    m = re.search(r"^flags\s*:\s*(.+)$", text, re.M)
    flags = set(m.group(1).split()) if m else set()
    return " ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags)


def _version(mod: str) -> str:
    try:
        return __import__(mod).__version__
    except Exception:  # not installed / broken import: report, never fail the benchmark
        return "n/a"


def machine_info() -> dict[str, str]:
    """CPU model, core count, ISA flags that matter here, threads used and library versions."""
    return {
        "cpu": _cpu_model(), "cores": str(os.cpu_count()), "flags": _cpu_flags(),
        "torch threads": str(torch.get_num_threads()), "python": platform.python_version(),
        "torch": torch.__version__, "triton": _version("triton"), "bitsandbytes": _version("bitsandbytes"),
        "peft": _version("peft"), "torchao": _version("torchao"), "transformers": _version("transformers"),
        "load average": " ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a",
    }


def machine_markdown() -> str:
    info = machine_info()
    return "Machine: " + "; ".join(f"{k}: {v}" for k, v in info.items()) + "."


def interleaved_wall_cpu(fns: Mapping[str, Callable[[], object]], reps: int = 5,
                         warmup: int = 1) -> tuple[dict[str, float], dict[str, float]]:
    """Median wall seconds and median thread CPU seconds per contender; contenders alternate within each
    round (see module docstring).

    On the shared VM the wall time includes the time a contender waited for a core; the thread's CPU
    time does not, so its ratios move far less with the load (a hyperthread sibling's work still slows it).
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    wall: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            w0, c0 = time.perf_counter(), time.thread_time()
            fn()
            cpu[name].append(time.thread_time() - c0)
            wall[name].append(time.perf_counter() - w0)
    return ({k: statistics.median(v) for k, v in wall.items()}, {k: statistics.median(v) for k, v in cpu.items()})


def interleaved(fns: Mapping[str, Callable[[], object]], reps: int = 5, warmup: int = 1) -> dict[str, float]:
    """Median wall seconds per contender (:func:`interleaved_wall_cpu`'s first half)."""
    return interleaved_wall_cpu(fns, reps, warmup)[0]


def _storages(tensors: Iterable[torch.Tensor]) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        if not isinstance(t, torch.Tensor) or t.device.type != "cpu" or t.is_meta:
            continue
        try:
            st = t.untyped_storage()
            seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
        except (RuntimeError, NotImplementedError):  # wrapper subclasses (torchao NF4): count inner tensors
            names = t.__tensor_flatten__()[0] if hasattr(t, "__tensor_flatten__") else []
            seen[-id(t)] = _storages([getattr(t, a) for a in names])
    return sum(seen.values())


def resident_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                   extra: Sequence[torch.Tensor] = ()) -> int:
    """Bytes of parameters, their grads, buffers, optimizer state and ``extra`` (storage de-duplicated)."""
    ts: list[torch.Tensor] = []
    for p in model.parameters():
        ts.append(p)
        if p.grad is not None:
            ts.append(p.grad)
    ts += list(model.buffers())
    if optimizer is not None:
        for st in optimizer.state.values():
            ts += [v for v in st.values() if isinstance(v, torch.Tensor)]
    ts += list(extra)
    return _storages(ts)


def peak_bytes(fn: Callable[[], object], resident: int) -> int:
    """``resident`` + the peak running sum of CPU allocator events while ``fn`` runs."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # raw kineto events: one signed ``[memory]`` record per allocation / free, in time order
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    run = peak = 0
    for _, delta in events:
        run += delta
        peak = max(peak, run)
    return resident + peak


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    def fmt(v: object) -> str:
        return f"{v:.3g}" if isinstance(v, float) and abs(v) < 1000 else (f"{v:.0f}" if isinstance(v, float) else str(v))

    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_section(key: str, body: str, path: Path = RESULTS) -> None:
    """Replace (or append) the section between ``<!-- key:start -->`` / ``<!-- key:end -->`` in ``path``.

    Other sections (written by other benchmarks) are kept as they are.
    """
    start, end = f"<!-- {key}:start -->", f"<!-- {key}:end -->"
    block = f"{start}\n{body.strip()}\n{end}\n"
    text = path.read_text() if path.exists() else "# peftfx benchmark results\n\n"
    if start in text and end in text:
        a, b = text.index(start), text.index(end) + len(end)
        text = text[:a] + block.rstrip("\n") + text[b:]
    else:
        text = text.rstrip("\n") + "\n\n" + block
    path.write_text(text)


def bar_plot(path: Path, title: str, labels: Sequence[str], values: Sequence[float], *,
             target: float | None = None, xlabel: str = "ratio") -> None:
    """Horizontal bar chart of ``values`` (one per label) with an optional target line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 0.45 * len(labels) + 1.2))
    ax.barh(list(labels)[::-1], list(values)[::-1], color="#4c72b0")
    if target is not None:
        ax.axvline(target, color="#c44e52", linestyle="--", label=f"target {target:g}")
        ax.legend(loc="lower right")
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
