"""Tiny-size smoke run of ``bench.cpu_kernels`` and ``bench.cpu_train``: they run and emit their tables.

No timing assertions (the machine is shared); the real runs are ``make bench``.
"""
from __future__ import annotations

import pytest

pytest.importorskip("bitsandbytes")
pytest.importorskip("peft")
pytest.importorskip("matplotlib")

from bench import cpu_kernels, cpu_train  # noqa: E402


def _table_rows(md: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in md.splitlines()
            if line.startswith("| ") and not line.startswith("| ---")]


def test_cpu_kernels_smoke(tmp_path):
    out = tmp_path / "RESULTS.md"
    out.write_text("# results\n\n<!-- other:start -->\nkeep me\n<!-- other:end -->\n")
    body = cpu_kernels.main(["--size", "256", "--reps", "1", "--decode-m", "1", "--out", str(out),
                             "--plot", str(tmp_path / "k.png")])
    rows = {(r[0], r[1]) for r in _table_rows(body)}
    for op in ("dequantize fp32", "dequantize bf16"):
        assert {(op, "peftfx native"), (op, "peftfx PyTorch path"), (op, "bitsandbytes")} <= rows
    assert {("quantize", "peftfx"), ("quantize", "bitsandbytes")} <= rows
    assert {("1", "peftfx native"), ("1", "peftfx PyTorch path"), ("1", "bitsandbytes"),
            ("1", "dense fp32 F.linear")} <= rows
    assert "bandwidth bound ms" in body
    text = out.read_text()
    assert "keep me" in text and "<!-- cpu_kernels:start -->" in text and "Machine: cpu:" in text
    assert (tmp_path / "k.png").stat().st_size > 0
    cpu_kernels.main(["--size", "128", "--reps", "1", "--decode-m", "1", "--out", str(out), "--plot",
                      str(tmp_path / "k.png")])  # a rerun replaces its section instead of appending
    assert out.read_text().count("<!-- cpu_kernels:start -->") == 1


def test_cpu_train_smoke(tmp_path):
    out = tmp_path / "RESULTS.md"
    body = cpu_train.main(["--hidden", "64", "--layers", "1", "--vocab", "128", "--batch", "1", "--seq", "8",
                           "--reps", "1", "--compile-reps", "1", "--no-torchao", "--out", str(out),
                           "--plot", str(tmp_path / "t.png")])
    rows = {r[0]: r for r in _table_rows(body)}
    peftfx_rows = [f"peftfx {c} {p}" for c in ("fp32", "auto") for p in ("qv", "all")]
    for name in ("dense LoRA (peft) qv", "peft+bnb qv", "peft+bnb bf16 qv", "peft+bnb all", "peft+bnb bf16 all",
                 *peftfx_rows, "peftfx.compile qv", "peftfx.compile all"):
        assert name in rows, name
    # ratio columns: 3 = time / peft+bnb, 4 = time / peft+bnb bf16, 6 = peak / peft+bnb, 7 = peak / bf16
    assert float(rows["peft+bnb qv"][3]) == 1.0 and float(rows["peft+bnb all"][6]) == 1.0
    assert float(rows["peft+bnb bf16 qv"][4]) == 1.0 and float(rows["peft+bnb bf16 all"][7]) == 1.0
    assert all(float(rows[k][5]) > 0 for k in peftfx_rows)  # peak MiB measured
    assert (tmp_path / "t.png").stat().st_size > 0
