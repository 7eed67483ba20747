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

import torch
from torch.distributed.fsdp import MixedPrecisionPolicy

import peftfx
# examples/ is sys.path[0] under torchrun
from distributed_common import PLAN, example_inputs, finish, parse_args, setup, tiny_llama, train
from peftfx.distributed import save_adapters, shard


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], "out/fsdp_adapters")
    rank, world, device = setup()
    if args.batch % world:
        raise SystemExit(f"--batch {args.batch} must be divisible by the world size {world}")

    torch.manual_seed(0)  # every rank builds the same base (shard() also broadcasts rank 0's tensors)
    # bf16 compute on GPUs: compile the model in bf16. export bakes dtype casts into the graph, so
    # FSDP2's param_dtype casting would fight them; LoRA parameters stay fp32, as PEFT keeps them.
    model = tiny_llama().to(device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    gm = peftfx.compile(model, PLAN, example_inputs=example_inputs(device))
    gm.train()
    # gradients reduced in fp32; the packed uint8 base is a buffer and never cast or reduced
    model = shard(gm, mp_policy=MixedPrecisionPolicy(reduce_dtype=torch.float32))
    opt = torch.optim.AdamW(peftfx.trainable_parameters(gm).values(), lr=args.lr)  # sharded optimizer state

    train(model, opt, args, rank, world, device)

    path = save_adapters(model, args.out)
    finish(path, rank, world)


if __name__ == "__main__":
    main()
