"""Numbers that mean what they say (issue 11, items 5-9 and 12): the recorded train loss is the
mean of the minibatch losses optimised (also across a kill + resume), nothing is selected on the
test split, paired gaps carry t-intervals and n, diverged runs are not averaged, runs at chance
are flagged, every report names its data and the epochs run; on_nonfinite in configs, sweep
seeds disjoint from evaluation seeds, ``sweep --jobs``; the paired gaps of three metrics with
sign counts, the per-run clip counters and ``summary.json``; sweep widening until the choice is
interior. Tiny digits runs, run directories written by hand where the report's arithmetic is
checked, or sweeps whose training is a known function of the lr."""

from __future__ import annotations

import json
import math
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gsgd.cli import main
from gsgd.data import Split
from gsgd.experiments import runner, sweep
from gsgd.experiments.config import ConfigError, config_from_dict, load_config, sweep_seeds
from gsgd.experiments.datasets import ExperimentData, load_experiment_data, synthetic_splits
from gsgd.experiments.files import LOCK_NAME
from gsgd.experiments.optimizers import build_optimizer
from gsgd.experiments.report import load_runs, plot_curves, summarize, write_report
from gsgd.experiments.runner import (
    RunInterrupted,
    RunOptions,
    evaluate,
    prepare_model,
    run_experiment,
    train_run,
)
from gsgd.experiments.stats import t_interval, t_quantile
from gsgd.experiments.sweep import open_edges, run_sweep, widen_grid

QUIET = RunOptions(log=None)
PER_EPOCH = 10  # 320 training examples in batches of 32


def digits_config(optimizers=None, epochs=2, seeds=(0,), **exp):
    return config_from_dict({
        "experiment": {"name": "t", "dataset": "digits", "seeds": list(seeds), "epochs": epochs,
                       "batch_size": 32, "checkpoint_every": 4, "train_eval_size": 300,
                       **exp},
        "model": {"kind": "mlp", "widths": [64, 24, 24, 10], "bias": True},
        "optimizers": optimizers or [{"name": "gsgd", "lr": 0.05, "momentum": 0.9}],
    })


@pytest.fixture(scope="module")
def small() -> ExperimentData:
    """Real digits, cut to 320 train / 96 val / 96 test examples."""
    full = load_experiment_data(digits_config().experiment).splits
    return ExperimentData(replace(full, train=Split(full.train.x[:320], full.train.y[:320]),
                                  val=Split(full.val.x[:96], full.val.y[:96]),
                                  test=Split(full.test.x[:96], full.test.y[:96])))


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def seen_losses(monkeypatch) -> list[float]:
    """The value of every training loss the runner computes (cross-entropy with grad on; the
    evaluations run under no_grad), in order."""
    seen: list[float] = []
    real = F.cross_entropy

    def recording(*args, **kwargs):
        loss = real(*args, **kwargs)
        if torch.is_grad_enabled():
            seen.append(float(loss.detach()))
        return loss

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", recording)
    return seen


def epoch_means(losses: list[float]) -> list[float]:
    return [sum(losses[i:i + PER_EPOCH]) / PER_EPOCH for i in range(0, len(losses), PER_EPOCH)]


# --------------------------------------------------------------------------- 5: train loss


def test_train_loss_is_the_mean_of_the_minibatch_losses_optimised(tmp_path, small,
                                                                   seen_losses):
    config = digits_config()
    spec = config.optimizers[0]
    train_run(config, spec, 0, tmp_path, small.splits, QUIET)
    lines = read_metrics(tmp_path)
    assert len(seen_losses) == 2 * PER_EPOCH
    assert [x["train_loss"] for x in lines] == pytest.approx(epoch_means(seen_losses),
                                                             rel=1e-12)
    # the eval-mode loss on the train subset has its own name, and is what evaluate() gives
    model, _ = prepare_model(config, 0, small.splits)
    model.load_state_dict(torch.load(tmp_path / "checkpoint.pt", weights_only=True)["model"])
    x, y = small.splits.train.x[:300], small.splits.train.y[:300]
    assert (lines[-1]["train_eval_loss"], lines[-1]["train_eval_acc"]) == pytest.approx(
        evaluate(model, x, y, 1000), rel=1e-6)
    assert lines[-1]["train_eval_loss"] != pytest.approx(lines[-1]["train_loss"], rel=1e-3)


@pytest.mark.parametrize("stop_after", [6, 17])  # inside epoch 1 / inside epoch 2
def test_train_loss_stays_the_minibatch_mean_across_a_kill_and_resume(tmp_path, small,
                                                                      seen_losses, stop_after):
    config = digits_config()
    spec = config.optimizers[0]
    with pytest.raises(RunInterrupted):
        train_run(config, spec, 0, tmp_path, small.splits,
                  replace(QUIET, stop_after_batches=stop_after))
    before = list(seen_losses)
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    resumed_at = ckpt["epoch"] * PER_EPOCH + ckpt["batch"]  # the last checkpoint: replayed after
    assert 0 < resumed_at < stop_after
    seen_losses.clear()
    train_run(config, spec, 0, tmp_path, small.splits, QUIET)
    optimised = before[:resumed_at] + seen_losses  # the losses the final model's steps took
    assert seen_losses[:stop_after - resumed_at] == before[resumed_at:]  # the same batches
    assert [x["train_loss"] for x in read_metrics(tmp_path)] == pytest.approx(
        epoch_means(optimised), rel=1e-12)


# --------------------------------------------------------------------------- hand-made runs


def epoch(e: int, val: float, test: float, loss: float = 0.5, **more) -> dict:
    return {"epoch": e, "lr": 0.1, "train_loss": loss, "time": 1.0, "train_eval_loss": loss,
            "train_eval_acc": val, "val_loss": loss, "val_acc": val, "test_loss": loss,
            "test_acc": test, **more}


def fake_experiment(exp_dir: Path, runs: dict[tuple[str, int], list[dict]], epochs: int = 3,
                    synthetic: bool = False, description: str = "", unfinished: tuple = (),
                    **config_exp) -> Path:
    """An experiment directory as the runner writes it: experiment.json, and per run spec.json,
    metrics.jsonl and (unless the run is ``unfinished``) final.json."""
    labels = list(dict.fromkeys(label for label, _ in runs))
    exp_dir.mkdir(parents=True)
    (exp_dir / "experiment.json").write_text(json.dumps({
        "name": exp_dir.name, "dataset": "digits", "data": "digits", "synthetic": synthetic,
        "note": "SYNTHETIC data of digits's shape (requested)" if synthetic else "",
        "description": description, "labels": labels,
        "config": {"experiment": {"name": exp_dir.name, "dataset": "digits", "epochs": epochs,
                                  **config_exp}}}))
    for (label, seed), history in runs.items():
        d = exp_dir / label / f"seed{seed}"
        d.mkdir(parents=True)
        name = "sgd" if label.startswith("SGD") else "gsgd"
        (d / "spec.json").write_text(json.dumps({"optimizer": {"name": name, "lr": 0.1},
                                                 "seed": seed}))
        (d / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
        diverged = [h for h in history if h.get("diverged")]
        if (label, seed) in unfinished:
            continue
        (d / "final.json").write_text(json.dumps({
            "lr": "0.1", "status": "diverged" if diverged else "finished",
            "reason": diverged[0]["reason"] if diverged else None}))
    return exp_dir


def table_row(text: str, label: str) -> list[str]:
    (row,) = [line for line in text.splitlines() if line.startswith(f"| {label} |")]
    return [c.strip() for c in row.strip("|").split("|")]


def test_no_column_is_selected_on_test_and_test_acc_at_best_val_is_reported(tmp_path):
    history = [epoch(1, 0.5, 0.5), epoch(2, 0.8, 0.6), epoch(3, 0.7, 0.9), epoch(4, 0.6, 0.7)]
    exp = fake_experiment(tmp_path / "e", {("SGD", 0): history}, epochs=4)
    text = write_report(exp).read_text()
    header = table_row(text, "optimizer")
    assert not any("best test" in h for h in header)
    row = dict(zip(header, table_row(text, "SGD"), strict=True))
    assert row["final test acc"] == "70.00"  # the last epoch
    assert row["test acc at best val"] == "60.00"  # epoch 2: highest val accuracy
    assert "90.00" not in text  # the highest test accuracy is no number of the report


def test_final_json_has_the_test_acc_at_the_best_val_epoch_and_no_best_test(tmp_path, small):
    config = digits_config(epochs=2)
    spec = config.optimizers[0]
    final = train_run(config, spec, 0, tmp_path, small.splits, QUIET)
    assert "best_test_acc" not in final and "test_acc_at_best_val" in final
    history = [epoch(1, 0.5, 0.5), epoch(2, 0.8, 0.6), epoch(3, 0.7, 0.9), epoch(4, 0.8, 0.7)]
    final = runner._final_summary(history, "G-SGD", spec, 0, 4)
    assert (final["best_val_epoch"], final["test_acc_at_best_val"]) == (2, 0.6)  # first best
    assert final["final"]["test_acc"] == 0.7 and "best_test_acc" not in final


def test_metrics_of_the_earlier_runner_are_read_with_the_eval_loss_under_its_own_name(
        tmp_path):
    """Earlier runners overwrote train_loss with the eval-mode loss where they evaluated (those
    records have train_acc); an epoch without evaluation kept its minibatch mean."""
    old = [{"epoch": 1, "lr": 0.1, "train_loss": 0.9, "time": 1.0},  # eval_every = 2
           {"epoch": 2, "lr": 0.1, "train_loss": 0.25, "train_acc": 0.9, "val_acc": 0.8,
            "val_loss": 0.4, "test_acc": 0.7, "test_loss": 0.5, "time": 1.0}]
    exp = fake_experiment(tmp_path / "e", {("SGD", 0): old}, epochs=2)
    (run,) = load_runs(exp)
    assert run.history[0] == old[0]
    assert run.history[1]["train_eval_loss"] == 0.25 and "train_loss" not in run.history[1]
    assert run.history[1]["train_eval_acc"] == 0.9
    text = write_report(exp).read_text()
    row = dict(zip(table_row(text, "optimizer"), table_row(text, "SGD"), strict=True))
    assert (row["final train loss"], row["final train-eval loss"]) == ("-", "0.2500")
    assert "train loss (mean minibatch loss) was not recorded for 1 run(s)" in text


# --------------------------------------------------------------------------- 7: statistics

# two-sided 95 % (and other) critical values of Student's t, from the printed tables
T_TABLE = [(0.975, 1, 12.706), (0.975, 2, 4.303), (0.975, 3, 3.182), (0.975, 4, 2.776),
           (0.975, 5, 2.571), (0.975, 9, 2.262), (0.975, 10, 2.228), (0.975, 20, 2.086),
           (0.975, 30, 2.042), (0.975, 60, 2.000), (0.975, 120, 1.980), (0.995, 1, 63.657),
           (0.995, 10, 3.169), (0.9, 5, 1.476), (0.95, 7, 1.895), (0.025, 4, -2.776)]


@pytest.mark.parametrize("p,df,expected", T_TABLE)
def test_t_quantile_matches_the_printed_t_table(p, df, expected):
    assert t_quantile(p, df) == pytest.approx(expected, abs=6e-4)


def test_t_quantile_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in (*range(1, 41), 75, 500):
        for p in (0.6, 0.9, 0.95, 0.975, 0.995, 0.9995, 0.01):
            assert t_quantile(p, df) == pytest.approx(stats.t.ppf(p, df), rel=1e-8), (p, df)


def test_t_interval_of_three_values():
    iv = t_interval([1.0, 2.0, 4.0])
    sd = math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2)
    half = 4.302653 * sd / math.sqrt(3)
    assert (iv.n, iv.mean, iv.sd) == (3, pytest.approx(7 / 3), pytest.approx(sd))
    assert (iv.low, iv.high) == (pytest.approx(7 / 3 - half), pytest.approx(7 / 3 + half))
    assert t_interval([2.0]).low is None


def test_gaps_are_paired_with_a_t_interval_and_n_and_last_k_averages_the_last_epochs(
        tmp_path, capsys):
    sgd = {s: [epoch(1, 0.5, 0.50), epoch(2, 0.5, 0.60), epoch(3, 0.5, 0.70)] for s in (0, 1, 2)}
    gsgd = {s: [epoch(1, 0.5, 0.50), epoch(2, 0.5, 0.60 + d), epoch(3, 0.5, 0.70 + d)]
            for s, d in ((0, 0.01), (1, 0.02), (2, 0.04))}
    runs = {("G-SGD", s): h for s, h in gsgd.items()} | {("SGD", s): h for s, h in sgd.items()}
    runs[("SGD", 3)] = sgd[0]  # no G-SGD partner: not in the gap
    exp = fake_experiment(tmp_path / "e", runs)
    text = write_report(exp).read_text()
    gap = ("| G-SGD − SGD | final test acc (pp; higher is better) | +2.33 | [-1.46, +6.13] "
           "| 1.53 | 3 |")
    assert gap in text
    # last 2 epochs: the same differences, test acc (60 + 70) / 2 for SGD
    assert main(["report", str(exp), "--last-k", "2"]) == 0
    text = (exp / "report.md").read_text()
    assert "last-2 test acc" in text and table_row(text, "SGD")[2] == "65.00 ± 0.00"
    assert gap.replace("final", "last-2") in text
    capsys.readouterr()
    # the config's report_last_k is the default of write_report
    exp2 = fake_experiment(tmp_path / "e2", runs, report_last_k=3)
    assert table_row(write_report(exp2).read_text(), "SGD")[2] == "60.00 ± 0.00"


# --------------------------------------------------------------------------- 8: collapsed runs


def test_a_nan_final_loss_is_diverged_chance_is_flagged_and_counts_are_what_is_averaged(
        tmp_path):
    ok = [epoch(1, 0.8, 0.8), epoch(2, 0.9, 0.9)]
    nan_end = [epoch(1, 0.8, 0.8), epoch(2, 0.1, 0.1, val_loss=float("nan"))]
    at_chance = [epoch(1, 0.1, 0.1), epoch(2, 0.1, 0.11)]
    exp = fake_experiment(tmp_path / "e", {
        ("SGD", 0): ok, ("SGD", 1): ok, ("SGD", 2): nan_end,
        ("G-SGD", 0): ok, ("G-SGD", 1): at_chance}, epochs=2)
    runs = load_runs(exp)
    rows = {r.label: r for r in summarize(runs, classes=10)}
    assert rows["SGD"].n == 2 and rows["SGD"].diverged == 1
    assert rows["SGD"].values["test_acc"] == [0.9, 0.9]  # the NaN run is not averaged
    assert rows["G-SGD"].chance == [(1, 0.11)]
    text = write_report(exp).read_text()
    row = table_row(text, "SGD")
    assert row[-2:] == ["2", "2 finished, 1 diverged"]
    assert "- SGD seed 2: epoch 2: non-finite val_loss" in text
    assert "**At chance**" in text and "- G-SGD seed 1: 11.00%" in text
    drawn = plot_curves(runs, tmp_path / "c.png")
    assert "SGD (n=2; 1 diverged)" in drawn.legends[0] and "G-SGD (n=2)" in drawn.legends[0]


def test_an_all_diverged_plot_says_why_and_the_report_counts_no_run(tmp_path):
    div = [{"epoch": 1, "diverged": True, "batch": 3, "reason": "non-finite training loss nan",
            "lr": 0.1}]
    exp = fake_experiment(tmp_path / "e", {("SGD", 0): div, ("SGD", 1): div})
    text = write_report(exp).read_text()
    assert "Epochs run: none (every run diverged)" in text
    assert table_row(text, "SGD")[-2:] == ["0", "0 finished, 2 diverged"]
    drawn = plot_curves(load_runs(exp), tmp_path / "c.png")
    assert drawn.legends == [[], []]
    assert drawn.notes == ["nothing to plot: all 2 runs diverged"] * 2


def test_the_runner_records_a_nonfinite_evaluated_loss_as_diverged(tmp_path, small,
                                                                   monkeypatch):
    real = runner.evaluate
    monkeypatch.setattr(runner, "evaluate",
                        lambda *a: (float("nan"), real(*a)[1]))  # e.g. BN stats gone to NaN
    config = digits_config(epochs=3)
    final = train_run(config, config.optimizers[0], 0, tmp_path, small.splits, QUIET)
    assert final["status"] == "diverged" and "val_loss" in final["reason"]
    assert final["epochs"] == 0 and len(read_metrics(tmp_path)) == 1  # stopped after epoch 1


# --------------------------------------------------------------------------- 9: data, epochs


def test_every_report_names_the_synthetic_data_and_the_epochs_actually_run(tmp_path):
    config = config_from_dict({
        "experiment": {"name": "w", "dataset": "digits", "epochs": 1, "batch_size": 64,
                       "description": "two widths, 50 epochs"},
        "model": {"widths": [[64, 8, 10], [64, 12, 10]], "bias": False},
        "optimizers": [{"name": "gsgd", "lr": 0.05}, {"name": "sgd", "lr": 0.05}]})
    splits = synthetic_splits((1, 8, 8), 10, n_train=128, n_val=32, n_test=32,
                              stands_for="digits")
    data = ExperimentData(splits, True, "SYNTHETIC data of digits's shape (requested)")
    dirs = run_experiment(config, tmp_path, QUIET, data=data)
    for d in dirs:
        text = (d / "report.md").read_text()
        assert "**SYNTHETIC data of digits's shape" in text
        assert "Epochs run: 1 (of 1 planned)." in text
        assert "Note: the description says 50 epochs; 1 were run." in text
    summary = (tmp_path / "w" / "report.md").read_text()
    assert "**SYNTHETIC data of digits's shape" in summary
    assert table_row(summary, "64-8-10")[-2] == "1"  # epochs run
    assert table_row(summary, "variant")[-2] == "epochs run"
    # the G-structure of each variant, counted by hand: m = 64*8 + 8*10, H = 8 (no biases)
    assert table_row(summary, "variant")[1:4] == ["m", "H", "H/m"]
    assert table_row(summary, "64-8-10")[1:4] == ["592", "8", f"{8 / 592:.4f}"]
    assert table_row(summary, "64-12-10")[1:4] == ["888", "12", f"{12 / 888:.4f}"]
    info = json.loads((tmp_path / "w" / "64-12-10" / "experiment.json").read_text())
    assert info["structure"] == {"m": 888, "H": 12, "blocks": 1, "H_over_m": 12 / 888}
    # a run stopped early: the epochs it ran, not the plan
    runs = {("SGD", 0): [epoch(1, 0.5, 0.5), epoch(2, 0.6, 0.6)], ("SGD", 1): [epoch(1, 0.5, 0.5)]}
    exp = fake_experiment(tmp_path / "e", runs, epochs=5, unfinished=(("SGD", 1),))
    text = write_report(exp).read_text()
    assert "Data: digits (the real dataset)." in text
    assert "Epochs run: 1-2 (of 5 planned; 1 run(s) unfinished)." in text
    assert table_row(text, "SGD")[-3:] == ["1-2", "2", "1 finished, 1 unfinished"]


# --------------------------------------------------------------------------- 12: configs, sweep


def test_on_nonfinite_is_a_gsgd_config_key_and_an_earlier_runs_spec_still_matches(tmp_path,
                                                                                  small):
    cfg = digits_config([{"name": "gsgd", "lr": 0.05, "on_nonfinite": "skip"}])
    model, structure = prepare_model(cfg, 0, small.splits)
    opt = build_optimizer(cfg.optimizers[0], model, structure)
    assert {g["on_nonfinite"] for g in opt.param_groups} == {"skip"}
    with pytest.raises(ConfigError, match="on_nonfinite"):
        digits_config([{"name": "sgd", "lr": 0.05, "on_nonfinite": "skip"}])
    with pytest.raises(ConfigError, match="'raise', 'skip'"):
        digits_config([{"name": "gsgd", "lr": 0.05, "on_nonfinite": "ignore"}])
    spec = runner._run_spec(digits_config(), digits_config().optimizers[0], 0, "digits", QUIET)
    assert "on_nonfinite" not in spec["optimizer"]  # as in the spec.json of earlier runs
    assert runner._run_spec(cfg, cfg.optimizers[0], 0, "digits", QUIET)["optimizer"][
        "on_nonfinite"] == "skip"


def test_sweep_seeds_are_disjoint_from_the_evaluation_seeds_by_default():
    exp = digits_config(seeds=(0, 1, 2)).experiment
    assert sweep_seeds(exp) == (1000, 1001, 1002)
    assert sweep_seeds(replace(exp, seeds=(1000, 7))) == (1001, 1002)
    assert sweep_seeds(replace(exp, sweep_seeds=(5,))) == (5,)


def test_sweep_trains_on_sweep_seeds_in_worker_processes_with_jobs(tmp_path, small):
    config = digits_config([{"name": "sgd", "lr": 0.1, "sweep": [1e-5, 0.1]}], epochs=1,
                           seeds=(0,))
    result = run_sweep(config, tmp_path, replace(QUIET, jobs=2), data=small, widen=0)
    assert result.chosen == {"": {"SGD": 0.1}}
    run_dirs = sorted(tmp_path.glob("t-sweep/*/seed*"))
    assert [d.name for d in run_dirs] == ["seed1000", "seed1000"]
    writers = {int((d / LOCK_NAME).read_text()) for d in run_dirs}
    assert os.getpid() not in writers  # trained by the worker processes
    text = result.report.read_text()
    assert "sweep seeds [1000]" in text and "disjoint from the evaluation seeds [0]" in text
    assert "Data: digits (the real dataset)." in text


# --------------------------------------------------------------------------- gaps, counters

T975 = {3: 3.182446305284263, 4: 2.7764451051977987}  # t_{0.975, df}, printed tables
# (val accs, test accs, train losses) of 3 epochs per run; G-SGD seed 4 diverges in epoch 2
HAND = {
    ("SGD", 0): ([.80, .85, .84], [.79, .83, .82], [.9, .5, .40]),
    ("SGD", 1): ([.70, .90, .88], [.71, .86, .87], [.8, .6, .30]),
    ("SGD", 2): ([.81, .82, .86], [.80, .81, .84], [.7, .5, .35]),
    ("SGD", 3): ([.75, .80, .79], [.74, .78, .80], [.9, .7, .50]),
    ("SGD", 4): ([.60, .70, .80], [.61, .72, .79], [1., .8, .60]),
    ("G-SGD", 0): ([.82, .88, .86], [.80, .84, .85], [.8, .4, .30]),
    ("G-SGD", 1): ([.72, .89, .91], [.73, .85, .90], [.7, .5, .32]),
    ("G-SGD", 2): ([.86, .83, .85], [.82, .81, .84], [.6, .4, .35]),  # final test tied
    ("G-SGD", 3): ([.77, .84, .83], [.76, .80, .79], [.8, .6, .45]),
    ("G-SGD", 4): ([.65], [.66], [.9]),
    ("G-SGD-b", 0): ([.81, .86, .85], [.80, .84, .83], [.8, .5, .41]),
    ("G-SGD-b", 1): ([.71, .90, .89], [.70, .87, .88], [.8, .6, .28]),
    ("G-SGD-b", 2): ([.80, .83, .87], [.79, .80, .86], [.7, .5, .33]),
    ("G-SGD-b", 3): ([.74, .81, .80], [.73, .79, .81], [.9, .7, .52]),
    ("G-SGD-b", 4): ([.62, .71, .82], [.60, .73, .81], [1., .8, .55]),
}
DIVERGED = {"epoch": 2, "diverged": True, "batch": 3, "reason": "non-finite training loss nan",
            "lr": 0.1}


def hand_experiment(exp_dir: Path, **config_exp) -> Path:
    """:data:`HAND` as an experiment directory; G-SGD runs record the optimizer's counters."""
    runs = {}
    for (label, seed), (vals, tests, losses) in HAND.items():
        counters = {} if label == "SGD" else {"clipped": 2 * seed, "skipped_steps": seed % 2}
        runs[(label, seed)] = [epoch(e + 1, v, t, loss, **counters)
                               for e, (v, t, loss) in enumerate(zip(vals, tests, losses,
                                                                    strict=True))]
    runs[("G-SGD", 4)].append(DIVERGED)
    return fake_experiment(exp_dir, runs, **config_exp)


def brute_values(label: str, seed: int, last_k: int = 1) -> dict[str, float]:
    """The three metrics of one :data:`HAND` run, computed here by hand."""
    vals, tests, losses = HAND[(label, seed)]
    best = max(range(len(vals)), key=lambda i: (vals[i], -i))  # the first highest val acc
    return {"test_acc": sum(tests[-last_k:]) / last_k, "test_acc_at_best_val": tests[best],
            "train_loss": sum(losses[-last_k:]) / last_k}


def brute_gap(label: str, key: str, seeds: list[int], last_k: int = 1) -> dict:
    """mean, t-interval, sd and sign count of ``label`` − SGD over ``seeds``, by hand."""
    scale, higher = (1.0, False) if key == "train_loss" else (100.0, True)
    d = [scale * (brute_values(label, s, last_k)[key] - brute_values("SGD", s, last_k)[key])
         for s in seeds]
    n = len(d)
    mean = sum(d) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1))
    half = T975[n - 1] * sd / math.sqrt(n)
    better = sum(1 for x in d if (x > 0) == higher and x != 0)
    tied = d.count(0.0)
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "sd": sd, "n": n,
            "better": better, "worse": n - better - tied, "tied": tied, "seeds": seeds}


METRIC_TEXT = {"test_acc": "final test acc (pp; higher is better)",
               "test_acc_at_best_val": "test acc at best val (pp; higher is better)",
               "train_loss": "final train loss (lower is better)"}


def gap_row(text: str, label: str, metric: str) -> list[str]:
    (row,) = [line for line in text.splitlines()
              if line.startswith(f"| {label} − SGD | {metric} |")]
    return [c.strip() for c in row.strip("|").split("|")][2:]


def test_paired_gaps_of_three_metrics_with_sign_counts_match_a_brute_force_computation(
        tmp_path):
    exp = hand_experiment(tmp_path / "e")
    text = write_report(exp).read_text()
    summary = json.loads((exp / "summary.json").read_text())
    assert summary["baseline"] == "SGD" and summary["last_k"] == 1
    for label, seeds in (("G-SGD", [0, 1, 2, 3]), ("G-SGD-b", [0, 1, 2, 3, 4])):
        for key, metric in METRIC_TEXT.items():
            want = brute_gap(label, key, seeds)
            d = 4 if key == "train_loss" else 2
            assert gap_row(text, label, metric) == [
                f"{want['mean']:+.{d}f}", f"[{want['lo']:+.{d}f}, {want['hi']:+.{d}f}]",
                f"{want['sd']:.{d}f}", str(want["n"]),
                f"better in {want['better']} of {want['n']} seeds, worse in {want['worse']}, "
                f"tied {want['tied']}"], (label, key)
            got = summary["optimizers"][label]["gaps"][key]
            for k in ("mean", "lo", "hi", "sd"):
                assert got[k] == pytest.approx(want[k], rel=1e-8, abs=1e-10), (label, key, k)
            assert {k: got[k] for k in ("n", "better", "worse", "tied", "seeds")} == {
                k: want[k] for k in ("n", "better", "worse", "tied", "seeds")}
    # the hand-made values have each kind of sign: a tie, a worse seed, an all-better metric
    assert "better in 2 of 4 seeds, worse in 1, tied 1" in gap_row(
        text, "G-SGD", METRIC_TEXT["test_acc"])[-1]
    assert "lower is better" in text and "a negative gap is an improvement" in text
    # the diverged run is in no pair, and listed
    assert "Excluded from the pairs (diverged): G-SGD seed 4." in text
    assert summary["optimizers"]["G-SGD"]["gaps"]["test_acc"]["seeds"] == [0, 1, 2, 3]
    # --last-k 2: the final metrics average the last 2 epochs; test acc at best val stays
    assert main(["report", str(exp), "--last-k", "2"]) == 0
    text2 = (exp / "report.md").read_text()
    want = brute_gap("G-SGD-b", "test_acc", [0, 1, 2, 3, 4], last_k=2)
    assert gap_row(text2, "G-SGD-b", "last-2 test acc (pp; higher is better)")[0] == \
        f"{want['mean']:+.2f}"
    want = brute_gap("G-SGD-b", "train_loss", [0, 1, 2, 3, 4], last_k=2)
    assert gap_row(text2, "G-SGD-b", "last-2 train loss (lower is better)")[0] == \
        f"{want['mean']:+.4f}"
    assert gap_row(text2, "G-SGD-b", METRIC_TEXT["test_acc_at_best_val"]) == \
        gap_row(text, "G-SGD-b", METRIC_TEXT["test_acc_at_best_val"])
    assert json.loads((exp / "summary.json").read_text())["last_k"] == 2


def test_the_baseline_can_be_named_and_an_unknown_one_is_refused(tmp_path, capsys):
    exp = hand_experiment(tmp_path / "e", report_baseline="G-SGD-b")
    text = write_report(exp).read_text()
    assert "Paired gaps to G-SGD-b" in text and "| SGD − G-SGD-b |" in text
    assert "| G-SGD − SGD |" not in text
    assert json.loads((exp / "summary.json").read_text())["baseline"] == "G-SGD-b"
    assert "| G-SGD-b − G-SGD |" in write_report(exp, baseline="G-SGD").read_text()
    with pytest.raises(ConfigError, match="'Adam'.*labels: SGD, G-SGD, G-SGD-b"):
        write_report(exp, baseline="Adam")


def test_the_per_run_table_shows_each_runs_clip_counter_and_skipped_steps(tmp_path):
    exp = hand_experiment(tmp_path / "e")
    text = write_report(exp).read_text()
    assert "| seed | optimizer | status | epochs | clipped | skipped steps |" in text
    rows = [line for line in text.splitlines()
            if line.startswith("| ") and line.split("|")[1].strip().isdigit()]
    assert rows[:3] == ["| 0 | SGD | finished | 3 | - | - |",  # by seed: the pairs together
                        "| 0 | G-SGD | finished | 3 | 0 | 0 |",
                        "| 0 | G-SGD-b | finished | 3 | 0 | 0 |"]
    assert len(rows) == len(HAND) and "| 3 | G-SGD-b | finished | 3 | 6 | 1 |" in rows
    # the diverged run: its counters at the last epoch that recorded them, its 1 epoch
    assert "| 4 | G-SGD | diverged | 1 | 8 | 0 |" in rows
    runs = json.loads((exp / "summary.json").read_text())["optimizers"]["G-SGD"]["runs"]
    assert runs[4] == {"seed": 4, "status": "diverged", "epochs": 1, "clipped": 8,
                       "skipped_steps": 0}
    # the counters are cumulative: the last recorded value, not a sum over epochs
    grown = [epoch(1, .5, .5, clipped=3), epoch(2, .6, .6, clipped=7), epoch(3, .7, .7)]
    exp2 = fake_experiment(tmp_path / "e2", {("G-SGD", 0): grown}, unfinished=(("G-SGD", 0),))
    assert "| 0 | G-SGD | unfinished | 3 | 7 | - |" in write_report(exp2).read_text()


def test_summary_json_has_the_tables_numbers_sorted_and_is_rewritten_the_same(tmp_path):
    exp = hand_experiment(tmp_path / "e")
    write_report(exp)
    raw = (exp / "summary.json").read_text()
    summary = json.loads(raw)
    assert raw == json.dumps(summary, indent=1, sort_keys=True) + "\n"  # sorted keys
    sgd = summary["optimizers"]["SGD"]
    assert set(summary["optimizers"]) == {"SGD", "G-SGD", "G-SGD-b"}
    assert sgd["gaps"] == {} and (sgd["n"], sgd["seeds"]) == (5, [0, 1, 2, 3, 4])
    assert (summary["optimizers"]["G-SGD"]["n"], summary["optimizers"]["G-SGD"]["diverged"]) \
        == (4, 1)
    for key in ("test_acc", "test_acc_at_best_val", "train_loss"):
        scale = 1.0 if key == "train_loss" else 100.0
        values = [scale * brute_values("SGD", s)[key] for s in range(5)]
        mean = sum(values) / 5
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / 4)
        assert sgd["columns"][key] == {"mean": pytest.approx(mean, rel=1e-9),
                                       "std": pytest.approx(std, rel=1e-8), "n": 5}
    assert set(sgd["columns"]) == {"test_acc", "test_acc_at_best_val", "val_acc", "train_loss",
                                   "train_eval_loss", "time"}
    # the report's table cites the same numbers
    assert table_row((exp / "report.md").read_text(), "SGD")[2] == \
        f"{sgd['columns']['test_acc']['mean']:.2f} ± {sgd['columns']['test_acc']['std']:.2f}"
    write_report(exp)
    assert (exp / "summary.json").read_text() == raw
    assert not list(exp.glob(".*tmp*"))


def test_a_sweep_directory_reports_the_gaps_of_the_metrics_it_has(tmp_path):
    """No test split evaluated: the gap of the final val accuracy and of the train loss."""
    runs = {(label, s): [{k: v for k, v in epoch(1, 0.5 + d * s, 0.0, 0.5 - d).items()
                          if not k.startswith("test")}]
            for label, d in (("SGD@lr=0.1", 0.0), ("SGD@lr=0.3", 0.01)) for s in (0, 1, 2)}
    exp = fake_experiment(tmp_path / "e", runs, epochs=1)
    text = write_report(exp).read_text()
    metrics = [line.split("|")[2].strip() for line in text.splitlines()
               if line.startswith("| SGD@lr=0.3 − SGD@lr=0.1 |")]
    assert metrics == ["final val acc (pp; higher is better)",
                       "final train loss (lower is better)"]
    assert "better in 2 of 3 seeds, worse in 0, tied 1" in text  # val acc, seed 0 tied
    assert "better in 3 of 3 seeds, worse in 0, tied 0" in text  # train loss
    gaps = json.loads((exp / "summary.json").read_text())["optimizers"]["SGD@lr=0.3"]["gaps"]
    assert set(gaps) == {"val_acc", "train_loss"}
    assert gaps["train_loss"]["mean"] == pytest.approx(-0.01)


# --------------------------------------------------------------------------- sweep widening


def peaked(lr: float, peak: float = 0.1) -> float:
    """A validation accuracy that falls off with |log10(lr / peak)|."""
    return 0.9 - 0.1 * abs(math.log10(lr / peak))


@pytest.fixture
def fake_training(monkeypatch):
    """Sweep training replaced by a known function of the lr: ``trained`` lists the lrs of each
    round's runs; ``diverge_above`` makes larger lrs diverge."""
    class Fake:
        trained: list[list[float]] = []
        diverge_above = math.inf
        peak = 0.1

        def __call__(self, tasks, options, data, given=None):
            self.trained.append(sorted({spec.lr for _, spec, _, _ in tasks}))
            return [{"status": "finished",
                     "final": {"val_acc": peaked(spec.lr, self.peak) + 1e-3 * seed,
                               "train_loss": 1.0}} if spec.lr <= self.diverge_above
                    else {"status": "diverged", "final": None}
                    for _, spec, seed, _ in tasks]
    fake = Fake()
    fake.trained = []
    monkeypatch.setattr(sweep, "run_tasks", fake)
    return fake


def sgd_sweep(lrs: list[float]):
    return digits_config([{"name": "sgd", "lr": 0.1, "sweep": lrs}], epochs=1, seeds=(0, 1))


@pytest.mark.parametrize("lrs,peak,widen,grid,best,trained", [
    ([0.01, 0.03], 0.1, 2, (0.01, 0.03, 0.09, 0.27), 0.09,
     [[0.01, 0.03], [0.09], [0.27]]),  # at the top: widened upwards twice
    ([1.0, 3.0], 0.1, 3, (0.037037, 0.111111, 0.333333, 1.0, 3.0), 0.111111,
     [[1.0, 3.0], [0.333333], [0.111111], [0.037037]]),  # at the bottom: downwards
    ([0.1], 0.1, 2, (0.0316228, 0.1, 0.316228), 0.1,
     [[0.1], [0.0316228, 0.316228]]),  # one lr: both sides by sqrt(10), then interior
])
def test_a_choice_at_the_edge_widens_the_grid_until_it_is_interior(
        tmp_path, small, fake_training, lrs, peak, widen, grid, best, trained):
    fake_training.peak = peak
    result = run_sweep(sgd_sweep(lrs), tmp_path, QUIET, data=small, widen=widen)
    choice = result.choices[""]["SGD"]
    assert (choice.grid, choice.lr, choice.interior) == (grid, best, True)
    assert result.chosen == {"": {"SGD": best}}
    assert fake_training.trained == trained  # every lr trained once, on both sweep seeds
    assert all(len(choice.scores[lr]) == 2 for lr in grid)
    text = result.report.read_text()
    for lr in grid:
        added = "grid" if lr in lrs else "widening"
        (row,) = [line for line in text.splitlines() if line.startswith(f"| SGD | {lr:g} |")]
        assert f"| {added}" in row and (("**yes**" in row) == (lr == best)), row
    assert f"- SGD: lr {best:g} is interior" in text and "Warning" not in text
    (tuned,) = result.configs
    assert load_config(tuned).optimizers[0].lr == best
    header = tuned.read_text().split("\n[experiment]")[0]
    assert f"SGD [{', '.join(f'{lr:g}' for lr in grid)}] -> {best:g} (interior" in header


def test_a_diverged_lr_above_the_choice_bounds_the_grid(tmp_path, small, fake_training):
    fake_training.diverge_above = 0.05
    result = run_sweep(sgd_sweep([0.01, 0.03]), tmp_path, QUIET, data=small, widen=2)
    choice = result.choices[""]["SGD"]
    assert (choice.grid, choice.lr, choice.interior) == ((0.01, 0.03, 0.09), 0.03, True)
    assert fake_training.trained == [[0.01, 0.03], [0.09]]
    assert "the lr above it, 0.09, diverged: a bound" in result.report.read_text()
    # every lr diverged: the choice is the smallest, and only the bottom widens
    inf = math.inf
    assert open_edges({0.1: [(-inf, inf)], 0.3: [(-inf, inf)]}) == ("low",)
    assert open_edges({0.1: [(-inf, inf)]}) == ("low",)
    assert open_edges({0.1: [(0.5, 1.0)]}) == ("low", "high")


def test_widen_0_keeps_the_grid_and_warns_that_the_choice_is_at_the_edge(tmp_path, small,
                                                                         fake_training):
    result = run_sweep(sgd_sweep([0.01, 0.03]), tmp_path, QUIET, data=small, widen=0)
    choice = result.choices[""]["SGD"]
    assert (choice.grid, choice.lr, choice.edges, choice.widenings) == (
        (0.01, 0.03), 0.03, ("high",), 0)
    assert fake_training.trained == [[0.01, 0.03]]
    text = result.report.read_text()
    assert "**Warning: SGD: lr 0.03 is the largest lr: at the edge of the grid after 0 " \
           "widenings**" in text
    assert "(AT THE EDGE, 0 widenings)" in result.configs[0].read_text()


def test_widen_grid_is_geometric_beyond_each_edge():
    assert widen_grid([0.03, 0.01], ["high"]) == (0.01, 0.03, 0.09)
    assert widen_grid([0.01, 0.03, 0.1], ["low"]) == (0.00333333, 0.01, 0.03, 0.1)
    assert widen_grid([0.01, 0.1], ["low", "high"]) == (0.001, 0.01, 0.1, 1.0)
    assert widen_grid([0.1], ["low", "high"]) == (0.0316228, 0.1, 0.316228)
    assert widen_grid([0.1, 0.3], []) == (0.1, 0.3)


def test_widening_reuses_the_runs_of_an_earlier_sweep(tmp_path, small):
    """Real (tiny) training: a sweep without widening, then one with: only the added lr
    trains, the runs on disk are skipped."""
    config = sgd_sweep([1e-5, 1e-4])
    first = run_sweep(config, tmp_path, QUIET, data=small, widen=0)
    assert first.choices[""]["SGD"].edges == ("high",)
    runs = sorted(tmp_path.glob("t-sweep/*/seed*/metrics.jsonl"))
    before = {p: p.stat().st_mtime_ns for p in runs}
    second = run_sweep(config, tmp_path, QUIET, data=small, widen=1)
    assert second.choices[""]["SGD"].grid == (1e-5, 1e-4, 1e-3)
    assert {p: p.stat().st_mtime_ns for p in runs} == before
    assert sorted(d.name for d in (tmp_path / "t-sweep").iterdir() if d.is_dir()) == [
        "SGD@lr=0.0001", "SGD@lr=0.001", "SGD@lr=1e-05"]
    assert second.choices[""]["SGD"].scores[1e-4] == first.choices[""]["SGD"].scores[1e-4]


def test_tiny_train_losses_are_shown_in_significant_digits_not_as_zero(tmp_path):
    runs = {("G-SGD", 0): [epoch(1, 0.9, 0.9, loss=4.0e-5)],
            ("G-SGD", 1): [epoch(1, 0.9, 0.9, loss=6.0e-5)],
            ("SGD", 0): [epoch(1, 0.9, 0.9, loss=1.0e-5)],
            ("SGD", 1): [epoch(1, 0.9, 0.9, loss=2.0e-5)]}
    text = write_report(fake_experiment(tmp_path / "e", runs, epochs=1)).read_text()
    row = table_row(text, "G-SGD")
    assert "5.00e-05 ± 1.41e-05" in row  # final train loss, not 0.0000 ± 0.0000
    gap = [line for line in text.splitlines() if "final train loss (lower" in line][0]
    assert "| +3.50e-05 |" in gap and "0.0000" not in gap
    assert table_row(text, "SGD")[3] == "90.00 ± 0.00"  # accuracies keep their two decimals


def test_a_deep_variants_tuned_name_is_a_valid_experiment_name_and_short_ones_keep_theirs():
    deep = "-".join(["784"] + ["64"] * 32 + ["10"])
    name = sweep.tuned_name("e1_depth_init", deep)
    assert name == "e1_depth_init-tuned-784-64x32-10"
    config_from_dict({"experiment": {"name": name, "dataset": "digits"},
                      "model": {"widths": [64, 8, 10]},
                      "optimizers": [{"name": "sgd", "lr": 0.1}]})  # accepted
    assert sweep.tuned_name("e1_depth_init", "784-64-64-10") == "e1_depth_init-tuned-784-64-64-10"
    assert sweep.tuned_name("e2", "") == "e2-tuned"
    assert sweep.compact_variant("49-8-8-10") == "49-8x2-10"
