"""Tiny-size smoke run of ``bench.activation_memory``: it runs every contender and writes its table and plot.

No timing or memory assertions (the machine is shared); the real run is ``python -m bench.activation_memory``.
"""
from __future__ import annotations

import pytest

pytest.importorskip("bitsandbytes")
pytest.importorskip("peft")
pytest.importorskip("matplotlib")

from bench import activation_memory  # noqa: E402


@pytest.mark.slow
def test_activation_memory_smoke(tmp_path):
    out, shared = tmp_path / "RESULTS.md", tmp_path / "rows.json"
    tiny = ["--reps", "1", "--hidden", "64", "--layers", "2", "--vocab", "128", "--out", str(out), "--plot",
            str(tmp_path / "a.png"), "--rows", str(shared)]
    activation_memory.main(["--seqs", "32", *tiny])
    body = activation_memory.main(["--seqs", "16", *tiny])  # a second run adds its rows to the first's
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in body.splitlines()
            if line.startswith("| ") and not line.startswith("| ---")][1:]
    assert {(r[0], r[1]) for r in rows} == {(s, k) for s in ("16", "32") for k in
                                            ("peftfx off", "peftfx blocks", "peftfx selective", "peft+bnb gc")}
    assert all(float(r[5]) > 0 for r in rows) and "<!-- activation_memory:start -->" in out.read_text()
    assert (tmp_path / "a.png").stat().st_size > 0
