"""The packed base sharded across ranks under FSDP2: 2 CPU processes with gloo.

One pair of worker processes (the harness of ``test_distributed``) runs every scenario and writes
its results; the single-process reference trains in the test process meanwhile.

* NF4 + double quant + LoRA on a tiny Llama, 3 AdamW steps on the global batch: each rank holds
  about half the packed bytes between steps, losses match single-process training, the gathered
  bytes are the single-process bytes, and adapters / the whole model saved from the shards load
  in one process (2 ranks -> 1) with the same logits; a model file written by one process loads
  into the 2-rank sharded model (1 -> 2).
* Every quant format on a small MLP with uneven shard sizes: outputs equal the unsharded model's,
  gathered bytes are byte-exact, and under a bf16 mixed-precision policy the layer still sees
  its fp32 scales (FSDP2 casts only what it gathers on its default path).
"""
from __future__ import annotations

import copy
import os
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from torch import nn

import peftfx
from peftfx.distributed.base_sharding import BASE_TENSORS, gathered_state_dict, local_bytes
from peftfx.io.checkpoint import read_safetensors, tensor_bytes
from peftfx.kernels.formats import FORMATS
from tests.rewriter.test_distributed import (
    WORLD, llama_batches, llama_gm, load_rank_results, run_workers, shard_of, train_single_process,
)

LAYER = "model.layers.0.self_attn.q_proj"


def _base_bytes(state: dict) -> dict[str, bytes]:
    """Raw bytes of every frozen base tensor of the swapped layers in a (gathered) state dict."""
    return {k: tensor_bytes(v) for k, v in state.items() if k.rpartition(".")[2] in BASE_TENSORS}


def _all_gather_bytes(gm) -> int:
    """Bytes FSDP2 keeps in all-gather buffers (unsharded copies) for frozen tensors right now."""
    total = 0
    for name, m in gm.named_modules():
        state = getattr(m, "_get_fsdp_state", None)
        group = state()._fsdp_param_group if state is not None else None
        for fp in group.fsdp_params if group is not None else []:
            if not fp.sharded_param.requires_grad:
                total += sum(t.untyped_storage().nbytes() for t in fp.all_gather_outputs)
    return total


# ---------------------------------------------------------------- worker side

def _scenario_llama(rank: int, gm, outdir: str) -> dict:
    from peftfx.distributed import save_adapters, shard

    fresh = copy.deepcopy(gm)  # the untrained model, to load the single-process file into later
    single_bytes = local_bytes(gm)
    if rank == 0:  # a file written by one (unsharded) process
        peftfx.save_model(gm, os.path.join(outdir, "single_model.safetensors"))
    shard(gm)
    resident, gathered_buffers, losses = [], [], []
    opt = torch.optim.AdamW([p for p in gm.parameters() if p.requires_grad], lr=5e-3)
    for batch in llama_batches():
        loss = gm(**shard_of(batch, rank)).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        resident.append(local_bytes(gm))
        gathered_buffers.append(_all_gather_bytes(gm))
        global_loss = loss.detach().clone()
        dist.all_reduce(global_loss)
        losses.append(global_loss.item() / WORLD)
    state = gathered_state_dict(gm)
    save_adapters(gm, os.path.join(outdir, "sharded_adapters"))
    peftfx.save_model(gm, os.path.join(outdir, "sharded_model.safetensors"))  # collective
    # 1 -> 2: the single-process file loads into the sharded model, shard by shard
    dist.barrier()
    shard(fresh)
    peftfx.load_model(fresh, os.path.join(outdir, "single_model.safetensors"))
    reloaded = gathered_state_dict(fresh)
    return {"single_bytes": single_bytes, "resident": resident, "gathered_buffers": gathered_buffers,
            "losses": losses, "base": _base_bytes(state) if rank == 0 else {},
            "adapters": {k: v for k, v in state.items() if k.endswith(("lora_A", "lora_B"))},
            "reloaded_base": _base_bytes(reloaded) if rank == 0 else {}}


class MLP(nn.Module):
    """Odd widths: every format's storage splits unevenly over 2 ranks (padding on the last)."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(64, 33)
        self.down = nn.Linear(33, 64)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def mlp_gm(fmt: str, seed: int = 0):
    torch.manual_seed(seed)
    quant = {"format": fmt, "double_quant": fmt in ("nf4", "fp4")} if fmt != "none" else None
    plan = {"targets": ["up", "down"], "lora": {"r": 4, "alpha": 8}, **({"quant": quant} if quant else {})}
    gm = peftfx.compile(MLP(), plan, example_inputs=(torch.randn(2, 64),))
    with torch.no_grad():  # non-zero B: the adapters take part in the output
        for name, p in gm.named_parameters():
            if name.endswith("lora_B"):
                p.copy_(torch.randn_like(p) * 0.1)
    return gm


def _scenario_formats(rank: int) -> dict:
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from peftfx.distributed import shard

    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(5))
    out = {}
    for fmt in FORMATS:
        gm = mlp_gm(fmt)
        ref = gm(x).detach()
        single = _base_bytes(gm.state_dict())
        bf16 = copy.deepcopy(gm)
        single_bytes = local_bytes(gm)
        dtypes = {n: t.dtype for n, t in gm.up.named_buffers()}
        shard(gm, per_block=False)
        y = gm(x)
        y.sum().backward()
        grads = sorted(n for n, p in gm.named_parameters() if p.grad is not None)
        state = gathered_state_dict(gm)
        seen: dict[str, torch.dtype] = {}
        bf16.up.register_forward_pre_hook(
            lambda m, a: seen.update({n: getattr(m, n).dtype for n in BASE_TENSORS if getattr(m, n, None) is not None}))
        shard(bf16, per_block=False, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16))
        bf16(x.to(torch.bfloat16)).float().sum().backward()
        bf16_state = gathered_state_dict(bf16)  # collective: every rank
        out[fmt] = {"max_diff": (y.detach() - ref).abs().max().item(), "grads": grads,
                    "same_bytes": rank != 0 or _base_bytes(state) == single,
                    "bf16_same_bytes": rank != 0 or _base_bytes(bf16_state) == single,
                    "seen": seen, "dtypes": dtypes,
                    "resident": local_bytes(gm), "single_bytes": single_bytes}
    return out


STREAM_PLAN = {"targets": ["*.q_proj", "*.k_proj", "*.v_proj", "*.o_proj", "*.gate_proj", "*.up_proj", "*.down_proj"],
               "quant": {"format": "nf4", "double_quant": True},
               "lora": {"r": 4, "alpha": 8, "targets": ["q_proj", "v_proj"]}}


def _save_stream_folder(outdir: str) -> str:
    """A Llama whose packed layers outweigh the rest (8 blocks, vocab 256), in 4 MB shards."""
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=1024, num_hidden_layers=8,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   use_cache=False, attn_implementation="sdpa")
    torch.manual_seed(0)
    path = os.path.join(outdir, "hf")
    transformers.LlamaForCausalLM(cfg).save_pretrained(path, max_shard_size="4MB")
    return path


def _stream_inputs() -> dict:
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _scenario_stream(rank: int, outdir: str) -> dict:
    from peftfx.inspect.estimate import measure_peak

    out = {}
    torch.manual_seed(0)
    peak = measure_peak(lambda: out.update(gm=peftfx.load(os.path.join(outdir, "hf"), STREAM_PLAN, shard=True,
                                                          example_inputs=_stream_inputs(), snapshots=False)))
    gm = out["gm"]
    with torch.no_grad():
        logits = gm(**_stream_inputs()).logits
    state = gathered_state_dict(gm)
    return {"peak": peak, "logits": logits, "state": state}


def _worker(rank: int, port: int, outdir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
    results = {}
    for name, run in (("llama", lambda: _scenario_llama(rank, llama_gm(), outdir)),
                      ("formats", lambda: _scenario_formats(rank)), ("stream", lambda: _scenario_stream(rank, outdir))):
        try:
            results[name] = run()
        except Exception:
            results[name] = {"error": traceback.format_exc()}
            torch.save(results, os.path.join(outdir, f"rank{rank}.pt"))
            os._exit(1)  # leave at once: the peer may wait in a collective this rank will never join
    torch.save(results, os.path.join(outdir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


# ---------------------------------------------------------------- test side

@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    outdir = str(tmp_path_factory.mktemp("sharded_base"))
    _save_stream_folder(outdir)
    codes, reference = run_workers(_worker, outdir, meanwhile=train_single_process)
    ranks = load_rank_results(outdir)
    for rank, res in enumerate(ranks):
        for name, r in res.items():
            assert "error" not in r, f"rank {rank} failed in {name!r}:\n{r['error']}"
    assert codes == [0] * WORLD, ranks
    return {"ranks": ranks, "outdir": outdir, "reference": reference}


def test_each_rank_holds_half_the_packed_base_and_trains_like_one_process(sharded):
    ref = sharded["reference"]
    for r in sharded["ranks"]:
        res = r["llama"]
        for step_bytes, buffers in zip(res["resident"], res["gathered_buffers"]):
            print(f"resident packed bytes per rank: {step_bytes} of {res['single_bytes']} single-process")
            assert step_bytes <= res["single_bytes"] / WORLD * 1.05
            assert buffers == 0  # no unsharded copy survives between steps
        loss_diff = max(abs(a - b) for a, b in zip(res["losses"], ref["losses"]))
        print(f"sharded base vs single process: max |loss diff| = {loss_diff:.3g}")
        assert loss_diff <= 1e-5
    r0 = sharded["ranks"][0]["llama"]
    want = _base_bytes(ref["gm"].state_dict())
    assert want and r0["base"] == want  # gathered bytes are the single-process bytes, tensor by tensor
    assert r0["reloaded_base"] == _base_bytes(ref["fresh"].state_dict())  # 1 -> 2 ranks


def test_files_saved_from_shards_load_in_one_process(sharded):
    ref, outdir = sharded["reference"], sharded["outdir"]
    batch = llama_batches()[0]
    with torch.no_grad():
        want = ref["gm"](**batch).logits
    fresh = copy.deepcopy(ref["fresh"])
    peftfx.load_adapters(fresh, os.path.join(outdir, "sharded_adapters"))  # checks the base fingerprint
    whole = copy.deepcopy(ref["fresh"])
    peftfx.load_model(whole, os.path.join(outdir, "sharded_model.safetensors"))
    with torch.no_grad():
        for gm in (fresh, whole):
            diff = (gm(**batch).logits - want).abs().max().item()
            print(f"saved from 2 shards, loaded in 1 process: max |logit diff| = {diff:.3g}")
            assert diff <= 1e-5
    single = os.path.join(outdir, "single_again.safetensors")
    peftfx.save_model(whole, single)
    # the same file a single process writes: names, dtypes, bytes and metadata (whose order in
    # the header safetensors does not fix, so the files are compared parsed)
    (a, meta_a) = read_safetensors(single)
    (b, meta_b) = read_safetensors(os.path.join(outdir, "sharded_model.safetensors"))
    assert meta_a == meta_b and a.keys() == b.keys()
    assert all(a[k].dtype == b[k].dtype and tensor_bytes(a[k]) == tensor_bytes(b[k]) for k in a)


def test_sharded_streaming_load_keeps_only_this_ranks_part_of_the_base(sharded):
    """``peftfx.load(..., shard=True)``: each rank keeps its chunk of a layer's packed base as soon
    as the layer is quantized, so its peak is the rest of the model + 1/W of the packed base + one
    dense layer; a load that kept the whole packed model on each rank would exceed the bound."""
    from peftfx.io.streaming import SafetensorsFolder

    folder = os.path.join(sharded["outdir"], "hf")
    torch.manual_seed(0)
    ref = peftfx.load(folder, STREAM_PLAN, example_inputs=_stream_inputs(), snapshots=False)
    want = ref.state_dict()
    full = sum(t.numel() * t.element_size() for t in want.values())
    packed = local_bytes(ref)
    largest = max(torch.Size(v["shape"]).numel() * 4 for _, v in SafetensorsFolder(folder).entries.values())
    bound = (full - packed) + packed / WORLD + largest + 0.10 * (full + largest)
    with torch.no_grad():
        logits = ref(**_stream_inputs()).logits
    for rank, r in enumerate(sharded["ranks"]):
        res = r["stream"]
        print(f"sharded streaming load, rank {rank}: peak {res['peak'] / 2**20:.2f} MiB "
              f"(bound {bound / 2**20:.2f} MiB; "
              f"compiled model {full / 2**20:.2f} MiB of which packed base {packed / 2**20:.2f} MiB)")
        assert res["peak"] <= bound
        assert torch.equal(res["logits"], logits)
    got = sharded["ranks"][0]["stream"]["state"]
    assert got.keys() == want.keys() and _base_bytes(got) == _base_bytes(want)
    assert all(torch.equal(got[k], want[k]) for k in want if k.endswith(("lora_A", "lora_B")))


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_shards_byte_exact_and_uncast(sharded, fmt):
    for rank, r in enumerate(sharded["ranks"]):
        res = r["formats"][fmt]
        assert res["max_diff"] == 0.0
        assert res["same_bytes"] and res["bf16_same_bytes"]
        assert {n.rpartition(".")[2] for n in res["grads"]} == {"lora_A", "lora_B"}  # never the base
        assert res["seen"] and all(res["seen"][n] == dt for n, dt in res["dtypes"].items() if n in res["seen"])
        assert res["resident"] <= res["single_bytes"] / WORLD * 1.05 + 64  # + padding of the last shard


# ---------------------------------------------------------------- single process

def test_load_refuses_a_layout_it_cannot_reshard_to_and_changes_nothing(tmp_path):
    """A whole-model file is cut along dim 0 for each rank; a model sharded another way is refused."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    from peftfx.distributed.base_sharding import make_base_shardable

    gm = mlp_gm("nf4")
    path = peftfx.save_model(gm, tmp_path / "model.safetensors")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        make_base_shardable(gm)
        fully_shard(gm, shard_placement_fn=lambda p: Shard(1) if p.dim() == 2 else Shard(0))
        before = {k: v.full_tensor().clone() for k, v in gm.state_dict().items() if hasattr(v, "full_tensor")}
        with torch.no_grad():
            for p in gm.parameters():
                if p.requires_grad:
                    p.add_(1.0)  # the file's values differ from the model's: a partial copy would show
        changed = {k: v.full_tensor().clone() for k, v in gm.state_dict().items() if hasattr(v, "full_tensor")}
        with pytest.raises(peftfx.CheckpointError, match=r"model\.safetensors: cannot reshard .*S\(1\)"):
            peftfx.load_model(gm, path)
        after = {k: v.full_tensor() for k, v in gm.state_dict().items() if hasattr(v, "full_tensor")}
        assert before.keys() == after.keys() and all(torch.equal(changed[k], after[k]) for k in after)
    finally:
        dist.destroy_process_group()


def test_sharded_base_is_regathered_for_recomputed_blocks(tmp_path):
    """Activation checkpointing per outlined block (what ``[memory] checkpoint = "blocks"`` does):
    the recomputation in backward needs the packed base again after FSDP2 freed it; FSDP2's
    pre-backward all-gather brings it back, so gradients equal those without checkpointing."""
    from torch.distributed._composable import checkpoint

    from peftfx.distributed import shard
    from peftfx.distributed.blocks import outline_blocks

    batch = shard_of(llama_batches()[0], 0)
    grads = []
    compiled = llama_gm()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        for recompute in (False, True):
            gm = copy.deepcopy(compiled)
            if recompute:
                for block in outline_blocks(gm).blocks:
                    checkpoint(gm.get_submodule(block))
            shard(gm)
            gm(**batch).loss.backward()
            grads.append({n: p.grad.full_tensor() for n, p in gm.named_parameters() if p.grad is not None})
    finally:
        dist.destroy_process_group()
    plain, recomputed = grads
    assert plain.keys() == recomputed.keys() and {n.rpartition(".")[2] for n in plain} == {"lora_A", "lora_B"}
    assert all(torch.allclose(plain[n], recomputed[n], atol=1e-6) for n in plain)
    assert any(plain[n].abs().max() > 0 for n in plain)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run by bench/gpu_check.sh)")
def test_every_format_shards_on_cuda_with_nccl(tmp_path):
    """One rank on one GPU with nccl: the FrozenStorage all-gather hooks on CUDA tensors, under a
    bf16 policy: every layer sees its base tensors uncast and the gathered bytes are unchanged."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from peftfx.distributed import shard

    torch.cuda.set_device(0)
    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        x = torch.randn(3, 64, device="cuda")
        for fmt in FORMATS:
            gm = mlp_gm(fmt).to("cuda")
            single = _base_bytes(gm.state_dict())
            dtypes = {n: t.dtype for n, t in gm.up.named_buffers()}
            ref = gm(x).detach()
            seen: dict[str, torch.dtype] = {}
            gm.up.register_forward_pre_hook(
                lambda m, a: seen.update({n: getattr(m, n).dtype for n in dtypes if getattr(m, n, None) is not None}))
            plain_gm = copy.deepcopy(gm)
            shard(plain_gm, per_block=False)
            assert torch.equal(plain_gm(x).detach(), ref), fmt
            shard(gm, per_block=False, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16))
            seen.clear()
            gm(x.to(torch.bfloat16)).float().sum().backward()
            assert seen == dtypes, fmt
            assert _base_bytes(gathered_state_dict(gm)) == single, fmt
    finally:
        dist.destroy_process_group()
