"""Mixed-batch multi-adapter serving vs looping over adapters one by one (same process, same module).

One NF4 base (a small random Llama) compiled with ``peftfx.compile_multi`` and four LoRA adapters
of different ranks and targets. A batch of ``B`` rows, ``B / 4`` per adapter, is served

* mixed: one forward with ``adapter_ids`` routing each row (gathered batched LoRA);
* looped: one forward per adapter over that adapter's rows (what serving without per-row routing
  does: swap adapter, run its requests, repeat).

Both use the same compiled module and kernels, so the ratio isolates batching across adapters.
Outputs are checked equal row by row before timing. Prints a table and appends a section to
``bench/RESULTS.md``.

    OMP_NUM_THREADS=1 python bench/multi_adapter.py [--batch 8] [--seq 64] [--reps 5]
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

import peftfx

RANKS = {"sql": 4, "chat": 8, "code": 16, "math": 8}
TARGETS = {"sql": ["*.q_proj", "*.v_proj"], "chat": ["*.q_proj", "*.v_proj", "*.o_proj"],
           "code": ["*.q_proj", "*.k_proj", "*.v_proj"], "math": ["*.v_proj", "*.down_proj"]}
QUANT_TARGETS = ["*.q_proj", "*.k_proj", "*.v_proj", "*.o_proj", "*.gate_proj", "*.up_proj", "*.down_proj"]


def build(hidden: int, layers: int, vocab: int) -> torch.nn.Module:
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 8 // 3,
                                   num_hidden_layers=layers, num_attention_heads=hidden // 64,
                                   num_key_value_heads=hidden // 64, max_position_embeddings=1024,
                                   use_cache=False, attn_implementation="sdpa")
    return transformers.LlamaForCausalLM(cfg).eval()


def timed(fn, reps: int) -> float:
    """Median seconds of ``reps`` calls after one warm-up."""
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--results", default=str(Path(__file__).with_name("RESULTS.md")))
    args = ap.parse_args()

    model = build(args.hidden, args.layers, args.vocab)
    inputs = {"input_ids": torch.randint(3, args.vocab, (args.batch, args.seq)),
              "attention_mask": torch.ones(args.batch, args.seq, dtype=torch.long)}
    plans = {name: {"quant": {"format": "nf4", "targets": QUANT_TARGETS},
                    "lora": {"r": r, "alpha": 2 * r, "targets": TARGETS[name]}} for name, r in RANKS.items()}
    gm = peftfx.compile_multi(model, plans, example_inputs=inputs)
    g = torch.Generator().manual_seed(0)
    for m in gm.modules():  # trained-looking adapters (fresh ones have B = 0)
        if hasattr(m, "lora_B") and m.lora_B is not None and m.lora_B.dim() == 3:
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.02)

    names = list(RANKS)
    ids = torch.tensor([peftfx.adapter_index(gm, names[i % len(names)]) for i in range(args.batch)])
    groups = [(int(i), (ids == i).nonzero().flatten()) for i in ids.unique()]

    def mixed():
        return gm(**inputs, adapter_ids=ids).logits

    def looped():
        out = torch.empty(args.batch, args.seq, args.vocab)
        for i, rows in groups:
            sub = {k: v[rows] for k, v in inputs.items()}
            out[rows] = gm(**sub, adapter_ids=torch.full((len(rows),), i)).logits
        return out

    with torch.inference_mode():
        diff = (mixed() - looped()).abs().max().item()
        t_mixed, t_loop = timed(mixed, args.reps), timed(looped, args.reps)
        t_base = timed(lambda: gm(**inputs, adapter_ids=torch.full((args.batch,), -1)).logits, args.reps)
    tokens = args.batch * args.seq
    rows = [("mixed batch (adapter_ids)", t_mixed), (f"loop over {len(groups)} adapters", t_loop),
            ("base only (ids = -1)", t_base)]
    machine = (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} thread(s), "
               f"torch {torch.__version__}, kernels: {peftfx.kernels.backend.backend_for(inputs['input_ids'])}")
    setup = (f"Llama hidden {args.hidden}, {args.layers} layers, NF4 base on all linears, adapters "
             f"{', '.join(f'{n} r={r}' for n, r in RANKS.items())}; batch {args.batch} x seq {args.seq}, "
             f"{args.batch // len(names)} rows per adapter; median of {args.reps}")
    table = ["| mode | ms / batch | tokens / s |", "| --- | ---: | ---: |"]
    table += [f"| {name} | {t * 1e3:.1f} | {tokens / t:,.0f} |" for name, t in rows]
    summary = (f"mixed / loop throughput ratio: **{t_loop / t_mixed:.2f}x**; LoRA overhead of the mixed batch "
               f"over the base: {100 * (t_mixed / t_base - 1):.1f}%; max |mixed - looped| = {diff:.2e}")
    text = "\n".join(["", "## multi_adapter: mixed-batch serving vs looping adapters", "",
                      f"Machine: {machine}.", f"Setup: {setup}.", "", *table, "", summary, ""])
    print(text)
    with open(args.results, "a") as f:
        f.write(text)


if __name__ == "__main__":
    import peftfx.kernels.backend  # noqa: F401  (backend_for in the report)

    main()
