"""A bf16-compiled model shards with FSDP2 (the recipe examples/train_fsdp.py uses on GPUs).

One process, gloo, file-store rendezvous (no port to collide with parallel test workers).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

import peftfx
from peftfx.distributed import shard
from peftfx.distributed.base_sharding import full_tensor
from tests.model_zoo import make_case


def test_bf16_compiled_model_trains_under_fsdp2(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        case = make_case("llama")
        model = case.model.to(torch.bfloat16)
        plan = {"targets": case.all_targets, "quant": {"format": "nf4"},
                "lora": {"r": 4, "targets": ["q_proj", "v_proj"]}}
        gm = peftfx.compile(model, plan, example_inputs=case.inputs)
        packed = gm.get_submodule("model.layers.0.self_attn.q_proj").weight.clone()
        gm.train()
        fsdp = shard(gm)
        opt = torch.optim.AdamW(peftfx.trainable_parameters(gm).values(), lr=1e-2)
        losses = []
        for _ in range(4):
            loss = fsdp(**case.inputs).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        assert losses[-1] < losses[0]
        assert all(p.dtype == torch.float32 for p in peftfx.trainable_parameters(gm).values())
        # the packed base is now a frozen FSDP2 shard: gathered, it is the same bytes
        assert torch.equal(full_tensor(gm.get_submodule("model.layers.0.self_attn.q_proj").weight), packed)
        dist.barrier()
    finally:
        dist.destroy_process_group()
