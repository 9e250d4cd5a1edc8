"""Tests for the ``gsgd`` command line: run, compare, sweep, report, summary, demo, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gsgd.cli import demo_config, main
from gsgd.experiments.config import load_config

TINY = """\
# tiny digits comparison for the CLI tests (seconds)
[experiment]
name = "tiny"
dataset = "digits"
seeds = [0, 1]
epochs = 1
batch_size = 128
threads = 1

[model]
widths = [64, 16, 16, 10]
bias = false

[[optimizers]]
name = "gsgd"
lr = 0.05
sweep = [0.00001, 0.05]

[[optimizers]]
name = "sgd"
lr = 0.05
"""




@pytest.fixture
def tiny(tmp_path) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY)
    return path


def test_run_prints_the_table_and_where_the_plot_is(tiny, tmp_path, capsys):
    assert main(["run", str(tiny), "--out", str(tmp_path / "runs"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "| G-SGD |" in out and "| SGD |" in out and "G-SGD − SGD" in out
    exp = tmp_path / "runs" / "tiny"
    assert f"Plot:   {exp / 'curves.png'}" in out
    assert (exp / "curves.png").exists()
    for label in ("G-SGD", "SGD"):
        for seed in (0, 1):
            run = exp / label / f"seed{seed}"
            assert {"metrics.jsonl", "checkpoint.pt", "final.json", "spec.json"} <= {
                p.name for p in run.iterdir()}
    # one line per epoch is logged even without progress bars
    assert "G-SGD seed1 epoch 1/1" in out


def test_run_overrides_seeds_and_epochs(tiny, tmp_path):
    out = tmp_path / "runs"
    assert main(["run", str(tiny), "--out", str(out), "--quiet", "--seeds", "3",
                 "--epochs", "2"]) == 0
    final = json.loads((out / "tiny" / "SGD" / "seed3" / "final.json").read_text())
    assert final["epochs"] == 2
    assert not (out / "tiny" / "SGD" / "seed0").exists()


@pytest.mark.parametrize("text,expected", [
    ("[experiment]\nname = 'x'\ndataset = 'digits'\nbatchsize = 3\n",
     ["[experiment]", "'batchsize'", "allowed keys:", "batch_size"]),
    ("[experiment]\nname = 'x'\ndataset = 'digits'\n[model]\nwidths = [64, 10]\n"
     "[[optimizers]]\nname = 'sgd'\nlr = 0.1\nlr_schedule = 'cosine'\n",
     ["[optimizers #1 (sgd)]", "lr_schedule = 'cosine'", "'constant', 'exp', 'step'"]),
])
def test_bad_config_exits_2_with_a_clear_message(tmp_path, capsys, text, expected):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    assert main(["run", str(path), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err
    for piece in expected:
        assert piece in err


def test_report_rebuilds_the_report_from_the_results(tiny, tmp_path, capsys):
    out = tmp_path / "runs"
    main(["run", str(tiny), "--out", str(out), "--quiet", "--seeds", "0"])
    report = out / "tiny" / "report.md"
    text = report.read_text()
    report.unlink()
    (out / "tiny" / "curves.png").unlink()
    capsys.readouterr()
    assert main(["report", str(out / "tiny")]) == 0
    assert report.read_text() == text and (out / "tiny" / "curves.png").exists()
    assert main(["report", str(tmp_path / "missing")]) == 2


def test_compare_runs_an_adhoc_comparison(tmp_path, capsys):
    args = ["compare", "--dataset", "digits", "--widths", "64,16,10", "--optimizers",
            "gsgd,sgd,adam", "--lr", "0.05,0.05,0.001", "--epochs", "1", "--seeds", "0",
            "--out", str(tmp_path), "--quiet", "--batch-size", "256"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "| Adam | 0.001 |" in out and "Adam − SGD" in out
    assert (tmp_path / "compare-digits-mlp" / "report.md").exists()


def test_compare_offers_gadam_and_the_pathcond_init(tmp_path, capsys):
    args = ["compare", "--dataset", "digits", "--widths", "64,16,10", "--optimizers",
            "sgd,gadam", "--lr", "0.05,0.001", "--epochs", "1", "--seeds", "0", "--pathcond",
            "--out", str(tmp_path), "--quiet", "--batch-size", "256"]
    assert main(args) == 0
    assert "| G-Adam | 0.001 |" in capsys.readouterr().out
    for label in ("SGD", "G-Adam"):
        final = json.loads((tmp_path / "compare-digits-mlp" / label / "seed0" /
                            "final.json").read_text())
        assert final["status"] == "finished" and final["pathcond"]["sweeps"] > 0


@pytest.mark.parametrize("args,expected", [
    (["--optimizers", "gsgd,rmsprop"], "unknown ['rmsprop']"),
    (["--optimizers", "gsgd,sgd", "--lr", "0.1,0.2,0.3"], "one lr or one per optimizer"),
    (["--widths", "100,10"], "widths[0] = 64"),
])
def test_compare_refuses_bad_arguments(tmp_path, capsys, args, expected):
    assert main(["compare", "--dataset", "digits", "--out", str(tmp_path), *args]) == 2
    assert expected in capsys.readouterr().err


def test_sweep_writes_a_report_and_a_tuned_config_ready_for_run(tiny, tmp_path, capsys):
    out = tmp_path / "runs"
    assert main(["sweep", str(tiny), "--out", str(out), "--quiet", "--seeds", "0"]) == 0
    printed = capsys.readouterr().out
    tuned = out / "tiny-sweep" / "tiny-tuned.toml"
    assert f"gsgd run {tuned}" in printed
    cfg = load_config(tuned)
    assert cfg.optimizer("G-SGD").lr == 0.05 and cfg.optimizer("G-SGD").sweep == ()
    assert cfg.optimizer("SGD").lr == 0.05
    assert cfg.experiment.name == "tiny-tuned"


def test_a_sweep_shortened_by_epochs_writes_tuned_configs_with_the_presets_epochs(
        tiny, tmp_path, capsys):
    preset = tmp_path / "long.toml"
    preset.write_text(TINY.replace("epochs = 1", "epochs = 7"))
    out = tmp_path / "runs"
    assert main(["sweep", str(preset), "--out", str(out), "--quiet", "--seeds", "0",
                 "--epochs", "1"]) == 0
    capsys.readouterr()
    logs = list((out / "tiny-sweep").rglob("metrics.jsonl"))
    assert logs and all(len(p.read_text().splitlines()) == 1 for p in logs)  # swept 1 epoch
    tuned = out / "tiny-sweep" / "tiny-tuned.toml"
    assert load_config(tuned).experiment.epochs == 7
    assert "The sweep trained 1 epoch; this config trains 7." in tuned.read_text()


def test_dry_run_with_synthetic_data_is_labelled(tiny, tmp_path, capsys):
    assert main(["run", str(tiny), "--out", str(tmp_path), "--dry-run", "--data", "synthetic",
                 "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "DRY RUN" in out and "SYNTHETIC" in out
    exp = tmp_path / "dry-run" / "tiny"
    assert "SYNTHETIC" in (exp / "report.md").read_text()
    lines = (exp / "G-SGD" / "seed0" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1  # one epoch
    assert not (exp / "G-SGD" / "seed1").exists()  # first seed only


def test_summary_prints_the_g_structure(tiny, capsys):
    assert main(["summary", "--widths", "784,64,64,10"]) == 0
    out = capsys.readouterr().out.lower()
    assert "784-64-64-10" in out or "64" in out
    assert "block" in out
    assert main(["summary", str(tiny)]) == 0
    assert "block" in capsys.readouterr().out.lower()


def test_demo_is_the_papers_mnist_setting_with_same_lr_for_both():
    cfg = demo_config()
    assert cfg.experiment.dataset == "mnist" and cfg.experiment.batch_size == 64
    assert cfg.model.widths == (784, 64, 64, 64, 64, 10) and cfg.model.bias is False
    assert cfg.init.skeleton and cfg.experiment.seeds == (0, 1, 2)
    gsgd, sgd = cfg.optimizers
    assert (gsgd.name, sgd.name) == ("gsgd", "sgd")
    assert gsgd.lr == sgd.lr == 0.1 and gsgd.lr_schedule == sgd.lr_schedule == "exp"
    assert gsgd.gamma == sgd.gamma == 0.01


def test_demo_dry_run_prints_table_and_plot_path(tmp_path, capsys):
    """The demo's code path on 3 batches (MNIST, or labelled synthetic data if unavailable)."""
    assert main(["demo", "--out", str(tmp_path), "--dry-run", "--quiet", "--jobs", "1"]) == 0
    out = capsys.readouterr().out
    assert "| G-SGD |" in out and "| SGD |" in out
    assert f"Plot:   {tmp_path / 'dry-run' / 'demo' / 'curves.png'}" in out
