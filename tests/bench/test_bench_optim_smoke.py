"""Tiny-size smoke run of ``bench.optim``: it runs and emits its table (no timing assertions: the machine is
shared; the real run is ``python -m bench.optim``)."""
from __future__ import annotations

import pytest

from bench import optim, optim_lookups


def test_optim_bench_smoke(tmp_path):
    out = tmp_path / "RESULTS.md"
    body = optim.main(["--sizes", "1", "--reps", "1", "--no-torchao", "--out", str(out)])
    rows = {r[1]: r for r in ([c.strip() for c in line.strip("|").split("|")] for line in body.splitlines()
                              if line.startswith("| ") and not line.startswith("| ---"))}
    assert {"torch AdamW(foreach)", "peftfx AdamW8bit", "peftfx AdamW8bit eager"} <= set(rows)
    assert float(rows["torch AdamW(foreach)"][3]) == 1.0
    assert float(rows["peftfx AdamW8bit"][6]) <= 0.26  # state / torch's: 2.03 of 8 bytes per parameter
    assert "<!-- optim_cpu:start -->" in out.read_text()


@pytest.mark.slow
def test_optim_lookups_bench_smoke(tmp_path):
    """bench.optim_lookups runs; before timing it checks that its arithmetic decode equals both dynamic maps and
    that the variants claiming the product's results (direct-converts, arith-decode, vgather) reproduce them."""
    out = tmp_path / "RESULTS.md"
    body = optim_lookups.main(["--millions", "1", "--reps", "1", "--vgather", "--out", str(out)])
    names = {line.split("|")[2].strip() for line in body.splitlines() if line.startswith("| 1M")}
    assert {"product", "direct-converts", "arith-decode", "vgather", "memory-only", "torch AdamW(foreach)"} <= names
    assert "<!-- optim_lookups:start -->" in out.read_text()
