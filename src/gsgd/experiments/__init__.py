"""Experiments: TOML configs, a resumable runner, lr sweeps, reports and plots (``gsgd`` CLI)."""

from gsgd.experiments.config import Config, ConfigError, OptimizerSpec, load_config
from gsgd.experiments.optimizers import build_optimizer
from gsgd.experiments.runner import RunInterrupted, RunOptions, run_experiment, train_run

__all__ = [
    "Config",
    "ConfigError",
    "OptimizerSpec",
    "RunInterrupted",
    "RunOptions",
    "build_optimizer",
    "load_config",
    "run_experiment",
    "train_run",
]
