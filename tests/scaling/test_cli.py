"""``peftfx scaling fit runs.csv``: text, JSON, per-group fits and one-line errors with exit code 2."""
from __future__ import annotations

import json

import pytest

from peftfx.inspect.cli import main
from peftfx.scaling import read_runs, write_runs


def _rows(method: str, alpha: float) -> list[dict]:
    return [{"N": n, "D_F": d, "D_T": 50 * d ** alpha * n ** 0.3, "method": method}
            for n in (1e4, 1e5, 1e6) for d in (1e3, 1e4, 1e5)]


@pytest.fixture
def runs_csv(tmp_path):
    path = tmp_path / "runs.csv"
    write_runs(path, _rows("lora", 0.2) + _rows("full", 0.4) + [{"N": 1e4, "D_F": 10.0, "D_T": -3.0, "method": "full"}])
    return path


def test_csv_round_trip(runs_csv):
    rows = read_runs(runs_csv)
    assert len(rows) == 19 and rows[0]["method"] == "lora" and rows[0]["N"] == 1e4 and isinstance(rows[0]["D_T"], float)


def test_fit_prints_one_law_per_group(runs_csv, capsys):
    assert main(["scaling", "fit", str(runs_csv), "--by", "method", "--skip-ossified"]) == 0
    out = capsys.readouterr().out
    assert "method=lora:" in out and "method=full:" in out and "skipped 1 ossified" in out
    assert "alpha = 0.2 " in out and "alpha = 0.4 " in out and "a 10x larger model is worth" in out


def test_fit_json(runs_csv, capsys):
    assert main(["scaling", "fit", str(runs_csv), "--by", "method", "--skip-ossified", "--json", "--bootstrap", "200",
                 "--confidence", "0.9"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["full"]["alpha"] == pytest.approx(0.4) and out["lora"]["beta"] == pytest.approx(0.3)
    assert out["full"]["skipped_ossified"] == 1 and out["full"]["confidence"] == 0.9
    assert out["lora"]["data_per_10x_model"] == pytest.approx(10 ** (0.3 / 0.2))


def test_ossified_run_without_flag_is_exit_2_naming_it(runs_csv, capsys):
    assert main(["scaling", "fit", str(runs_csv)]) == 2
    err = capsys.readouterr().err
    assert "D_T (run 18, N=10000, D_F=10)" in err and "-3.0" in err and "--skip-ossified" in err


@pytest.mark.parametrize("text,match", [("N,D_F\n1,2\n", "no column(s) D_T"),
                                        ("N,D_F,D_T\n1,2,lots\n", "line 2: D_T='lots' is not a number")])
def test_bad_csv_is_exit_2_naming_the_value(tmp_path, capsys, text, match):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    assert main(["scaling", "fit", str(path)]) == 2
    assert match in capsys.readouterr().err


def test_missing_file_and_bad_option(tmp_path, capsys):
    assert main(["scaling", "fit", str(tmp_path / "nope.csv")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["scaling", "fit", str(tmp_path / "nope.csv"), "--confidence", "2"]) == 2
