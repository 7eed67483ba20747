"""NF4 kernels on CPU, one thread: peftfx (native decoder and PyTorch path) vs bitsandbytes, torchao, dense fp32.

Rows (weight ``[size, size]``, NF4, block 64, double quantization on every side):

* dequantize to fp32 and to bf16 (throughput, M elements/s; ratio = peftfx / bitsandbytes);
* quantize (throughput; ratio = peftfx / bitsandbytes);
* decode-shaped forward ``y = x @ deq(W).T`` for M = 1..8 (time; ratio = contender / dense ``F.linear``).

``peftfx native`` is the default cpu backend with the C++ decoder (:mod:`peftfx.kernels.cpu_native`);
``peftfx PyTorch path`` is what runs without it (``PEFTFX_CPU_NATIVE=0``, or no compiler). Beside
each decode row stands the memory-bandwidth bound: the bytes the contender must read (packed weight
+ scales, or the dense fp32 weight) at the bandwidth of a large ``copy_`` measured in the same
process (read + write bytes per thread-CPU second), i.e. the fastest that row could run on this machine.
Decode rows report wall time and the thread's CPU time of the same calls (the shared VM's load moves
the first far more than the second).

All contenders of a row run interleaved in the same process (see :mod:`bench.common`); medians of
``--reps`` rounds. Prints the tables, writes the ``cpu_kernels`` section of ``bench/RESULTS.md`` and
``bench/cpu_kernels.png``.

    python -m bench.cpu_kernels [--size 4096] [--reps 5] [--decode-m 1 2 4 8]
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time
import warnings
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from bench.common import (RESULTS, bar_plot, interleaved, interleaved_wall_cpu, machine_markdown, markdown_table,
                          write_section)

__all__ = ["main", "run", "copy_bandwidth"]


def copy_bandwidth(mib: int = 256, reps: int = 5) -> tuple[float, float]:
    """Bytes/s of a large ``dst.copy_(src)`` (read + write bytes), median of ``reps``: the memory bound, by
    wall time and by the thread's CPU time (the second excludes waiting for a core, like the CPU columns)."""
    src = torch.ones(mib << 18)
    dst = torch.empty_like(src)
    dst.copy_(src)  # fault the pages in before timing
    wall, cpu = [], []
    for _ in range(reps):
        w0, c0 = time.perf_counter(), time.thread_time()
        dst.copy_(src)
        cpu.append(time.thread_time() - c0)
        wall.append(time.perf_counter() - w0)
    nbytes = 2 * src.numel() * 4
    return nbytes / statistics.median(wall), nbytes / statistics.median(cpu)


@contextlib.contextmanager
def _pytorch_path():
    """Run peftfx's cpu backend without the native decoder (what users without a compiler get)."""
    from peftfx.kernels import cpu_native

    old = os.environ.get(cpu_native.ENV_VAR)
    os.environ[cpu_native.ENV_VAR] = "0"
    try:
        yield
    finally:
        if old is None:
            del os.environ[cpu_native.ENV_VAR]
        else:
            os.environ[cpu_native.ENV_VAR] = old


def _without_native(fn: Callable[[], object]) -> Callable[[], object]:
    def run() -> object:
        with _pytorch_path():
            return fn()
    return run


def _contenders(w: torch.Tensor) -> dict[str, dict[str, Callable[[], object]]]:
    """Per row: contender name -> zero-argument callable."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbF

    from peftfx.kernels import ops

    from peftfx.kernels import quantizer

    qw = quantizer.quantize(w, "nf4", block_size=64, double_quant=True)
    q, st = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    q16, st16 = bnbF.quantize_4bit(w.bfloat16(), blocksize=64, quant_type="nf4", compress_statistics=True)
    warnings.filterwarnings("ignore", message=".*PEFTFX_CPU_NATIVE=0.*")  # the PyTorch-path rows switch it off
    deq32, deq16 = (lambda: ops.dequantize(qw, torch.float32)), (lambda: ops.dequantize(qw, torch.bfloat16))
    rows: dict[str, dict[str, Callable[[], object]]] = {
        "dequantize fp32": {"peftfx native": deq32, "peftfx PyTorch path": _without_native(deq32),
                            "bitsandbytes": lambda: bnbF.dequantize_4bit(q, st)},
        "dequantize bf16": {"peftfx native": deq16, "peftfx PyTorch path": _without_native(deq16),
                            "bitsandbytes": lambda: bnbF.dequantize_4bit(q16, st16)},
        "quantize": {"peftfx": lambda: quantizer.quantize(w, "nf4", block_size=64, double_quant=True),
                     "bitsandbytes": lambda: bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4",
                                                                compress_statistics=True)},
    }
    nf4 = None
    try:
        from torchao.quantization import to_nf4

        nf4 = to_nf4(w, 64, 256)
        rows["dequantize fp32"]["torchao"] = nf4.get_original_weight
        rows["quantize"]["torchao"] = lambda: to_nf4(w, 64, 256)
    except Exception as e:  # torchao missing or broken: the other rows still run
        warnings.warn(f"torchao NF4 unavailable: {e}")
    rows["_decode"] = {"qw": qw, "q": q, "st": st, "nf4": nf4, "bnb": bnb, "ops": ops}  # type: ignore[dict-item]
    return rows


def run(size: int = 4096, reps: int = 5, decode_m: tuple[int, ...] = (1, 2, 4, 8)) -> dict[str, list[tuple]]:
    """Measure every row; returns ``{"throughput": rows, "decode": rows, "bandwidth": [bytes/s]}``."""
    from peftfx.kernels import cpu_native

    if not cpu_native.available():
        warnings.warn("the native decoder is unavailable: the 'peftfx native' rows run the PyTorch path")
    torch.manual_seed(0)
    w = torch.randn(size, size)
    c = _contenders(w)
    dec = c.pop("_decode")
    n = w.numel()
    throughput = []
    for row, fns in c.items():
        t = interleaved(fns, reps=reps)
        for name, sec in t.items():
            throughput.append((row, name, sec * 1e3, n / sec / 1e6, t["bitsandbytes"] / sec))
    decode = []
    ops, bnb, qw, q, st, nf4 = dec["ops"], dec["bnb"], dec["qw"], dec["q"], dec["st"], dec["nf4"]
    bw_wall, bw = copy_bandwidth(min(256, max(8, 16 * w.numel() * 4 >> 20)))  # beyond the caches
    must_read = {"dense fp32 F.linear": w.numel() * 4, "peftfx native": qw.nbytes(),
                 "peftfx PyTorch path": qw.nbytes(), "bitsandbytes": q.numel() * q.element_size()
                 + sum(t.numel() * t.element_size() for t in (st.absmax, st.state2.absmax)),
                 "torchao": qw.nbytes()}
    for m in decode_m:
        x = torch.randn(m, size)
        native = lambda: ops.qlora_linear(x, qw, None, None, None, 0.0)  # noqa: E731
        fns = {"dense fp32 F.linear": lambda: F.linear(x, w),
               "peftfx native": native, "peftfx PyTorch path": _without_native(native),
               "bitsandbytes": lambda: bnb.matmul_4bit(x, q.t(), st)}
        if nf4 is not None:
            from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import linear_nf4

            fns["torchao"] = lambda: linear_nf4(x, nf4)
        with torch.no_grad():
            t, cpu = interleaved_wall_cpu(fns, reps=reps)
        dense, dense_cpu = t["dense fp32 F.linear"], cpu["dense fp32 F.linear"]
        for name, sec in t.items():
            bound = (must_read[name] + x.numel() * 4) / bw
            decode.append((m, name, sec * 1e3, sec / dense, cpu[name] * 1e3, cpu[name] / dense_cpu, bound * 1e3,
                           cpu[name] / bound))
    return {"throughput": throughput, "decode": decode, "bandwidth": [bw, bw_wall]}


def report(res: dict[str, list[tuple]], size: int, reps: int, out: Path = RESULTS,
           plot: Path | None = None) -> str:
    """Markdown for the results (also written into ``out``'s ``cpu_kernels`` section, and a PNG)."""
    tp = markdown_table(["operation", "contender", "ms (median)", "M elem/s", "speed vs bitsandbytes"],
                        res["throughput"])
    dc = markdown_table(["M", "contender", "wall ms (median)", "wall / dense fp32", "CPU ms (median)",
                         "CPU / dense fp32", "bandwidth bound ms", "CPU / bound"], res["decode"])
    bw, bw_wall = res["bandwidth"][0] / 1e9, res["bandwidth"][1] / 1e9
    body = (f"## cpu_kernels: NF4 dequantize / quantize / decode forward ({size}x{size}, block 64, double quant)\n\n"
            f"{machine_markdown()}\nMedian of {reps} interleaved rounds, one thread.\n\n"
            f"Throughput (targets: native dequantize >= 1.5x bitsandbytes, quantize >= 2x):\n\n{tp}\n\n"
            f"Decode-shaped forward `x[M, {size}] @ deq(W).T` (target: peftfx native <= 1.0x dense fp32). "
            f"Wall = perf_counter; CPU = the thread's CPU time in the same calls (excludes waiting for a core). "
            f"Bandwidth bound = bytes the contender must read (weight storage + x) at {bw:.1f} GB/s, the "
            f"read + write rate of a large `copy_` (256 MiB at size 4096) in the same process by CPU time "
            f"({bw_wall:.1f} GB/s by wall time), compared with the CPU column:\n\n{dc}\n")
    if plot is not None:
        labels = [f"{r[0]} ({r[1]})" for r in res["throughput"] if r[1] != "bitsandbytes"]
        vals = [r[4] for r in res["throughput"] if r[1] != "bitsandbytes"]
        labels += [f"decode M={r[0]} ({r[1]}) dense/t" for r in res["decode"] if r[1].startswith("peftfx")]
        vals += [1.0 / r[3] for r in res["decode"] if r[1].startswith("peftfx")]
        labels += [f"decode M={r[0]} ({r[1]}) dense/t CPU" for r in res["decode"] if r[1] == "peftfx native"]
        vals += [1.0 / r[5] for r in res["decode"] if r[1] == "peftfx native"]
        bar_plot(plot, f"NF4 kernels, {size}x{size}, 1 thread: speed ratio (higher is better)", labels, vals,
                 target=1.0, xlabel="speed ratio (vs bitsandbytes; decode: vs dense fp32)")
        body += f"\n![cpu_kernels]({plot.name})\n"
    write_section("cpu_kernels", body, out)
    return body


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--decode-m", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=RESULTS, help="markdown file whose cpu_kernels section is written")
    ap.add_argument("--plot", type=Path, default=RESULTS.with_name("cpu_kernels.png"))
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    res = run(a.size, a.reps, tuple(a.decode_m))
    body = report(res, a.size, a.reps, a.out, a.plot)
    print(body)
    return body


if __name__ == "__main__":
    main()
