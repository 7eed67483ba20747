"""The experiment's CPU accounting: phases add up, and the quiet-machine projection lays the runs out
on the workers (busiest worker + each worker's share of its start-up) after the main process."""
from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from bench.transfer_scaling.timing import Phases, phase_table, summary  # noqa: E402


def _run(arm: str, size: str, worker: int, train: float, prepare: float = 0.0) -> dict:
    return {"arm": arm, "size": size, "steps": 100, "evals": 5, "train_cpu": train, "eval_cpu": 1.0,
            "prepare_cpu": prepare, "seconds": 3 * (train + 1.0 + prepare), "worker": worker}


def test_summary_splits_phases_and_projects_two_workers():
    rows = [_run("scratch", "a", 1, 10.0), _run("full", "a", 2, 20.0), _run("qlora", "a", 1, 30.0, prepare=2.0)]
    infos = {"a": {"steps": 500, "cpu_seconds": 40.0, "seconds": 90.0, "worker": 2}}
    phases = Phases()
    phases.seconds["analysis (D_E, fits, bootstrap)"] = (1.0, 1.0)
    cost = summary(rows, infos, phases, wall=300.0, main_cpu=8.0, worker_cpu=130.0, workers=2)
    assert cost["pretrain"] == 40.0 and cost["scratch"] == 11.0 and cost["finetune"] == 21.0 + 33.0
    assert cost["train"] == 60.0 + 40.0 and cost["eval"] == 3.0 and cost["prepare"] == 2.0  # steps incl. pre-training
    run_cpu = 40.0 + 11.0 + 54.0
    assert cost["total_cpu"] == 138.0 and cost["unaccounted"] == pytest.approx(138.0 - run_cpu - 1.0)
    # worker 1: 11 + 33 = 44 CPU-s of runs, worker 2: 21 + 40 = 61 -> main 8 + 61 + (130 - 105) / 2
    assert cost["projected_wall"] == pytest.approx(8.0 + 61.0 + 12.5)
    one = summary(rows, infos, phases, wall=300.0, main_cpu=138.0, worker_cpu=0.0, workers=1)
    assert one["projected_wall"] == one["total_cpu"] == 138.0
    table = phase_table(rows, infos)
    assert "| pre-train a | 1 | 500 |" in table and "| qlora a | 1 | 100 | 5 | 30.0 | 1.0 | 2.0 |" in table


def test_cached_pretraining_costs_nothing():
    infos = {"a": {"steps": 500, "cpu_seconds": 40.0, "seconds": 90.0, "cached": True, "worker": 1}}
    cost = summary([], infos, Phases(), wall=5.0, main_cpu=5.0, worker_cpu=0.0, workers=1)
    assert cost["pretrain"] == 0.0 and cost["total_cpu"] == 5.0 and cost["pretrain_cached"] == 40.0
    assert cost["projected_wall_cold"] == 45.0
    assert "pre-train a (from the cache; 40 CPU-s when trained)" in phase_table([], infos)
