"""Learning-rate sweep: pick each optimizer's lr on the validation split, never on test.

For every optimizer with ``sweep = [lr, ...]`` each lr is trained (runs labelled
``<label>@lr=<lr>`` in ``<out>/<name>-sweep/``) without ever evaluating the test split, on the
sweep seeds (:func:`gsgd.experiments.config.sweep_seeds`: by default disjoint from the
evaluation seeds). The lr with the best mean final validation accuracy over the seeds wins
(ties: lower mean final train loss; a run that diverged counts as accuracy -inf). With
``jobs > 1`` the runs are trained in the runner's worker processes. Writes ``sweep.md`` and a
tuned config per model variant, ready for ``gsgd run``, with the chosen lrs and no sweep lists.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from gsgd.experiments.config import (
    SWEEP_SEED_BASE,
    Config,
    ConfigError,
    OptimizerSpec,
    config_to_toml,
    sweep_seeds,
)
from gsgd.experiments.datasets import ExperimentData, load_experiment_data
from gsgd.experiments.files import atomic_write_text
from gsgd.experiments.runner import (
    RunOptions,
    experiment_dir,
    experiment_dirs,
    run_dir_for,
    run_tasks,
)

__all__ = ["SweepResult", "choose_lr", "run_sweep", "sweep_label"]


@dataclass(frozen=True)
class SweepResult:
    """What the sweep chose, and where it wrote the report and the tuned configs."""

    chosen: dict[str, dict[str, float]]  # variant -> optimizer label -> lr
    report: Path
    configs: list[Path]


def sweep_label(spec: OptimizerSpec, lr: float) -> str:
    """The run label of ``spec`` at learning rate ``lr``."""
    return f"{spec.label}@lr={lr:g}"


def choose_lr(scores: dict[float, list[tuple[float, float]]]) -> float:
    """The lr with the best mean final (val accuracy, -train loss); -inf marks divergence."""
    def key(lr: float) -> tuple[float, float]:
        accs = [a for a, _ in scores[lr]]
        losses = [loss for _, loss in scores[lr]]
        return (statistics.fmean(accs) if accs else -math.inf,
                -statistics.fmean(losses) if losses and all(map(math.isfinite, losses))
                else -math.inf)
    return max(sorted(scores), key=key)


def run_sweep(config: Config, out_dir: Path, options: RunOptions | None = None,
              data: ExperimentData | None = None) -> SweepResult:
    """Run the lr sweep of ``config`` under ``out_dir/<name>-sweep`` and choose each lr
    (``data``: these splits instead of loading ``[experiment] dataset``)."""
    options = replace(options or RunOptions(), evaluate_test=False)
    swept = [s for s in config.optimizers if s.sweep]
    if not swept:
        raise ConfigError(f"{config.experiment.name}: no optimizer has sweep = [lrs...]; add "
                         "e.g. sweep = [0.01, 0.03, 0.1] to an [[optimizers]] table")
    given = data
    if data is None:
        data = load_experiment_data(config.experiment, synthetic=options.synthetic,
                                    fallback_to_synthetic=options.fallback_to_synthetic)
    name = f"{config.experiment.name}-sweep"
    seeds = sweep_seeds(config.experiment)
    base = replace(config, experiment=replace(config.experiment, name=name, seeds=seeds))
    sweep_dir = Path(out_dir) / name
    overlap = sorted(set(seeds) & set(config.experiment.seeds))
    how = ("[experiment] sweep_seeds" if config.experiment.sweep_seeds else
           f"by default disjoint from the evaluation seeds {list(config.experiment.seeds)}: "
           f"counted up from {SWEEP_SEED_BASE}, skipping them")
    lines = [f"# lr sweep: {config.experiment.name}", "", *_data_lines(data),
             "Selection on the validation split only (the test split is never evaluated). "
             f"Final validation accuracy (%), mean over the sweep seeds {list(seeds)} ({how})"
             f"; epochs run: {config.experiment.epochs}.", ""]
    if overlap:
        lines += [f"**Note: sweep seeds {overlap} are also evaluation seeds**: the runs that "
                  "choose the lr are among those that judge it.", ""]
    with experiment_dir(sweep_dir, options):
        tasks = [(cfg, run_spec, seed, run_dir_for(exp_dir, run_spec.label, seed))
                 for _variant, cfg, exp_dir in experiment_dirs(base, out_dir)
                 for spec in cfg.optimizers if spec.sweep
                 for run_spec in _swept_specs(spec) for seed in cfg.experiment.seeds]
        finals = iter(run_tasks(tasks, options, data, given))
        chosen: dict[str, dict[str, float]] = {}
        configs = [_choose(config, variant, cfg, finals, out_dir, chosen, lines)
                   for variant, cfg, _exp_dir in experiment_dirs(base, out_dir)]
        report = sweep_dir / "sweep.md"
        atomic_write_text(report, "\n".join(lines))
    return SweepResult(chosen, report, configs)


def _data_lines(data: ExperimentData) -> list[str]:
    if data.synthetic:
        return [f"Data: {data.splits.name}.", "",
                f"**{data.note}: these numbers say nothing about the real dataset.**", ""]
    return [f"Data: {data.splits.name} (the real dataset).", ""]


def _swept_specs(spec: OptimizerSpec) -> list[OptimizerSpec]:
    """The runs of one swept optimizer: one spec per lr, labelled by :func:`sweep_label`."""
    return [replace(spec, lr=lr, label=sweep_label(spec, lr), sweep=()) for lr in spec.sweep]


def _score(final: dict) -> tuple[float, float]:
    """(final val accuracy, final train loss) of a run; (-inf, inf) for a diverged one."""
    last = final["final"] or {}
    acc = last.get("val_acc") if final["status"] == "finished" else None
    loss = last.get("train_loss") if acc is not None else None
    return (-math.inf if acc is None else acc, math.inf if loss is None else loss)


def _choose(config: Config, variant: str, cfg: Config, finals: Iterator[dict], out_dir: Path,
            chosen: dict[str, dict[str, float]], lines: list[str]) -> Path:
    """Score one variant's runs (``finals``, in task order), fill ``chosen`` and the report
    ``lines``, write the tuned config; return its path."""
    sweep_dir = Path(out_dir) / cfg.experiment.name
    chosen[variant] = {}
    if variant:
        lines += [f"## {variant}", ""]
    lines += ["| optimizer | lr | final val acc | final train loss | diverged | chosen |",
              "|---|---|---|---|---|---|"]
    tuned = []
    for spec in cfg.optimizers:
        if not spec.sweep:
            tuned.append(spec)
            continue
        scores = {lr: [_score(next(finals)) for _ in cfg.experiment.seeds] for lr in spec.sweep}
        best = choose_lr(scores)
        chosen[variant][spec.label] = best
        tuned.append(replace(spec, lr=best, sweep=()))
        for lr in spec.sweep:
            accs = [a for a, _ in scores[lr] if math.isfinite(a)]
            losses = [x for _, x in scores[lr] if math.isfinite(x)]
            n_div = sum(1 for a, _ in scores[lr] if not math.isfinite(a))
            acc_txt = f"{100 * statistics.fmean(accs):.2f}" if accs else "-"
            loss_txt = f"{statistics.fmean(losses):.4f}" if losses else "-"
            mark = "**yes**" if lr == best else ""
            lines.append(f"| {spec.label} | {lr:g} | {acc_txt} | {loss_txt} | {n_div} | "
                         f"{mark} |")
    lines.append("")
    exp = replace(config.experiment, name=f"{config.experiment.name}-tuned"
                  + (f"-{variant}" if variant else ""))
    tuned_cfg = replace(cfg, experiment=exp, optimizers=tuple(tuned))
    path = sweep_dir / f"{exp.name}.toml"
    header = (f"Tuned by `gsgd sweep` from {config.experiment.name}: lrs chosen on the "
              f"validation split ({json.dumps(chosen[variant])}).\nRun: gsgd run {path}")
    atomic_write_text(path, config_to_toml(tuned_cfg, header))
    lines += [f"Tuned config: {path}", ""]
    return path
