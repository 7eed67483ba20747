"""Activation memory of a QLoRA training step on CPU: peftfx [memory] settings vs peft+bnb gradient checkpointing.

Model: the bench Llama (:func:`bench.cpu_train.build_model`: hidden 1024, 4 layers, vocab 8192 by
default), batch 1, sequence lengths ``--seqs``; the standard QLoRA plan (NF4 + double quantization on
the 7 decoder linears, LoRA r=16 on q,v, no dropout), fp32 compute on both sides. Contenders:

* ``peftfx off`` / ``peftfx blocks`` / ``peftfx selective``: ``peftfx.compile`` with
  ``[memory] checkpoint = ...`` (one compile each; the graph has a dynamic sequence dim);
* ``peft+bnb gc``: ``bnb.nn.Linear4bit`` + ``peft.get_peft_model`` with transformers'
  ``gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})``: what
  QLoRA users run.

Per sequence length, step times (forward + backward + AdamW) are medians of ``--reps`` interleaved
rounds after a warm-up, one thread; peak memory is measured once per contender (bench.common:
resident tensors + the CPU allocator's peak during one step). Both sides run the same loop
(``model(**inputs).loss.backward()``, AdamW step, ``zero_grad(set_to_none=True)``): it keeps the
loss only, so the model output (the logits) is dropped before backward on both sides. Writes the
``activation_memory`` section of ``bench/RESULTS.md`` and ``bench/activation_memory.png`` (peak vs
sequence length).

A long sweep runs as several short processes (one per sequence length, each under the bench lock)
that share ``--rows FILE``: each run replaces its own sequence lengths' rows (with the load average
it ran at) and the section is written from all rows in the file.

    python -m bench.activation_memory [--seqs 128,512,1024,2048] [--reps 2] [--hidden 1024] [--layers 4]
    python -m bench.activation_memory --seqs 2048 --reps 1 --rows bench/activation_memory_rows.json
    python -m bench.activation_memory --device cuda --out $OUT/activation_memory.md   # bench/gpu_check.sh
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
from pathlib import Path

import torch

from bench.common import (
    RESULTS,
    interleaved,
    machine_markdown,
    markdown_table,
    peak_bytes,
    resident_bytes,
    write_section,
)
from bench.cpu_train import build_model, peftfx_plan, setup_bnb

__all__ = ["main", "run"]

LORA = ["q_proj", "v_proj"]
MODES = ("off", "blocks", "selective")
CUDA_MODES = MODES + ("blocks+offload",)
THEIRS = "peft+bnb gc"


def _memory(mode: str):
    from peftfx.plan import MemorySpec

    checkpoint, _, offload = mode.partition("+")
    return MemorySpec(checkpoint=checkpoint, offload="cpu" if offload else "none")


def _setups(base, vocab: int, device: str = "cpu") -> dict[str, tuple[torch.nn.Module, list]]:
    import peftfx

    ids = torch.randint(0, vocab, (2, 16), device=device)
    example = {"input_ids": ids, "labels": ids}
    setups = {}
    for mode in (CUDA_MODES if device == "cuda" else MODES):
        plan = dataclasses.replace(peftfx_plan(LORA), memory=_memory(mode))
        model = copy.deepcopy(base).to(device)
        setups[f"peftfx {mode}"] = (peftfx.compile(model, plan, example_inputs=example).train(), [])
    theirs, extra = setup_bnb(base, LORA)
    if device == "cuda":
        theirs = theirs.to(device)
    theirs.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    setups[THEIRS] = (theirs.train(), extra)
    return setups


def _step(model: torch.nn.Module, inputs: dict):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        model(**inputs).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, opt


def _cuda_peak(step) -> int:
    """Peak CUDA bytes of one step (everything allocated counts: weights, state, activations)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def _timed(step, device: str):
    if device != "cuda":
        return step

    def synced() -> None:
        step()
        torch.cuda.synchronize()

    return synced


def run(seqs=(128, 512, 1024, 2048), reps=2, hidden=1024, layers=4, vocab=8192, device="cpu") -> list[tuple]:
    """``[(seq, setup, step ms, step / theirs, peak MiB, peak / theirs, rounds, load average), ...]``."""
    base = build_model(hidden, layers, vocab)
    setups = _setups(base, vocab, device)
    rows = []
    for seq in seqs:
        g = torch.Generator().manual_seed(seq)
        ids = torch.randint(0, vocab, (1, seq), generator=g).to(device)
        inputs = {"input_ids": ids, "labels": ids}
        steps = {k: _step(m, inputs) for k, (m, _) in setups.items()}
        t = interleaved({k: _timed(s, device) for k, (s, _) in steps.items()}, reps=reps)
        if device == "cuda":
            peak = {k: _cuda_peak(steps[k][0]) for k in setups}
        else:
            peak = {k: peak_bytes(steps[k][0], resident_bytes(m, steps[k][1], extra))
                    for k, (m, extra) in setups.items()}
        load = " ".join(f"{x:.1f}" for x in os.getloadavg())
        for k in setups:
            rows.append((seq, k, t[k] * 1e3, t[k] / t[THEIRS], peak[k] / 2**20, peak[k] / peak[THEIRS], reps, load))
        print(markdown_table(["seq", "setup", "step ms", "step / theirs", "peak MiB", "peak / theirs", "rounds",
                              "load"],
                             [r for r in rows if r[0] == seq]), flush=True)
    return rows


def _plot(path: Path, rows: list[tuple]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for setup in dict.fromkeys(r[1] for r in rows):
        pts = [(r[0], r[4]) for r in rows if r[1] == setup]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=setup,
                linestyle="--" if setup == THEIRS else "-")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length (batch 1)")
    ax.set_ylabel("peak MiB of one training step")
    ax.set_title("QLoRA step peak memory vs sequence length (CPU, lower is better)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def report(rows: list[tuple], cfg: str, out: Path = RESULTS, plot: Path | None = None) -> str:
    table = markdown_table(["seq", "setup", "step ms (median)", "step / peft+bnb gc", "peak MiB",
                            "peak / peft+bnb gc", "rounds", "load average (1/5/15 min)"], rows)
    body = (f"## activation_memory: [memory] checkpointing vs peft+bnb gradient checkpointing ({cfg})\n\n"
            f"{machine_markdown()}\nThe machine is shared: other jobs were running (load average above); "
            f"ratios come from medians of the interleaved rounds (column) in one process per sequence length, "
            f"one thread. Targets with "
            f"`checkpoint = \"blocks\"`: peak <= 0.8x and step <= 1.0x peft+bnb with "
            f"`gradient_checkpointing_enable(use_reentrant=False)`, same fp32 compute. Both sides run the same loop "
            f"(`model(**inputs).loss.backward()`, AdamW, `zero_grad(set_to_none=True)`), which keeps only the loss: "
            f"the logits are dropped before backward on both sides.\n\n{table}\n")
    if plot is not None:
        _plot(plot, rows)
        body += f"\n![activation_memory]({plot.name})\n"
    write_section("activation_memory", body, out)
    return body


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seqs", default="128,512,1024,2048", help="comma-separated sequence lengths")
    for name, default in (("reps", 2), ("hidden", 1024), ("layers", 4), ("vocab", 8192), ("threads", 1)):
        ap.add_argument(f"--{name}", type=int, default=default)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="cuda: peaks from torch.cuda.max_memory_allocated, and blocks+offload joins")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--plot", type=Path, default=RESULTS.with_name("activation_memory.png"))
    ap.add_argument("--rows", type=Path, default=None,
                    help="JSON file of rows shared by several runs (each replaces its own sequence lengths)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    seqs = [int(s) for s in a.seqs.split(",")]
    rows = run(seqs, a.reps, a.hidden, a.layers, a.vocab, a.device)
    if a.rows is not None:
        kept = [tuple(r) for r in json.loads(a.rows.read_text())] if a.rows.exists() else []
        rows = sorted([r for r in kept if r[0] not in seqs] + rows, key=lambda r: r[0])
        a.rows.write_text(json.dumps(rows, indent=0))
    cfg = (f"{a.device}, Llama hidden {a.hidden}, {a.layers} layers, vocab {a.vocab}, batch 1, NF4 + double quant on all 7 "
           f"decoder linears, LoRA r=16 on q,v")
    body = report(rows, cfg, a.out, a.plot)
    print(body)
    return body


if __name__ == "__main__":
    main()
