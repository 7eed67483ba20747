"""Runs as CSV: one row per fine-tuning run with columns ``N``, ``D_F``, ``D_T`` (and any others).

Extra columns (``method``, ``finetuned_loss``, ...) are kept as strings so runs can be grouped,
e.g. one fit per fine-tuning method (``peftfx scaling fit runs.csv --by method``).
"""
from __future__ import annotations

import csv
import math
import os
from collections.abc import Iterable, Mapping, Sequence

from peftfx.errors import ScalingError

__all__ = ["REQUIRED_COLUMNS", "read_runs", "write_runs", "group_runs"]

REQUIRED_COLUMNS = ("N", "D_F", "D_T")


def read_runs(path: str | os.PathLike) -> list[dict[str, object]]:
    """Rows of a runs CSV; ``N``, ``D_F``, ``D_T`` as floats (validity is checked by the fit)."""
    if not os.path.isfile(path):
        raise ScalingError(f"runs CSV {os.fspath(path)!r} does not exist")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in reader.fieldnames or []]
        missing = [c for c in REQUIRED_COLUMNS if c not in header]
        if missing:
            raise ScalingError(f"runs CSV {os.fspath(path)!r} has no column(s) {', '.join(missing)} (header: {header}); "
                               f"it needs {', '.join(REQUIRED_COLUMNS)}")
        rows = []
        for line, raw in enumerate(reader, start=2):  # line 1 is the header
            row: dict[str, object] = {(k or "").strip(): (v or "").strip() for k, v in raw.items()}
            for col in REQUIRED_COLUMNS:
                try:
                    row[col] = float(row[col])  # type: ignore[arg-type]
                except ValueError:
                    raise ScalingError(f"runs CSV {os.fspath(path)!r} line {line}: {col}={row[col]!r} is not a number")
            rows.append(row)
    return rows


def write_runs(path: str | os.PathLike, rows: Iterable[Mapping[str, object]], columns: Sequence[str] = ()) -> None:
    """Write ``rows`` with ``N, D_F, D_T`` first, then ``columns`` (default: the other keys, in first-seen order)."""
    rows = list(rows)
    extra = list(columns) or [k for k in dict.fromkeys(k for r in rows for k in r) if k not in REQUIRED_COLUMNS]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*REQUIRED_COLUMNS, *extra], extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (repr(v) if isinstance(v, float) and math.isfinite(v) else v) for k, v in row.items()})


def group_runs(rows: Iterable[Mapping[str, object]], column: str) -> dict[str, list[Mapping[str, object]]]:
    """``{value: rows}`` by the value of ``column``, in first-seen order."""
    groups: dict[str, list[Mapping[str, object]]] = {}
    for i, row in enumerate(rows):
        if column not in row:
            raise ScalingError(f"run {i} has no column {column!r} to group by (columns: {sorted(row)})")
        groups.setdefault(str(row[column]), []).append(row)
    return groups
