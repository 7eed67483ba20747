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
