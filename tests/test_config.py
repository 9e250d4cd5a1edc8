"""Tests for the experiment config schema: strict validation, clear messages, schedules, TOML
round trips, and the optimizer registry."""

from __future__ import annotations

import copy
import dataclasses
import math
import re
from pathlib import Path

import pytest
import torch

from gsgd.experiments.config import (
    ADAM_FAMILY,
    OPTIMIZER_NAMES,
    ConfigError,
    OptimizerSpec,
    config_from_dict,
    config_to_toml,
    load_config,
)
from gsgd.experiments.optimizers import OPTIMIZERS, build_optimizer
from gsgd.models import mlp

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.toml"))

BASE = {
    "experiment": {"name": "x", "dataset": "mnist", "seeds": [0, 1], "epochs": 3},
    "model": {"kind": "mlp", "widths": [784, 32, 10], "bias": False},
    "init": {"skeleton": True},
    "optimizers": [{"name": "gsgd", "lr": 0.1}, {"name": "sgd", "lr": 0.1}],
}


def with_change(path: str, value, delete: bool = False) -> dict:
    """BASE with ``section.key`` (``optimizers.0.key`` for a list) set to ``value``."""
    data = copy.deepcopy(BASE)
    *parents, key = path.split(".")
    node = data
    for p in parents:
        node = node[int(p)] if p.isdigit() else node[p]
    if delete:
        del node[key]
    else:
        node[key] = value
    return data


def error_of(data: dict) -> str:
    with pytest.raises(ConfigError) as info:
        config_from_dict(data)
    return str(info.value)


def test_base_config_is_valid_and_defaults_fill_in():
    cfg = config_from_dict(BASE)
    assert cfg.experiment.seeds == (0, 1) and cfg.experiment.batch_size == 64
    assert [o.label for o in cfg.optimizers] == ["G-SGD", "SGD"]
    assert cfg.init.rescale is None


@pytest.mark.parametrize("section,path", [
    ("experiment", "experiment.learning_rate"),
    ("model", "model.depht"),
    ("init", "init.skeletonize"),
    ("optimizers #1 (gsgd)", "optimizers.0.betas"),  # an Adam-only key on gsgd
    ("optimizers #2 (sgd)", "optimizers.1.max_ratio"),
])
def test_unknown_key_is_refused_naming_key_section_and_allowed_keys(section, path):
    msg = error_of(with_change(path, 1))
    key = path.split(".")[-1]
    assert f"[{section}]" in msg and repr(key) in msg and "allowed keys:" in msg


def test_unknown_key_message_lists_the_allowed_keys_of_that_section():
    msg = error_of(with_change("experiment.lr", 0.1))
    for key in ("name", "dataset", "seeds", "epochs", "batch_size", "val_size", "device"):
        assert key in msg


def test_unknown_section_is_refused():
    data = copy.deepcopy(BASE)
    data["training"] = {}
    assert "unknown section [training]" in error_of(data)


@pytest.mark.parametrize("path,value,expected", [
    ("experiment.dataset", "imagenet", "'mnist', 'fashion-mnist'"),
    ("experiment.epochs", 0, "integer >= 1"),
    ("experiment.epochs", 2.5, "integer >= 1"),
    ("experiment.seeds", [0, 0], "must not repeat"),
    ("experiment.seeds", [-1], "integers >= 0"),
    ("experiment.batch_size", True, "integer >= 1"),
    ("experiment.val_size", 1.5, "fraction in (0, 1)"),
    ("experiment.device", "tpu", "'cpu', 'cuda', 'auto'"),
    ("experiment.dtype", "float16", "'float32', 'float64'"),
    ("model.kind", "vgg", "'mlp', 'plainnet', 'resnet'"),
    ("model.bias", "no", "true or false"),
    ("model.widths", [784, 0, 10], "integers >= 1"),
    ("optimizers.0.name", "rmsprop", "'gsgd', 'sgd', 'pathsgd', 'enorm', 'adam'"),
    ("optimizers.0.lr", -0.1, "> 0"),
    ("optimizers.0.lr", "0.1", "finite number"),
    ("optimizers.0.momentum", 1.0, "< 1"),
    ("optimizers.0.lr_schedule", "cosine", "'constant', 'exp', 'step'"),
    ("optimizers.0.max_ratio", 1.0, "> 1"),
])
def test_bad_value_is_refused_naming_key_value_and_what_is_allowed(path, value, expected):
    msg = error_of(with_change(path, value))
    assert f"{path.split('.')[-1]} = {value!r}" in msg
    assert expected in msg


def test_mlp_widths_must_match_the_dataset():
    msg = error_of(with_change("model.widths", [100, 32, 10]))
    assert "widths[0] = 784" in msg and "mnist" in msg
    assert "widths[-1] = 10" in error_of(with_change("model.widths", [784, 32, 7]))


@pytest.mark.parametrize("path", ["experiment.name", "experiment.dataset", "optimizers.0.lr",
                                  "optimizers.0.name"])
def test_missing_required_key_is_refused(path):
    assert "missing required key" in error_of(with_change(path, None, delete=True))


def test_missing_optimizers_is_refused_with_the_supported_names():
    data = copy.deepcopy(BASE)
    del data["optimizers"]
    msg = error_of(data)
    assert "[[optimizers]]" in msg and "gsgd" in msg and "adam" in msg


def test_duplicate_labels_are_refused():
    data = with_change("optimizers", [{"name": "sgd", "lr": 0.1}, {"name": "sgd", "lr": 0.3}])
    assert "labels ['SGD']" in error_of(data)
    data["optimizers"][1]["label"] = "SGD-0.3"
    assert [o.label for o in config_from_dict(data).optimizers] == ["SGD", "SGD-0.3"]


def test_schedule_parameters_must_match_the_schedule():
    assert "needs gamma" in error_of(with_change("optimizers.0.lr_schedule", "exp"))
    assert "needs milestones" in error_of(with_change("optimizers.0.lr_schedule", "step"))
    assert "only used by lr_schedule = 'exp'" in error_of(with_change("optimizers.0.gamma", 0.1))
    msg = error_of(with_change("optimizers.0.milestones", [5]))
    assert "only used by lr_schedule = 'step'" in msg


def test_adam_refuses_momentum_and_nesterov_needs_momentum():
    assert "Adam has no momentum" in error_of(
        with_change("optimizers", [{"name": "adam", "lr": 1e-3, "momentum": 0.9}]))
    assert "nesterov = true needs momentum" in error_of(with_change("optimizers.1.nesterov", True))


def test_rescale_section_is_validated():
    cfg = config_from_dict(with_change("init.rescale", {"base": 10.0, "low": -1, "high": 1}))
    assert (cfg.init.rescale.base, cfg.init.rescale.low, cfg.init.rescale.high) == (10, -1, 1)
    assert "[init.rescale]: unknown key 'scale'" in error_of(
        with_change("init.rescale", {"scale": 2}))
    assert "low = 1 must be <= high = -1" in error_of(
        with_change("init.rescale", {"low": 1, "high": -1}))


def test_width_list_of_lists_gives_one_variant_per_profile():
    cfg = config_from_dict(with_change("model.widths", [[784, 32, 32, 10], [784, 64, 64, 10]]))
    variants = cfg.variants()
    assert [v for v, _ in variants] == ["784-32-32-10", "784-64-64-10"]
    assert variants[1][1].model.widths == (784, 64, 64, 10)
    assert config_from_dict(BASE).variants()[0][0] == ""


def test_lr_schedules_follow_their_formulas():
    exp = OptimizerSpec("sgd", 0.1, lr_schedule="exp", gamma=0.01)
    assert exp.lr_at(0) == 0.1
    assert exp.lr_at(150) == pytest.approx(0.1 * math.exp(-1.5), rel=1e-15)
    step = OptimizerSpec("sgd", 1.0, lr_schedule="step", milestones=(80, 120), factor=0.1)
    assert [step.lr_at(e) for e in (0, 79, 80, 119, 120, 159)] == pytest.approx(
        [1.0, 1.0, 0.1, 0.1, 0.01, 0.01], rel=1e-12)
    assert OptimizerSpec("sgd", 0.3).lr_at(99) == 0.3


def test_invalid_toml_and_missing_file_give_config_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[experiment\nname = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml")


def test_config_writes_back_to_toml_unchanged(tmp_path):
    data = with_change("optimizers", [
        {"name": "gsgd", "lr": 0.1, "lr_schedule": "exp", "gamma": 0.01, "momentum": 0.9,
         "label": "G-SGD-m", "sweep": [0.03, 0.1]},
        {"name": "sgd", "lr": 1.0, "lr_schedule": "step", "milestones": [80, 120]},
        {"name": "adam", "lr": 1e-3, "betas": [0.8, 0.99]}])
    data["init"]["rescale"] = {"base": 10.0, "low": -1.0, "high": 1.0}
    data["experiment"]["description"] = 'quotes " and \\ backslash'
    data["model"]["widths"] = [[784, 32, 10], [784, 64, 10]]
    cfg = config_from_dict(data)
    path = tmp_path / "c.toml"
    path.write_text(config_to_toml(cfg, header="a header\nline two"))
    assert path.read_text().startswith("# a header\n# line two\n")
    assert load_config(path) == cfg


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_preset_is_valid_and_round_trips(path, tmp_path):
    cfg = load_config(path)
    out = tmp_path / "x.toml"
    out.write_text(config_to_toml(cfg))
    assert load_config(out) == cfg
    first = path.read_text().lstrip().splitlines()[0]
    assert first.startswith("#"), "a preset starts with a comment saying what it reproduces"
    time_line = re.search(r"^# Time\b.*$", path.read_text(), re.MULTILINE)
    assert time_line and re.search(r"hour|minute", path.read_text()), "says how long it takes"


def test_registry_records_are_keyed_by_name_and_take_spec_keys():
    spec_keys = {f.name for f in dataclasses.fields(OptimizerSpec)}
    assert tuple(OPTIMIZERS) == OPTIMIZER_NAMES
    for name, record in OPTIMIZERS.items():
        assert record.name == name and record.label and callable(record.build)
        assert set(record.keys) <= spec_keys


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_build_optimizer_sets_lr_momentum_weight_decay(name):
    if name in ("pathsgd", "enorm"):
        pytest.importorskip(f"gsgd.optim.{name}")
    from gsgd.discovery import discover

    model = mlp([6, 5, 5, 3], bias=True, seed=0)
    adam = name in ADAM_FAMILY
    spec = OptimizerSpec(name, 0.05, momentum=0.0 if adam else 0.5, weight_decay=1e-4)
    opt = build_optimizer(spec, model, discover(model))
    assert isinstance(opt, torch.optim.Optimizer)
    group = opt.param_groups[0]
    assert group["lr"] == 0.05 and group["weight_decay"] == 1e-4
    if not adam:
        assert group["momentum"] == 0.5
    if name.startswith("gadam"):
        assert group["decoupled_weight_decay"] is (name == "gadamw")
    n_params = sum(len(g["params"]) for g in opt.param_groups)
    assert n_params == len(list(model.parameters()))
    # one step runs and changes the weights
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    before = [p.detach().clone() for p in model.parameters()]
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))


def test_cnn_model_keys_are_validated():
    cnn = with_change("model", {"kind": "resnet", "depth": 21})
    assert "depths 6n+2 (20, 32, 44, 56, 110) and 34" in error_of(cnn)
    assert "cut: only for kind = 'plainnet'" in error_of(
        with_change("model", {"kind": "resnet", "cut": "stages"}))
    assert "shortcut: only for kind = 'resnet'" in error_of(
        with_change("model", {"kind": "plainnet", "shortcut": "B"}))
    assert "bn_mode = 'rough'" in error_of(with_change("model", {"kind": "plainnet",
                                                                 "bn_mode": "rough"}))
    cfg = config_from_dict(with_change("model", {"kind": "plainnet", "depth": 34,
                                                 "widths": [8, 8, 16, 16], "batchnorm": True}))
    assert cfg.model.widths == (8, 8, 16, 16) and cfg.model.bias is None
