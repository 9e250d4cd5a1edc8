"""The runner's G-space Adam optimizers (gadam, gadamw), the bp_norm key and the PathCond init:
config keys accepted / refused, spec.json only changed when they are used, tiny digits runs."""

from __future__ import annotations

import json
import tomllib
from dataclasses import replace

import pytest
import torch

from conftest import config_error, config_with
from gsgd.experiments.config import (
    _COMMON_OPTIMIZER_KEYS,
    config_from_dict,
    config_to_toml,
)
from gsgd.experiments.datasets import load_experiment_data
from gsgd.experiments.optimizers import build_optimizer
from gsgd.experiments.runner import (
    RunInterrupted,
    RunOptions,
    _run_spec,
    initial_model,
    prepare_model,
    run_dir_for,
    run_experiment,
    train_run,
)
from gsgd.optim import GAdam, GAdamW
from test_runner import digits_cut

QUIET = RunOptions(log=None)

BASE = {
    "experiment": {"name": "t", "dataset": "digits", "seeds": [0], "epochs": 1,
                   "batch_size": 32, "train_eval_size": 100, "checkpoint_every": 4},
    "model": {"kind": "mlp", "widths": [64, 16, 16, 10], "bias": False},
    "init": {"skeleton": True},
    "optimizers": [{"name": "gsgd", "lr": 0.1}, {"name": "sgd", "lr": 0.1}],
}


def cfg(optimizers=None, **kw):
    return config_with(BASE, optimizers, **kw)


def error_of(**kw) -> str:
    return config_error(BASE, **kw)


# --------------------------------------------------------------------------- config keys


def test_gadam_and_gadamw_take_their_keys_and_default_labels():
    c = cfg([{"name": "gadam", "lr": 1e-3, "betas": [0.8, 0.99], "eps": 1e-6, "amsgrad": True,
              "decay_carriers": True, "bp_norm": [1e-4, 1e-3], "max_ratio": 10.0,
              "on_nonfinite": "skip", "weight_decay": 1e-4},
             {"name": "gadamw", "lr": 1e-3}])
    a, w = c.optimizers
    assert (a.label, w.label) == ("G-Adam", "G-AdamW")
    assert a.bp_norm == (1e-4, 1e-3) and a.amsgrad and a.decay_carriers and a.max_ratio == 10
    assert config_from_dict(tomllib.loads(config_to_toml(c))) == c  # round trip
    model, structure = prepare_model(c, 0, load_experiment_data(c.experiment).splits)
    group = build_optimizer(a, model, structure).param_groups[0]
    assert (group["betas"], group["eps"], group["amsgrad"], group["decay_carriers"],
            group["bp_norm"], group["max_ratio"], group["on_nonfinite"],
            group["weight_decay"]) == ((0.8, 0.99), 1e-6, True, True, (1e-4, 1e-3), 10.0,
                                       "skip", 1e-4)
    assert "amsgrad" not in _COMMON_OPTIMIZER_KEYS  # a G-Adam key, not one of every optimizer


def test_bp_norm_is_a_gsgd_key_and_not_an_sgd_or_adam_one():
    assert cfg([{"name": "gsgd", "lr": 0.1, "bp_norm": [0.0, 1e-3]}]).optimizers[0].bp_norm \
        == (0.0, 1e-3)
    for name in ("sgd", "adam"):
        msg = error_of(optimizers=[{"name": name, "lr": 0.1, "bp_norm": [0.0, 1e-3]}])
        assert f"(optimizers #1 ({name})]: unknown key 'bp_norm'"[1:] in msg


@pytest.mark.parametrize("value", [[0.1], [-1.0, 0.0], [0.0, float("inf")], "0.1", [True, 0]])
def test_bad_bp_norm_is_refused_in_one_line(value):
    msg = error_of(optimizers=[{"name": "gadam", "lr": 1e-3, "bp_norm": value}])
    assert "bp_norm" in msg and "two finite numbers >= 0" in msg and "\n" not in msg


def test_adam_family_keys_are_checked():
    assert "unknown key 'amsgrad'" in error_of(
        optimizers=[{"name": "adam", "lr": 1e-3, "amsgrad": True}])
    assert "G-Adam has no momentum key, use betas" in error_of(
        optimizers=[{"name": "gadam", "lr": 1e-3, "momentum": 0.9}])
    assert "decay_carriers = 1: must be true or false" in error_of(
        optimizers=[{"name": "gadamw", "lr": 1e-3, "decay_carriers": 1}])


def test_pathcond_keys_labels_and_conflict():
    c = cfg([{"name": "sgd", "lr": 0.1, "pathcond": True},
             {"name": "adam", "lr": 1e-3, "pathcond": True, "label": "A"},
             {"name": "adam", "lr": 1e-3, "label": "B"}])
    assert [(o.label, o.pathcond) for o in c.optimizers] == [
        ("SGD+PathCond", True), ("A", True), ("B", False)]
    assert cfg(init={"pathcond": True}).init.pathcond
    assert "pathcond = 'yes': must be true or false" in error_of(
        optimizers=[{"name": "sgd", "lr": 0.1, "pathcond": "yes"}])
    assert "[init] pathcond = 1: must be true or false" in error_of(init={"pathcond": 1})
    assert "already applies PathCond for every optimizer" in error_of(
        init={"pathcond": True}, optimizers=[{"name": "sgd", "lr": 0.1, "pathcond": True}])


def test_new_keys_enter_the_run_spec_only_when_used():
    plain = cfg()
    spec = _run_spec(plain, plain.optimizers[0], 0, "digits", QUIET)
    for key in ("bp_norm", "amsgrad", "decay_carriers", "pathcond"):
        assert key not in spec["optimizer"]
    assert "pathcond" not in spec["init"]
    used = cfg([{"name": "gsgd", "lr": 0.1, "bp_norm": [0.0, 1e-3], "pathcond": True}],
               init={"skeleton": True})
    spec = _run_spec(used, used.optimizers[0], 0, "digits", QUIET)
    assert spec["optimizer"]["bp_norm"] == [0.0, 1e-3] and spec["optimizer"]["pathcond"] is True
    init = cfg(init={"pathcond": True})
    assert _run_spec(init, init.optimizers[0], 0, "digits", QUIET)["init"]["pathcond"] is True


# --------------------------------------------------------------------------- tiny runs


@pytest.fixture(scope="module")
def small():
    """Real digits, cut to 192 train / 64 val / 64 test examples (6 batches of 32)."""
    return digits_cut(cfg(), 192, 64)


def test_build_and_train_gadam_and_gadamw(small, tmp_path):
    c = cfg([{"name": "gadam", "lr": 1e-2, "bp_norm": [1e-4, 0.0]},
             {"name": "gadamw", "lr": 1e-2, "weight_decay": 1e-2}], epochs=2)
    dirs = run_experiment(c, tmp_path, QUIET, data=small)
    for spec, cls in zip(c.optimizers, (GAdam, GAdamW), strict=True):
        run = run_dir_for(dirs[0], spec.label, 0)
        final = json.loads((run / "final.json").read_text())
        assert final["status"] == "finished" and final["epochs"] == 2
        assert final["final"]["test_acc"] > 0.3  # it learns (chance: 0.1)
        assert "clipped" in final["final"] and "pathcond" not in final
        group = torch.load(run / "checkpoint.pt", weights_only=True)["optimizer"][
            "param_groups"][0]  # the trained optimizer's hyper-parameters
        assert tuple(group["bp_norm"]) == spec.bp_norm
        assert group["weight_decay"] == spec.weight_decay
        assert group["decoupled_weight_decay"] is (cls is GAdamW)
    assert (dirs[0] / "report.md").exists()


def _outputs(model, x):
    with torch.no_grad():
        return model(x)


def test_pathcond_init_keeps_the_function_and_only_where_asked(small, tmp_path):
    c = cfg([{"name": "sgd", "lr": 0.1, "pathcond": True}, {"name": "adam", "lr": 1e-3}])
    sgd, adam = c.optimizers
    plain, _ = prepare_model(c, 0, small.splits)
    conditioned, _, result = initial_model(c, 0, small.splits, sgd)
    unconditioned, _, none = initial_model(c, 0, small.splits, adam)
    assert none is None and result is not None and result.sweeps > 0
    assert result.criterion_after < result.criterion_before
    x = small.splits.train.x[:64]
    ref = _outputs(plain, x)
    out = _outputs(conditioned, x)
    assert ((out - ref).abs().max() / ref.abs().max()) < 1e-6  # same function (float32)
    diff = max(float((a - b).detach().abs().max()) for a, b in
               zip(plain.parameters(), conditioned.parameters(), strict=True))
    assert diff > 1e-2  # but other weights
    assert all(torch.equal(a, b) for a, b in
               zip(plain.parameters(), unconditioned.parameters(), strict=True))

    dirs = run_experiment(c, tmp_path, QUIET, data=small)
    f_sgd = json.loads((run_dir_for(dirs[0], "SGD+PathCond", 0) / "final.json").read_text())
    f_adam = json.loads((run_dir_for(dirs[0], "Adam", 0) / "final.json").read_text())
    assert f_sgd["pathcond"]["sweeps"] == result.sweeps and f_sgd["pathcond"]["converged"]
    assert f_sgd["pathcond"]["criterion_after"] == pytest.approx(result.criterion_after)
    assert "pathcond" not in f_adam
    s_sgd = json.loads((run_dir_for(dirs[0], "SGD+PathCond", 0) / "spec.json").read_text())
    s_adam = json.loads((run_dir_for(dirs[0], "Adam", 0) / "spec.json").read_text())
    assert s_sgd["optimizer"]["pathcond"] is True and "pathcond" not in s_adam["optimizer"]


def test_init_pathcond_applies_to_every_optimizer(small, tmp_path):
    c = cfg([{"name": "sgd", "lr": 0.1}, {"name": "gsgd", "lr": 0.1}],
            init={"skeleton": True, "pathcond": True})
    plain = cfg()
    ref, _ = prepare_model(plain, 0, small.splits)
    for spec in c.optimizers:
        model, _, result = initial_model(c, 0, small.splits, spec)
        assert result is not None and result.sweeps > 0
        assert any(not torch.equal(a, b) for a, b in
                   zip(ref.parameters(), model.parameters(), strict=True))
    dirs = run_experiment(c, tmp_path, QUIET, data=small)
    for spec in c.optimizers:
        final = json.loads((run_dir_for(dirs[0], spec.label, 0) / "final.json").read_text())
        assert final["status"] == "finished" and final["pathcond"]["sweeps"] > 0


def test_pathcond_run_resumes_bit_identical(small, tmp_path):
    c = cfg([{"name": "sgd", "lr": 0.1, "pathcond": True}], epochs=2)
    spec = c.optimizers[0]
    a = train_run(c, spec, 0, tmp_path / "a", small.splits, QUIET)
    with pytest.raises(RunInterrupted):
        train_run(c, spec, 0, tmp_path / "b", small.splits, replace(QUIET, stop_after_batches=8))
    b = train_run(c, spec, 0, tmp_path / "b", small.splits, QUIET)
    assert a["pathcond"] == b["pathcond"]
    wa = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)["model"]
    wb = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
