"""Plan data in and out: reading plan files, writing TOML/JSON, and checking parsed values.

The value checks (``check_int``, ``check_choice``, ...) raise :class:`PlanError` with messages that
name the key, the bad value and what is allowed; the specs in :mod:`peftfx.plan` are built on them.

The TOML emitter covers exactly the shapes a plan's ``to_dict()`` produces: a top-level table of
scalars and arrays, sub-tables (``[lora]``), arrays of tables (``[[rules]]``) and, below those,
inline tables (``lora = {r = 4}``). ``tomllib`` (Python >= 3.11, or the ``tomli`` backport) reads
it back to the same dict.
"""
from __future__ import annotations

import difflib
import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from peftfx.errors import PlanError

__all__ = [
    "dumps_toml", "dumps_json", "load_plan_file", "did_you_mean", "check_keys", "check_int", "check_num",
    "check_bool", "check_choice", "check_block", "check_size", "plain", "FrozenDict",
]

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
# Escapes TOML basic strings require; every other control character becomes \uXXXX.
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def _toml_str(s: str) -> str:
    """One TOML basic string."""
    out = []
    for ch in s:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _toml_key(key: str) -> str:
    """A key, bare when TOML allows it."""
    if not isinstance(key, str):
        raise PlanError(f"TOML keys must be strings, got {key!r}")
    return key if _BARE_KEY.match(key) else _toml_str(key)


def _toml_value(value: Any) -> str:
    """A scalar, array or inline table."""
    if isinstance(value, bool):  # before int: bool is an int subclass
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise PlanError(f"cannot write {value!r} to a plan file: values must be finite")
        return repr(value)  # shortest round-tripping form; '1e-05' is valid TOML
    if isinstance(value, str):
        return _toml_str(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    if value is None:
        raise PlanError("cannot write None to TOML (TOML has no null): leave the key out instead")
    raise PlanError(f"cannot write {type(value).__name__} value {value!r} to TOML")


def _is_table_array(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and bool(value) and all(isinstance(v, Mapping) for v in value)


def _emit_table(lines: list[str], table: Mapping[str, Any]) -> None:
    """Key/value lines of one table; anything nested goes inline."""
    for key, value in table.items():
        lines.append(f"{_toml_key(key)} = {_toml_value(value)}")


def dumps_toml(data: Mapping[str, Any]) -> str:
    """Serialize a plan dict to TOML text.

    Top-level scalars and arrays come first (TOML requires it), then one ``[name]`` table per
    mapping, then one ``[[name]]`` block per element of an array of mappings.
    """
    lines: list[str] = []
    tables = [(k, v) for k, v in data.items() if isinstance(v, Mapping)]
    arrays = [(k, v) for k, v in data.items() if _is_table_array(v)]
    _emit_table(lines, {k: v for k, v in data.items() if not isinstance(v, Mapping) and not _is_table_array(v)})
    for key, table in tables:
        lines += ["", f"[{_toml_key(key)}]"]
        _emit_table(lines, table)
    for key, items in arrays:
        for item in items:
            lines += ["", f"[[{_toml_key(key)}]]"]
            _emit_table(lines, item)
    return "\n".join(lines).lstrip("\n") + "\n"


def dumps_json(data: Mapping[str, Any], *, indent: int | None = 2) -> str:
    """Serialize a plan dict to JSON text (strict: NaN/Inf are rejected)."""
    try:
        return json.dumps(data, indent=indent, allow_nan=False)
    except ValueError as e:
        raise PlanError(f"cannot write plan as JSON: {e}") from None


def _load_toml(text: str) -> dict[str, Any]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ModuleNotFoundError:
            raise PlanError("reading TOML plans needs Python >= 3.11 or `pip install tomli`; "
                            "or write the plan as .json") from None
    return tomllib.loads(text)


def load_plan_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a ``.toml`` or ``.json`` plan file into a plain dict (not yet validated).

    Raises:
        PlanError: missing file, unknown extension, or a syntax error (with the parser's position).
    """
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in (".toml", ".json"):
        raise PlanError(f"plan file {str(p)!r} has extension {p.suffix or '(none)'!r}; "
                        "use .toml or .json")
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PlanError(f"plan file {str(p)!r} does not exist") from None
    except OSError as e:
        raise PlanError(f"cannot read plan file {str(p)!r}: {e}") from None
    try:
        data = _load_toml(text) if suffix == ".toml" else json.loads(text)
    except PlanError:
        raise
    except ValueError as e:  # tomllib.TOMLDecodeError and json.JSONDecodeError are ValueErrors
        raise PlanError(f"plan file {str(p)!r} is not valid {suffix[1:].upper()}: {e}") from None
    if not isinstance(data, dict):
        raise PlanError(f"plan file {str(p)!r} must hold a table/object at the top, "
                        f"got {type(data).__name__}")
    return data


# ---------------------------------------------------------------- value checks for parsed plan data


# PEFT's names for our keys, which difflib would not find.
_ALIASES = {"rank": "r", "lora_alpha": "alpha", "lora_dropout": "dropout", "target_modules": "targets",
            "num_virtual_tokens": "tokens", "init_lora_weights": "init", "prefix_projection": "reparametrize",
            "encoder_hidden_size": "hidden", "prompt_tuning_init_text": "init_text", "quant_type": "format",
            "blocksize": "block_size", "bnb_4bit_quant_type": "format", "bnb_4bit_use_double_quant": "double_quant",
            "bnb_4bit_compute_dtype": "compute_dtype", "llm_int8_threshold": "threshold"}


def did_you_mean(value: str, allowed: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest allowed string (or PEFT alias), or ``""``."""
    allowed = list(allowed)
    if _ALIASES.get(value) in allowed:
        return f" (did you mean {_ALIASES[value]!r}?)"
    close = difflib.get_close_matches(str(value), allowed, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_keys(d: Mapping[str, Any], allowed: Iterable[str], where: str) -> None:
    """Raise PlanError on the first key of ``d`` not in ``allowed``, listing the allowed ones."""
    allowed = tuple(allowed)
    for key in d:
        if key not in allowed:
            raise PlanError(f"unknown key {key!r} in {where}{did_you_mean(key, allowed)}; "
                            f"allowed: {', '.join(allowed)}")


def check_int(where: str, value: Any, lo: int, hi: int | None = None) -> int:
    """An int (not a bool) in [lo, hi]."""
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise PlanError(f"{where} must be an integer {rng}, got {value!r}")
    return value


def check_num(where: str, value: Any, *, gt: float | None = None, ge: float | None = None,
              lt: float | None = None) -> float:
    """A finite int or float within the given bounds."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    ok = ok and (gt is None or value > gt) and (ge is None or value >= ge) and (lt is None or value < lt)
    if not ok:
        rng = " and ".join(f"{op} {b}" for op, b in ((">", gt), (">=", ge), ("<", lt)) if b is not None)
        raise PlanError(f"{where} must be a finite number {rng}, got {value!r}")
    return value


def check_bool(where: str, value: Any) -> bool:
    """A real bool (TOML/JSON true/false)."""
    if not isinstance(value, bool):
        raise PlanError(f"{where} must be true or false, got {value!r}")
    return value


def check_choice(where: str, value: Any, allowed: Iterable[str]) -> str:
    """One of ``allowed``."""
    allowed = tuple(allowed)
    if value not in allowed:
        raise PlanError(f"{where} must be one of {', '.join(map(repr, allowed))}; got {value!r}"
                        f"{did_you_mean(value, allowed) if isinstance(value, str) else ''}")
    return value


def check_block(where: str, value: Any) -> int:
    """A block size: power of two in [16, 4096]."""
    v = check_int(where, value, 16, 4096)
    if v & (v - 1):
        raise PlanError(f"{where} must be a power of two in [16, 4096], got {value!r}")
    return v


_SIZE = re.compile(r"^\s*(-?\d+(?:\.\d+)?|\.\d+)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def check_size(where: str, value: Any) -> int:
    """A memory size in bytes from a positive int or a string such as ``"24GiB"``, ``"500MB"``, ``"1.5 GB"``.

    Binary units (KiB, MiB, GiB, TiB) are powers of 1024, decimal ones (KB, MB, GB, TB) of 1000,
    as on GPU spec sheets; a bare number is bytes.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        n = value
    elif isinstance(value, str) and (m := _SIZE.match(value)):
        n = int(float(m.group(1)) * _SIZE_UNITS[(m.group(2) or "B").lower()])
    else:
        raise PlanError(f"{where} must be a size such as '24GiB', '500MB' or a number of bytes, got {value!r}")
    if n <= 0:
        raise PlanError(f"{where} must be positive, got {value!r}")
    return n


def plain(value: Any) -> Any:
    """Tuples → lists, mappings → dicts, recursively (JSON/TOML friendly)."""
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    return value


class FrozenDict(dict):
    """A read-only, hashable dict for rule overrides (JSON-serializable, picklable)."""

    def _readonly(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("rule overrides are read-only")

    # every mutating dict method raises
    __setitem__ = __delitem__ = __ior__ = clear = pop = popitem = setdefault = update = _readonly  # type: ignore

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(tuple(sorted(self.items())))

    def __reduce__(self) -> tuple[Any, ...]:
        return (FrozenDict, (dict(self),))
