"""The study's cross-experiment figures: a paired gap against a property of the model variant.

One point per (experiment directory, optimizer): the paired difference ``label`` minus
``baseline`` of a metric (:func:`gsgd.experiments.report.metric_gaps`: per seed, over the seeds
where both runs are averaged), drawn at its mean with its 95% t-interval, against ``x``:

- ``depth``: the number of hidden layers of an MLP variant (``len(widths) - 2``);
- ``H_over_m``: the invariant ratio H / m of the variant's G-structure (H hidden units, m
  weights in G-blocks; recorded in experiment.json by the runner), the paper's Fashion-MNIST axis;
- ``width``: the first hidden width of an MLP variant.

A directory given is an experiment directory (it has experiment.json) or a group directory (its
model variants are the subdirectories that have one). ``gsgd figures`` writes the plot and a
markdown table of the same numbers, so that every point of the figure can be read exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from gsgd.experiments.config import ConfigError
from gsgd.experiments.files import atomic_open, atomic_write_text, read_json
from gsgd.experiments.report import (
    LEVEL,
    Metric,
    gap_metrics,
    load_runs,
    metric_gaps,
    resolve_baseline,
    table_metrics,
)

__all__ = ["AXES", "GapPoint", "experiment_dirs_under", "gap_points", "gap_table", "plot_gaps",
           "variant_x"]

AXES = ("depth", "H_over_m", "width")
AXIS_LABELS = {"depth": "hidden layers", "H_over_m": "invariant ratio H / m",
               "width": "hidden width h"}


@dataclass(frozen=True)
class GapPoint:
    """One experiment's paired gap of ``metric`` (``label`` minus ``baseline``), at ``x``."""

    experiment: str  # the experiment directory's name
    x: float
    label: str
    baseline: str
    metric: str
    n: int
    mean: float | None  # report units (accuracy: percentage points); None when n = 0
    low: float | None  # 95% t-interval (None when n < 2)
    high: float | None
    better: int
    worse: int


def experiment_dirs_under(paths: Sequence[str | Path]) -> list[Path]:
    """The experiment directories of ``paths``: each one itself when it has experiment.json,
    else its subdirectories that have one (a group of model variants), in name order."""
    out: list[Path] = []
    for p in map(Path, paths):
        if (p / "experiment.json").is_file():
            out.append(p)
            continue
        subs = sorted(d for d in p.iterdir() if (d / "experiment.json").is_file()) \
            if p.is_dir() else []
        if not subs:
            raise ConfigError(f"{p}: not an experiment directory (no experiment.json in it or "
                              "in its subdirectories); give a results directory of gsgd run")
        out += subs
    return out


def variant_x(exp_dir: Path, axis: str) -> float:
    """The value of ``axis`` (one of :data:`AXES`) for the model of ``exp_dir``."""
    info = read_json(exp_dir / "experiment.json")
    model = info.get("config", {}).get("model", {})
    widths = model.get("widths")
    if axis in ("depth", "width"):
        if model.get("kind", "mlp") != "mlp" or not widths or isinstance(widths[0], list):
            raise ConfigError(f"{exp_dir}: --x {axis} needs an MLP with one widths profile")
        return float(len(widths) - 2) if axis == "depth" else float(widths[1])
    if axis == "H_over_m":
        dims = info.get("structure") or {}
        if dims.get("H_over_m") is None:
            raise ConfigError(f"{exp_dir}: experiment.json records no G-structure (written by "
                              "an earlier runner): rerun `gsgd run` on its config to record it")
        return float(dims["H_over_m"])
    raise ConfigError(f"--x {axis!r}: supported axes are {', '.join(AXES)}")


def _metric(runs, key: str) -> Metric:
    for m in gap_metrics(runs):
        if m.key == key:
            return m
    known = ", ".join(m.key for m in gap_metrics(runs))
    if not known:  # nothing recorded (every run diverged): the gaps are n = 0 points
        for m in table_metrics(runs):
            if m.key == key:
                return m
    raise ConfigError(f"--metric {key!r}: the runs record {known}")


def gap_points(dirs: Sequence[Path], axis: str, metric: str = "test_acc",
               baseline: str | None = None) -> list[GapPoint]:
    """The :class:`GapPoint` of every optimizer other than the baseline (default: the first
    plain-SGD one) in every experiment directory of ``dirs``."""
    points = []
    for d in dirs:
        runs = load_runs(d)
        if not runs:
            continue
        ref = resolve_baseline(runs, baseline)
        m = _metric(runs, metric)
        x = variant_x(d, axis)
        for gap in metric_gaps(runs, m, ref):
            iv = gap.interval
            two = iv is not None and iv.n > 1
            signs = gap.signs
            points.append(GapPoint(d.name, x, gap.label, gap.reference, m.key, gap.n,
                                   None if iv is None else iv.mean,
                                   iv.low if two else None, iv.high if two else None,
                                   signs.better, signs.worse))
    return points


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:+.2f}"


def gap_table(points: Sequence[GapPoint], axis: str) -> str:
    """The points as a markdown table, sorted by label then x."""
    lines = [f"| {AXIS_LABELS[axis]} | gap | mean | {100 * LEVEL:g}% CI | n | better / worse "
             "| experiment |", "|---|---|---|---|---|---|---|"]
    for p in sorted(points, key=lambda p: (p.label, p.x)):
        x = f"{p.x:.4f}" if axis == "H_over_m" else f"{p.x:g}"
        ci = "-" if p.low is None else f"[{p.low:+.2f}, {p.high:+.2f}]"
        lines.append(f"| {x} | {p.label} − {p.baseline} | {_num(p.mean)} | {ci} | {p.n} | "
                     f"{p.better} / {p.worse} | {p.experiment} |")
    return "\n".join(lines) + "\n"


def plot_gaps(points: Sequence[GapPoint], path: Path, axis: str, title: str = "") -> Path:
    """Each label's gaps against ``axis`` (mean with its t-interval as error bars), a line at 0;
    ``path`` and the table beside it (``path`` with suffix .md) written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    labels = list(dict.fromkeys(p.label for p in points))
    for k, label in enumerate(labels):
        mine = sorted((p for p in points if p.label == label and p.mean is not None),
                      key=lambda p: p.x)
        if not mine:
            continue
        shift = 1 + 0.03 * (k - (len(labels) - 1) / 2)  # side by side on a log axis
        xs = [p.x * shift for p in mine]
        ys = [p.mean for p in mine]
        err = [[p.mean - p.low if p.low is not None else 0 for p in mine],
               [p.high - p.mean if p.high is not None else 0 for p in mine]]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3,
                    label=f"{label} − {mine[0].baseline}")
    ax.axhline(0.0, color="grey", lw=0.8)
    ax.set_xscale("log", base=2 if axis in ("depth", "width") else 10)
    if axis in ("depth", "width"):
        xs = sorted({p.x for p in points})
        ax.set_xticks(xs, [f"{x:g}" for x in xs])
    ax.set_xlabel(AXIS_LABELS[axis])
    metric = points[0].metric if points else "test_acc"
    unit = "" if metric == "train_loss" else " (pp)"
    ax.set_ylabel(f"paired gap of {metric}{unit}, {100 * LEVEL:g}% CI")
    if title:
        ax.set_title(title)
    if labels:
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)
    atomic_write_text(path.with_suffix(".md"), gap_table(points, axis))
    return path
