"""Sharded QLoRA with FSDP2: ``torchrun --nproc-per-node 2 examples/train_fsdp.py``.

Runs unchanged on CPUs (gloo) and on GPUs (nccl, one per process). Same model, plan and data as
``train_ddp.py``; here ``peftfx.distributed.shard`` applies ``fully_shard`` to each block, then the
root (parameters sharded, packed NF4 bytes left as replicated uint8 buffers, untouched by the
mixed-precision policy), and
``peftfx.distributed.save_adapters`` gathers the sharded adapters and writes them on rank 0, in
the file ``peftfx.load_adapters`` reads in a single process.

    torchrun --nproc-per-node 2 examples/train_fsdp.py --steps 30 --out out/fsdp_adapters
"""
from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy

import peftfx
from distributed_common import PLAN, counting_batch, setup, tiny_llama  # examples/ is sys.path[0] under torchrun
from peftfx.distributed import save_adapters, shard


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=8, help="global batch (split across ranks)")
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--out", default="out/fsdp_adapters")
    args = ap.parse_args()
    rank, world, device = setup()
    if args.batch % world:
        raise SystemExit(f"--batch {args.batch} must be divisible by the world size {world}")

    torch.manual_seed(0)  # every rank builds the same base (shard() also broadcasts rank 0's tensors)
    # bf16 compute on GPUs: compile the model in bf16. export bakes dtype casts into the graph, so
    # FSDP2's param_dtype casting would fight them; LoRA parameters stay fp32, as PEFT keeps them.
    model = tiny_llama().to(device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    example = {k: v.to(device) for k, v in counting_batch(2, torch.Generator().manual_seed(0)).items()}
    gm = peftfx.compile(model, PLAN, example_inputs=example)
    gm.train()
    # gradients reduced in fp32; the packed uint8 base is a buffer and never cast or reduced
    model = shard(gm, mp_policy=MixedPrecisionPolicy(reduce_dtype=torch.float32))
    opt = torch.optim.AdamW(peftfx.trainable_parameters(gm).values(), lr=args.lr)  # sharded optimizer state

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

    path = save_adapters(model, args.out)
    if rank == 0:
        print(f"saved adapters to {path} ({world} ranks, backend {dist.get_backend()})")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
