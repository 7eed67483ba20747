"""Tiny-size smoke run of ``bench.generation``: it runs, checks mixed == looped generation, emits its tables.

No timing assertions (the machine is shared); the real run is ``python -m bench.generation``. Slow: it
compiles three models and captures their generation graphs.
"""
from __future__ import annotations

import pytest

pytest.importorskip("bitsandbytes")
pytest.importorskip("peft")

from bench import generation  # noqa: E402


@pytest.mark.slow
def test_generation_bench_smoke(tmp_path):
    out = tmp_path / "RESULTS.md"
    body = generation.main(["--hidden", "128", "--layers", "1", "--vocab", "256", "--prompt", "8", "--new", "12",
                            "--batches", "1", "2", "--reps", "1", "--out", str(out)])
    assert "| 1 |" in body and "| 2 |" in body and "mixed / loop" in body
    assert "<!-- generation:start -->" in out.read_text()
