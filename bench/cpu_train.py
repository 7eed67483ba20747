"""QLoRA training step on CPU, one thread: peftfx vs peft + bitsandbytes, torchao NF4 and dense LoRA.

Model: a random Llama (default hidden 1024, 4 layers, 16 heads, intermediate 2816, vocab 8192), batch
4 x 128, LoRA r=16, alpha 32, no dropout; step = forward + backward + AdamW. Every quantized setup
stores the 7 decoder linears (q/k/v/o/gate/up/down) in NF4 (block 64, double quantization) holding
the same weights, and puts LoRA either on q,v ("qv") or on all 7 ("all"). The model stays fp32; the
compute dtype is that of the frozen base GEMMs:

* ``dense LoRA (peft)``: peft LoRA on fp32 weights (q,v): the denominator of the issue's baselines;
* ``peft+bnb``: ``nn.Linear`` replaced by ``bnb.nn.Linear4bit`` (bitsandbytes' default fp32 compute)
  then ``peft.get_peft_model``; ``peft+bnb bf16``: the same with ``compute_dtype=torch.bfloat16``;
* ``torchao``: weights replaced by ``to_nf4`` tensors (``linear_nf4``) then ``peft.get_peft_model``;
* ``peftfx fp32``: ``peftfx.compile(model, plan)`` with fp32 base GEMMs; ``peftfx auto``: the same
  plan with ``compute_dtype = "auto"`` (bf16 GEMMs on CPUs with AMX/AVX512-BF16, fp32 elsewhere).

Step times (wall and the thread's CPU time) are medians of ``--reps`` interleaved rounds; peak memory is measured once per setup
after warm-up (see :mod:`bench.common`: allocator events + resident tensors, including bnb's
quant_state tensors). ``compile`` time is export + passes +
quantization on a fresh copy of the model. Writes the ``cpu_train`` section of ``bench/RESULTS.md``
and ``bench/cpu_train.png``.

    python -m bench.cpu_train [--hidden 1024] [--layers 4] [--vocab 8192] [--batch 4] [--seq 128] [--reps 5]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings
from pathlib import Path
from typing import Callable

import torch

from bench.common import (RESULTS, bar_plot, interleaved_wall_cpu, machine_markdown, markdown_table, peak_bytes,
                          resident_bytes, write_section)

__all__ = ["main", "run", "build_model"]

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PLANS = {"qv": ["q_proj", "v_proj"], "all": ALL}
R, ALPHA = 16, 32
COMPILE_TIMES: dict[tuple[str, ...], list[float]] = {}  # plan -> seconds (the setup's compile is one sample)


def build_model(hidden: int, layers: int, vocab: int, inter: int | None = None) -> torch.nn.Module:
    import transformers

    torch.manual_seed(0)
    heads = max(1, hidden // 64)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter or hidden * 11 // 4,
                                   num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                                   max_position_embeddings=2048, use_cache=False, attn_implementation="sdpa")
    return transformers.LlamaForCausalLM(cfg)


def _decoder_linears(model: torch.nn.Module):
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in ALL]


def _peft(model: torch.nn.Module, lora: list[str]) -> torch.nn.Module:
    import peft

    cfg = peft.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=lora, bias="none")
    return peft.get_peft_model(model, cfg)


def setup_dense(base, lora):
    return _peft(copy.deepcopy(base), lora), []


def setup_bnb(base, lora, compute=torch.float32):
    import bitsandbytes as bnb

    model = copy.deepcopy(base)
    for name, lin in _decoder_linears(model):
        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                              compute_dtype=compute, compress_statistics=True, quant_type="nf4")
        q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, compress_statistics=True,
                                     quant_type="nf4", blocksize=64)
        parent, leaf = name.rsplit(".", 1)
        setattr(model.get_submodule(parent), leaf, q)
    model = model.to("cpu")  # Params4bit quantizes on its first .to()
    extra = []
    for m in model.modules():
        qs = getattr(getattr(m, "weight", None), "quant_state", None)
        if qs is not None:
            extra += [qs.absmax, qs.code] + ([qs.state2.absmax, qs.state2.code] if qs.nested else [])
    assert extra, "bitsandbytes did not quantize the Linear4bit weights"
    return _peft(model, lora), extra


def setup_torchao(base, lora):
    from torchao.quantization import to_nf4

    model = copy.deepcopy(base)
    for _, lin in _decoder_linears(model):
        lin.weight = torch.nn.Parameter(to_nf4(lin.weight.data, 64, 256), requires_grad=False)
    return _peft(model, lora), []


def peftfx_plan(lora: list[str], compute: str | None = None):
    import peftfx

    quant = {"format": "nf4", "block_size": 64, "double_quant": True}
    if compute is not None:
        quant["compute_dtype"] = compute
    return peftfx.Plan.from_dict({
        "targets": [f"*.{t}" for t in ALL],
        "quant": quant,
        "lora": {"r": R, "alpha": ALPHA, "dropout": 0.0, "targets": [f"*.{t}" for t in lora]},
    })


def setup_peftfx(base, lora, inputs, compute=None):
    import peftfx

    model = copy.deepcopy(base)
    start = time.perf_counter()
    gm = peftfx.compile(model, peftfx_plan(lora, compute), example_inputs=inputs)
    COMPILE_TIMES.setdefault(tuple(lora), []).append(time.perf_counter() - start)
    gm.train()
    return gm, []


def _step(model: torch.nn.Module, inputs: dict) -> tuple[Callable[[], None], torch.optim.Optimizer]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step() -> None:
        model(**inputs).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, opt


def run(hidden=1024, layers=4, vocab=8192, batch=4, seq=128, reps=5, compile_reps=3,
        with_torchao=True) -> dict[str, list[tuple]]:
    """Measure every setup; returns ``{"step": rows, "compile": rows}`` as table tuples."""
    base = build_model(hidden, layers, vocab)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    COMPILE_TIMES.clear()
    setups: dict[str, tuple[torch.nn.Module, object]] = {"dense LoRA (peft) qv": setup_dense(base, PLANS["qv"])}
    for plan, lora in PLANS.items():
        setups[f"peft+bnb {plan}"] = setup_bnb(base, lora)
        setups[f"peft+bnb bf16 {plan}"] = setup_bnb(base, lora, torch.bfloat16)
        setups[f"peftfx fp32 {plan}"] = setup_peftfx(base, lora, inputs)
        setups[f"peftfx auto {plan}"] = setup_peftfx(base, lora, inputs, "auto")
        if with_torchao:
            try:
                setups[f"torchao {plan}"] = setup_torchao(base, lora)
            except Exception as e:  # torchao missing, or peft refusing its tensor subclass
                warnings.warn(f"torchao NF4 setup failed: {e}")
    steps = {k: _step(m, inputs) for k, (m, _) in setups.items()}
    t, cpu = interleaved_wall_cpu({k: s for k, (s, _) in steps.items()}, reps=reps)
    peak = {}
    for k, (m, extra) in setups.items():
        step, opt = steps[k]
        ext = extra() if callable(extra) else extra
        peak[k] = peak_bytes(step, resident_bytes(m, opt, ext))
    dense = t["dense LoRA (peft) qv"]
    rows = []
    for k, sec in t.items():
        plan = k.rsplit(" ", 1)[-1]
        bnb_k, bf_k = f"peft+bnb {plan}", f"peft+bnb bf16 {plan}"
        rows.append((k, sec * 1e3, sec / dense, sec / t[bnb_k], sec / t[bf_k], peak[k] / 2**20,
                     peak[k] / peak[bnb_k], peak[k] / peak[bf_k], cpu[k] * 1e3, cpu[k] / cpu[bnb_k],
                     cpu[k] / cpu[bf_k]))
    import peftfx

    comp = []
    for plan, lora in PLANS.items():
        times = COMPILE_TIMES.setdefault(tuple(lora), [])
        while len(times) < compile_reps:
            model = copy.deepcopy(base)
            start = time.perf_counter()
            peftfx.compile(model, peftfx_plan(lora), example_inputs=inputs)
            times.append(time.perf_counter() - start)
            del model
        comp.append((f"peftfx.compile {plan}", statistics.median(times), min(times), len(times)))
    return {"step": rows, "compile": comp}


def report(res: dict[str, list[tuple]], cfg: str, reps: int, out: Path = RESULTS, plot: Path | None = None) -> str:
    st = markdown_table(["setup", "step ms (median)", "time / dense LoRA", "time / peft+bnb",
                         "time / peft+bnb bf16", "peak MiB", "peak / peft+bnb", "peak / peft+bnb bf16",
                          "step CPU ms", "CPU / peft+bnb", "CPU / peft+bnb bf16"],
                        res["step"])
    cp = markdown_table(["compile (export + passes + quantization)", "s (median)", "s (min)", "runs"], res["compile"])
    body = (f"## cpu_train: QLoRA training step ({cfg})\n\n{machine_markdown()}\n"
            f"Median of {reps} interleaved rounds, one thread. Targets: peftfx time and peak <= 0.90x peft+bnb "
            f"for the same plan; compile <= 5 s. `peft+bnb` is bitsandbytes' default (fp32 compute), the "
            f"configuration of the issue's baseline; `bf16` rows compute the frozen base GEMMs in bf16 "
            f"(`peftfx auto` on a CPU with bf16 units). Peak = resident tensors + peak of the CPU allocator's "
            f"events during one step (torch profiler), measured the same way for every setup. Step CPU = the "
            f"thread's CPU time in the same steps (excludes waiting for a core on the shared machine).\n\n"
            f"{st}\n\n{cp}\n")
    if plot is not None:
        rows = [r for r in res["step"] if not r[0].startswith("peft+bnb ") or " bf16 " in r[0]]
        bar_plot(plot, "step vs peft+bnb fp32, same plan, 1 thread (lower is better)",
                 [f"{r[0]} time" for r in rows] + [f"{r[0]} peak mem" for r in rows],
                 [r[3] for r in rows] + [r[6] for r in rows], target=0.9, xlabel="ratio to peft+bnb")
        body += f"\n![cpu_train]({plot.name})\n"
    write_section("cpu_train", body, out)
    return body


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for name, default in (("hidden", 1024), ("layers", 4), ("vocab", 8192), ("batch", 4), ("seq", 128),
                          ("reps", 5), ("compile-reps", 3), ("threads", 1)):
        ap.add_argument(f"--{name}", type=int, default=default)
    ap.add_argument("--no-torchao", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--plot", type=Path, default=RESULTS.with_name("cpu_train.png"))
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    res = run(a.hidden, a.layers, a.vocab, a.batch, a.seq, a.reps, a.compile_reps, not a.no_torchao)
    cfg = (f"Llama hidden {a.hidden}, {a.layers} layers, intermediate {a.hidden * 11 // 4}, vocab {a.vocab}, "
           f"batch {a.batch}x{a.seq}, LoRA r={R}, NF4 on all 7 decoder linears")
    body = report(res, cfg, a.reps, a.out, a.plot)
    print(body)
    return body


if __name__ == "__main__":
    main()
