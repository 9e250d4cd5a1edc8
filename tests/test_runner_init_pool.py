"""The runner's He init (``[init] weights``), per-optimizer init arms (``skeleton`` / ``weights``
in an ``[[optimizers]]`` entry) and pooled inputs (``[experiment] pool``): config keys accepted /
refused, the init order, pairing by seed, spec.json unchanged for configs without the new keys."""

from __future__ import annotations

import json
import math
import re
import tomllib
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

import gsgd.experiments.runner as runner
from conftest import config_error, config_with
from gsgd.basis import block_routes
from gsgd.cli import _compare_config, build_parser
from gsgd.experiments.config import config_from_dict, config_to_toml
from gsgd.experiments.datasets import load_experiment_data, synthetic_splits
from gsgd.experiments.models import build_model, model_structure
from gsgd.experiments.runner import (
    RunOptions,
    _run_spec,
    initial_model,
    prepare_model,
    run_dir_for,
    run_experiment,
)
from gsgd.models import he_init
from test_runner import digits_cut

QUIET = RunOptions(log=None)
ROOT = Path(__file__).resolve().parents[1]

BASE = {
    "experiment": {"name": "t", "dataset": "digits", "seeds": [0], "epochs": 1,
                   "batch_size": 32, "train_eval_size": 100, "checkpoint_every": 4},
    "model": {"kind": "mlp", "widths": [64, 16, 16, 10], "bias": True},
    "init": {"skeleton": True},
    "optimizers": [{"name": "gsgd", "lr": 0.1}, {"name": "sgd", "lr": 0.1}],
}
# The study's three arms: G-SGD and SGD from the skeleton init, SGD from He init.
ARMS = [{"name": "gsgd", "lr": 0.1}, {"name": "sgd", "lr": 0.1},
        {"name": "sgd", "lr": 0.1, "label": "SGD-He", "skeleton": False, "weights": "he"}]


def cfg(optimizers=None, **kw):
    return config_with(BASE, optimizers, **kw)


def error_of(**kw) -> str:
    return config_error(BASE, **kw)


def weights_of(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def designated(model: nn.Module, structure) -> list[torch.Tensor]:
    """The skeleton (designated parent / child) weights of every block, flattened."""
    named = dict(model.named_parameters())
    out = []
    for block in structure.blocks:
        for layer, r in zip(block.layers, block_routes(block), strict=True):
            flat = named[layer.weight].detach().reshape(-1)
            out += [flat[pos] for pos in (r.parent_flat(), r.child_flat()) if len(pos)]
    return out


@pytest.fixture(scope="module")
def small():
    """Real digits, cut to 128 train / 64 val / 64 test examples (4 batches of 32)."""
    return digits_cut(cfg(), 128, 64)


# --------------------------------------------------------------------------- he_init


def test_he_init_draws_n_0_2_over_fan_in_zero_biases_and_leaves_batchnorm():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 32, 3), nn.BatchNorm2d(32), nn.ReLU(), nn.Flatten(),
                          nn.Linear(2000, 600), nn.ReLU(), nn.Linear(600, 10))
    with torch.no_grad():
        model[1].weight.fill_(3.0)
        model[1].bias.fill_(-2.0)
    rng = torch.get_rng_state()
    assert he_init(model, seed=0) is model
    assert torch.equal(torch.get_rng_state(), rng)  # its own generator, the global RNG untouched
    for module, fan_in in ((model[0], 16 * 9), (model[4], 2000), (model[6], 600)):
        w = module.weight.detach()
        assert float(w.std()) == pytest.approx(math.sqrt(2 / fan_in), rel=0.05)
        assert abs(float(w.mean())) < 5 * math.sqrt(2 / fan_in / w.numel())  # 5 std errors
        assert torch.all(module.bias == 0)
    big = model[4].weight.detach()  # 1.2M draws: std within 0.5%
    assert float(big.std()) == pytest.approx(math.sqrt(2 / 2000), rel=0.005)
    assert torch.all(model[1].weight == 3.0) and torch.all(model[1].bias == -2.0)


def test_he_init_is_deterministic_from_the_seed_and_the_dtype_does_not_matter():
    def net(seed: int, dtype=torch.float32) -> nn.Module:
        torch.manual_seed(seed + 100)  # another default init underneath: all of it re-drawn
        return he_init(nn.Sequential(nn.Linear(30, 20), nn.ReLU(), nn.Linear(20, 5)).to(dtype),
                       seed)

    a, b, c = net(3), net(3), net(4)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))
    assert all(not torch.equal(x, y) for x, y in
               zip(a[0].parameters(), c[0].parameters(), strict=True) if x.dim() == 2)
    d = net(3, torch.float64)
    assert all(torch.equal(x, y.float()) for x, y in
               zip(a.parameters(), d.parameters(), strict=True))
    # Not the stream of torch.Generator().manual_seed(seed): the batch order draws from that.
    plain = torch.randn(20, 30, generator=torch.Generator().manual_seed(3),
                        dtype=torch.float64) * math.sqrt(2 / 30)
    assert not torch.allclose(a[0].weight.double(), plain)


def test_he_weights_come_before_the_skeleton_init(small):
    c = cfg(init={"weights": "he", "skeleton": True})
    model, structure = prepare_model(c, 0, small.splits)
    marks = designated(model, structure)
    assert marks and all(torch.all(m == 1) for m in marks)  # skeleton := 1 last
    he = he_init(build_model(c.model, small.splits.input_shape, 10, seed=0), 0)
    he_structure = model_structure(he, c.model)
    keep = [torch.ones_like(p, dtype=torch.bool) for p in he.parameters()]
    named = dict(he.named_parameters())
    index = {name: k for k, name in enumerate(named)}
    for block in he_structure.blocks:
        for layer, r in zip(block.layers, block_routes(block), strict=True):
            flat = keep[index[layer.weight]].reshape(-1)
            for pos in (r.parent_flat(), r.child_flat()):
                flat[pos] = False
    for p, q, k in zip(model.parameters(), he.parameters(), keep, strict=True):
        assert torch.equal(p.detach()[k], q.detach()[k])  # the rest: He's draws, biases 0
    default, _ = prepare_model(cfg(), 0, small.splits)
    assert not torch.equal(model[1].weight, default[1].weight)


# --------------------------------------------------------------------------- per-optimizer arms


def test_optimizer_entries_override_the_init_for_their_runs_only(small):
    c = cfg(ARMS)
    gsgd, sgd, sgd_he = c.optimizers
    assert (c.init_for(sgd_he).weights, c.init_for(sgd_he).skeleton) == ("he", False)
    assert c.init_for(sgd) == c.init == c.init_for(None)
    w_gsgd, w_sgd, w_he = (weights_of(initial_model(c, 0, small.splits, s)[0])
                           for s in (gsgd, sgd, sgd_he))
    assert all(torch.equal(a, b) for a, b in zip(w_gsgd, w_sgd, strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(w_sgd, w_he, strict=True))
    he = weights_of(he_init(build_model(c.model, small.splits.input_shape, 10, seed=0), 0))
    assert all(torch.equal(a, b) for a, b in zip(w_he, he, strict=True))  # no skeleton on it
    # A sweep's runs (the spec with another lr and label) and its tuned config keep it.
    assert c.init_for(replace(sgd_he, lr=0.01, label="SGD-He@0.01")) == c.init_for(sgd_he)
    assert config_from_dict(tomllib.loads(config_to_toml(c))) == c
    # An entry's skeleton = true under [init] skeleton = false: the skeleton for that one only.
    flipped = cfg([{"name": "gsgd", "lr": 0.1, "skeleton": True}, {"name": "sgd", "lr": 0.1}],
                  init={"skeleton": False})
    m_on, s_on, _ = initial_model(flipped, 0, small.splits, flipped.optimizers[0])
    m_off, s_off, _ = initial_model(flipped, 0, small.splits, flipped.optimizers[1])
    assert all(torch.all(m == 1) for m in designated(m_on, s_on))
    assert not all(torch.all(m == 1) for m in designated(m_off, s_off))


def test_arms_are_paired_by_seed_and_record_their_init(small, tmp_path, monkeypatch):
    batches: dict[int, list[torch.Tensor]] = {}
    real = runner.iterate_batches

    def recording(x, y, *args, **kw):  # the labels of every batch, in order, per call
        out = []
        batches[len(batches)] = out
        for xb, yb in real(x, y, *args, **kw):
            out.append(yb.clone())
            yield xb, yb

    monkeypatch.setattr(runner, "iterate_batches", recording)
    c = cfg(ARMS, seeds=[0])
    (exp_dir,) = run_experiment(c, tmp_path, QUIET, data=small)
    assert len(batches) == 3  # one epoch of each arm, in config order
    order = [torch.cat(b) for b in batches.values()]
    assert torch.equal(order[1], order[2]) and torch.equal(order[0], order[1])  # same batches
    finals = {s.label: json.loads((run_dir_for(exp_dir, s.label, 0) / "final.json").read_text())
              for s in c.optimizers}
    assert finals["SGD-He"]["init"] == {"weights": "he", "skeleton": False}
    assert finals["SGD"]["init"] == finals["G-SGD"]["init"] == {"weights": "default",
                                                               "skeleton": True}
    assert finals["SGD-He"]["final"]["train_loss"] != finals["SGD"]["final"]["train_loss"]
    specs = {s.label: json.loads((run_dir_for(exp_dir, s.label, 0) / "spec.json").read_text())
             for s in c.optimizers}
    assert specs["SGD-He"]["init"] == {"skeleton": False, "weights": "he"}
    assert specs["SGD"]["init"] == {} == specs["G-SGD"]["init"]
    assert all("skeleton" not in s["optimizer"] and "weights" not in s["optimizer"]
               for s in specs.values())


def test_an_override_equal_to_init_gives_the_same_run_spec():
    plain = cfg([{"name": "sgd", "lr": 0.1}])
    same = cfg([{"name": "sgd", "lr": 0.1, "skeleton": True, "weights": "default"}])
    moved = cfg([{"name": "sgd", "lr": 0.1}], init={"skeleton": False, "weights": "he"})
    arm = cfg([{"name": "sgd", "lr": 0.1, "skeleton": False, "weights": "he"}])
    spec = _run_spec(plain, plain.optimizers[0], 0, "digits", QUIET)
    assert _run_spec(same, same.optimizers[0], 0, "digits", QUIET) == spec
    assert _run_spec(arm, arm.optimizers[0], 0, "digits", QUIET) == \
        _run_spec(moved, moved.optimizers[0], 0, "digits", QUIET) != spec


# --------------------------------------------------------------------------- spec.json identity


def test_an_old_style_config_has_no_new_keys_in_its_run_spec():
    c = cfg()
    for s in c.optimizers:
        spec = _run_spec(c, s, 0, "digits", QUIET)
        assert spec["init"] == {} and "pool" not in spec["experiment"]
        assert not {"skeleton", "weights"} & set(spec["optimizer"])
        assert spec["data"] == "digits"
    he = cfg(init={"weights": "he"}, pool=2, model={"kind": "mlp", "widths": [16, 8, 10]})
    spec = _run_spec(he, he.optimizers[0], 0, "digits, 2x2 average-pooled to 4x4", QUIET)
    assert spec["init"] == {"weights": "he"} and spec["experiment"]["pool"] == 2


def committed_runs() -> list[Path]:
    """The spec.json of every committed run of ``gsgd run`` (sweep runs, labelled
    ``<label>@lr=<lr>`` without an experiment.json of their own, are left out)."""
    return sorted(p for p in (ROOT / "results").glob("**/seed*/spec.json")
                  if (p.parents[2] / "experiment.json").is_file())


@pytest.mark.skipif(not committed_runs(), reason="no committed runs under results/")
def test_committed_runs_still_match_their_spec():
    """Every spec.json under results/ is what the runner computes today from the run's config
    (experiment.json), so a rerun resumes / skips them without --rerun-changed. (``compile``:
    taken from the recorded spec; the runs predate its "auto" default, a drift of its own.)"""
    for path in committed_runs():
        recorded = json.loads(path.read_text())
        config = config_from_dict(json.loads((path.parents[2] / "experiment.json").read_text())
                                  ["config"])
        spec = config.optimizer(path.parent.parent.name)
        spec = replace(spec, compile=recorded["optimizer"].get("compile", spec.compile))
        limits = recorded["limits"]
        options = replace(QUIET, max_batches_per_epoch=limits["max_batches_per_epoch"],
                          eval_limit=limits["eval_limit"], evaluate_test=limits["evaluate_test"])
        assert _run_spec(config, spec, recorded["seed"], recorded["data"], options) == recorded, \
            path


# --------------------------------------------------------------------------- pooled inputs


def brute_force_pool(x: torch.Tensor, k: int) -> torch.Tensor:
    n, c, h, w = x.shape
    out = torch.empty(n, c, h // k, w // k)
    for i in range(h // k):
        for j in range(w // k):
            out[:, :, i, j] = x[:, :, k * i:k * i + k, k * j:k * j + k].mean((2, 3))
    return out


def test_pooled_splits_are_the_means_of_the_4x4_blocks():
    exp = cfg(model={"kind": "mlp", "widths": [784, 8, 10]}, dataset="synthetic").experiment
    pooled_exp = replace(exp, pool=4)
    full = load_experiment_data(exp).splits
    pooled = load_experiment_data(pooled_exp).splits
    assert full.name == synthetic_splits((1, 28, 28), 10, stands_for="synthetic").name
    assert pooled.input_shape == (1, 7, 7) and pooled.name == \
        f"{full.name}, 4x4 average-pooled to 7x7"
    for name in ("train", "val", "test"):
        a, b = getattr(full, name), getattr(pooled, name)
        assert b.x.shape == (len(a.y), 1, 7, 7) and b.x[0].numel() == 49
        torch.testing.assert_close(b.x, brute_force_pool(a.x, 4), rtol=1e-6, atol=1e-6)
        assert torch.equal(a.y, b.y)


def test_real_data_is_pooled_once_at_load_time_and_trains_with_49_inputs(tmp_path):
    c = cfg(model={"kind": "mlp", "widths": [16, 8, 10]}, pool=2)  # digits 8x8 -> 4x4
    first, again = (load_experiment_data(c.experiment).splits for _ in range(2))
    assert first is again  # cached: pooled once per process, not per batch or run
    full = load_experiment_data(replace(c.experiment, pool=1)).splits
    assert first.train.x.shape[1:] == (1, 4, 4) and first.name == \
        "digits, 2x2 average-pooled to 4x4"
    torch.testing.assert_close(first.test.x, brute_force_pool(full.test.x, 2))
    fashion = cfg(model={"kind": "mlp", "widths": [49, 8, 10]}, dataset="fashion-mnist",
                  pool=4, epochs=1)
    (exp_dir,) = run_experiment(fashion, tmp_path, replace(QUIET, synthetic=True,
                                                           max_batches_per_epoch=2,
                                                           eval_limit=16), report=False)
    spec = json.loads((run_dir_for(exp_dir, "G-SGD", 0) / "spec.json").read_text())
    assert spec["experiment"]["pool"] == 4 and "4x4 average-pooled to 7x7" in spec["data"]
    final = json.loads((run_dir_for(exp_dir, "G-SGD", 0) / "final.json").read_text())
    assert final["status"] == "finished"


def test_mlp_widths_are_checked_against_the_pooled_shape():
    fashion = {"model": {"kind": "mlp", "widths": [49, 8, 10]}, "dataset": "fashion-mnist"}
    assert cfg(**fashion, pool=4).experiment.pool == 4
    msg = error_of(**fashion)  # pool 1: 784 inputs
    assert "widths[0] = 784" in msg
    msg = error_of(model={"kind": "mlp", "widths": [784, 8, 10]}, dataset="fashion-mnist",
                   pool=4)
    assert "pooled 4x4 to 1x7x7" in msg and "widths[0] = 49" in msg


# --------------------------------------------------------------------------- bad values


@pytest.mark.parametrize("kw,expected", [
    ({"dataset": "mnist", "pool": 5, "model": {"kind": "mlp", "widths": [784, 8, 10]}},
     r"\[experiment\] pool = 5: .*28x28.*allowed values: 1, 2, 4, 7, 14, 28"),
    ({"pool": 3}, r"\[experiment\] pool = 3: dataset 'digits' has 8x8 .*allowed values: 1, 2, "
                  r"4, 8$"),
    ({"pool": 0}, r"\[experiment\] pool = 0: must be an integer >= 1"),
    ({"pool": 2.0}, r"\[experiment\] pool = 2.0: must be an integer >= 1"),
    ({"init": {"weights": "xavier"}}, r"\[init\] weights = 'xavier': allowed values: "
                                      r"'default', 'he'"),
    ({"optimizers": [{"name": "sgd", "lr": 0.1, "skeleton": "yes"}]},
     r"\[optimizers #1 \(sgd\)\] skeleton = 'yes': must be true or false"),
    ({"optimizers": [{"name": "gsgd", "lr": 0.1}, {"name": "adam", "lr": 1e-3,
                                                   "weights": "xavier"}]},
     r"\[optimizers #2 \(adam\)\] weights = 'xavier': allowed values: 'default', 'he'"),
    ({"optimizers": [{"name": "sgd", "lr": 0.1}, {"name": "sgd", "lr": 0.1, "weights": "he"}]},
     r"labels \['SGD'\] are used more than once"),
])
def test_bad_values_are_refused_in_one_line_naming_the_key(kw, expected):
    msg = error_of(**kw)
    assert re.search(expected, msg), msg
    assert "\n" not in msg


# --------------------------------------------------------------------------- docs and CLI


def test_the_readme_example_is_a_valid_three_arm_config():
    text = (ROOT / "README.md").read_text()
    (block,) = [b for b in re.findall(r"```toml\n(.*?)```", text, flags=re.S) if "pool" in b]
    c = config_from_dict(tomllib.loads(block))
    assert c.experiment.pool == 4 and c.model.widths == (49, 64, 64, 10)
    assert [(s.label, c.init_for(s).weights, c.init_for(s).skeleton) for s in c.optimizers] == [
        ("G-SGD", "default", True), ("SGD", "default", True), ("SGD-He", "he", False)]


def test_compare_takes_the_init_weights():
    base = ["compare", "--dataset", "digits", "--widths", "64,16,10"]
    args = build_parser().parse_args([*base, "--init-weights", "he", "--no-skeleton"])
    init = _compare_config(args).init
    assert (init.weights, init.skeleton) == ("he", False)
    assert _compare_config(build_parser().parse_args(base)).init.weights == "default"


def test_summary_of_a_pooled_config_uses_the_pooled_input(tmp_path, capsys):
    """``gsgd summary`` builds a pooled config's model for its 7x7 inputs (widths[0] = 49)."""
    from gsgd.cli import main

    path = tmp_path / "pooled.toml"
    path.write_text('[experiment]\nname = "p"\ndataset = "fashion-mnist"\npool = 4\n'
                    '[model]\nwidths = [49, 8, 10]\nbias = false\n'
                    '[[optimizers]]\nname = "gsgd"\nlr = 0.01\n')
    assert main(["summary", str(path)]) == 0
    assert "widths 49-8-10" in capsys.readouterr().out
