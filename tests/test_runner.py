"""Tests for the experiment runner: determinism, kill + resume, skipping, divergence, reports,
lr sweeps. Small MLPs on sklearn digits (real data, loads in well under a second)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from gsgd.data import Split
from gsgd.experiments.config import RescaleSpec, config_from_dict, load_config
from gsgd.experiments.datasets import ExperimentData, load_experiment_data, synthetic_splits
from gsgd.experiments.report import load_runs, paired_gaps, summarize, write_report
from gsgd.experiments.runner import (
    RunInterrupted,
    RunOptions,
    prepare_model,
    run_dir_for,
    run_experiment,
    train_run,
)
from gsgd.experiments.sweep import choose_lr, run_sweep

QUIET = RunOptions(log=None)
TIME_KEYS = ("time", "eval_time")


def digits_config(optimizers=None, epochs=2, seeds=(0,), checkpoint_every=4, **exp):
    return config_from_dict({
        "experiment": {"name": "t", "dataset": "digits", "seeds": list(seeds), "epochs": epochs,
                       "batch_size": 32, "checkpoint_every": checkpoint_every,
                       "train_eval_size": 300, **exp},
        "model": {"kind": "mlp", "widths": [64, 24, 24, 10], "bias": True},
        "init": {"skeleton": True},
        "optimizers": optimizers or [
            {"name": "gsgd", "lr": 0.05, "momentum": 0.9, "lr_schedule": "exp", "gamma": 0.3},
            {"name": "sgd", "lr": 0.05, "momentum": 0.9}],
    })




def digits_cut(config, train: int, held: int) -> ExperimentData:
    """Real digits (``config``'s experiment), cut to ``train`` training examples and ``held``
    validation and test examples each."""
    full = load_experiment_data(config.experiment).splits
    cut = replace(full, train=Split(full.train.x[:train], full.train.y[:train]),
                  val=Split(full.val.x[:held], full.val.y[:held]),
                  test=Split(full.test.x[:held], full.test.y[:held]))
    return ExperimentData(cut)


@pytest.fixture(scope="module")
def small():
    """Real digits, cut to 320 train / 96 val / 96 test examples (10 batches of 32)."""
    return digits_cut(digits_config(), 320, 96)


@pytest.fixture(scope="module")
def digits(small):
    return small.splits


def without_time(history):
    return [{k: v for k, v in h.items() if k not in TIME_KEYS} for h in history]


def read_metrics(run_dir: Path):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def final_weights(config, spec, seed, run_dir, data):
    """Rebuild the model from the run's final checkpoint."""
    model, _ = prepare_model(config, seed, data)
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    model.load_state_dict(ckpt["model"])
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("label", ["G-SGD", "SGD"])
@pytest.mark.parametrize("stop_after", [6, 17])  # inside epoch 1 / inside epoch 2
def test_killed_then_resumed_run_ends_bit_identical_to_uninterrupted(tmp_path, digits, label,
                                                                     stop_after):
    config = digits_config()
    spec = config.optimizer(label)
    straight = tmp_path / "straight"
    final_a = train_run(config, spec, 0, straight, digits, QUIET)

    resumed = tmp_path / "resumed"
    with pytest.raises(RunInterrupted):
        train_run(config, spec, 0, resumed, digits, replace(QUIET, stop_after_batches=stop_after))
    assert not (resumed / "final.json").exists()
    final_b = train_run(config, spec, 0, resumed, digits, QUIET)

    assert without_time(read_metrics(resumed)) == without_time(read_metrics(straight))
    assert final_b["final"]["test_acc"] == final_a["final"]["test_acc"]
    assert final_b["final"]["train_loss"] == final_a["final"]["train_loss"]
    wa = final_weights(config, spec, 0, straight, digits)
    wb = final_weights(config, spec, 0, resumed, digits)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_without_restoring_batch_order_would_differ(tmp_path, digits):
    """The resume test can fail: a run whose batch-order generator restarts differs."""
    config = digits_config()
    spec = config.optimizer("G-SGD")
    a = train_run(config, spec, 0, tmp_path / "a", digits, QUIET)
    b = train_run(config, spec, 1, tmp_path / "b", digits, QUIET)  # other seed, other order
    assert a["final"]["train_loss"] != b["final"]["train_loss"]


def test_same_seed_gives_identical_runs_and_seeds_differ(tmp_path, digits):
    config = digits_config(epochs=1)
    spec = config.optimizer("SGD")
    for name, seed in (("a", 0), ("b", 0), ("c", 3)):
        train_run(config, spec, seed, tmp_path / name, digits, QUIET)
    a, b, c = (without_time(read_metrics(tmp_path / n)) for n in "abc")
    assert a == b
    assert a != c


def test_finished_run_is_skipped_on_rerun(tmp_path, digits):
    config = digits_config(epochs=1)
    spec = config.optimizer("SGD")
    first = train_run(config, spec, 0, tmp_path, digits, QUIET)
    before = (tmp_path / "metrics.jsonl").stat().st_mtime_ns
    # A rerun must return the stored summary without training (a kill would be raised otherwise).
    again = train_run(config, spec, 0, tmp_path, digits, replace(QUIET, stop_after_batches=0))
    assert again == first
    assert (tmp_path / "metrics.jsonl").stat().st_mtime_ns == before


def test_finished_run_is_extended_to_more_epochs_like_a_longer_run(tmp_path, digits):
    short, long = digits_config(epochs=1), digits_config(epochs=2)
    spec = short.optimizer("G-SGD")
    train_run(short, spec, 0, tmp_path / "x", digits, QUIET)
    extended = train_run(long, spec, 0, tmp_path / "x", digits, QUIET)
    direct = train_run(long, spec, 0, tmp_path / "y", digits, QUIET)
    assert extended["epochs"] == 2
    assert without_time(read_metrics(tmp_path / "x")) == without_time(read_metrics(tmp_path / "y"))
    assert extended["final"]["test_acc"] == direct["final"]["test_acc"]


def test_metrics_have_one_line_per_epoch_with_all_fields(tmp_path, digits):
    config = digits_config(epochs=2)
    spec = config.optimizer("G-SGD")
    with pytest.raises(RunInterrupted):
        train_run(config, spec, 0, tmp_path, digits, replace(QUIET, stop_after_batches=15))
    train_run(config, spec, 0, tmp_path, digits, QUIET)
    lines = read_metrics(tmp_path)
    assert [x["epoch"] for x in lines] == [1, 2]
    for key in ("lr", "train_loss", "train_eval_loss", "train_eval_acc", "val_acc", "test_acc",
                "val_loss", "time"):
        assert all(key in x for x in lines), key
    assert lines[1]["lr"] == pytest.approx(0.05 * torch.e ** -0.3)


def test_rerun_with_a_different_spec_is_refused(tmp_path, digits):
    config = digits_config(epochs=1)
    spec = config.optimizer("SGD")
    train_run(config, spec, 0, tmp_path, digits, QUIET)
    with pytest.raises(ValueError, match="different spec"):
        train_run(config, replace(spec, lr=0.5), 0, tmp_path, digits, QUIET)
    # --no-resume starts it over
    out = train_run(config, replace(spec, lr=0.5), 0, tmp_path, digits,
                    replace(QUIET, resume=False))
    assert out["status"] == "finished"


def test_diverged_run_is_recorded_and_the_comparison_goes_on(tmp_path, small):
    config = digits_config(
        optimizers=[{"name": "sgd", "lr": 1e12, "label": "SGD-huge"},
                    {"name": "gsgd", "lr": 1e12, "label": "GSGD-huge"},
                    {"name": "sgd", "lr": 0.05}],
        epochs=2, seeds=(0, 1))
    (exp_dir,) = run_experiment(config, tmp_path, QUIET, data=small)
    finals = {(r.label, r.seed): json.loads((run_dir_for(exp_dir, r.label, r.seed)
                                             / "final.json").read_text())
              for r in load_runs(exp_dir)}
    assert finals[("SGD-huge", 0)]["status"] == "diverged"
    assert "non-finite" in finals[("SGD-huge", 0)]["reason"]
    assert finals[("SGD", 1)]["status"] == "finished"
    rows = {r.label: r for r in summarize(load_runs(exp_dir))}
    assert rows["SGD-huge"].diverged == 2 and rows["SGD"].finished == 2
    report = (exp_dir / "report.md").read_text()
    assert "2 diverged" in report


def test_skeleton_init_is_applied_for_every_optimizer(digits):
    config = digits_config()
    model, structure = prepare_model(config, 0, digits)
    from gsgd.basis import block_routes

    (block,) = structure.blocks
    named = dict(model.named_parameters())
    for layer, r in zip(block.layers, block_routes(block), strict=True):
        flat = named[layer.weight].detach().reshape(-1)
        for pos in (r.parent_flat(), r.child_flat()):
            if len(pos):
                assert torch.all(flat[pos] == 1)


def test_rescaled_init_preserves_function_but_changes_weights(digits):
    plain = digits_config()
    rescaled = replace(plain, init=replace(plain.init, rescale=RescaleSpec(10.0, -1.0, 1.0)))
    a, _ = prepare_model(plain, 0, digits)
    b, _ = prepare_model(rescaled, 0, digits)
    x = digits.test.x[:50]
    assert not torch.allclose(a[1].weight, b[1].weight)
    torch.testing.assert_close(a(x), b(x), rtol=1e-4, atol=1e-5)


def test_report_has_mean_std_table_gap_and_png(tmp_path, small):
    config = digits_config(epochs=2, seeds=(0, 1), checkpoint_every=0)
    (exp_dir,) = run_experiment(config, tmp_path, QUIET, data=small)
    text = (exp_dir / "report.md").read_text()
    assert "| G-SGD |" in text and "| SGD |" in text and "±" in text
    assert "G-SGD − SGD" in text
    assert (exp_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(exp_dir.glob(".*tmp*"))
    runs = load_runs(exp_dir)
    ((label, ref, diffs),) = paired_gaps(runs)
    assert (label, ref, len(diffs)) == ("G-SGD", "SGD", 2)
    by = {(r.label, r.seed): r.last("test_acc") for r in runs}
    assert diffs[0] == pytest.approx(by[("G-SGD", 0)] - by[("SGD", 0)])
    # rebuilding the report from disk gives the same text
    assert write_report(exp_dir).read_text() == text


def test_width_variants_get_one_directory_each_and_a_summary(tmp_path, small):
    config = config_from_dict({
        "experiment": {"name": "w", "dataset": "digits", "epochs": 1, "batch_size": 64},
        "model": {"widths": [[64, 8, 8, 10], [64, 16, 16, 10]], "bias": False},
        "optimizers": [{"name": "gsgd", "lr": 0.05}, {"name": "sgd", "lr": 0.05}],
    })
    dirs = run_experiment(config, tmp_path, QUIET, data=small)
    assert [d.name for d in dirs] == ["64-8-8-10", "64-16-16-10"]
    summary = (tmp_path / "w" / "report.md").read_text()
    assert "64-8-8-10" in summary and "64-16-16-10" in summary and "G-SGD − SGD" in summary


def test_choose_lr_picks_best_validation_accuracy_and_penalises_divergence():
    inf = float("inf")
    assert choose_lr({0.1: [(0.9, 0.3)], 0.3: [(0.95, 0.2)], 1.0: [(-inf, inf)]}) == 0.3
    assert choose_lr({0.1: [(0.9, 0.3), (0.9, 0.3)], 0.3: [(1.0, 0.1), (-inf, inf)]}) == 0.1
    assert choose_lr({0.1: [(0.9, 0.5)], 0.3: [(0.9, 0.2)]}) == 0.3  # tie: lower loss


def test_sweep_selects_on_validation_and_never_evaluates_test(tmp_path, small):
    config = digits_config(optimizers=[{"name": "sgd", "lr": 0.1, "sweep": [1e-5, 0.1]}],
                           epochs=1)
    result = run_sweep(config, tmp_path, QUIET, data=small)
    assert result.chosen == {"": {"SGD": 0.1}}
    for metrics in (tmp_path / "t-sweep").glob("*/seed*/metrics.jsonl"):
        for line in metrics.read_text().splitlines():
            assert "test_acc" not in json.loads(line) and "test_loss" not in json.loads(line)
    (tuned_path,) = result.configs
    tuned = load_config(tuned_path)
    assert tuned.optimizers[0].lr == 0.1 and tuned.optimizers[0].sweep == ()
    assert "**yes**" in (tmp_path / "t-sweep" / "sweep.md").read_text()


def test_synthetic_data_has_the_shape_and_is_labelled():
    s = synthetic_splits((3, 32, 32), 10, n_train=20, n_val=4, n_test=4)
    assert s.train.x.shape == (20, 3, 32, 32) and s.input_shape == (3, 32, 32)
    assert "SYNTHETIC" in s.name and "synthetic" in s.name.lower()
    assert int(s.train.y.max()) < 10


def test_dry_run_falls_back_to_labelled_synthetic_data_when_dataset_is_missing(tmp_path):
    config = config_from_dict({
        "experiment": {"name": "c", "dataset": "cifar10", "data_root": str(tmp_path / "none")},
        "model": {"widths": [3072, 8, 10]},
        "optimizers": [{"name": "sgd", "lr": 0.01}],
    })
    from gsgd.data import DatasetError

    with pytest.raises(DatasetError):
        load_experiment_data(config.experiment)
    data = load_experiment_data(config.experiment, fallback_to_synthetic=True)
    assert data.synthetic and "SYNTHETIC" in data.note and "cifar10" in data.note
    assert data.splits.input_shape == (3, 32, 32)


def test_gsgd_uses_the_lr_written_to_param_groups_after_load_state_dict():
    """Regression: GSGD once kept the pre-load group dicts, so a resumed run ignored the lr
    schedule (load_state_dict replaces the param_group dicts)."""
    from gsgd.models import mlp
    from gsgd.optim import GSGD

    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))

    def one_step(lr_after_load: float) -> torch.Tensor:
        model = mlp([6, 5, 5, 3], bias=False, seed=0)
        opt = GSGD(model, lr=0.1)
        opt.load_state_dict(opt.state_dict())
        opt.param_groups[0]["lr"] = lr_after_load
        torch.nn.functional.cross_entropy(model(x), y).backward()
        before = model[1].weight.detach().clone()
        opt.step()
        return model[1].weight.detach() - before

    assert torch.allclose(one_step(0.0), torch.zeros(5, 6))
    assert not torch.allclose(one_step(0.1), torch.zeros(5, 6))


def test_parallel_jobs_give_the_same_results_as_sequential_runs(tmp_path, small):
    config = digits_config(epochs=1, seeds=(0, 1))
    seq = run_experiment(config, tmp_path / "seq", QUIET, report=False, data=small)[0]
    par = run_experiment(config, tmp_path / "par", replace(QUIET, jobs=2), report=False,
                         data=small)[0]
    for label in ("G-SGD", "SGD"):
        for seed in (0, 1):
            a = read_metrics(run_dir_for(seq, label, seed))
            b = read_metrics(run_dir_for(par, label, seed))
            assert without_time(a) == without_time(b)


@pytest.mark.parametrize("works", [True, False], ids=["compiler works", "no compiler"])
def test_compile_auto_compiles_the_gsgd_step_where_a_compiler_works(monkeypatch, works):
    """``compile = "auto"`` (the default) asks the compiler probe; true / false are kept;
    GSGD_COMPILE=0 makes "auto" eager; dry runs take "auto" eagerly."""
    from gsgd.experiments import optimizers
    from gsgd.experiments.runner import dry_run_config
    from gsgd.models import mlp

    monkeypatch.setattr(optimizers, "compiler_works", lambda device: works)
    model = mlp([4, 3, 2], seed=0)
    spec = digits_config().optimizers[0]
    assert spec.compile == "auto"
    monkeypatch.setenv("GSGD_COMPILE", "")
    assert optimizers.step_compiled(spec, model) is works
    assert optimizers.step_compiled(replace(spec, compile=True), model) is True
    assert optimizers.step_compiled(replace(spec, compile=False), model) is False
    monkeypatch.setenv("GSGD_COMPILE", "0")
    assert optimizers.step_compiled(spec, model) is False
    dry = dry_run_config(digits_config()).optimizers  # eager where the optimizer compiles
    assert all(s.compile is (False if s.name == "gsgd" else "auto") for s in dry)


def test_the_step_path_and_the_compile_time_are_recorded_apart_from_the_epoch_time(
        tmp_path, digits, monkeypatch):
    """Each G-SGD epoch records which step ran; the seconds spent building graphs
    (gsgd.graphs.compile_seconds) are recorded as ``compile_time`` in the epoch where they
    were spent, and not in its ``time``."""
    import time as time_module

    from gsgd import graphs
    from gsgd.optim import GSGD

    steps = {"n": 0}
    real_step = GSGD.step

    def step_that_compiles_first(self, closure=None):  # a 0.5 s "compile" in the first step
        steps["n"] += 1
        if steps["n"] == 1:
            time_module.sleep(0.5)
            graphs._COMPILE_SECONDS[0] += 0.5
        return real_step(self, closure)

    monkeypatch.setattr(GSGD, "step", step_that_compiles_first)
    config = digits_config([{"name": "gsgd", "lr": 0.05}], epochs=2)
    run_experiment(config, tmp_path, QUIET, data=ExperimentData(digits))
    (run_dir,) = [p.parent for p in tmp_path.rglob("metrics.jsonl")]
    first, second = read_metrics(run_dir)
    assert first["step_path"] == second["step_path"] == "eager"  # GSGD_COMPILE=0 in tests
    assert first["compile_time"] == pytest.approx(0.5, abs=1e-6)
    assert "compile_time" not in second
    assert first["time"] < 0.5 + second["time"]  # the 0.5 s is not in the epoch time


def test_graph_building_time_is_counted():
    """compile_seconds() grows by the time a new graph takes to build (a tiny function)."""
    from gsgd import graphs

    if not graphs.compiler_works():
        pytest.skip("no working compiler here")
    before = graphs.compile_seconds()
    out = graphs.compiled(lambda x: x * 3 - 1)(torch.ones(3))
    assert torch.equal(out, torch.full((3,), 2.0))
    assert graphs.compile_seconds() > before
