"""Side-by-side timing of the fused NF4+LoRA kernels on a GPU (run by bench/gpu_check.sh).

Providers, all bf16, K = N = 4096, r = 16, M in (1, 16, 256, 4096):
  dense       F.linear(x, W) with a bf16 W (no LoRA)              -- the M <= 16 target's baseline
  dense+lora  F.linear(x, W) + s·(x·Aᵀ)·Bᵀ in PyTorch (cuBLAS)    -- the M = 4096 target's baseline
  deq+mm      deq(W_nf4) to bf16, then dense+lora (what bitsandbytes / torchao / unsloth do for training)
  bnb         bitsandbytes.matmul_4bit (NF4, double quant, block 64) + LoRA in PyTorch, when importable
  fused       qlora_forward_triton (GEMV for M <= 16, tiles above; W decoded in registers, LoRA fused)
fwd+bwd adds dx, dA, dB (dense/bnb: autograd; deq+mm: dequantize again in backward, as QLoRA does).
Targets (issue 19, H200): M <= 16 fused fwd <= 0.35x dense (bandwidth limit ~0.26x: 0.516 of 2 bytes
per weight); M = 4096 fused fwd <= 1.15x dense+lora. Writes the table and the configs the autotuner
chose into bench/RESULTS.md (section gpu_kernels) and $OUT/gpu_results.md, and a plot
(bench/gpu_kernels.png, copied to $OUT).
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.testing

from bench.common import RESULTS, bar_plot, write_section
from peftfx.kernels import gemv_triton, qlora_triton
from peftfx.kernels.qlora_triton import qlora_backward_triton, qlora_forward_triton
from peftfx.kernels.quant_triton import dequantize_triton, quantize_triton

K = N = int(os.environ.get("PEFTFX_BENCH_K", 4096))  # smaller only for a CPU smoke test of this script
R = 16
S = 2.0
DT = torch.bfloat16
MS = (1, 16, 256, 4096)
TARGET_SMALL = 0.35
TARGET_LARGE = 1.15


def bench(fn) -> float:
    """Median microseconds (return_mode exists in Triton >= 3.0)."""
    return 1e3 * triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def _bnb(w: torch.Tensor):
    """(forward, fwd+bwd builder) through bitsandbytes' 4-bit matmul, or None when unavailable."""
    try:
        import bitsandbytes as bnb
        from bitsandbytes.functional import quantize_4bit
    except Exception as e:  # noqa: BLE001 - any import failure means "not available here"
        print(f"bitsandbytes not importable: {e}")
        return None
    packed, state = quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    return lambda x, A, B: bnb.matmul_4bit(x, packed.t(), quant_state=state) + S * F.linear(F.linear(x, A), B)


def _best(kernel) -> str:
    cfg = getattr(kernel, "best_config", None)
    return str(cfg) if cfg is not None else "-"


def main() -> int:
    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    w = (torch.randn(N, K, device=dev) * K ** -0.5).to(DT)
    qw = quantize_triton(w, "nf4", block_size=64, double_quant=True)
    wd = dequantize_triton(qw, DT)
    A = (torch.randn(R, K, device=dev) * K ** -0.5).to(DT)
    B = (torch.randn(N, R, device=dev) * 0.1).to(DT)
    bnb_fwd = _bnb(w) if dev == "cuda" else None
    needs = (True, False, True, True)
    rows, chosen, plot_labels, plot_values = [], [], [], []
    name = torch.cuda.get_device_name() if dev == "cuda" else "cpu (smoke test)"
    info = f"{name} · torch {torch.__version__} · triton {triton.__version__}"
    for m in MS:
        m = min(m, K)
        x = torch.randn(m, K, device=dev, dtype=DT)
        dy = torch.randn(m, N, device=dev, dtype=DT)

        # correctness first: the fused kernel against dequantize-then-matmul
        y_f = qlora_forward_triton(x, qw, None, A, B, S, None)
        y_d = F.linear(x, wd) + S * F.linear(F.linear(x, A), B)
        err = float((y_f.float() - y_d.float()).abs().max() / y_d.float().abs().max().clamp(min=1e-6))

        xg = x.clone().requires_grad_(True)
        Ag, Bg = A.clone().requires_grad_(True), B.clone().requires_grad_(True)

        def dense_lora_fb():
            xg.grad = Ag.grad = Bg.grad = None
            (F.linear(xg, w) + S * F.linear(F.linear(xg, Ag), Bg)).backward(dy)

        def deq_mm_fb():
            wd_ = dequantize_triton(qw, DT)
            xa = F.linear(x, A)
            F.linear(x, wd_) + S * F.linear(xa, B)
            wd_ = dequantize_triton(qw, DT)  # QLoRA re-dequantizes in backward (no bf16 W kept)
            dyb = dy @ B
            dy @ wd_ + S * (dyb @ A), S * (dyb.t() @ x), S * (dy.t() @ xa)

        def bnb_fb():
            xg.grad = Ag.grad = Bg.grad = None
            bnb_fwd(xg, Ag, Bg).backward(dy)

        def fused_fb():
            qlora_forward_triton(x, qw, None, A, B, S, None)
            qlora_backward_triton(dy, x, qw, A, B, S, None, needs)

        fns = {"dense": lambda: F.linear(x, w),
               "dense+lora": lambda: F.linear(x, w) + S * F.linear(F.linear(x, A), B),
               "deq+mm": lambda: (lambda wd_: F.linear(x, wd_) + S * F.linear(F.linear(x, A), B))(
                   dequantize_triton(qw, DT)),
               "fused": lambda: qlora_forward_triton(x, qw, None, A, B, S, None),
               "dense+lora fb": dense_lora_fb, "deq+mm fb": deq_mm_fb, "fused fb": fused_fb}
        if bnb_fwd is not None:
            fns["bnb"] = lambda: bnb_fwd(x, A, B)
            fns["bnb fb"] = bnb_fb
        t = {k: bench(fn) for k, fn in fns.items()}
        bnb_t = f"{t['bnb']:.1f}" if "bnb" in t else "-"
        bnb_fb_t = f"{t['bnb fb']:.1f}" if "bnb fb" in t else "-"
        if m <= 16:
            base, ratio, target = "dense", t["fused"] / t["dense"], TARGET_SMALL
        else:
            base, ratio, target = "dense+lora", t["fused"] / t["dense+lora"], (TARGET_LARGE if m >= 4096 else None)
        ok = "-" if target is None else ("PASS" if ratio <= target else "MISS")
        rows.append(f"| {m} | fwd | {t['dense']:.1f} | {t['dense+lora']:.1f} | {t['deq+mm']:.1f} | {bnb_t} "
                    f"| {t['fused']:.1f} | {ratio:.2f}x {base} | {target or '-'} | {ok} "
                    f"| {t['fused'] / t['deq+mm']:.2f}x | {err:.1e} |")
        rows.append(f"| {m} | fwd+bwd | - | {t['dense+lora fb']:.1f} | {t['deq+mm fb']:.1f} | {bnb_fb_t} "
                    f"| {t['fused fb']:.1f} | {t['fused fb'] / t['dense+lora fb']:.2f}x dense+lora | - | - "
                    f"| {t['fused fb'] / t['deq+mm fb']:.2f}x | |")
        fwd_kernel = gemv_triton._qlora_gemv_kernel if gemv_triton.use_gemv(m) else qlora_triton._qlora_forward_kernel
        chosen.append(f"| {m} | {fwd_kernel.base_fn.__name__} | {_best(fwd_kernel)} | {_best(qlora_triton._qlora_dx_kernel)} |")
        plot_labels += [f"M={m} fwd / {base}", f"M={m} fwd+bwd / dense+lora"]
        plot_values += [ratio, t["fused fb"] / t["dense+lora fb"]]
        print(rows[-2], rows[-1], sep="\n", flush=True)

    body = "\n".join([
        f"## gpu_kernels: fused NF4 (double quant, block 64) + LoRA r={R}, K=N={K}, bf16 -- {info}", "",
        "Times in microseconds (triton.testing.do_bench median). fused/deq+mm = the fused kernel against "
        "dequantize-then-matmul; rel err = max|fused - deq+mm| / max|deq+mm|; bnb = bitsandbytes.matmul_4bit "
        "+ LoRA.", "",
        "| M | pass | dense bf16 | dense+LoRA | deq→mm+LoRA | bnb+LoRA | fused | fused ratio | target | ok "
        "| fused/deq+mm | rel err |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|", *rows, "",
        "Configs the autotuner chose (after pruning to <= 3 candidates per key):", "",
        "| M | forward kernel | forward config | dx config |", "|---|---|---|---|", *chosen, "",
        "![gpu_kernels](gpu_kernels.png)", ""])
    print("\n" + body)
    plot = Path(__file__).with_name("gpu_kernels.png")
    try:
        bar_plot(plot, f"fused NF4+LoRA / bf16 baseline ({name})", plot_labels, plot_values, target=TARGET_LARGE,
                 xlabel="time ratio (lower is better)")
    except Exception as e:  # noqa: BLE001 - matplotlib missing on the GPU image: table only
        print(f"no plot: {e}")
    write_section("gpu_kernels", body, RESULTS)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "gpu_results.md"), "a") as f:
            f.write(body + "\n")
        if plot.exists():
            shutil.copy(plot, os.environ["OUT"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
