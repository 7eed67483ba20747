"""``peftfx generate MODEL_FOLDER --adapters DIR --prompt TEXT``: stream tokens from a saved adapter.

The model folder is a local Hugging Face folder (config, weights and tokenizer; nothing is
downloaded). ``--adapters`` is a folder written by :func:`peftfx.save_adapters`: its header holds
the plan, so the base is compiled with that plan and the adapters are loaded bit-exactly (the base
fingerprint is checked). New tokens are printed as they come (transformers' ``TextStreamer``).
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Callable

import peftfx
from peftfx.inspect.model_source import UsageError, model_from_spec

__all__ = ["add_generate_command"]


def _float_arg(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def add_generate_command(sub, positive: Callable[[str], int]) -> None:
    """Register ``generate`` on the ``peftfx`` argparse sub-parsers."""
    p = sub.add_parser("generate", help="stream text from MODEL_FOLDER with saved adapters")
    p.add_argument("model", metavar="MODEL_FOLDER", help="a local Hugging Face model folder with its tokenizer")
    p.add_argument("--adapters", required=True, metavar="DIR", help="folder written by peftfx.save_adapters")
    p.add_argument("--prompt", required=True, metavar="TEXT")
    p.add_argument("--max-new-tokens", type=positive, default=64, metavar="N", help="default 64")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=_float_arg, default=1.0, metavar="T")
    p.add_argument("--top-p", type=_float_arg, default=None, metavar="P")
    p.add_argument("--top-k", type=positive, default=None, metavar="K")
    p.add_argument("--seed", type=int, default=None, metavar="S", help="seed of the sampling generator")
    p.set_defaults(fn=run_generate)


def _plan_of(adapters: str) -> dict:
    from peftfx.io.checkpoint import ADAPTER_FILE, read_safetensors  # lazy: CLI start-up time (torch)

    path = os.path.join(adapters, ADAPTER_FILE)
    if not os.path.isfile(path):
        raise UsageError(f"--adapters {adapters!r} holds no {ADAPTER_FILE}; pass a folder written by "
                         "peftfx.save_adapters")
    _, meta = read_safetensors(path)
    plan = json.loads(meta.get("peftfx.plan", "null"))
    if plan is None:
        raise UsageError(f"{path} records no plan; re-save it with peftfx.save_adapters")
    return plan


def run_generate(args) -> int:
    import torch
    import transformers


    if not os.path.isdir(args.model):
        raise UsageError(f"MODEL_FOLDER {args.model!r} is not a folder")
    plan = _plan_of(args.adapters)
    model, inputs, _ = model_from_spec(args.model, device="cpu")
    inputs = {k: v for k, v in inputs.items() if k != "labels"}
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise UsageError(f"MODEL_FOLDER {args.model!r} has no usable tokenizer ({exc})") from None
    gm = peftfx.compile(model, plan, example_inputs=inputs, snapshots=False)
    peftfx.load_adapters(gm, args.adapters)
    encoded = tokenizer(args.prompt, return_tensors="pt")
    generator = torch.Generator().manual_seed(args.seed) if args.seed is not None else None
    streamer = transformers.TextStreamer(tokenizer, skip_prompt=False)
    peftfx.generate(gm, encoded["input_ids"], encoded.get("attention_mask"), max_new_tokens=args.max_new_tokens,
                    do_sample=args.sample, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                    generator=generator, streamer=streamer, eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id)
    return 0
