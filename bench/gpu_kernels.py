"""Side-by-side timing of the fused NF4+LoRA kernels on a GPU (run by bench/gpu_check.sh).

Providers, all bf16, K = N = 4096, r = 16, M in (1, 16, 4096):
  dense       F.linear(x, W) with a bf16 W (no LoRA)              -- the M <= 16 target's baseline
  dense+lora  F.linear(x, W) + s·(x·Aᵀ)·Bᵀ in PyTorch             -- the M = 4096 target's baseline
  deq+mm      deq(W_nf4) to bf16, then dense+lora (what bitsandbytes / torchao / unsloth do)
  fused       qlora_forward_triton (W dequantized in registers, LoRA in the epilogue)
fwd+bwd adds dx, dA, dB (dense: autograd; deq+mm: dequantize again in backward, as QLoRA does).
Writes a markdown table to stdout and to $OUT/gpu_results.md when OUT is set.
"""
from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F
import triton
import triton.testing

from peftfx.kernels.qlora_triton import qlora_backward_triton, qlora_forward_triton
from peftfx.kernels.quant_triton import dequantize_triton, quantize_triton

K = N = int(os.environ.get("PEFTFX_BENCH_K", 4096))  # smaller only for a CPU smoke test of this script
R = 16
S = 2.0
DT = torch.bfloat16
TARGET_SMALL = 0.35  # M <= 16: fused fwd <= 0.35 x dense bf16 (4-bit weights move a quarter of the bytes)
TARGET_LARGE = 1.15  # M = 4096: fused <= 1.15 x dense bf16 + LoRA


def bench(fn) -> float:
    """Median microseconds (return_mode exists in Triton >= 3.0)."""
    return 1e3 * triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def main() -> int:
    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    w = (torch.randn(N, K, device=dev) * K ** -0.5).to(DT)
    qw = quantize_triton(w, "nf4", block_size=64, double_quant=True)
    wd = dequantize_triton(qw, DT)
    A = (torch.randn(R, K, device=dev) * K ** -0.5).to(DT)
    B = (torch.randn(N, R, device=dev) * 0.1).to(DT)
    needs = (True, False, True, True)
    rows = []
    name = torch.cuda.get_device_name() if dev == "cuda" else "cpu (smoke test)"
    info = f"{name} · torch {torch.__version__} · triton {triton.__version__}"
    for m in (1, 16, min(4096, K)):
        x = torch.randn(m, K, device=dev, dtype=DT)
        dy = torch.randn(m, N, device=dev, dtype=DT)

        # correctness first: the fused kernel against dequantize-then-matmul
        y_f = qlora_forward_triton(x, qw, None, A, B, S, None)
        y_d = F.linear(x, wd) + S * F.linear(F.linear(x, A), B)
        err = float((y_f.float() - y_d.float()).abs().max() / y_d.float().abs().max().clamp(min=1e-6))

        dense = lambda: F.linear(x, w)  # noqa: E731
        dense_lora = lambda: F.linear(x, w) + S * F.linear(F.linear(x, A), B)  # noqa: E731
        deq_mm = lambda: (lambda wd_: F.linear(x, wd_) + S * F.linear(F.linear(x, A), B))(dequantize_triton(qw, DT))  # noqa: E731
        fused = lambda: qlora_forward_triton(x, qw, None, A, B, S, None)  # noqa: E731

        xg = x.clone().requires_grad_(True)
        Ag, Bg = A.clone().requires_grad_(True), B.clone().requires_grad_(True)

        def dense_lora_fb():
            xg.grad = Ag.grad = Bg.grad = None
            y = F.linear(xg, w) + S * F.linear(F.linear(xg, Ag), Bg)
            y.backward(dy)

        def deq_mm_fb():
            wd_ = dequantize_triton(qw, DT)
            xa = F.linear(x, A)
            F.linear(x, wd_) + S * F.linear(xa, B)
            wd_ = dequantize_triton(qw, DT)  # QLoRA re-dequantizes in backward (no bf16 W kept)
            dyb = dy @ B
            dy @ wd_ + S * (dyb @ A), S * (dyb.t() @ x), S * (dy.t() @ xa)

        def fused_fb():
            qlora_forward_triton(x, qw, None, A, B, S, None)
            qlora_backward_triton(dy, x, qw, A, B, S, None, needs)

        t = {name: bench(fn) for name, fn in [("dense", dense), ("dense+lora", dense_lora), ("deq+mm", deq_mm),
                                              ("fused", fused), ("dense+lora fb", lambda: dense_lora_fb()),
                                              ("deq+mm fb", deq_mm_fb), ("fused fb", fused_fb)]}
        if m <= 16:
            base, ratio, target = "dense", t["fused"] / t["dense"], TARGET_SMALL
        else:
            base, ratio, target = "dense+lora", t["fused"] / t["dense+lora"], TARGET_LARGE
        rows.append(f"| {m} | fwd | {t['dense']:.1f} | {t['dense+lora']:.1f} | {t['deq+mm']:.1f} | {t['fused']:.1f} "
                    f"| {ratio:.2f}x {base} | <= {target}x | {'PASS' if ratio <= target else 'MISS'} "
                    f"| {t['fused'] / t['deq+mm']:.2f}x | {err:.1e} |")
        rows.append(f"| {m} | fwd+bwd | - | {t['dense+lora fb']:.1f} | {t['deq+mm fb']:.1f} | {t['fused fb']:.1f} "
                    f"| {t['fused fb'] / t['dense+lora fb']:.2f}x dense+lora | - | - "
                    f"| {t['fused fb'] / t['deq+mm fb']:.2f}x | |")
        print(rows[-2], rows[-1], sep="\n", flush=True)

    table = "\n".join([
        f"## Fused NF4 (double quant, block 64) + LoRA r={R}, K=N={K}, bf16 -- {info}", "",
        "Times in microseconds (triton.testing.do_bench median). fused/deq+mm = the fused kernel against "
        "dequantize-then-matmul; rel err = max|fused - deq+mm| / max|deq+mm|.", "",
        "| M | pass | dense bf16 | dense+LoRA | deq→mm+LoRA | fused | fused ratio | target | ok | fused/deq+mm | rel err |",
        "|---|---|---|---|---|---|---|---|---|---|---|", *rows, ""])
    print("\n" + table)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "gpu_results.md"), "a") as f:
            f.write(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
