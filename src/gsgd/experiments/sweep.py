"""Learning-rate sweep: pick each optimizer's lr on the validation split, never on test.

For every optimizer with ``sweep = [lr, ...]`` each lr is trained (runs labelled
``<label>@lr=<lr>`` in ``<out>/<name>-sweep/``) without ever evaluating the test split, on the
sweep seeds (:func:`gsgd.experiments.config.sweep_seeds`: by default disjoint from the
evaluation seeds). The lr with the best mean final validation accuracy over the seeds wins
(ties: lower mean final train loss; a run that diverged counts as accuracy -inf). With
``jobs > 1`` the runs are trained in the runner's worker processes.

**Widening** (``widen`` rounds, ``gsgd sweep --widen N``, default 2): when an optimizer's choice
is the smallest or the largest lr of its grid, one lr beyond that edge is added (the edge lr
divided / multiplied by the ratio of the two grid lrs nearest the edge; by sqrt(10) on both
sides for a one-lr grid; to 6 significant digits), trained on the same seeds, and the choice is
made again. A largest lr that diverged bounds the grid above (so a choice below it is interior
on that side). Runs already trained are reused: a round trains only the lrs it added, and a
rerun skips the finished runs on disk. Writes ``sweep.md`` (every lr of the final grid, the
choice, and per optimizer whether it is interior or still at the edge after the widenings) and
a tuned config per model variant, ready for ``gsgd run``, with the chosen lrs and no sweep
lists; its header records the grids and the choices.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

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
    Task,
    experiment_dir,
    experiment_dirs,
    run_dir_for,
    run_tasks,
)

__all__ = ["DEFAULT_WIDEN", "Score", "SweepChoice", "SweepResult", "choose_lr", "open_edges",
           "compact_variant", "run_sweep", "sweep_label", "tuned_name", "widen_grid"]

DEFAULT_WIDEN = 2  # widening rounds of gsgd sweep


class Score(NamedTuple):
    """One sweep run's final validation accuracy and train loss (-inf, inf: diverged)."""

    val_acc: float
    train_loss: float


@dataclass(frozen=True)
class SweepChoice:
    """One swept optimizer of one model variant: the final ``grid`` (ascending), the scores of
    each lr over the seeds, the ``lr`` chosen, the ``widenings`` made, the round in which each
    lr was added (0: the config's grid) and the ``edges`` the choice still sits at (): interior,
    "low": the smallest lr, "high": the largest)."""

    label: str
    grid: tuple[float, ...]
    scores: dict[float, list[Score]]
    lr: float
    widenings: int
    added: dict[float, int]
    edges: tuple[str, ...]

    @property
    def interior(self) -> bool:
        """Whether the grid has an lr on both sides of the choice (or a diverged one above)."""
        return not self.edges


@dataclass(frozen=True)
class SweepResult:
    """What the sweep chose, and where it wrote the report and the tuned configs; ``choices``
    per variant and optimizer label (grids, scores, widenings, interior or not)."""

    chosen: dict[str, dict[str, float]]  # variant -> optimizer label -> lr
    report: Path
    configs: list[Path]
    choices: dict[str, dict[str, SweepChoice]] = field(default_factory=dict)


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


def _diverged(scores: list[tuple[float, float]]) -> bool:
    """Whether an lr counts as diverged (a seed diverged: its mean accuracy is -inf)."""
    return any(not math.isfinite(a) for a, _ in scores)


def open_edges(scores: dict[float, list[tuple[float, float]]]) -> tuple[str, ...]:
    """The edges of the grid (the lrs of ``scores``) at which :func:`choose_lr`'s choice sits:
    "low" when it is the smallest lr, "high" when it is the largest and did not diverge (a
    diverged largest lr bounds the grid above); () when it is interior."""
    best, grid = choose_lr(scores), sorted(scores)
    return tuple(side for side, at in (("low", best == grid[0]),
                                       ("high", best == grid[-1] and not _diverged(scores[best])))
                 if at)


def _round_lr(lr: float) -> float:
    """``lr`` to 6 significant digits (the digits of its run label)."""
    return float(f"{lr:g}")


def widen_grid(grid: Sequence[float], edges: Sequence[str]) -> tuple[float, ...]:
    """``grid`` (ascending) with one lr added beyond each of ``edges`` ("low", "high"): the edge
    lr divided / multiplied by the ratio of the two lrs nearest that edge (sqrt(10) for a
    one-lr grid), to 6 significant digits."""
    grid = sorted(set(grid))
    out = set(grid)
    for side in edges:
        pair = grid[:2] if side == "low" else grid[-2:]
        ratio = pair[1] / pair[0] if len(pair) == 2 else math.sqrt(10.0)
        edge = grid[0] / ratio if side == "low" else grid[-1] * ratio
        new = _round_lr(edge)
        beyond = new < grid[0] if side == "low" else new > grid[-1]
        out.add(new if beyond else edge)
    return tuple(sorted(out))


def run_sweep(config: Config, out_dir: Path, options: RunOptions | None = None,
              data: ExperimentData | None = None, widen: int = DEFAULT_WIDEN,
              tuned_epochs: int | None = None) -> SweepResult:
    """Run the lr sweep of ``config`` under ``out_dir/<name>-sweep`` and choose each lr
    (``data``: these splits instead of loading ``[experiment] dataset``; ``widen``: at most
    this many widenings of a grid whose choice is at its edge, 0: none; ``tuned_epochs``: the
    epochs the tuned configs train for, where the sweep itself ran a shortened
    ``config.experiment.epochs``, e.g. ``gsgd sweep --epochs 30`` on a 100-epoch preset)."""
    if widen < 0:
        raise ConfigError(f"widen = {widen}: the number of widenings must be >= 0")
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
             f"; epochs run: {config.experiment.epochs}.", "",
             f"Widening (up to {widen} rounds): a choice at the smallest or the largest lr of its "
             "grid gets one more lr beyond that edge (the edge lr divided / multiplied by the "
             "ratio of its two nearest grid lrs; by sqrt(10) for a one-lr grid), trained on the "
             "same seeds, and the lr is chosen again. A diverged largest lr bounds the grid "
             "above.", ""]
    if overlap:
        lines += [f"**Note: sweep seeds {overlap} are also evaluation seeds**: the runs that "
                  "choose the lr are among those that judge it.", ""]
    with experiment_dir(sweep_dir, options):
        variants = experiment_dirs(base, out_dir)
        choices = _sweep_rounds(variants, widen, options, data, given)
        chosen = {v: {label: c.lr for label, c in per.items()} for v, per in choices.items()}
        configs = []
        for variant, cfg, _exp_dir in variants:
            path = _write_tuned(config, variant, cfg, choices[variant], sweep_dir,
                                tuned_epochs)
            lines += _variant_lines(variant, cfg, choices[variant], widen, path)
            configs.append(path)
        report = sweep_dir / "sweep.md"
        atomic_write_text(report, "\n".join(lines))
    return SweepResult(chosen, report, configs, choices)


class _Slot(NamedTuple):
    """Where a sweep task's score goes: (variant, optimizer label, lr)."""

    variant: str
    label: str
    lr: float


def _sweep_rounds(variants: list[tuple[str, Config, Path]], widen: int, options: RunOptions,
                  data: ExperimentData, given: ExperimentData | None
                  ) -> dict[str, dict[str, SweepChoice]]:
    """Train every grid, then widen the grids whose choice is at an edge (up to ``widen``
    times), training only the lrs added; the choices per variant and label."""
    grids = {(v, s.label): tuple(sorted(set(s.sweep))) for v, cfg, _ in variants
             for s in cfg.optimizers if s.sweep}
    added = {key: dict.fromkeys(grid, 0) for key, grid in grids.items()}
    widenings = dict.fromkeys(grids, 0)
    scores: dict[tuple[str, str], dict[float, list[Score]]] = {key: {} for key in grids}
    for round_ in range(widen + 1):
        tasks: list[Task] = []
        slots: list[_Slot] = []
        for variant, cfg, exp_dir in variants:
            for spec in cfg.optimizers:
                for lr in grids.get((variant, spec.label), ()):
                    if lr in scores[(variant, spec.label)]:
                        continue  # trained in an earlier round
                    run_spec = replace(spec, lr=lr, label=sweep_label(spec, lr), sweep=())
                    for seed in cfg.experiment.seeds:
                        tasks.append((cfg, run_spec, seed,
                                      run_dir_for(exp_dir, run_spec.label, seed)))
                        slots.append(_Slot(variant, spec.label, lr))
        for slot, final in zip(slots, run_tasks(tasks, options, data, given), strict=True):
            scores[(slot.variant, slot.label)].setdefault(slot.lr, []).append(_score(final))
        if round_ == widen:
            break
        grown = False
        for key, grid in grids.items():
            edges = open_edges(scores[key])
            if edges:
                grids[key] = widen_grid(grid, edges)
                widenings[key] += 1
                new = [lr for lr in grids[key] if lr not in added[key]]
                added[key].update(dict.fromkeys(new, round_ + 1))
                grown = True
        if not grown:
            break
    choices: dict[str, dict[str, SweepChoice]] = {v: {} for v, _, _ in variants}
    for (variant, label), grid in grids.items():
        choices[variant][label] = SweepChoice(
            label, grid, scores[(variant, label)], choose_lr(scores[(variant, label)]),
            widenings[(variant, label)], added[(variant, label)],
            open_edges(scores[(variant, label)]))
    return choices


def _data_lines(data: ExperimentData) -> list[str]:
    if data.synthetic:
        return [f"Data: {data.splits.name}.", "",
                f"**{data.note}: these numbers say nothing about the real dataset.**", ""]
    return [f"Data: {data.splits.name} (the real dataset).", ""]


def _score(final: dict) -> Score:
    """(final val accuracy, final train loss) of a run; (-inf, inf) for a diverged one."""
    last = final["final"] or {}
    acc = last.get("val_acc") if final["status"] == "finished" else None
    loss = last.get("train_loss") if acc is not None else None
    return Score(-math.inf if acc is None else acc, math.inf if loss is None else loss)


def _grid_text(grid: Sequence[float]) -> str:
    return "[" + ", ".join(f"{lr:g}" for lr in grid) + "]"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _choice_text(choice: SweepChoice, widen: int) -> str:
    """Whether ``choice`` is interior, or (a warning) at the edge of its grid."""
    tried = f"grid {_grid_text(choice.grid)}, {_plural(choice.widenings, 'widening')}"
    if choice.interior:
        above = [lr for lr in choice.grid if lr > choice.lr]
        note = (f"; the lr above it, {above[0]:g}, diverged: a bound"
                if above and _diverged(choice.scores[above[0]]) else "")
        return f"- {choice.label}: lr {choice.lr:g} is interior ({tried}{note})."
    where = " and ".join({"low": "the smallest", "high": "the largest"}[e] for e in choice.edges)
    fix = (f"a larger `--widen N` (it was {widen})" if widen else
           "`--widen N` (widening was off)")
    return (f"- **Warning: {choice.label}: lr {choice.lr:g} is {where} lr: at the edge of the "
            f"grid after {_plural(choice.widenings, 'widening')}** ({tried}); a better lr may "
            f"lie beyond it: rerun with {fix} or extend `sweep = [...]`.")


def _variant_lines(variant: str, cfg: Config, choices: dict[str, SweepChoice], widen: int,
                   tuned: Path) -> list[str]:
    """One variant's part of ``sweep.md``: every lr of each final grid, and the choices."""
    lines = [f"## {variant}", ""] if variant else []
    lines += ["| optimizer | lr | final val acc | final train loss | diverged | added | chosen |",
              "|---|---|---|---|---|---|---|"]
    for spec in cfg.optimizers:
        if spec.label not in choices:
            continue
        c = choices[spec.label]
        for lr in c.grid:
            accs = [a for a, _ in c.scores[lr] if math.isfinite(a)]
            losses = [x for _, x in c.scores[lr] if math.isfinite(x)]
            n_div = sum(1 for a, _ in c.scores[lr] if not math.isfinite(a))
            acc_txt = f"{100 * statistics.fmean(accs):.2f}" if accs else "-"
            loss_txt = f"{statistics.fmean(losses):.4f}" if losses else "-"
            added = "grid" if c.added[lr] == 0 else f"widening {c.added[lr]}"
            mark = "**yes**" if lr == c.lr else ""
            lines.append(f"| {spec.label} | {lr:g} | {acc_txt} | {loss_txt} | {n_div} | "
                         f"{added} | {mark} |")
    lines += ["", *(_choice_text(choices[s.label], widen) for s in cfg.optimizers
                    if s.label in choices), "", f"Tuned config: {tuned}", ""]
    return lines


NAME_LIMIT = 100  # an experiment name is at most this long (config.NAME_RULE)


def compact_variant(variant: str) -> str:
    """A variant name with runs of equal widths written once with a count: 784-64-64-64-10 ->
    784-64x3-10."""
    parts = variant.split("-")
    out: list[str] = []
    k = 0
    while k < len(parts):
        j = k
        while j + 1 < len(parts) and parts[j + 1] == parts[k]:
            j += 1
        out.append(parts[k] if j == k else f"{parts[k]}x{j - k + 1}")
        k = j + 1
    return "-".join(out)


def tuned_name(name: str, variant: str) -> str:
    """The experiment name of a variant's tuned config: ``<name>-tuned-<variant>``, with the
    variant compacted (:func:`compact_variant`) where the full name would be longer than an
    experiment name may be (a 32-layer MLP's widths)."""
    full = f"{name}-tuned" + (f"-{variant}" if variant else "")
    if len(full) <= NAME_LIMIT:
        return full
    short = f"{name}-tuned-{compact_variant(variant)}"
    return short if len(short) <= NAME_LIMIT else short[:NAME_LIMIT]


def _write_tuned(config: Config, variant: str, cfg: Config, choices: dict[str, SweepChoice],
                 sweep_dir: Path, tuned_epochs: int | None = None) -> Path:
    """Write one variant's tuned config (the chosen lrs, no sweep lists, ``tuned_epochs`` if
    given, else the sweep's epochs); return its path."""
    tuned = tuple(replace(s, lr=choices[s.label].lr, sweep=()) if s.label in choices else s
                  for s in cfg.optimizers)
    swept_epochs = config.experiment.epochs
    epochs = swept_epochs if tuned_epochs is None else tuned_epochs
    if epochs < 1:
        raise ConfigError(f"tuned_epochs = {epochs}: must be >= 1")
    exp = replace(config.experiment, name=tuned_name(config.experiment.name, variant),
                  epochs=epochs)
    tuned_cfg = replace(cfg, experiment=exp, optimizers=tuned)
    path = sweep_dir / f"{exp.name}.toml"
    chosen = {label: c.lr for label, c in choices.items()}
    grids = [f"{label} {_grid_text(c.grid)} -> {c.lr:g} ("
             + ("interior" if c.interior else "AT THE EDGE") + f", "
             f"{_plural(c.widenings, 'widening')})" for label, c in choices.items()]
    header = (f"Tuned by `gsgd sweep` from {config.experiment.name}: lrs chosen on the "
              f"validation split ({json.dumps(chosen)}).\nGrids (final, after widening): "
              + "; ".join(grids)
              + (f"\nThe sweep trained {_plural(swept_epochs, 'epoch')}; this config trains "
                 f"{epochs}." if epochs != swept_epochs else "")
              + f"\nRun: gsgd run {path}")
    atomic_write_text(path, config_to_toml(tuned_cfg, header))
    return path
