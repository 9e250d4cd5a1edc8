"""Crash-safe file writes of the experiment runner, sweeps and reports, and directory locks.

A file is written whole into a temp file next to it (``.<name>.tmp<PID>``), flushed, fsync'ed
and moved into place with ``os.replace``, so a reader (or a resumed run) sees either the old or
the new file, never a part. Metrics lines are appended and fsync'ed one by one. A temp file
whose writer was killed is removed by :func:`remove_stale_temp_files` at the next start.

:func:`hold_lock` takes an OS file lock (``flock``) on ``<dir>/.gsgd.lock`` for the life of a
block: one writer per run directory. The OS drops the lock when its process dies, so a killed
run never blocks the next one.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from gsgd._process import stale_entries

__all__ = [
    "LOCK_NAME",
    "TEMP_NAME",
    "DamagedRunFile",
    "DirectoryBusy",
    "ForeignDirectoryError",
    "append_json_line",
    "atomic_open",
    "atomic_write_text",
    "hold_lock",
    "read_json",
    "remove_stale_temp_files",
]

LOCK_NAME = ".gsgd.lock"
TEMP_NAME = re.compile(r"\.(?P<name>.+)\.tmp(?P<pid>[0-9]{1,10})")  # atomic_open's temp files


class DirectoryBusy(RuntimeError):
    """Another live process holds the lock of a run or experiment directory."""


class ForeignDirectoryError(RuntimeError):
    """A directory the runner would write into, or clear, is not one it made."""


class DamagedRunFile(RuntimeError):
    """A file the runner wrote (spec.json, final.json, checkpoint.pt) cannot be read back; the
    message names it and what to do."""


def read_json(path: Path) -> Any:
    """The JSON document in ``path``; :class:`DamagedRunFile` naming it when it is not JSON."""
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DamagedRunFile(
            f"{path} is damaged (not JSON: {exc}); delete it (and the run's other files, or "
            "rerun with --no-resume) to train that run again") from None


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


def remove_stale_temp_files(directory: Path) -> list[Path]:
    """Remove the ``.<name>.tmp<PID>`` files of :func:`atomic_open` in ``directory`` whose PID is
    not alive (a killed writer's); other files, directories and links are kept. Returns them."""
    removed = []
    for path in stale_entries(directory, TEMP_NAME):
        if path.is_file() and not path.is_symlink():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _holder(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return ""
    return f" (pid {text})" if text.isdigit() else ""


@contextmanager
def hold_lock(directory: Path, shared: bool = False) -> Iterator[None]:
    """Hold an exclusive (or ``shared``) ``flock`` on ``directory/.gsgd.lock`` for the block.

    Fails at once with :class:`DirectoryBusy`, naming the directory, when a live process holds a
    conflicting lock. An exclusive holder writes its PID into the file (for that message).
    """
    directory = Path(directory)
    path = directory / LOCK_NAME
    for attempt in range(100):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except FileNotFoundError:
            if not attempt:
                raise
            raise DirectoryBusy(f"{directory} was removed by another process while this one "
                                "was locking it; run again") from None
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _holder(fd)
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise DirectoryBusy(
                f"{directory} is in use by another gsgd process{holder}: wait for it to "
                "finish (a rerun then resumes or skips its runs), or use another --out"
            ) from None
        try:  # the file may have been removed (a dry run's clear) between open and flock
            st, held = os.stat(path), os.fstat(fd)
            same = (st.st_dev, st.st_ino) == (held.st_dev, held.st_ino)
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    else:
        raise DirectoryBusy(f"{directory}: could not lock {path} (it keeps being replaced)")
    try:
        if not shared:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock
