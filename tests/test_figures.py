"""``gsgd figures``: the paired gap of a metric against a model property (depth, H/m, width) over
experiment directories. The numbers plotted are recomputed here from the runs' final.json
(per-seed differences, their mean and t-interval), and bad input gets a one-line error."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from gsgd.cli import main
from gsgd.experiments.config import config_from_dict
from gsgd.experiments.datasets import ExperimentData, synthetic_splits
from gsgd.experiments.figures import experiment_dirs_under, gap_points
from gsgd.experiments.runner import RunOptions, run_experiment
from gsgd.experiments.stats import t_quantile

CONFIG = {
    "experiment": {"name": "g", "dataset": "digits", "epochs": 1, "batch_size": 32,
                   "seeds": [0, 1, 2]},
    "model": {"widths": [[64, 8, 10], [64, 8, 8, 8, 10]], "bias": False},
    "optimizers": [{"name": "gsgd", "lr": 0.1, "compile": False}, {"name": "sgd", "lr": 0.1}],
}


@pytest.fixture(scope="module")
def group(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("figures")
    splits = synthetic_splits((1, 8, 8), 10, n_train=128, n_val=32, n_test=64,
                              stands_for="digits")
    data = ExperimentData(splits, True, "SYNTHETIC data of digits's shape (requested)")
    run_experiment(config_from_dict(CONFIG), out, RunOptions(log=None), data=data)
    return out / "g"


def final_acc(exp_dir: Path, label: str, seed: int) -> float:
    return json.loads((exp_dir / label / f"seed{seed}" / "final.json").read_text()
                      )["final"]["test_acc"]


def test_each_point_is_the_mean_and_t_interval_of_the_per_seed_differences(group):
    dirs = experiment_dirs_under([group])
    assert [d.name for d in dirs] == ["64-8-10", "64-8-8-8-10"]
    points = gap_points(dirs, "depth")
    assert [(p.x, p.label, p.baseline, p.n) for p in points] == [
        (1.0, "G-SGD", "SGD", 3), (3.0, "G-SGD", "SGD", 3)]
    for p, d in zip(points, dirs, strict=True):
        diffs = [100 * (final_acc(d, "G-SGD", s) - final_acc(d, "SGD", s)) for s in (0, 1, 2)]
        half = t_quantile(0.975, 2) * statistics.stdev(diffs) / 3 ** 0.5
        assert p.mean == pytest.approx(statistics.mean(diffs), abs=1e-9)
        assert (p.low, p.high) == pytest.approx((p.mean - half, p.mean + half), abs=1e-9)
        assert p.better == sum(x > 0 for x in diffs) and p.worse == sum(x < 0 for x in diffs)


def test_the_invariant_ratio_axis_is_h_over_m_of_the_g_structure(group):
    points = gap_points(experiment_dirs_under([group]), "H_over_m")
    # counted by hand: 64-8-10: m = 512 + 80, H = 8; 64-8-8-8-10: m = 512 + 64 + 64 + 80, H = 24
    assert [p.x for p in points] == [8 / 592, 24 / 720]


def test_the_command_writes_the_plot_and_the_table_and_names_the_baseline(group, tmp_path,
                                                                          capsys):
    out = tmp_path / "fig" / "gap.png"
    assert main(["figures", str(group), "--x", "depth", "--out", str(out),
                 "--baseline", "G-SGD"]) == 0
    printed = capsys.readouterr().out
    assert out.is_file() and out.stat().st_size > 0
    table = out.with_suffix(".md").read_text()
    assert "| 1 | SGD − G-SGD |" in table and "| 3 | SGD − G-SGD |" in table
    assert table.strip() in printed


@pytest.mark.parametrize(("args", "expected"), [
    (["--x", "depth", "--out", "x.svg"], "--out x.svg: give a .png path"),
    (["--x", "depth", "--metric", "val_loss"], "--metric 'val_loss': the runs record"),
    (["--x", "depth", "--baseline", "Adam"], "report baseline 'Adam': no optimizer"),
])
def test_bad_input_is_one_line_naming_the_flag(group, tmp_path, capsys, args, expected):
    argv = ["figures", str(group), "--out", str(tmp_path / "g.png")] + args
    if "--out" in args:
        argv = ["figures", str(group)] + args
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and "\n" not in err and "Traceback" not in err


def test_a_directory_without_experiments_is_refused(tmp_path, capsys):
    assert main(["figures", str(tmp_path), "--x", "depth", "--out", str(tmp_path / "g.png")]) == 2
    assert "not an experiment directory" in capsys.readouterr().err
