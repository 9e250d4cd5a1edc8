"""Crash-safe file writes of the experiment runner, sweeps and reports.

A file is written whole into a temp file next to it, flushed, fsync'ed and moved into place
with ``os.replace``, so a reader (or a resumed run) sees either the old or the new file, never
a part. Metrics lines are appended and fsync'ed one by one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

__all__ = ["append_json_line", "atomic_open", "atomic_write_text"]


@contextmanager
def atomic_open(path: Path, mode: str = "w") -> Iterator[IO[Any]]:
    """A temp file in ``path``'s directory, opened with ``mode`` ("w" or "wb"), that replaces
    ``path`` when the block ends without an error (and is removed when it raises)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with tmp.open(mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (temp file + ``os.replace``)."""
    with atomic_open(path) as f:
        f.write(text)


def append_json_line(path: Path, record: dict[str, Any]) -> None:
    """Append ``record`` as one JSON line to ``path``, flushed and fsync'ed."""
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())
