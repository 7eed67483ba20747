"""What examples/train_ddp.py and train_fsdp.py share: the tiny Llama, the plan, the data, the
process group. Nothing is downloaded: the model is built from a config, the data is synthetic.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

VOCAB, SEQ = 128, 16
PLAN = {
    "targets": ["*.q_proj", "*.k_proj", "*.v_proj", "*.o_proj", "*.gate_proj", "*.up_proj", "*.down_proj"],
    "quant": {"format": "nf4", "double_quant": True},
    "lora": {"r": 8, "alpha": 16, "targets": ["*.q_proj", "*.v_proj", "*.up_proj", "*.down_proj"]},
}


def tiny_llama() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      use_cache=False, attn_implementation="sdpa")
    return LlamaForCausalLM(cfg)


def counting_batch(batch: int, generator: torch.Generator) -> dict:
    """``batch`` sequences ``(start + stride * t) % VOCAB``: learnable from a few tokens of context."""
    start = torch.randint(0, VOCAB, (batch, 1), generator=generator)
    stride = torch.randint(1, 4, (batch, 1), generator=generator)
    ids = (start + stride * torch.arange(SEQ)) % VOCAB
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def setup() -> tuple[int, int, torch.device]:
    """Process group from torchrun's environment: nccl on GPUs, gloo on CPUs."""
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


def parse_args(description: str, default_out: str):
    """The flags both scripts take; the global batch must split evenly across ranks."""
    import argparse

    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=8, help="global batch (split across ranks)")
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--out", default=default_out)
    return ap.parse_args()


def example_inputs(device: torch.device) -> dict:
    """The batch every rank compiles with (same seed, so the same graph everywhere)."""
    return {k: v.to(device) for k, v in counting_batch(2, torch.Generator().manual_seed(0)).items()}


def train(model: torch.nn.Module, opt: torch.optim.Optimizer, args, rank: int, world: int,
          device: torch.device) -> None:
    """``args.steps`` steps on this rank's slice of the same global batches; rank 0 prints the mean loss."""
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


def finish(path, rank: int, world: int) -> None:
    """Report where rank 0 saved the adapters, then leave the process group together."""
    if rank == 0:
        print(f"saved adapters to {path} ({world} ranks, backend {dist.get_backend()})")
    dist.barrier()
    dist.destroy_process_group()
