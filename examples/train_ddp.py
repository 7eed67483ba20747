"""Data-parallel QLoRA with DDP: ``torchrun --nproc-per-node 2 examples/train_ddp.py``.

Runs unchanged on CPUs (gloo) and on GPUs (nccl, one per process). The model is a tiny random
Llama built from a config (nothing downloaded); the task is learnable synthetic text: each
sequence counts upward from a random token with a random stride, modulo the vocabulary. Each rank
compiles the same model and plan (same seed), wraps it with ``peftfx.distributed.ddp`` (only the
adapters are all-reduced; packed NF4 bytes are never re-broadcast), trains on its slice of every
global batch, and rank 0 saves the adapters.

    torchrun --nproc-per-node 2 examples/train_ddp.py --steps 30 --out out/ddp_adapters
"""
from __future__ import annotations

import torch

import peftfx
# examples/ is sys.path[0] under torchrun
from distributed_common import PLAN, example_inputs, finish, parse_args, setup, tiny_llama, train
from peftfx.distributed import check_in_sync, ddp, save_adapters


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], "out/ddp_adapters")
    rank, world, device = setup()
    if args.batch % world:
        raise SystemExit(f"--batch {args.batch} must be divisible by the world size {world}")

    torch.manual_seed(0)  # every rank builds the same base and LoRA init (DDP also broadcasts rank 0's)
    model = tiny_llama().to(device)
    gm = peftfx.compile(model, PLAN, example_inputs=example_inputs(device))
    gm.train()
    model = ddp(gm, device_ids=[device.index] if device.type == "cuda" else None)
    opt = torch.optim.AdamW(peftfx.trainable_parameters(gm).values(), lr=args.lr)

    train(model, opt, args, rank, world, device)

    check_in_sync(model)  # every replica holds the same adapters and packed bytes
    path = save_adapters(model, args.out)
    finish(path, rank, world)


if __name__ == "__main__":
    main()
