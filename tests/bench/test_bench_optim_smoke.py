"""Tiny-size smoke run of ``bench.optim``: it runs and emits its table (no timing assertions: the machine is
shared; the real run is ``python -m bench.optim``)."""
from __future__ import annotations

from bench import optim


def test_optim_bench_smoke(tmp_path):
    out = tmp_path / "RESULTS.md"
    body = optim.main(["--sizes", "1", "--reps", "1", "--no-torchao", "--out", str(out)])
    rows = {r[1]: r for r in ([c.strip() for c in line.strip("|").split("|")] for line in body.splitlines()
                              if line.startswith("| ") and not line.startswith("| ---"))}
    assert {"torch AdamW(foreach)", "peftfx AdamW8bit", "peftfx AdamW8bit eager"} <= set(rows)
    assert float(rows["torch AdamW(foreach)"][3]) == 1.0
    assert float(rows["peftfx AdamW8bit"][6]) <= 0.26  # state / torch's: 2.03 of 8 bytes per parameter
    assert "<!-- optim_cpu:start -->" in out.read_text()
