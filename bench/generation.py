"""Generation on CPU: ``peftfx.generate`` vs transformers + peft + bitsandbytes ``generate`` (same adapter).

Model: the bench Llama (:func:`bench.cpu_train.build_model`: hidden 1024, 4 layers, vocab 8192), the 7
decoder linears in NF4 (block 64, double quant), LoRA r=16 on q,v with random non-zero B. Prompt
``--prompt`` (128) tokens, ``--new`` (128) greedy new tokens, batch 1 and 8. Contenders:

* ``peftfx``: ``peftfx.compile`` + ``peftfx.generate`` (static KV cache, one step graph);
* ``peft+bnb``: PEFT loading our exported adapter over ``bnb.nn.Linear4bit`` layers holding our exact
  NF4 codes (:func:`peftfx.io.bnb_io.to_linear4bit`), transformers ``generate`` (dynamic cache);
* ``dense fp32``: transformers ``generate`` of the fp32 model without adapter, beside them.

Tokens/s are medians of ``--reps`` interleaved rounds (``bench.common.interleaved``); beside the wall-time
ratio, the ratio of the contenders' median CPU (thread) time, which other jobs on a shared machine
disturb less. Per-step time is read from a streamer's timestamps (wall clock and CPU time): the median of
the 8 decode steps around token 8 and around token 120 of peftfx's decode. Mixed multi-adapter
batch: ``compile_multi`` with 4 adapters, batch 8 (2 rows each) in one ``generate`` vs one ``generate``
per adapter over its rows. The greedy tokens of peftfx and peft+bnb are compared (first row) and the
match length is reported. Writes the ``generation`` section of ``bench/RESULTS.md``.

    OMP_NUM_THREADS=1 python -m bench.generation [--prompt 128] [--new 128] [--reps 3] [--parts single|mixed]
    python -m bench.generation --device cuda --out $OUT/gpu_results.md     # GPU rows (bench/gpu_check.sh)
"""
from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.common import RESULTS, interleaved, machine_markdown, markdown_table, write_section
from bench.cpu_train import build_model, peftfx_plan

__all__ = ["main"]

ADAPTERS = {"sql": 4, "chat": 8, "code": 16, "math": 8}


class _Clock:
    """A streamer recording when each new-token step arrives (the first ``put`` is the prompt), by wall
    clock and by this thread's CPU time (which other jobs on a shared machine do not stretch)."""

    def __init__(self) -> None:
        self.times: list[tuple[float, float]] = []

    def put(self, value) -> None:
        self.times.append((time.perf_counter(), time.thread_time()))

    def end(self) -> None:
        pass

    def per_token(self, cpu: bool = False) -> list[float]:
        stamps = [t[1 if cpu else 0] for t in self.times]
        return [b - a for a, b in zip(stamps[1:], stamps[2:])]

    def window(self, token: int, half: int = 4, cpu: bool = False) -> float:
        """Median seconds per step over the steps around ``token`` (1-based; one step alone is too noisy)."""
        steps = self.per_token(cpu)
        if not steps:
            return float("nan")
        lo = max(0, min(token - 1 - half, len(steps) - 2 * half))
        return statistics.median(steps[lo: lo + 2 * half])


def _cpu_timed(fn, into: list[float]):
    """``fn`` that also appends the CPU seconds of this thread it took (scheduling on a shared machine
    does not count; the contenders run one thread each)."""
    def run():
        start = time.thread_time()
        out = fn()
        into.append(time.thread_time() - start)
        return out
    return run


def _randomize(gm, seed: int = 0) -> None:
    import peftfx

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peftfx.trainable_parameters(gm).items():
            p.copy_(torch.randn(p.shape, generator=g) * (0.02 if "lora_B" in name else 0.05))


def _no_eos(model):
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    model.generation_config.use_cache = True
    model.config.use_cache = True
    return model


def _peft_bnb(base, gm):
    import peft

    import peftfx
    from peftfx.io.bnb_io import to_linear4bit
    from peftfx.kernels.modules import qlora_layers

    model = _no_eos(copy.deepcopy(base))
    for fqn, m in qlora_layers(gm).items():
        model.set_submodule(fqn, to_linear4bit(m))
    model.is_loaded_in_4bit = True
    with tempfile.TemporaryDirectory() as d:
        peftfx.export_peft(gm, d)
        return peft.PeftModel.from_pretrained(model, d).eval()


def _hf(model, ids, mask, new):
    def run():
        with torch.no_grad():
            return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                  do_sample=False, pad_token_id=0)
    return run


def _single(base, vocab, prompt, new, batches, reps) -> tuple[list, list[str]]:
    """Rows of the one-adapter table (peftfx vs peft+bnb vs dense fp32) and token-agreement notes."""
    import peftfx

    example = {"input_ids": torch.randint(3, vocab, (2, 16)), "attention_mask": torch.ones(2, 16, dtype=torch.long)}
    gm = peftfx.compile(_no_eos(copy.deepcopy(base)), peftfx_plan(["q_proj", "v_proj"]), example_inputs=example)
    _randomize(gm)
    gm.eval()
    reference = _peft_bnb(base, gm)
    dense = _no_eos(copy.deepcopy(base))
    rows, notes = [], []
    for batch in batches:
        ids = torch.randint(3, vocab, (batch, prompt), generator=torch.Generator().manual_seed(batch))
        mask = torch.ones_like(ids)
        clock = _Clock()

        def ours(clock=clock, ids=ids, mask=mask):
            clock.times.clear()
            return peftfx.generate(gm, ids, mask, max_new_tokens=new, streamer=clock)

        mine, theirs = ours(), _hf(reference, ids, mask, new)()
        same = (mine[0, prompt:] == theirs[0, prompt:]).long().cumprod(0).sum().item()
        notes.append(f"batch {batch}: peftfx and peft+bnb greedy tokens agree for the first {same} of {new} "
                     "(row 0)")
        cpu = {"peftfx": [], "peft+bnb": []}
        times = interleaved({"peftfx": _cpu_timed(ours, cpu["peftfx"]),
                             "peft+bnb": _cpu_timed(_hf(reference, ids, mask, new), cpu["peft+bnb"]),
                             "dense fp32": _hf(dense, ids, mask, new)}, reps=reps, warmup=0)
        ours()
        t8, t120 = clock.window(8), clock.window(min(120, new - 4))
        c8, c120 = clock.window(8, cpu=True), clock.window(min(120, new - 4), cpu=True)
        tps = {k: batch * new / v for k, v in times.items()}
        cpu_ratio = statistics.median(cpu["peft+bnb"]) / statistics.median(cpu["peftfx"])
        rows.append([batch, tps["peftfx"], tps["peft+bnb"], tps["dense fp32"], tps["peftfx"] / tps["peft+bnb"],
                     cpu_ratio, t8 * 1e3, t120 * 1e3, t120 / t8, c8 * 1e3, c120 * 1e3, c120 / c8])
    return rows, notes


def run(hidden=1024, layers=4, vocab=8192, prompt=128, new=128, batches=(1, 8), reps=3,
        parts=("single", "mixed")) -> str:
    base = build_model(hidden, layers, vocab).eval()
    rows, notes = _single(base, vocab, prompt, new, batches, reps) if "single" in parts else ([], [])
    multi = _multi(base, vocab, prompt, new, reps) if "mixed" in parts else None
    body = "\n\n".join([
        f"## generation: greedy decoding, Llama hidden {hidden}, {layers} layers, vocab {vocab}, NF4 (7 linears, "
        f"double quant) + LoRA r=16 on q,v; prompt {prompt} -> {new} new tokens",
        machine_markdown() + " Other engineers' jobs were running on this 2-core machine during the run: "
        "absolute numbers are noisy, ratios come from interleaved medians of the same run.",
        markdown_table(["batch", "peftfx tok/s", "peft+bnb tok/s", "dense fp32 (transformers) tok/s",
                        "peftfx / peft+bnb (wall)", "peftfx / peft+bnb (CPU time)", "peftfx ms/step near token 8",
                        "near token 120", "token 120 / token 8", "CPU ms/step near token 8", "near token 120",
                        "token 120 / token 8 (CPU)"], rows) if rows else "",
        markdown_table(["mixed 4-adapter batch 8 tok/s", "loop over adapters tok/s", "mixed / loop"],
                       [multi]) if multi else "",
        "\n".join(f"- {n}" for n in notes),
        "Targets: peftfx >= 2x peft+bnb tokens/s; mixed >= 1.5x loop; token 120 <= 1.3x token 8. Per-step times "
        "are medians over the 8 decode steps around each token (one streamer run); CPU time is this process's "
        "thread time, median per contender.",
    ])
    return body


def _multi(base, vocab, prompt, new, reps) -> list:
    import peftfx

    quant = {"format": "nf4", "block_size": 64, "double_quant": True,
             "targets": ["*.q_proj", "*.k_proj", "*.v_proj", "*.o_proj", "*.gate_proj", "*.up_proj", "*.down_proj"]}
    plans = {n: {"quant": quant, "lora": {"r": r, "alpha": 2 * r, "targets": ["*.q_proj", "*.v_proj"]}}
             for n, r in ADAPTERS.items()}
    example = {"input_ids": torch.randint(3, vocab, (2, 16)), "attention_mask": torch.ones(2, 16, dtype=torch.long)}
    gm = peftfx.compile_multi(_no_eos(copy.deepcopy(base)), plans, example_inputs=example)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in gm.modules():
            if getattr(m, "lora_B", None) is not None and m.lora_B.dim() == 3:
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.02)
    names = list(ADAPTERS)
    ids = torch.randint(3, vocab, (8, prompt), generator=torch.Generator().manual_seed(3))
    rows = torch.tensor([peftfx.adapter_index(gm, names[i % 4]) for i in range(8)])

    def mixed():
        return peftfx.generate(gm, ids, max_new_tokens=new, adapter_ids=rows)

    def loop():
        return [peftfx.generate(gm, ids[rows == a], max_new_tokens=new, adapter_ids=rows[rows == a])
                for a in rows.unique()]

    out, parts = mixed(), loop()
    for a, part in zip(rows.unique(), parts):
        assert torch.equal(out[rows == a], part), "mixed and looped generation disagree"
    times = interleaved({"mixed": mixed, "loop": loop}, reps=reps, warmup=0)
    mixed_tps, loop_tps = 8 * new / times["mixed"], 8 * new / times["loop"]
    return [mixed_tps, loop_tps, mixed_tps / loop_tps]


def run_gpu(hidden=1024, layers=4, vocab=8192, prompt=128, new=128, batches=(1, 8), reps=3) -> str:
    """GPU rows (bench/gpu_check.sh): peftfx NF4+LoRA (bf16 compute) vs transformers bf16 dense generate."""
    import peftfx

    base = build_model(hidden, layers, vocab).eval().to(device="cuda", dtype=torch.bfloat16)
    example = {"input_ids": torch.randint(3, vocab, (2, 16), device="cuda"),
               "attention_mask": torch.ones(2, 16, dtype=torch.long, device="cuda")}
    gm = peftfx.compile(_no_eos(copy.deepcopy(base)), peftfx_plan(["q_proj", "v_proj"], "bfloat16"),
                        example_inputs=example)
    _randomize(gm)
    gm.eval()
    dense = _no_eos(base)
    rows = []
    for batch in batches:
        ids = torch.randint(3, vocab, (batch, prompt), device="cuda")
        mask = torch.ones_like(ids)

        def synced(fn):
            def run():
                out = fn()
                torch.cuda.synchronize()
                return out
            return run

        times = interleaved({"peftfx": synced(lambda: peftfx.generate(gm, ids, mask, max_new_tokens=new)),
                             "bf16 dense": synced(_hf(dense, ids, mask, new))}, reps=reps, warmup=1)
        tps = {k: batch * new / v for k, v in times.items()}
        rows.append([batch, tps["peftfx"], tps["bf16 dense"], tps["peftfx"] / tps["bf16 dense"]])
    return "\n\n".join([
        f"### generation on {torch.cuda.get_device_name()}: Llama hidden {hidden}, {layers} layers, NF4 + LoRA r=16 "
        f"(bf16 compute) vs transformers bf16 dense generate; prompt {prompt} -> {new}",
        markdown_table(["batch", "peftfx tok/s", "transformers bf16 tok/s", "peftfx / bf16"], rows)])


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--parts", nargs="+", choices=("single", "mixed"), default=["single", "mixed"],
                    help="one part only prints its tables (split a long run; the section is written with both)")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cuda: the GPU rows only")
    args = ap.parse_args(argv)
    if args.device == "cuda":
        body = run_gpu(args.hidden, args.layers, args.vocab, args.prompt, args.new, tuple(args.batches), args.reps)
        print(body)
        with open(args.out, "a") as f:
            f.write("\n" + body + "\n")
        return body
    body = run(args.hidden, args.layers, args.vocab, args.prompt, args.new, tuple(args.batches), args.reps,
               tuple(args.parts))
    print(body)
    if set(args.parts) == {"single", "mixed"}:
        write_section("generation", body, Path(args.out))
    return body


if __name__ == "__main__":
    main()
