"""Reports of an experiment directory: a Markdown table over seeds and PNG learning curves.

``write_report(exp_dir)`` reads every ``<label>/seed<k>/metrics.jsonl`` (finished, diverged or
still running) and writes, atomically, ``report.md`` and ``curves.png``. What the numbers are:

* **train loss**: the mean of the minibatch losses optimised in the epoch (``train_loss``);
  **train-eval** loss / accuracy: eval mode, on a fixed subset of the training set
  (``train_eval_loss`` / ``train_eval_acc``);
* **final**: the last epoch of each run, or with ``last_k`` > 1 the mean of its last k evaluated
  epochs; **test acc at best val**: a run's test accuracy in its (first) epoch of highest
  validation accuracy. No number is selected on the test split;
* **diverged**: the run's training loss or optimizer step turned non-finite (a ``diverged``
  line), or its last evaluated loss is not finite. Diverged runs are listed and never averaged:
  ``n`` (tables) and the legends count the runs averaged;
* **at chance**: a final accuracy <= :data:`CHANCE_FACTOR` / classes; flagged (still averaged);
* **gaps**: each optimizer minus the first plain-SGD one, paired by seed over the seeds where
  both runs are averaged: mean, 95 % t-interval (:mod:`gsgd.experiments.stats`) and n.

Every report names its data (a SYNTHETIC banner where synthetic) and the epochs actually run.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from gsgd.experiments.config import DATASET_SHAPES, ExperimentSection
from gsgd.experiments.files import atomic_open, atomic_write_text, read_json
from gsgd.experiments.stats import t_interval

__all__ = ["CHANCE_FACTOR", "Curves", "Gap", "OptimizerRow", "RunRecord", "best_val_epoch",
           "load_runs", "markdown_report", "nonfinite_losses", "paired_gaps", "plot_curves",
           "summarize", "upgrade_record", "write_group_report", "write_report"]

CHANCE_FACTOR = 1.5  # a final accuracy <= 1.5 / classes is flagged as "at chance"
LEVEL = 0.95  # of the t-intervals of the gaps


# --------------------------------------------------------------------------- one epoch, one run


def nonfinite_losses(rec: dict) -> list[str]:
    """The ``*_loss`` keys of a metrics record whose value is recorded and not finite."""
    return [k for k, v in rec.items()
            if k.endswith("_loss") and isinstance(v, int | float) and not math.isfinite(v)]


def best_val_epoch(epochs: list[dict]) -> dict | None:
    """The first of ``epochs`` with the highest finite validation accuracy (None if none)."""
    best = None
    for h in epochs:
        v = h.get("val_acc")
        if v is not None and math.isfinite(v) and (best is None or v > best["val_acc"]):
            best = h
    return best


@dataclass
class RunRecord:
    """One run as found on disk."""

    label: str
    seed: int
    optimizer: str
    lr: str
    history: list[dict]
    finished: bool
    diverged: bool
    reason: str | None = None  # why it diverged

    @property
    def epochs(self) -> list[dict]:
        """The completed epochs (without the divergence line)."""
        return [h for h in self.history if not h.get("diverged")]

    def values(self, key: str) -> list[float]:
        """The recorded values of ``key``, epoch by epoch."""
        return [h[key] for h in self.epochs if h.get(key) is not None]

    @property
    def evaluated(self) -> list[dict]:
        """The completed epochs that were evaluated (every ``eval_every``-th, and the last)."""
        return [h for h in self.epochs if "val_acc" in h]

    def last(self, key: str, k: int = 1) -> float | None:
        """``key`` in the last evaluated epoch (``k`` > 1: its mean over the last k evaluated
        epochs); None when not recorded there."""
        vals = [h[key] for h in self.evaluated[-k:] if h.get(key) is not None]
        return statistics.fmean(vals) if vals else None

    def at_best_val(self, key: str) -> float | None:
        """``key`` in the run's epoch of highest validation accuracy."""
        best = best_val_epoch(self.epochs)
        return None if best is None else best.get(key)

    @property
    def running(self) -> bool:
        """Neither finished nor diverged (still training, or stopped and resumable)."""
        return not self.finished and not self.diverged


_OLD_NAMES = {"train_loss": "train_eval_loss", "train_acc": "train_eval_acc"}


def upgrade_record(rec: dict) -> dict:
    """A metrics record in today's names. A record of an earlier runner with ``train_acc`` held
    the eval-mode loss and accuracy on the train subset as ``train_loss`` / ``train_acc`` (the
    minibatch mean it had computed was overwritten): they are renamed ``train_eval_loss`` /
    ``train_eval_acc``, and the record has no ``train_loss``. Other records are returned as
    they are (an old epoch without evaluation kept its minibatch mean as ``train_loss``)."""
    if "train_acc" not in rec or "train_eval_acc" in rec:
        return rec
    return {_OLD_NAMES.get(k, k): v for k, v in rec.items()}


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                out.append(upgrade_record(json.loads(line)))
            except json.JSONDecodeError:
                break  # a partly written last line of a killed run
    return out


def _experiment_info(exp_dir: Path) -> dict:
    path = exp_dir / "experiment.json"
    return read_json(path) if path.exists() else {}


def _divergence(history: list[dict], final: dict | None) -> str | None:
    """Why a run counts as diverged (None: it did not)."""
    for h in history:
        if h.get("diverged"):
            where = f"epoch {h['epoch']}" + (f", batch {h['batch']}" if "batch" in h else "")
            return f"{where}: {h.get('reason', 'diverged')}"
    if final is not None and final.get("status") == "diverged":
        return final.get("reason") or "diverged"
    evaluated = [h for h in history if any(k.endswith("_loss") for k in h)]
    if evaluated and nonfinite_losses(evaluated[-1]):
        last = evaluated[-1]
        return f"epoch {last['epoch']}: non-finite {', '.join(nonfinite_losses(last))}"
    return None


def load_runs(exp_dir: str | Path) -> list[RunRecord]:
    """Every run under ``exp_dir`` (``<label>/seed<k>/``), in the config's optimizer order."""
    exp_dir = Path(exp_dir)
    order = _experiment_info(exp_dir).get("labels", [])
    labels = [d.name for d in exp_dir.iterdir() if d.is_dir() and any(d.glob("seed*/spec.json"))]
    labels.sort(key=lambda x: (order.index(x) if x in order else len(order), x))
    runs = []
    for label in labels:
        for run_dir in sorted((exp_dir / label).glob("seed*"), key=lambda p: int(p.name[4:])):
            spec_path = run_dir / "spec.json"
            if not spec_path.exists():
                continue
            spec = read_json(spec_path)
            final_path = run_dir / "final.json"
            final = read_json(final_path) if final_path.exists() else None
            history = _read_jsonl(run_dir / "metrics.jsonl")
            opt = spec["optimizer"]
            reason = _divergence(history, final)
            runs.append(RunRecord(
                label=label, seed=int(spec["seed"]), optimizer=opt["name"],
                lr=final["lr"] if final else str(opt["lr"]), history=history,
                finished=final is not None, diverged=reason is not None, reason=reason,
            ))
    return runs


# --------------------------------------------------------------------------- statistics


@dataclass
class OptimizerRow:
    """The statistics of one optimizer over its seeds: ``values`` of the runs averaged (the
    non-diverged ones), ``averaged`` their seeds, ``chance`` the (seed, accuracy) of those at
    chance accuracy."""

    label: str
    optimizer: str
    lr: str
    values: dict[str, list[float]] = field(default_factory=dict)
    seeds: int = 0
    finished: int = 0
    diverged: int = 0
    running: int = 0
    epochs: list[int] = field(default_factory=list)
    averaged: list[int] = field(default_factory=list)
    chance: list[tuple[int, float]] = field(default_factory=list)

    @property
    def n(self) -> int:
        """How many runs are averaged."""
        return len(self.averaged)


_KEYS = ("test_acc", "test_acc_at_best_val", "val_acc", "train_loss", "train_eval_loss", "time")


def accuracy_key(runs: list[RunRecord]) -> str:
    """``test_acc`` when any run evaluated the test split, else ``val_acc`` (lr sweeps)."""
    return "test_acc" if any(r.last("test_acc") is not None for r in runs) else "val_acc"


def summarize(runs: list[RunRecord], last_k: int = 1,
              classes: int | None = None) -> list[OptimizerRow]:
    """Per label, over its non-diverged runs: final (``last_k`` > 1: mean of the last k
    evaluated epochs) test / val accuracy and train / train-eval loss, test accuracy at the
    best-validation epoch, s/epoch; runs at chance accuracy when ``classes`` is given."""
    rows: dict[str, OptimizerRow] = {}
    acc_key = accuracy_key(runs)
    for run in runs:
        row = rows.setdefault(run.label, OptimizerRow(run.label, run.optimizer, run.lr,
                                                      {k: [] for k in _KEYS}))
        row.seeds += 1
        row.diverged += run.diverged
        if run.diverged:
            continue
        row.finished += run.finished
        row.running += run.running
        row.averaged.append(run.seed)
        row.epochs.append(len(run.epochs))
        times = run.values("time")
        values = {"test_acc": run.last("test_acc", last_k),
                  "test_acc_at_best_val": run.at_best_val("test_acc"),
                  "val_acc": run.last("val_acc", last_k),
                  "train_loss": run.last("train_loss", last_k),
                  "train_eval_loss": run.last("train_eval_loss", last_k),
                  "time": statistics.fmean(times) if times else None}
        for key, v in values.items():
            if v is not None and math.isfinite(v):
                row.values[key].append(v)
        acc = run.last(acc_key)
        if classes and acc is not None and acc <= CHANCE_FACTOR / classes:
            row.chance.append((run.seed, acc))
    return list(rows.values())


class Gap(NamedTuple):
    """Per-seed differences ``label`` minus ``reference`` of one metric."""

    label: str
    reference: str
    diffs: list[float]

    def text(self, scale: float = 100.0, digits: int = 2) -> str:
        """mean, 95 % t-interval, n and sd, e.g. ``+0.33, 95% CI [-1.36, +2.02] (n = 3)``."""
        if not self.diffs:
            return "no seed where both runs are averaged (n = 0)"
        iv = t_interval([d * scale for d in self.diffs], LEVEL)
        if iv.n == 1:
            return f"{iv.mean:+.{digits}f} (n = 1 seed: no interval)"
        return (f"{iv.mean:+.{digits}f}, {100 * LEVEL:g}% CI [{iv.low:+.{digits}f}, "
                f"{iv.high:+.{digits}f}] (n = {iv.n} seeds, sd {iv.sd:.{digits}f})")


def paired_gaps(runs: list[RunRecord], key: str = "test_acc", last_k: int = 1) -> list[Gap]:
    """A :class:`Gap` of the final ``key`` (``last_k``: mean of the last k epochs) for every
    optimizer other than the first plain-SGD one, paired over the seeds where both runs are
    averaged (not diverged, ``key`` recorded)."""
    reference = next((r.label for r in runs if r.optimizer == "sgd"), None)
    if reference is None:
        return []
    by = {(r.label, r.seed): r.last(key, last_k) for r in runs
          if not r.diverged and r.last(key) is not None}
    labels = list(dict.fromkeys(r.label for r in runs if r.label != reference))
    out = []
    for label in labels:
        seeds = sorted(s for (lab, s) in by if lab == label and (reference, s) in by)
        out.append(Gap(label, reference, [by[(label, s)] - by[(reference, s)] for s in seeds]))
    return out


# --------------------------------------------------------------------------- text


def _mean_std(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    if not values:
        return "-"
    m = statistics.fmean(values) * scale
    if len(values) == 1:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ± {statistics.stdev(values) * scale:.{digits}f}"


def _range(values: list[int]) -> str:
    if not values:
        return "-"
    return str(values[0]) if len(set(values)) == 1 else f"{min(values)}-{max(values)}"


def _classes(info: dict) -> int | None:
    if info.get("num_classes"):
        return int(info["num_classes"])
    shape = DATASET_SHAPES.get(info.get("dataset", ""))
    return shape[1] if shape else None


def _planned_epochs(info: dict) -> int | None:
    exp = (info.get("config") or {}).get("experiment")
    if exp is None:
        return None
    return int(exp.get("epochs", ExperimentSection.epochs))


def _data_lines(info: dict) -> list[str]:
    """Where the numbers come from: the data (a SYNTHETIC banner where synthetic)."""
    if not info:
        return ["Data: unknown (no experiment.json).", ""]
    name = info.get("data") or info.get("dataset") or "unknown"
    sizes = info.get("sizes")
    size_txt = (f"; {sizes['train']} train / {sizes['val']} val / {sizes['test']} test examples"
                if sizes else "")
    if info.get("synthetic"):
        return [f"Data: {name}{size_txt}.", "",
                f"**{info.get('note') or 'SYNTHETIC DATA'}: these numbers say nothing about "
                "the real dataset.**", ""]
    return [f"Data: {name} (the real dataset{size_txt}).", ""]


def _epoch_lines(info: dict, runs: list[RunRecord]) -> list[str]:
    """The epochs actually run (and a note when the description claims another number)."""
    done = [len(r.epochs) for r in runs if not r.diverged]
    planned = _planned_epochs(info)
    text = f"Epochs run: {_range(done)}" if done else "Epochs run: none (every run diverged)"
    if planned is not None:
        text += f" (of {planned} planned"
        unfinished = sum(r.running for r in runs)
        text += f"; {unfinished} run(s) unfinished)" if unfinished else ")"
    lines = [text + "."]
    claimed = {int(x) for x in re.findall(r"(\d+) epochs", info.get("description", ""))}
    if done and claimed and claimed != set(done):
        lines.append(f"Note: the description says {', '.join(map(str, sorted(claimed)))} "
                     f"epochs; {_range(done)} were run.")
    return [*lines, ""]


def _title(exp_dir: Path, info: dict) -> str:
    return info.get("name", exp_dir.name) + (f" / {info['variant']}"
                                             if info.get("variant") else "")


def markdown_report(exp_dir: Path, runs: list[RunRecord], title: str = "",
                    last_k: int = 1) -> str:
    """The Markdown text of ``report.md``."""
    info = _experiment_info(exp_dir)
    lines = [f"# {title or _title(exp_dir, info)}", ""]
    if info.get("description"):
        lines += [info["description"], ""]
    lines += _data_lines(info) + _epoch_lines(info, runs)
    classes = _classes(info)
    rows = summarize(runs, last_k, classes)
    acc = accuracy_key(runs).removesuffix("_acc")
    fin = "final" if last_k == 1 else f"last-{last_k}"
    lines += [
        f"Accuracies in %, mean ± std over the n runs averaged. {fin} = "
        + ("the last epoch" if last_k == 1 else f"the mean of each run's last {last_k} "
           "evaluated epochs")
        + "; test acc at best val = each run's test accuracy in its epoch of highest validation "
        "accuracy (no column is selected on the test split); train loss = mean of the minibatch "
        "losses optimised in the epoch; train-eval loss = eval-mode loss on a fixed subset of "
        "the training set. Diverged runs are listed below and not averaged.", "",
        f"| optimizer | lr | {fin} test acc | test acc at best val | {fin} val acc | "
        f"{fin} train loss | {fin} train-eval loss | s/epoch | epochs | n | runs |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        status = [f"{r.finished} finished"] + [f"{c} {what}" for c, what in
                                               ((r.running, "unfinished"),
                                                (r.diverged, "diverged")) if c]
        v = r.values
        lines.append(
            f"| {r.label} | {r.lr} | {_mean_std(v['test_acc'], 100)} | "
            f"{_mean_std(v['test_acc_at_best_val'], 100)} | {_mean_std(v['val_acc'], 100)} | "
            f"{_mean_std(v['train_loss'], 1, 4)} | {_mean_std(v['train_eval_loss'], 1, 4)} | "
            f"{_mean_std(v['time'], 1, 1)} | {_range(r.epochs)} | {r.n} | {', '.join(status)} |")
    diverged = [r for r in runs if r.diverged]
    if diverged:
        lines += ["", "Diverged (not averaged):", ""]
        lines += [f"- {r.label} seed {r.seed}: {r.reason}" for r in diverged]
    chance = [(r.label, s, a) for r in rows for s, a in r.chance]
    if chance and classes:
        lines += ["", f"**At chance** (final {acc} accuracy <= {CHANCE_FACTOR:g} x chance = "
                  f"{100 * CHANCE_FACTOR / classes:.1f}%; averaged, but these runs learned "
                  "nothing):", ""]
        lines += [f"- {label} seed {s}: {100 * a:.2f}%" for label, s, a in chance]
    old = [r for r in runs if not r.diverged and r.last("train_eval_loss") is not None
           and r.last("train_loss") is None]
    if old:
        lines += ["", f"The train loss (mean minibatch loss) was not recorded for {len(old)} "
                  "run(s): their metrics were written before the runner recorded it (their "
                  "train-eval loss is the eval-mode loss on the train subset, which earlier "
                  "reports mislabelled \"train loss\")."]
    gaps = paired_gaps(runs, f"{acc}_acc", last_k)
    if gaps:
        lines += ["", f"Gap in {fin} {acc} accuracy (percentage points), paired by seed: mean, "
                  f"{100 * LEVEL:g}% t-interval over the n seeds where both runs are averaged:",
                  ""]
        lines += [f"- {g.label} − {g.reference}: {g.text()}" for g in gaps]
    lines += ["", "Learning curves: curves.png", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- plot


class Curves(NamedTuple):
    """What :func:`plot_curves` drew: per axis its y label, legend entries and, for an empty
    axis, the note that says why."""

    ylabels: list[str]
    legends: list[list[str]]
    notes: list[str]


def plot_curves(runs: list[RunRecord], path: Path, title: str = "") -> Curves:
    """Test (or val) accuracy and train loss per epoch: the mean over the non-diverged runs with
    a min-max band per optimizer; the legend counts the runs drawn (and those that diverged).
    An axis with nothing to draw says why."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    acc_key = accuracy_key(runs)
    loss_key = "train_loss" if any(r.values("train_loss") for r in runs) else "train_eval_loss"
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for label in dict.fromkeys(r.label for r in runs):
        group = [r for r in runs if r.label == label and not r.diverged]
        n_div = sum(1 for r in runs if r.label == label and r.diverged)
        legend = f"{label} (n={len(group)}" + (f"; {n_div} diverged)" if n_div else ")")
        for ax, key in zip(axes, (acc_key, loss_key), strict=True):
            per_epoch: dict[int, list[float]] = {}
            for r in group:
                for h in r.epochs:
                    v = h.get(key)
                    if v is not None and math.isfinite(v):
                        per_epoch.setdefault(h["epoch"], []).append(v * (100 if "acc" in key
                                                                          else 1))
            if not per_epoch:
                continue
            xs = sorted(per_epoch)
            mean = [statistics.fmean(per_epoch[x]) for x in xs]
            line, = ax.plot(xs, mean, marker="." if len(xs) < 30 else None, label=legend)
            ax.fill_between(xs, [min(per_epoch[x]) for x in xs], [max(per_epoch[x]) for x in xs],
                            color=line.get_color(), alpha=0.2)
    axes[0].set_ylabel(f"{acc_key.replace('_acc', '')} accuracy (%)")
    axes[1].set_ylabel("train loss (mean minibatch loss of the epoch)" if loss_key == "train_loss"
                       else "train-eval loss (eval mode, train subset)")
    if all(v > 0 for line in axes[1].get_lines() for v in line.get_ydata()) \
            and axes[1].get_lines():
        axes[1].set_yscale("log")
    n_div = sum(r.diverged for r in runs)
    notes = []
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend()
        else:
            why = (f"nothing to plot: all {len(runs)} runs diverged" if n_div == len(runs)
                   else "nothing to plot: no run has recorded an evaluated epoch yet")
            ax.text(0.5, 0.5, why, transform=ax.transAxes, ha="center", va="center",
                    wrap=True)
            notes.append(why)
            ax.set_xticks([])
            ax.set_yticks([])
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    drawn = Curves([ax.get_ylabel() for ax in axes],
                   [[line.get_label() for line in ax.get_lines()] for ax in axes], notes)
    plt.close(fig)
    return drawn


# --------------------------------------------------------------------------- files


def report_last_k(exp_dir: Path) -> int:
    """``[experiment] report_last_k`` of the experiment's config (1 when absent)."""
    exp = (_experiment_info(exp_dir).get("config") or {}).get("experiment", {})
    return int(exp.get("report_last_k", 1))


def write_report(exp_dir: str | Path, last_k: int | None = None) -> Path:
    """Write ``report.md`` and ``curves.png`` into ``exp_dir``; return the report's path.
    ``last_k``: "final" numbers are the mean of each run's last k evaluated epochs (default:
    the config's ``report_last_k``, else 1)."""
    exp_dir = Path(exp_dir)
    runs = load_runs(exp_dir)
    if not runs:
        raise FileNotFoundError(f"{exp_dir}: no runs found (expected <label>/seed<k>/spec.json)")
    last_k = report_last_k(exp_dir) if last_k is None else last_k
    text = markdown_report(exp_dir, runs, last_k=last_k)
    atomic_write_text(exp_dir / "report.md", text)
    plot_curves(runs, exp_dir / "curves.png", title=_title(exp_dir, _experiment_info(exp_dir)))
    return exp_dir / "report.md"


def write_group_report(group_dir: str | Path, exp_dirs: list[Path],
                       last_k: int | None = None) -> Path:
    """One table over model variants (e.g. widths): each optimizer's final test accuracy and the
    paired gaps to SGD per variant, the epochs run, with links to the per-variant reports."""
    group_dir = Path(group_dir)
    infos = [_experiment_info(d) for d in exp_dirs]
    lines = [f"# {group_dir.name}: per model variant", ""]
    synthetic = [i for i in infos if i.get("synthetic")]
    lines += _data_lines(synthetic[0] if synthetic else (infos[0] if infos else {}))
    header_done = False
    for exp_dir, info in zip(exp_dirs, infos, strict=True):
        k = report_last_k(exp_dir) if last_k is None else last_k
        runs = load_runs(exp_dir)
        rows = summarize(runs, k, _classes(info))
        acc = accuracy_key(runs)
        gaps = paired_gaps(runs, acc, k)
        if not header_done:
            fin = "Final" if k == 1 else f"Last-{k}-epoch mean"
            planned = _planned_epochs(info)
            lines += [f"{fin} {acc.removesuffix('_acc')} accuracy (%), mean ± std over the n "
                      "runs averaged (diverged runs are not); gaps paired by seed: mean and "
                      f"{100 * LEVEL:g}% t-interval."
                      + (f" Epochs planned: {planned}." if planned is not None else ""), "",
                      "| variant | " + " | ".join([r.label for r in rows]
                                                  + [f"{g.label} − {g.reference}" for g in gaps])
                      + " | epochs run | report |",
                      "|---" * (len(rows) + len(gaps) + 3) + "|"]
            header_done = True
        cells = [f"{_mean_std(r.values[acc], 100)} (n={r.n})" for r in rows]
        cells += [g.text() for g in gaps]
        done = _range([len(r.epochs) for r in runs if not r.diverged])
        rel = exp_dir.relative_to(group_dir) if exp_dir.is_relative_to(group_dir) else exp_dir
        lines.append(f"| {exp_dir.name} | " + " | ".join(cells) + f" | {done} | {rel}/report.md |")
    lines.append("")
    path = group_dir / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path
