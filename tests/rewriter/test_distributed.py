"""peftfx.distributed: compiled models under DDP and FSDP2, 2 CPU processes with gloo on 127.0.0.1.

One pair of worker processes runs every distributed scenario (imports and compiles dominate the
cost) and writes its results to a temporary folder; the single-process references run in the
test process and each test compares one aspect. Workers are joined with a timeout and killed in
a ``finally`` so a hang or a crash never outlives the test.
"""
from __future__ import annotations

import copy
import os
import socket
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import peftfx
from peftfx.distributed import ANCHOR_ATTR, keep_adapters_in_graph
from peftfx.distributed.wrappers import _fingerprint

WORLD = 2
STEPS = 3
PER_RANK = 2  # sequences per rank and step (global batch 4)
JOIN_TIMEOUT_S = 120.0


# ---------------------------------------------------------------- models, plans, data (shared)

def llama_gm(seed: int = 0, tiled: bool = False):
    """The zoo Llama, NF4 + LoRA on attention; ``tiled``: LoRA on every linear, checkpointed blocks whose MLPs
    run in chunks of a few tokens (several chunks per sequence, so each MLP adapter's gradient is a sum over
    chunks that the tiled MLP must hand to autograd, and so to DDP's hooks, once)."""
    from tests.model_zoo import make_case

    case = make_case("llama", seed=seed)
    plan = {"targets": case.all_targets, "quant": {"format": "nf4", "double_quant": True},
            "lora": {"r": 4, "alpha": 8, "targets": case.all_targets if tiled else case.attn_targets}}
    if tiled:
        plan["memory"] = {"checkpoint": "blocks", "tile_mlp": True, "tile_tokens": 2}
    torch.manual_seed(seed)  # LoRA A init: identical in every process
    return peftfx.compile(case.model, plan, example_inputs=case.inputs)


def train_llama(gm, batches: list[dict], sgd: bool = False) -> list[float]:
    """AdamW (or SGD, whose step is linear in the gradient: rounding differences are not amplified where a
    gradient is ~0) on ``gm`` (plain or DDP-wrapped) over ``batches``: the per-step losses."""
    params = [p for p in gm.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.5) if sgd else torch.optim.AdamW(params, lr=5e-3)
    losses = []
    for batch in batches:
        loss = gm(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def llama_batches() -> list[dict]:
    """STEPS global batches of WORLD * PER_RANK sequences; rank r takes rows [r*PER_RANK, (r+1)*PER_RANK)."""
    g = torch.Generator().manual_seed(1234)
    out = []
    for _ in range(STEPS):
        ids = torch.randint(3, 96, (WORLD * PER_RANK, 9), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    return out


def shard_of(batch: dict, rank: int) -> dict:
    return {k: v[rank * PER_RANK:(rank + 1) * PER_RANK] for k, v in batch.items()}


class TwoHeads(nn.Module):
    """A trunk and two heads; the auxiliary head's output reaches the loss only on some ranks/steps."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Linear(64, 64)
        self.head = nn.Linear(64, 5)
        self.aux = nn.Linear(64, 4)

    def forward(self, x):
        h = torch.relu(self.trunk(x))
        return self.head(h), self.aux(h)


def _two_heads_gm(seed: int = 0):
    torch.manual_seed(seed)
    model = TwoHeads()
    plan = {"targets": ["trunk", "head", "aux"], "quant": {"format": "nf4"}, "lora": {"r": 4, "alpha": 8}}
    gm = peftfx.compile(model, plan, example_inputs=(torch.randn(2, 64),))
    with torch.no_grad():  # non-zero B so every adapter's gradient is non-trivial from step 1
        for name, p in gm.named_parameters():
            if name.endswith("lora_B"):
                p.copy_(torch.randn_like(p) * 0.1)
    return gm


def _two_heads_data():
    g = torch.Generator().manual_seed(99)
    return [(torch.randn(WORLD * PER_RANK, 64, generator=g), torch.randint(0, 5, (WORLD * PER_RANK,), generator=g),
             torch.randn(WORLD * PER_RANK, 4, generator=g)) for _ in range(STEPS)]


def _uses_aux(rank: int, step: int) -> bool:
    return rank == 0 or step % 2 == 1  # rank 1 skips the aux head on even steps


def _two_heads_loss(gm, x, y, z, rank: int, step: int):
    logits, aux = gm(x)
    loss = F.cross_entropy(logits, y)
    return loss + F.mse_loss(aux, z) if _uses_aux(rank, step) else loss


def adapters_of(gm) -> dict:
    return {n: p.detach().clone() for n, p in peftfx.trainable_parameters(gm).items()}


def _buffer_prints(gm) -> dict:
    return {n: (b.dtype, _fingerprint(b)) for n, b in gm.named_buffers()}


# ---------------------------------------------------------------- worker side

def _scenario_ddp(rank: int, gm) -> dict:
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    from peftfx.distributed import check_in_sync, ddp

    before = _buffer_prints(gm)
    model = ddp(gm)
    names = {id(p): n for n, p in gm.named_parameters()}
    reduced: list[tuple[str, torch.dtype]] = []

    def recording_hook(state, bucket):  # what DDP hands to the all-reduce, bucket by bucket
        reduced.extend((names[id(p)], p.dtype) for p in bucket.parameters())
        reduced.append(("<bucket numel>", bucket.buffer().numel()))
        return allreduce_hook(None, bucket)

    model.register_comm_hook(None, recording_hook)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    losses = []
    for batch in llama_batches():
        loss = model(**shard_of(batch, rank)).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    check_in_sync(model)
    return {"adapters": adapters_of(gm), "before": before, "after": _buffer_prints(gm), "reduced": reduced,
            "losses": losses}


def _scenario_fsdp(rank: int, gm, outdir: str) -> dict:
    from torch.distributed.tensor import DTensor

    from peftfx.distributed import full_adapter_state_dict, save_adapters, shard

    from torch.distributed.fsdp import FSDPModule

    before = _buffer_prints(gm)
    shard(gm)
    sharded = sorted(n for n, p in gm.named_parameters() if isinstance(p, DTensor))
    groups = gm.meta["peftfx.fsdp_groups"]
    # each block is its own FSDP group (its own state, managing exactly its own parameters)
    blocks = [g for g in groups if g]
    owned = {g: sorted(f"{g}.{n}" for n, _ in gm.get_submodule(g).named_parameters()) for g in blocks}
    owned[""] = sorted(n for n, _ in gm.named_parameters() if not any(n.startswith(b + ".") for b in blocks))
    managed = {}
    for g in groups:
        ids = {id(fp.sharded_param) for fp in gm.get_submodule(g)._get_fsdp_state()._fsdp_param_group.fsdp_params}
        managed[g] = [*sorted(n for n, p in gm.named_parameters() if id(p) in ids), len(ids)]
    is_fsdp = {g: isinstance(gm.get_submodule(g), FSDPModule) for g in groups}
    opt = torch.optim.AdamW([p for p in gm.parameters() if p.requires_grad], lr=5e-3)
    losses = []
    for batch in llama_batches():
        loss = gm(**shard_of(batch, rank)).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        global_loss = loss.detach().clone()
        dist.all_reduce(global_loss)
        losses.append(global_loss.item() / WORLD)
    sd = full_adapter_state_dict(gm)
    path = save_adapters(gm, os.path.join(outdir, "fsdp_adapters"))
    return {"losses": losses, "sharded": sharded, "groups": groups, "owned": owned, "managed": managed, "is_fsdp": is_fsdp,
            "before": before, "after": _buffer_prints(gm), "sd_keys": sorted(sd),
            "path": path}


def _scenario_ddp_tiled(rank: int) -> dict:
    from peftfx.distributed import check_in_sync, ddp
    from peftfx.kernels.tiled_mlp import TiledMLP

    gm = llama_gm(tiled=True)
    tiled = sorted(n for n, m in gm.named_modules() if isinstance(m, TiledMLP))
    model = ddp(gm)
    losses = train_llama(model, [shard_of(b, rank) for b in llama_batches()], sgd=True)
    check_in_sync(model)
    seq = llama_batches()[0]["input_ids"].shape[1]
    hidden = next(p.shape[1] for n, p in gm.named_parameters() if "embed_tokens" in n)
    chunks = len(gm.get_submodule(tiled[0]).chunks(torch.empty(PER_RANK, seq, hidden))) if tiled else 0  # a rank's MLP input
    return {"adapters": adapters_of(gm), "losses": losses, "tiled": tiled, "chunks": chunks}


def _scenario_unused(rank: int) -> dict:
    from peftfx.distributed import check_in_sync, ddp

    gm = _two_heads_gm()
    model = ddp(gm)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    for step, (x, y, z) in enumerate(_two_heads_data()):
        sl = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        _two_heads_loss(model, x[sl], y[sl], z[sl], rank, step).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    check_in_sync(model)
    # check_in_sync must notice a replica whose packed bytes differ (and say which)
    detected = ""
    if rank == 1:
        with torch.no_grad():
            gm.get_submodule("aux").weight[0] ^= 1
    try:
        check_in_sync(model)
    except peftfx.PeftfxError as exc:
        detected = str(exc)
    return {"adapters": adapters_of(gm), "detected": detected}


def _scenario_fsdp_bf16(rank: int) -> dict:
    """FSDP2 mixed precision casts parameters only: packed bytes stay uint8 and unchanged."""
    from peftfx.distributed import shard
    from torch.distributed.fsdp import MixedPrecisionPolicy

    gm = _two_heads_gm()
    before = _buffer_prints(gm)
    shard(gm, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32))
    x, y, z = _two_heads_data()[0]
    _two_heads_loss(gm, x[:PER_RANK], y[:PER_RANK], z[:PER_RANK], rank, 1).backward()
    grads = {n: (type(p.grad).__name__, p.grad.dtype) for n, p in gm.named_parameters() if p.grad is not None}
    return {"before": before, "after": _buffer_prints(gm), "grads": grads}


def _worker(rank: int, port: int, outdir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
    results = {}
    llama = llama_gm()
    llama_copy = copy.deepcopy(llama)  # a compile costs seconds; the copy is the same model
    scenarios = (("ddp", lambda: _scenario_ddp(rank, llama)), ("fsdp", lambda: _scenario_fsdp(rank, llama_copy, outdir)),
                 ("unused", lambda: _scenario_unused(rank)), ("fsdp_bf16", lambda: _scenario_fsdp_bf16(rank)),
                 ("ddp_tiled", lambda: _scenario_ddp_tiled(rank)))
    for name, run in scenarios:
        try:
            results[name] = run()
        except Exception:
            # Record and leave at once: the peer may sit in a collective this rank will never
            # join; closing our sockets makes it fail fast instead of waiting for the timeout.
            results[name] = {"error": traceback.format_exc()}
            torch.save(results, os.path.join(outdir, f"rank{rank}.pt"))
            os._exit(1)
    torch.save(results, os.path.join(outdir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(fn, outdir: str, *, meanwhile=lambda: None, timeout: float = JOIN_TIMEOUT_S):
    """Run ``fn(rank, port, outdir)`` in WORLD spawned processes and ``meanwhile()`` here.

    Returns ``(exit codes, meanwhile's result)``. Every worker is joined with ``timeout`` and
    killed if still alive, whatever happens here.
    """
    ctx = torch.multiprocessing.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=fn, args=(rank, port, outdir), daemon=True) for rank in range(WORLD)]
    try:
        for p in procs:
            p.start()
        local = meanwhile()
        for p in procs:
            p.join(timeout)
        return [p.exitcode for p in procs], local
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)


def load_rank_results(outdir: str) -> list[dict]:
    """What each worker saved as ``outdir/rank{r}.pt`` ({} for a worker that saved nothing)."""
    results = []
    for rank in range(WORLD):
        path = os.path.join(outdir, f"rank{rank}.pt")
        results.append(torch.load(path, weights_only=False) if os.path.exists(path) else {})
    return results


# ---------------------------------------------------------------- test side

def train_single_process() -> dict:
    """Single-process AdamW training on the global batch: per-step losses and final adapters (also of the tiled,
    checkpointed model: ``tiled``)."""
    gm = llama_gm()
    fresh = copy.deepcopy(gm)
    initial = adapters_of(gm)
    losses = train_llama(gm, llama_batches())
    tiled = llama_gm(tiled=True)
    tiled_losses = train_llama(tiled, llama_batches(), sgd=True)
    return {"gm": gm, "fresh": fresh, "losses": losses, "adapters": adapters_of(gm), "buffers": _buffer_prints(gm),
            "initial": initial, "tiled": {"losses": tiled_losses, "adapters": adapters_of(tiled)}}


@pytest.fixture(scope="module")
def dist_results(tmp_path_factory):
    outdir = str(tmp_path_factory.mktemp("dist"))
    codes, reference = run_workers(_worker, outdir, meanwhile=train_single_process)
    return {"codes": codes, "ranks": load_rank_results(outdir), "outdir": outdir, "reference": reference}


@pytest.fixture(scope="module")
def llama_reference(dist_results):
    return dist_results["reference"]


def _get(dist_results, scenario: str) -> list[dict]:
    out = []
    for rank, res in enumerate(dist_results["ranks"]):
        r = res.get(scenario)
        assert r is not None, f"rank {rank} did not run {scenario!r} (exit codes {dist_results['codes']})"
        assert "error" not in r, f"rank {rank} failed in {scenario!r}:\n{r['error']}"
        out.append(r)
    return out


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_workers_exit_cleanly(dist_results):
    assert dist_results["codes"] == [0] * WORLD, dist_results["ranks"]


def test_ddp_matches_single_process_on_global_batch(dist_results, llama_reference):
    r0, r1 = _get(dist_results, "ddp")
    assert _max_diff(r0["adapters"], r1["adapters"]) == 0.0  # bitwise identical replicas
    diff = _max_diff(r0["adapters"], llama_reference["adapters"])
    print(f"DDP vs single process: max |adapter diff| = {diff:.3g}")
    assert diff <= 1e-6, diff
    # the adapters moved: the comparison is not between untouched initial values
    assert _max_diff(r0["adapters"], llama_reference["initial"]) > 1e-3


def test_ddp_with_checkpointed_tiled_mlps_matches_single_process(dist_results, llama_reference):
    """DDP over blocks that recompute in backward and MLPs that run in chunks (LoRA on the MLP linears too):
    each adapter's gradient reaches DDP once per step (DDP raises if a parameter is marked ready twice), and
    SGD training equals the single-process run on the global batch."""
    r0, r1 = _get(dist_results, "ddp_tiled")
    assert r0["tiled"] and r0["tiled"] == r1["tiled"] and r0["chunks"] >= 2  # the MLPs run in several chunks
    assert any(".mlp." in n for n in r0["adapters"])  # and carry adapters
    assert _max_diff(r0["adapters"], r1["adapters"]) == 0.0
    reference = llama_reference["tiled"]
    diff = _max_diff(r0["adapters"], reference["adapters"])
    print(f"DDP + tiled MLPs vs single process: max |adapter diff| = {diff:.3g}")
    assert diff <= 1e-6, diff


def test_ddp_keeps_packed_bytes_and_reduces_only_adapters(dist_results, llama_reference):
    for r in _get(dist_results, "ddp"):
        assert r["after"].keys() == r["before"].keys() == llama_reference["buffers"].keys()
        for name, (dtype, fp) in r["after"].items():
            assert dtype == r["before"][name][0]
            assert torch.equal(fp, r["before"][name][1]) and torch.equal(fp, llama_reference["buffers"][name][1]), name
        packed = [n for n, (dt, _) in r["after"].items() if n.endswith(".weight")]
        assert packed and all(r["after"][n][0] == torch.uint8 for n in packed)
        reduced = [(n, dt) for n, dt in r["reduced"] if n != "<bucket numel>"]
        trainable = peftfx.trainable_parameters(llama_reference["gm"])
        assert sorted({n for n, _ in reduced}) == sorted(trainable)
        assert {dt for _, dt in reduced} == {torch.float32}
        bucket_numel = sum(v for n, v in r["reduced"] if n == "<bucket numel>")
        assert bucket_numel == STEPS * sum(p.numel() for p in trainable.values())


def test_fsdp_losses_match_and_saved_adapters_load_back(dist_results, llama_reference):
    r0, r1 = _get(dist_results, "fsdp")
    trainable = sorted(peftfx.trainable_parameters(llama_reference["gm"]))
    assert set(trainable) <= set(r0["sharded"])  # adapters are sharded DTensors, not replicas
    for r in (r0, r1):  # one FSDP2 group per block, then the root
        assert r["groups"] == ["model.layers.0", "model.layers.1", ""]
        assert all(r["is_fsdp"].values())
        for g, names in r["owned"].items():  # each group manages exactly the parameters under its path
            assert names and r["managed"][g] == [*names, len(names)], g
    for r in (r0, r1):
        loss_diff = max(abs(a - b) for a, b in zip(r["losses"], llama_reference["losses"]))
        print(f"FSDP2 vs single process: max |loss diff| = {loss_diff:.3g}")
        assert loss_diff <= 1e-6
        assert all(torch.equal(fp, r["before"][n][1]) and dt == r["before"][n][0] for n, (dt, fp) in r["after"].items())
    assert r0["sd_keys"] == trainable and r1["sd_keys"] == []  # gathered on rank 0 only
    assert r0["path"] is not None and r1["path"] is None  # written by rank 0 only
    fresh = llama_reference["fresh"]  # untrained, single process
    peftfx.load_adapters(fresh, r0["path"])  # also verifies plan layers and the base fingerprint
    assert _max_diff(adapters_of(fresh), llama_reference["adapters"]) <= 1e-6
    batch = llama_batches()[0]
    with torch.no_grad():
        out, ref = fresh(**batch).logits, llama_reference["gm"](**batch).logits
    out_diff = (out - ref).abs().max().item()
    print(f"FSDP2-saved adapters loaded in one process: max |logit diff| = {out_diff:.3g}")
    assert out_diff <= 1e-5


def test_unused_adapter_does_not_diverge_ranks(dist_results):
    r0, r1 = _get(dist_results, "unused")
    assert _max_diff(r0["adapters"], r1["adapters"]) == 0.0
    # reference: one process, loss = mean over ranks of each rank's loss on its own rows
    gm = _two_heads_gm()
    opt = torch.optim.AdamW(peftfx.trainable_parameters(gm).values(), lr=5e-3)
    for step, (x, y, z) in enumerate(_two_heads_data()):
        losses = [_two_heads_loss(gm, x[r * PER_RANK:(r + 1) * PER_RANK], y[r * PER_RANK:(r + 1) * PER_RANK],
                                  z[r * PER_RANK:(r + 1) * PER_RANK], r, step) for r in range(WORLD)]
        (sum(losses) / WORLD).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    diff = _max_diff(r0["adapters"], adapters_of(gm))
    print(f"unused adapter, DDP vs single process: max |adapter diff| = {diff:.3g}")
    assert diff <= 1e-6
    for r in (r0, r1):  # a replica with one flipped packed byte is caught and named, on every rank
        assert "aux.weight" in r["detected"]


def test_fsdp_mixed_precision_leaves_packed_bytes_alone(dist_results):
    for r in _get(dist_results, "fsdp_bf16"):
        for name, (dtype, fp) in r["after"].items():
            assert dtype == r["before"][name][0] and torch.equal(fp, r["before"][name][1]), name
        assert {n.rpartition(".")[2] for n in r["grads"]} == {"lora_A", "lora_B"}
        assert all(kind == "DTensor" and dt == torch.float32 for kind, dt in r["grads"].values())


# ---------------------------------------------------------------- single-process checks

def test_keep_adapters_in_graph_is_exact_and_reaches_every_adapter():
    gm = _two_heads_gm()
    x = torch.randn(3, 64)
    ref_logits, ref_aux = gm(x)
    ref_logits.sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in gm.named_parameters() if p.grad is not None}
    assert not any(n.startswith("aux.") for n in ref_grads)  # the aux adapter is unused here
    gm.zero_grad(set_to_none=True)
    handle = keep_adapters_in_graph(gm)
    assert keep_adapters_in_graph(gm) is handle  # idempotent
    logits, aux = gm(x)
    assert torch.equal(logits, ref_logits) and torch.equal(aux, ref_aux)
    logits.sum().backward()
    grads = {n: p.grad for n, p in gm.named_parameters() if p.grad is not None}
    assert sorted(grads) == sorted(peftfx.trainable_parameters(gm))
    assert all(torch.equal(grads[n], g) for n, g in ref_grads.items())
    assert all(torch.count_nonzero(grads[n]) == 0 for n in grads if n.startswith("aux."))
    handle.remove()
    assert torch.equal(gm(x)[1], ref_aux) and keep_adapters_in_graph(gm) is not handle  # re-installable
    assert getattr(gm, ANCHOR_ATTR) is not handle


def test_integer_parameters_are_refused_by_name():
    from peftfx.distributed import ddp

    gm = _two_heads_gm()
    gm.head.register_parameter("codes", nn.Parameter(torch.zeros(4, dtype=torch.uint8), requires_grad=False))
    with pytest.raises(peftfx.PeftfxError, match="head.codes"):
        ddp(gm)


def test_shard_warns_and_makes_one_group_when_blocks_cannot_be_outlined():
    from torch.distributed.fsdp import FSDPModule

    from peftfx.distributed import shard
    from tests.rewriter.test_blocks import Stack

    torch.manual_seed(0)
    gm = peftfx.compile(Stack("tied"), {"targets": ["body.layers.*.fc"], "lora": {"r": 2, "alpha": 4}},
                        example_inputs=(torch.randn(3, 16),))
    x = torch.randn(4, 16)
    ref = gm(x).detach()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        with pytest.warns(UserWarning, match="one FSDP2 group.*read outside its block"):
            shard(gm)
        assert gm.meta["peftfx.fsdp_groups"] == [""] and isinstance(gm, FSDPModule)
        assert not isinstance(gm.get_submodule("body.layers.0"), FSDPModule)
        assert torch.equal(gm(x).detach(), ref)
    finally:
        dist.destroy_process_group()
