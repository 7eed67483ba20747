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

import argparse

import torch
import torch.distributed as dist

import peftfx
from distributed_common import PLAN, counting_batch, setup, tiny_llama  # examples/ is sys.path[0] under torchrun
from peftfx.distributed import check_in_sync, ddp, save_adapters


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=8, help="global batch (split across ranks)")
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--out", default="out/ddp_adapters")
    args = ap.parse_args()
    rank, world, device = setup()
    if args.batch % world:
        raise SystemExit(f"--batch {args.batch} must be divisible by the world size {world}")

    torch.manual_seed(0)  # every rank builds the same base and LoRA init (DDP also broadcasts rank 0's)
    model = tiny_llama().to(device)
    example = {k: v.to(device) for k, v in counting_batch(2, torch.Generator().manual_seed(0)).items()}
    gm = peftfx.compile(model, PLAN, example_inputs=example)
    gm.train()
    model = ddp(gm, device_ids=[device.index] if device.type == "cuda" else None)
    opt = torch.optim.AdamW(peftfx.trainable_parameters(gm).values(), lr=args.lr)

    data = torch.Generator().manual_seed(1)  # the same global batches on every rank
    per_rank = args.batch // world
    for step in range(args.steps):
        batch = counting_batch(args.batch, data)
        mine = {k: v[rank * per_rank:(rank + 1) * per_rank].to(device) for k, v in batch.items()}
        loss = model(**mine).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 10 == 0 or step == args.steps - 1:
            avg = loss.detach().clone()
            dist.all_reduce(avg)
            if rank == 0:
                print(f"step {step:4d}  loss {avg.item() / world:.4f}", flush=True)

    check_in_sync(model)  # every replica holds the same adapters and packed bytes
    path = save_adapters(model, args.out)
    if rank == 0:
        print(f"saved adapters to {path} ({world} ranks, backend {dist.get_backend()})")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
