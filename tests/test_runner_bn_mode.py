"""A G-optimizer's own ``bn_mode`` (``[[optimizers]] bn_mode``): the paper's approximate batch-norm
heuristic as one arm of an experiment whose [model] treats batch norm exactly. Accepted only for
G-optimizers on a CNN with batch norm, it changes that arm's G-structure (and so its skeleton
designation) and nothing else: same base draw, same spec under "model", no change for the others."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from conftest import config_error, config_with
from gsgd.experiments.datasets import synthetic_splits
from gsgd.experiments.optimizers import build_optimizer
from gsgd.experiments.runner import RunOptions, _run_spec, initial_model

QUIET = RunOptions(log=None)
CNN = {
    "experiment": {"name": "t", "dataset": "digits", "seeds": [0], "epochs": 1,
                   "batch_size": 16},
    "model": {"kind": "plainnet", "depth": 8, "widths": [4, 4, 4], "batchnorm": True,
              "bn_mode": "exact"},
    "init": {"skeleton": True},
    "optimizers": [{"name": "gsgd", "lr": 0.1},
                   {"name": "gsgd", "lr": 0.1, "label": "G-SGD-approx",
                    "bn_mode": "approximate", "compile": False},
                   {"name": "sgd", "lr": 0.1}],
}


@pytest.fixture(scope="module")
def data():
    return synthetic_splits((1, 8, 8), 10, n_train=32, n_val=16, n_test=16, seed=0)


def test_the_arm_gets_the_approximate_structure_and_the_others_stay_exact(data):
    config = config_with(CNN)
    exact, approx, sgd = config.optimizers
    assert config.model_for(approx).bn_mode == "approximate"
    assert config.model_for(exact) == config.model == config.model_for(sgd)
    _, s_exact, _ = initial_model(config, 0, data, exact)
    model, s_approx, _ = initial_model(config, 0, data, approx)
    assert not s_exact.approximate and s_approx.approximate
    opt = build_optimizer(approx, model, s_approx)
    assert opt.structure.approximate


def test_only_the_skeleton_designation_differs_between_the_arms(data):
    config = config_with(CNN)
    exact, approx, _ = config.optimizers
    no_skeleton = config_with(CNN, init={"skeleton": False})
    a, _, _ = initial_model(no_skeleton, 0, data, no_skeleton.optimizers[0])
    b, _, _ = initial_model(no_skeleton, 0, data, no_skeleton.optimizers[1])
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)  # the same base draw
    x, _, _ = initial_model(config, 0, data, exact)
    y, _, _ = initial_model(config, 0, data, approx)
    assert any(not torch.equal(p, q) for p, q in zip(x.parameters(), y.parameters(),
                                                      strict=True))


def test_the_override_goes_under_model_in_the_run_spec():
    config = config_with(CNN)
    exact, approx, sgd = config.optimizers
    s_exact = _run_spec(config, exact, 0, "digits", QUIET)
    s_approx = _run_spec(config, approx, 0, "digits", QUIET)
    assert "bn_mode" not in s_exact["optimizer"] and "bn_mode" not in s_approx["optimizer"]
    assert s_approx["model"]["bn_mode"] == "approximate"
    moved = config_with(CNN, model={**CNN["model"], "bn_mode": "approximate"})
    same = replace(approx, bn_mode=None)
    assert _run_spec(moved, same, 0, "digits", QUIET) == s_approx
    equal = replace(exact, bn_mode="exact")
    assert _run_spec(config, equal, 0, "digits", QUIET) == s_exact


@pytest.mark.parametrize(("change", "expected"), [
    ({"optimizers": [{"name": "sgd", "lr": 0.1, "bn_mode": "approximate"}]},
     "unknown key 'bn_mode'"),
    ({"optimizers": [{"name": "gsgd", "lr": 0.1, "bn_mode": "rough"}]},
     "bn_mode = 'rough'"),
    ({"model": {"kind": "plainnet", "depth": 8, "widths": [4, 4, 4]},
      "optimizers": [{"name": "gsgd", "lr": 0.1, "bn_mode": "approximate"}]},
     "bn_mode: only for a CNN with [model] batchnorm = true"),
])
def test_bad_bn_mode_entries_are_refused_in_one_line(change, expected):
    message = config_error(CNN, **change)
    assert expected in message and "\n" not in message
