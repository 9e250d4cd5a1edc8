"""Every preset in configs/ runs end to end with --dry-run (1 epoch, 3 batches, first seed, small
eval subsets): on the real data when it is here, else on labelled synthetic data (CIFAR)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gsgd.cli import main
from gsgd.experiments.config import load_config
from gsgd.experiments.runner import dry_run_config, experiment_dirs

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
CONFIGS = sorted(CONFIG_DIR.glob("*.toml"))
REQUIRED = ("e1_depth_init", "e2_mnist_mlp_paper", "e3_pathsgd", "e3_pathsgd_unbalanced",
            "e4_fashion_widths", "e4_fashion_widths_tuned", "e5_fashion_plainnet",
            "e5_fashion_resnet20", "mnist_mlp_short", "fashion_mlp_widths", "pathsgd_balanced",
            "pathsgd_unbalanced", "cifar10_plainnet34_gpu", "cifar10_resnet34_gpu",
            "mnist_adam_family", "mnist_adam_family_short", "mnist_bp_norm_short")
# presets whose settings include nets that diverge from the skeleton init at the preset's
# default lr (E1's 32-layer MLPs: the skeleton init's forward pass explodes); their runs may
# end "diverged" (with a reason), never crash
MAY_DIVERGE = ("e1_depth_init",)




def test_every_paper_preset_is_present():
    assert {p.stem for p in CONFIGS} >= set(REQUIRED)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_preset_dry_run_trains_every_optimizer_and_writes_the_report(path, tmp_path, capsys):
    assert main(["run", str(path), "--dry-run", "--out", str(tmp_path), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "DRY RUN" in out
    config = dry_run_config(load_config(path))
    for _, cfg, exp_dir in experiment_dirs(config, tmp_path / "dry-run"):
        assert (exp_dir / "report.md").exists() and (exp_dir / "curves.png").exists()
        info = json.loads((exp_dir / "experiment.json").read_text())
        if info["synthetic"]:  # e.g. CIFAR: not obtainable here
            assert "SYNTHETIC" in out and "SYNTHETIC" in (exp_dir / "report.md").read_text()
        finished = 0
        for spec in cfg.optimizers:
            final = json.loads((exp_dir / spec.label / "seed"
                                f"{cfg.experiment.seeds[0]}" / "final.json").read_text())
            if final["status"] == "diverged" and path.stem in MAY_DIVERGE:
                assert final["reason"], "a diverged run says why"
                continue
            assert final["status"] == "finished" and final["epochs"] == 1
            assert 0.0 <= final["final"]["test_acc"] <= 1.0
            finished += 1
        assert finished, "at least one optimizer of every model trains"


def test_a_dry_run_sweeps_tuned_config_is_a_valid_config(tmp_path, capsys):
    """The dry run turns compile = "auto" off only where an optimizer takes ``compile``: the
    tuned config it writes (G-SGD beside SGD) loads again."""
    path = CONFIG_DIR / "e2_mnist_mlp_paper.toml"
    assert main(["sweep", str(path), "--dry-run", "--out", str(tmp_path), "--quiet"]) == 0
    capsys.readouterr()
    tuned = load_config(tmp_path / "dry-run" / "e2_mnist_mlp_paper-sweep"
                        / "e2_mnist_mlp_paper-tuned.toml")
    assert {s.name for s in tuned.optimizers} == {"gsgd", "sgd"}
    assert all(not s.sweep for s in tuned.optimizers)
