"""AdamW8bit under DDP and FSDP2: 2 CPU processes, gloo, spawned by tests/rewriter/test_distributed.py's
``run_workers``; the single-process reference trains on the global batch meanwhile."""
from __future__ import annotations

import os
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from peftfx.kernels.adam8bit_compiled import COMPILE_ENV
from peftfx.optim import AdamW8bit
from tests.rewriter.test_distributed import WORLD, load_rank_results, run_workers

STEPS = 3
PER_RANK = 4


def _model() -> nn.Module:
    torch.manual_seed(0)  # identical initial weights in every process
    return nn.Sequential(nn.Linear(32, 128), nn.GELU(), nn.Linear(128, 128), nn.GELU(), nn.Linear(128, 8))


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    return [(torch.randn(WORLD * PER_RANK, 32, generator=g), torch.randn(WORLD * PER_RANK, 8, generator=g))
            for _ in range(STEPS)]


def _train(model: nn.Module, params, rank: int | None) -> tuple[list[float], AdamW8bit]:
    """STEPS steps; ``rank`` None trains on the whole global batch, else on this rank's rows."""
    opt = AdamW8bit(params, lr=1e-2)
    losses = []
    for x, y in _batches():
        if rank is not None:
            x, y = x[rank * PER_RANK:(rank + 1) * PER_RANK], y[rank * PER_RANK:(rank + 1) * PER_RANK]
        loss = F.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, opt


def _ddp(rank: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel

    model = _model()
    ddp = DistributedDataParallel(model)
    _train(ddp, ddp.parameters(), rank)
    return {"params": {n: p.detach().clone() for n, p in model.named_parameters()}}


def _fsdp(rank: int) -> dict:
    from torch.distributed.fsdp import fully_shard

    model = _model()
    for layer in (model[0], model[2], model[4]):
        fully_shard(layer)
    fully_shard(model)
    params = dict(model.named_parameters())
    losses, opt = _train(model, params.values(), rank)
    layout = {n: {"local": p.to_local().numel(), "global": p.numel(),
                  **{k: tuple(t.shape) for k, t in opt.state[p].items() if k != "step"}} for n, p in params.items()}
    return {"kinds": {n: type(p).__name__ for n, p in params.items()}, "losses": losses, "layout": layout,
            "full": {n: p.full_tensor().detach().clone() for n, p in params.items()}}


def _worker(rank: int, port: int, outdir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    # the eager CPU update: compiling it in both spawned ranks costs ~45 s on a cold inductor cache, and the
    # compiled update equals the eager one (state bit for bit) in tests/optim/test_compiled_step.py
    os.environ[COMPILE_ENV] = "0"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
    results = {}
    for name, run in (("ddp", _ddp), ("fsdp", _fsdp)):
        try:
            results[name] = run(rank)
        except Exception:
            results[name] = {"error": traceback.format_exc()}
            torch.save(results, os.path.join(outdir, f"rank{rank}.pt"))
            os._exit(1)  # the peer may wait in a collective: leave at once so it fails fast
    torch.save(results, os.path.join(outdir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def _reference() -> dict:
    model = _model()
    old = os.environ.get(COMPILE_ENV)
    os.environ[COMPILE_ENV] = "0"  # the ranks' eager update (see _worker)
    try:
        losses, _ = _train(model, model.parameters(), None)
    finally:
        os.environ.pop(COMPILE_ENV) if old is None else os.environ.update({COMPILE_ENV: old})
    return {"losses": losses, "params": {n: p.detach().clone() for n, p in model.named_parameters()}}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    outdir = str(tmp_path_factory.mktemp("optim_dist"))
    codes, reference = run_workers(_worker, outdir, meanwhile=_reference)
    ranks = load_rank_results(outdir)
    for r in ranks:
        for scenario in r.values():
            assert "error" not in scenario, scenario.get("error")
    assert codes == [0] * WORLD, codes
    return {"ranks": ranks, "reference": reference}


def test_ddp_ranks_stay_bitwise_in_sync_and_match_one_process_on_the_global_batch(results):
    r0, r1 = (r["ddp"]["params"] for r in results["ranks"])
    assert all(torch.equal(r0[n], r1[n]) for n in r0)  # same averaged gradient, same deterministic update
    ref = results["reference"]["params"]
    # DDP's all-reduce mean rounds differently from one process's batch mean: a moment may land one code
    # away, which moves a weight by about lr * 1% after three steps
    assert all(torch.allclose(r0[n], ref[n], rtol=0, atol=1e-3) for n in ref)


def test_fsdp2_quantizes_each_local_shard_and_trains_like_one_process(results):
    ranks = [r["fsdp"] for r in results["ranks"]]
    assert set(ranks[0]["kinds"].values()) == {"DTensor"}
    for r in ranks:
        for name, lay in r["layout"].items():
            if lay["global"] >= 4096:  # 8-bit state over the local shard only
                assert lay["codes"] == (2, lay["local"]) and lay["absmax"] == (2, -(-lay["local"] // 256)), name
            else:
                assert "exp_avg" in lay, name
    assert [r["layout"]["2.weight"]["local"] for r in ranks] == [64 * 128, 64 * 128]
    ref = results["reference"]
    mean = [sum(r["losses"][s] for r in ranks) / WORLD for s in range(STEPS)]
    assert mean == pytest.approx(ref["losses"], rel=1e-3)
    full0, full1 = ranks[0]["full"], ranks[1]["full"]
    assert all(torch.equal(full0[n], full1[n]) for n in full0)
    assert all(torch.allclose(full0[n], ref["params"][n], rtol=0, atol=1e-3) for n in full0)
