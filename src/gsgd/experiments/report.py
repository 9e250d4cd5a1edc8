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
* **gaps**: each optimizer minus the baseline (the first plain-SGD one, or the label named by
  ``baseline`` / ``[experiment] report_baseline``), paired by seed over the seeds where both
  runs are averaged, of the final test (sweeps: val) accuracy, the test accuracy at the
  best-validation epoch and the final train loss (lower is better): mean, 95 % t-interval
  (:mod:`gsgd.experiments.stats`), sd, n and the sign count (seeds better / worse / tied);
* **per run**: status, epochs, and the optimizer's counters as the runner recorded them at the
  last epoch: ``clipped`` (G-SGD / G-Adam ``clip_counts()`` total) and ``skipped_steps``.

Every report names its data (a SYNTHETIC banner where synthetic) and the epochs actually run.
``write_report`` also writes ``summary.json`` (sorted keys): per optimizer the table's means and
stds, the paired gaps and the per-run counters, for documents that cite the numbers.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from gsgd.experiments.config import DATASET_SHAPES, ConfigError, ExperimentSection
from gsgd.experiments.files import atomic_open, atomic_write_text, read_json
from gsgd.experiments.stats import Interval, t_interval

__all__ = ["CHANCE_FACTOR", "Curves", "Gap", "Metric", "OptimizerRow", "PairedGap",
           "RunCounters", "RunRecord", "SignCount", "all_gaps", "best_val_epoch", "gap_metrics",
           "load_runs", "markdown_report", "metric_gaps", "nonfinite_losses", "paired_gaps",
           "plot_curves", "resolve_baseline", "run_counters", "run_value", "sign_count",
           "summarize", "summary_record", "table_metrics", "upgrade_record", "write_group_report",
           "write_report"]

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


def run_value(run: RunRecord, key: str, last_k: int = 1) -> float | None:
    """One run's number of a table column: ``test_acc_at_best_val`` (the test accuracy in its
    best-validation epoch), ``time`` (mean s/epoch), else the final ``key`` (``last_k`` > 1:
    the mean of its last k evaluated epochs); None when not recorded or not finite."""
    if key == "test_acc_at_best_val":
        v = run.at_best_val("test_acc")
    elif key == "time":
        times = run.values("time")
        v = statistics.fmean(times) if times else None
    else:
        v = run.last(key, last_k)
    return v if v is not None and math.isfinite(v) else None


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
        for key in _KEYS:
            v = run_value(run, key, last_k)
            if v is not None:
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


class Metric(NamedTuple):
    """A metric of the paired-gap table: the run value ``key`` (:func:`run_value`), its name in
    the report, which direction is better, and its report units (``scale``, ``digits``)."""

    key: str
    name: str
    higher_is_better: bool
    scale: float = 1.0
    digits: int = 4


class SignCount(NamedTuple):
    """In how many paired seeds an optimizer is better / worse than / tied with the baseline."""

    better: int
    worse: int
    tied: int

    @property
    def n(self) -> int:
        """How many seeds were compared."""
        return self.better + self.worse + self.tied

    def text(self) -> str:
        """e.g. ``better in 4 of 5 seeds, worse in 1, tied 0``."""
        return f"better in {self.better} of {self.n} seeds, worse in {self.worse}, tied {self.tied}"


def sign_count(diffs: list[float] | tuple[float, ...], higher_is_better: bool) -> SignCount:
    """The :class:`SignCount` of per-seed differences (optimizer minus baseline); an exactly
    equal pair is a tie."""
    better = sum(1 for d in diffs if (d > 0 if higher_is_better else d < 0))
    tied = sum(1 for d in diffs if d == 0)
    return SignCount(better, len(diffs) - better - tied, tied)


@dataclass(frozen=True)
class PairedGap:
    """Per-seed differences ``label`` minus ``reference`` of ``metric``, over ``seeds`` (the seeds
    where both runs are averaged); ``diffs`` in the metric's own units (accuracies: fractions)."""

    label: str
    reference: str
    metric: Metric
    seeds: tuple[int, ...]
    diffs: tuple[float, ...]

    @property
    def n(self) -> int:
        """How many seeds are paired."""
        return len(self.diffs)

    @property
    def interval(self) -> Interval | None:
        """Mean and t-interval of the differences in report units (None when n = 0)."""
        if not self.diffs:
            return None
        return t_interval([d * self.metric.scale for d in self.diffs], LEVEL)

    @property
    def signs(self) -> SignCount:
        """Seeds where ``label`` is better / worse / tied (the metric's direction)."""
        return sign_count(self.diffs, self.metric.higher_is_better)


def resolve_baseline(runs: list[RunRecord], name: str | None = None) -> str | None:
    """The label the gaps are taken against: ``name`` when given (it must be a label of
    ``runs``: :class:`ConfigError` otherwise), else the first plain-SGD optimizer (None: none)."""
    if name:
        labels = list(dict.fromkeys(r.label for r in runs))
        if name not in labels:
            raise ConfigError(f"report baseline {name!r}: no optimizer has this label; labels: "
                              f"{', '.join(labels)}")
        return name
    return next((r.label for r in runs if r.optimizer == "sgd"), None)


def gap_metrics(runs: list[RunRecord], last_k: int = 1) -> list[Metric]:
    """The metrics of the paired-gap table that ``runs`` recorded: final test accuracy (val
    accuracy where no test split was evaluated, as in sweeps), test accuracy at the
    best-validation epoch, final train loss (lower is better)."""
    return [m for m in table_metrics(runs, last_k)
            if any(not r.diverged and run_value(r, m.key, last_k) is not None for r in runs)]


def table_metrics(runs: list[RunRecord], last_k: int = 1) -> list[Metric]:
    """Every metric the paired-gap table can hold, recorded by ``runs`` or not (see
    :func:`gap_metrics` for those they recorded)."""
    fin = "final" if last_k == 1 else f"last-{last_k}"
    acc = accuracy_key(runs)
    return [Metric(acc, f"{fin} {acc.removesuffix('_acc')} acc", True, 100.0, 2),
            Metric("test_acc_at_best_val", "test acc at best val", True, 100.0, 2),
            Metric("train_loss", f"{fin} train loss", False, 1.0, 4)]


def metric_gaps(runs: list[RunRecord], metric: Metric, reference: str | None,
                last_k: int = 1) -> list[PairedGap]:
    """A :class:`PairedGap` of ``metric`` for every label other than ``reference`` (in run
    order), paired over the seeds where both runs are averaged (not diverged, value recorded);
    [] without a reference."""
    if reference is None:
        return []
    by = {(r.label, r.seed): v for r in runs if not r.diverged
          and (v := run_value(r, metric.key, last_k)) is not None}
    out = []
    for label in dict.fromkeys(r.label for r in runs if r.label != reference):
        seeds = tuple(sorted(s for (lab, s) in by if lab == label and (reference, s) in by))
        out.append(PairedGap(label, reference, metric, seeds,
                             tuple(by[(label, s)] - by[(reference, s)] for s in seeds)))
    return out


def paired_gaps(runs: list[RunRecord], key: str = "test_acc", last_k: int = 1,
                reference: str | None = None) -> list[Gap]:
    """A :class:`Gap` of the final ``key`` (``last_k``: mean of the last k epochs) for every
    optimizer other than ``reference`` (default: the first plain-SGD one), paired over the
    seeds where both runs are averaged (not diverged, ``key`` recorded)."""
    gaps = metric_gaps(runs, Metric(key, key, True), resolve_baseline(runs, reference), last_k)
    return [Gap(g.label, g.reference, list(g.diffs)) for g in gaps]


class RunCounters(NamedTuple):
    """One run's line of the per-run table: the optimizer's counters as recorded at its last
    epoch (None: the optimizer has no such counter, or nothing was recorded)."""

    label: str
    seed: int
    status: str  # finished, diverged or unfinished
    epochs: int  # completed epochs
    clipped: int | None  # clip_counts() total (G-SGD, G-Adam)
    skipped_steps: int | None


def _last_recorded(run: RunRecord, key: str) -> int | None:
    vals = [h[key] for h in run.history if h.get(key) is not None]
    return int(vals[-1]) if vals else None


def run_counters(run: RunRecord) -> RunCounters:
    """The :class:`RunCounters` of ``run`` (the counters are cumulative: the last recorded)."""
    status = "diverged" if run.diverged else "finished" if run.finished else "unfinished"
    return RunCounters(run.label, run.seed, status, len(run.epochs),
                       _last_recorded(run, "clipped"), _last_recorded(run, "skipped_steps"))


# --------------------------------------------------------------------------- text


def fixed(x: float, digits: int, sign: str = "") -> str:
    """``x`` with ``digits`` decimals, or in 3 significant digits (e.g. 4.93e-05) where those
    decimals would show a non-zero number as 0 (the train losses of long runs); ``sign="+"``
    prints the sign of a gap."""
    if x != 0 and abs(x) < 10 ** -digits:
        return f"{x:{sign}.2e}"
    return f"{x:{sign}.{digits}f}"


def _mean_std(values: list[float], scale: float = 1.0, digits: int = 2,
              small: bool = False) -> str:
    """mean ± std (``small``: tiny values in significant digits, see :func:`fixed`)."""
    if not values:
        return "-"
    show = (lambda x: fixed(x, digits)) if small else (lambda x: f"{x:.{digits}f}")
    m = statistics.fmean(values) * scale
    if len(values) == 1:
        return show(m)
    return f"{show(m)} ± {show(statistics.stdev(values) * scale)}"


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


def _gap_cells(gap: PairedGap) -> list[str]:
    """mean, CI, sd, n and sign count of one gap, in report units."""
    iv, d = gap.interval, gap.metric.digits
    if iv is None:
        return ["-", "-", "-", "0", "no seed where both runs are averaged"]
    # losses (4 decimals) in significant digits where tiny; accuracies keep their decimals (a
    # rounding residue such as -2e-15 pp is 0.00)
    show = fixed if d >= 4 else (lambda x, digits, sign="": f"{x:{sign}.{digits}f}")
    ci = "- (n = 1)" if iv.low is None else f"[{show(iv.low, d, '+')}, {show(iv.high, d, '+')}]"
    sd = "-" if iv.sd is None else show(iv.sd, d)
    return [show(iv.mean, d, "+"), ci, sd, str(iv.n), gap.signs.text()]


def _metric_text(metric: Metric) -> str:
    better = "higher" if metric.higher_is_better else "lower"
    return f"{metric.name} (" + ("pp; " if metric.scale == 100 else "") + f"{better} is better)"


def all_gaps(runs: list[RunRecord], reference: str | None, last_k: int = 1
             ) -> list[PairedGap]:
    """The gaps of every :func:`gap_metrics` metric, by optimizer (run order), then metric."""
    per_metric = [metric_gaps(runs, m, reference, last_k) for m in gap_metrics(runs, last_k)]
    labels = dict.fromkeys(r.label for r in runs if r.label != reference)
    return [g for label in labels for gaps in per_metric for g in gaps if g.label == label]


def _gap_lines(runs: list[RunRecord], reference: str | None, named: bool,
               last_k: int) -> list[str]:
    """The paired-gap section of ``report.md`` (nothing without a baseline or a second label)."""
    gaps = all_gaps(runs, reference, last_k)
    if not gaps:
        return []
    how = "named in the report settings" if named else "the first plain-SGD optimizer"
    fin = "last epoch" if last_k == 1 else f"last {last_k} evaluated epochs"
    lines = ["", f"Paired gaps to {reference} (the baseline: {how}), by seed: optimizer − "
             f"{reference} over the n seeds where both runs are averaged (diverged runs are "
             f"excluded from the pairs); mean, {100 * LEVEL:g}% t-interval and sd over those "
             "seeds. Accuracies in percentage points (pp), higher is better; train loss = the "
             f"mean minibatch loss of the {fin}, lower is better (a negative gap is an "
             f"improvement). Sign count: the seeds where the optimizer is better than, worse "
             f"than or tied with {reference}.", "",
             "| gap | metric | mean | 95% CI | sd | n | sign count |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {g.label} − {g.reference} | {_metric_text(g.metric)} | "
              + " | ".join(_gap_cells(g)) + " |" for g in gaps]
    diverged = [f"{r.label} seed {r.seed}" for r in runs if r.diverged]
    if diverged:
        lines += ["", f"Excluded from the pairs (diverged): {', '.join(diverged)}."]
    return lines


def _counter_lines(runs: list[RunRecord]) -> list[str]:
    """The per-run table of ``report.md``, by seed: status, epochs and the optimizer's
    counters."""
    def cell(v: int | None) -> str:
        return "-" if v is None else str(v)
    order = list(dict.fromkeys(r.label for r in runs))
    counters = sorted(map(run_counters, runs), key=lambda c: (c.seed, order.index(c.label)))
    lines = ["", "Per run, by seed: epochs completed; clipped = the optimizer's clip counter at "
             "its last recorded epoch (the total of G-SGD's `clip_counts()`: carrier ratios its "
             "guard changed); skipped steps = steps not taken (`skipped_steps()`, on_nonfinite "
             "= \"skip\"); \"-\": the optimizer has no such counter.", "",
             "| seed | optimizer | status | epochs | clipped | skipped steps |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {c.seed} | {c.label} | {c.status} | {c.epochs} | {cell(c.clipped)} | "
              f"{cell(c.skipped_steps)} |" for c in counters]
    return lines


def markdown_report(exp_dir: Path, runs: list[RunRecord], title: str = "",
                    last_k: int = 1, baseline: str | None = None) -> str:
    """The Markdown text of ``report.md`` (``baseline``: the label the gaps are taken against;
    default: the first plain-SGD optimizer)."""
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
            f"{_mean_std(v['train_loss'], 1, 4, True)} | "
            f"{_mean_std(v['train_eval_loss'], 1, 4, True)} | "
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
    lines += _gap_lines(runs, resolve_baseline(runs, baseline), bool(baseline), last_k)
    lines += _counter_lines(runs)
    lines += ["", "Learning curves: curves.png", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- summary.json

_SCALES = {"test_acc": 100.0, "test_acc_at_best_val": 100.0, "val_acc": 100.0}


def _number(v: float | None) -> float | None:
    """``v`` to 10 significant digits (float noise off, so the file is stable)."""
    return None if v is None else float(f"{v:.10g}")


def _column(values: list[float], scale: float) -> dict:
    return {"mean": _number(statistics.fmean(values) * scale) if values else None,
            "std": _number(statistics.stdev(values) * scale) if len(values) > 1 else None,
            "n": len(values)}


def _gap_record(gap: PairedGap) -> dict:
    iv, signs = gap.interval, gap.signs
    return {"mean": _number(iv.mean) if iv else None,
            "lo": _number(iv.low) if iv else None, "hi": _number(iv.high) if iv else None,
            "sd": _number(iv.sd) if iv else None, "n": gap.n, "seeds": list(gap.seeds),
            "better": signs.better, "worse": signs.worse, "tied": signs.tied,
            "higher_is_better": gap.metric.higher_is_better}


def summary_record(info: dict, runs: list[RunRecord], last_k: int = 1,
                   baseline: str | None = None, title: str = "") -> dict:
    """The content of ``summary.json``: per optimizer label the n, the mean / std of each table
    column, the paired gaps to the baseline (mean, lo, hi, sd, n, seeds, sign counts) and the
    per-run counters. Accuracies in %, their gaps in percentage points, losses as recorded."""
    reference = resolve_baseline(runs, baseline)
    rows = summarize(runs, last_k, _classes(info))
    gaps = all_gaps(runs, reference, last_k)
    counters = [run_counters(r) for r in runs]
    optimizers = {}
    for row in rows:
        optimizers[row.label] = {
            "optimizer": row.optimizer, "lr": row.lr, "n": row.n, "seeds": row.averaged,
            "finished": row.finished, "diverged": row.diverged, "unfinished": row.running,
            "columns": {k: _column(v, _SCALES.get(k, 1.0)) for k, v in row.values.items()},
            "gaps": {g.metric.key: _gap_record(g) for g in gaps if g.label == row.label},
            "runs": [{"seed": c.seed, "status": c.status, "epochs": c.epochs,
                      "clipped": c.clipped, "skipped_steps": c.skipped_steps}
                     for c in counters if c.label == row.label]}
    return {"title": title, "last_k": last_k, "baseline": reference, "level": LEVEL,
            "data": info.get("data") or info.get("dataset"),
            "synthetic": bool(info.get("synthetic")),
            "units": {"acc": "%", "acc gaps": "percentage points", "loss": "cross-entropy",
                      "time": "s/epoch", "gaps": "optimizer minus baseline, paired by seed"},
            "optimizers": optimizers}


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


def _report_setting(exp_dir: Path, key: str, default):
    exp = (_experiment_info(exp_dir).get("config") or {}).get("experiment", {})
    return exp.get(key, default)


def report_last_k(exp_dir: Path) -> int:
    """``[experiment] report_last_k`` of the experiment's config (1 when absent)."""
    return int(_report_setting(exp_dir, "report_last_k", 1))


def report_baseline(exp_dir: Path) -> str | None:
    """``[experiment] report_baseline`` of the experiment's config, where the config has one
    (None when absent or empty: the first plain-SGD optimizer)."""
    return _report_setting(exp_dir, "report_baseline", None) or None


def write_report(exp_dir: str | Path, last_k: int | None = None,
                 baseline: str | None = None) -> Path:
    """Write ``report.md``, ``summary.json`` and ``curves.png`` into ``exp_dir``; return the
    report's path. ``last_k``: "final" numbers are the mean of each run's last k evaluated
    epochs (default: the config's ``report_last_k``, else 1); ``baseline``: the label the gaps
    are taken against (default: the config's ``report_baseline``, else the first plain-SGD
    optimizer)."""
    exp_dir = Path(exp_dir)
    runs = load_runs(exp_dir)
    if not runs:
        raise FileNotFoundError(f"{exp_dir}: no runs found (expected <label>/seed<k>/spec.json)")
    last_k = report_last_k(exp_dir) if last_k is None else last_k
    baseline = report_baseline(exp_dir) if baseline is None else baseline
    info = _experiment_info(exp_dir)
    text = markdown_report(exp_dir, runs, last_k=last_k, baseline=baseline)
    summary = summary_record(info, runs, last_k, baseline, _title(exp_dir, info))
    atomic_write_text(exp_dir / "summary.json",
                      json.dumps(summary, indent=1, sort_keys=True, allow_nan=False) + "\n")
    atomic_write_text(exp_dir / "report.md", text)
    plot_curves(runs, exp_dir / "curves.png", title=_title(exp_dir, info))
    return exp_dir / "report.md"


def _dims_cells(dims: dict | None) -> list[str]:
    """m, H and the invariant ratio H/m of a variant's G-structure ("-" if not recorded)."""
    if not dims:
        return ["-", "-", "-"]
    ratio = dims.get("H_over_m")
    return [str(dims["m"]), str(dims["H"]), "-" if ratio is None else f"{ratio:.4f}"]


def write_group_report(group_dir: str | Path, exp_dirs: list[Path],
                       last_k: int | None = None, baseline: str | None = None) -> Path:
    """One table over model variants (e.g. widths): the G-structure's m, H and invariant ratio
    H/m, each optimizer's final test accuracy and the paired gaps to the baseline (as in
    :func:`write_report`) per variant, the epochs run, with links to the per-variant reports."""
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
        gaps = paired_gaps(runs, acc, k, report_baseline(exp_dir) if baseline is None
                           else baseline)
        if not header_done:
            fin = "Final" if k == 1 else f"Last-{k}-epoch mean"
            planned = _planned_epochs(info)
            lines += [f"{fin} {acc.removesuffix('_acc')} accuracy (%), mean ± std over the n "
                      "runs averaged (diverged runs are not); gaps paired by seed: mean and "
                      f"{100 * LEVEL:g}% t-interval."
                      + (f" Epochs planned: {planned}." if planned is not None else ""), "",
                      "| variant | m | H | H/m | " + " | ".join(
                          [r.label for r in rows] + [f"{g.label} − {g.reference}" for g in gaps])
                      + " | epochs run | report |",
                      "|---" * (len(rows) + len(gaps) + 6) + "|"]
            header_done = True
        cells = _dims_cells(info.get("structure"))
        cells += [f"{_mean_std(r.values[acc], 100)} (n={r.n})" for r in rows]
        cells += [g.text() for g in gaps]
        done = _range([len(r.epochs) for r in runs if not r.diverged])
        rel = exp_dir.relative_to(group_dir) if exp_dir.is_relative_to(group_dir) else exp_dir
        lines.append(f"| {exp_dir.name} | " + " | ".join(cells) + f" | {done} | {rel}/report.md |")
    lines.append("")
    path = group_dir / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path
