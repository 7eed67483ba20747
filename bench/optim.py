"""AdamW optimizer step: peftfx.optim vs torch AdamW(foreach=True), torchao AdamW8bit (and bitsandbytes on CUDA).

Parameters are ``count`` fp32 matrices of ``[1024, 1024]`` (10M ~ 10, 50M ~ 48 of them) with fixed random
gradients; every contender owns an identical copy. One timed call is one ``optimizer.step()``; contenders
alternate within each round (:func:`bench.common.interleaved`), medians of ``--reps`` rounds after warm-up
steps (torchao compiles its step with inductor during the warm-up; that compile time is reported apart).

On the CPU, ``peftfx AdamW8bit`` runs its inductor-compiled update and ``peftfx AdamW8bit eager`` the eager
fallback (``PEFTFX_OPTIM_COMPILE=0``). Rows per size: step ms, step / torch AdamW, step / torchao AdamW8bit, state MiB (every tensor the optimizer
holds), state / torch's. On CUDA (``--device cuda``, run by bench/gpu_check.sh) it adds bitsandbytes'
AdamW8bit / PagedAdamW8bit and the paged variants, and a peak-GPU-memory column: ``max_memory_allocated``
during a step, parameters and gradients included (the paged optimizers keep their state in host memory).

    python -m bench.optim [--sizes 10 50] [--reps 5] [--device cpu|cuda] [--no-torchao] [--out RESULTS.md]
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Callable

import torch

from bench.common import RESULTS, interleaved, machine_markdown, markdown_table, write_section

__all__ = ["main", "run"]

SIDE = 1024  # parameter matrices are [SIDE, SIDE]
TARGETS = "step <= 1.0x torch AdamW(foreach=True); step <= 0.5x torchao AdamW8bit; state <= 0.26x torch's"


def _params(count: int, device: str, seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator(device).manual_seed(seed)  # drawn where they live: 200M values on a GPU take no time
    params = []
    for _ in range(count):
        p = torch.nn.Parameter(torch.randn(SIDE, SIDE, generator=g, device=device))
        p.grad = torch.randn(SIDE, SIDE, generator=g, device=device) * 1e-3
        params.append(p)
    return params


def _contenders(device: str, torchao: bool) -> dict[str, Callable[[list], torch.optim.Optimizer]]:
    from peftfx.optim import AdamW8bit, PagedAdamW, PagedAdamW8bit

    makers: dict[str, Callable[[list], torch.optim.Optimizer]] = {
        "torch AdamW(foreach)": lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True),
        "peftfx AdamW8bit": lambda ps: AdamW8bit(ps, lr=1e-3),
    }
    if device == "cpu":  # the fallback without inductor (PEFTFX_OPTIM_COMPILE=0)
        makers["peftfx AdamW8bit eager"] = lambda ps: _eager(AdamW8bit(ps, lr=1e-3))
    if torchao:
        try:
            from torchao.optim import AdamW8bit as AoAdamW8bit
        except ImportError:  # the GPU image may lack it: report the rest
            print("torchao not importable: its row is left out")
        else:
            makers["torchao AdamW8bit"] = lambda ps: AoAdamW8bit(ps, lr=1e-3)
    if device == "cuda":
        try:
            import bitsandbytes as bnb
        except ImportError:
            print("bitsandbytes not importable: its rows are left out")
        else:
            makers["bitsandbytes AdamW8bit"] = lambda ps: bnb.optim.AdamW8bit(ps, lr=1e-3)
            makers["bitsandbytes PagedAdamW8bit"] = lambda ps: bnb.optim.PagedAdamW8bit(ps, lr=1e-3)
        makers["peftfx PagedAdamW8bit"] = lambda ps: PagedAdamW8bit(ps, lr=1e-3)
        makers["peftfx PagedAdamW"] = lambda ps: PagedAdamW(ps, lr=1e-3)
    return makers


def _eager(opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """``opt`` whose steps run with PEFTFX_OPTIM_COMPILE=0 (the eager CPU update)."""
    from peftfx.kernels.adam8bit_compiled import COMPILE_ENV

    step = opt.step

    def eager_step(*args, **kwargs):
        old = os.environ.get(COMPILE_ENV)
        os.environ[COMPILE_ENV] = "0"
        try:
            return step(*args, **kwargs)
        finally:
            if old is None:
                del os.environ[COMPILE_ENV]
            else:
                os.environ[COMPILE_ENV] = old

    opt.step = eager_step  # type: ignore[method-assign]
    return opt


def _sync(device: str) -> Callable[[], None]:
    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


def run(count: int, reps: int, device: str, torchao: bool) -> list[list[object]]:
    makers = _contenders(device, torchao)
    setups, compile_s, steps = {}, {}, {}
    sync = _sync(device)
    for name, make in makers.items():
        params = _params(count, device)
        opt = make(params)
        start = time.perf_counter()
        opt.step()  # first step: state allocation (and the inductor compiles: peftfx's update, torchao's step)
        sync()
        compile_s[name] = time.perf_counter() - start
        setups[name] = (params, opt)

        def step(opt=opt):
            opt.step()
            sync()

        steps[name] = step
    medians = interleaved(steps, reps=reps, warmup=1)
    torch_s = medians["torch AdamW(foreach)"]
    ao_s = medians.get("torchao AdamW8bit")
    torch_state = _state_bytes(setups["torch AdamW(foreach)"][1])
    rows = []
    for name, (params, opt) in setups.items():
        state = _state_bytes(opt)
        row = [f"{count * SIDE * SIDE / 1e6:.0f}M", name, medians[name] * 1e3, medians[name] / torch_s,
               medians[name] / ao_s if ao_s else "n/a", state / 2**20, state / torch_state, compile_s[name]]
        if device == "cuda":
            row.append(_cuda_peak(steps[name], params, opt) / 2**20)
        rows.append(row)
    del setups, steps
    return rows


def _tensor_bytes(v: torch.Tensor) -> int:
    """Bytes of one state tensor; wrapper subclasses (torchao) by their inner tensors."""
    inner = v.__tensor_flatten__()[0] if hasattr(v, "__tensor_flatten__") else None
    ts = [getattr(v, a) for a in inner] if inner else [v]
    return sum(t.numel() * t.element_size() for t in ts)


def _state_bytes(opt: torch.optim.Optimizer) -> int:
    """Every tensor the optimizer holds, wherever it lives (CPU, GPU, pinned host, unified memory)."""
    return sum(_tensor_bytes(v) for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor))


def _cuda_peak(step: Callable[[], None], params: list, opt: torch.optim.Optimizer) -> int:
    """This contender's GPU bytes at its step's peak: its parameters, gradients and GPU-resident state plus the
    step's own allocations (the other contenders' tensors, alive meanwhile, are left out). bitsandbytes'
    paged state lives in CUDA unified memory, which torch's allocator does not count."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    transient = torch.cuda.max_memory_allocated() - before
    resident = sum(2 * p.numel() * p.element_size() for p in params)
    resident += sum(_tensor_bytes(v) for st in opt.state.values() for v in st.values()
                    if isinstance(v, torch.Tensor) and v.is_cuda)
    return resident + transient


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=float, nargs="+", default=[10, 50], help="millions of parameters")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--no-torchao", action="store_true", help="skip torchao (its CPU compile takes minutes)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for millions in args.sizes:
        count = max(1, round(millions * 1e6 / (SIDE * SIDE)))
        rows += run(count, args.reps, args.device, not args.no_torchao)
    header = ["params", "optimizer", "step ms (median)", "step / torch AdamW", "step / torchao AdamW8bit",
              "state MiB", "state / torch", "first step s"]
    if args.device == "cuda":
        header.append("peak GPU MiB")
    table = markdown_table(header, rows)
    print(table)
    body = (f"## optim ({args.device}): one AdamW step, peftfx.optim vs torch and torchao\n\n{machine_markdown()}\n"
            f"Median of {args.reps} interleaved rounds, {args.threads} thread(s); fp32 parameters, [1024, 1024] "
            f"matrices. Targets: {TARGETS}. State = every tensor the optimizer holds. `first step s` includes "
            "state allocation and the inductor compile of the update (peftfx, torchao); for peftfx it depends on "
            "inductor's on-disk cache (cold vs warm: see the reading below). The machine is shared: other "
            "jobs ran during the measurement (load average above), which inflates absolute times; ratios come from "
            "interleaved rounds.\n\n" + table)
    write_section(f"optim_{args.device}", body, args.out)
    return body


if __name__ == "__main__":
    main()
