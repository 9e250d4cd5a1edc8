"""Reports of an experiment directory: a Markdown table over seeds and PNG learning curves.

``write_report(exp_dir)`` reads every ``<label>/seed<k>/metrics.jsonl`` (finished, diverged or
still running) and writes, atomically, ``report.md`` (per optimizer: final and best test
accuracy, final validation accuracy and train loss as mean +- std over seeds, seconds per epoch,
seeds; then each optimizer minus SGD, paired by seed) and ``curves.png`` (test accuracy and train
loss per epoch: mean line with a min-max band over seeds).
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from gsgd.experiments.files import atomic_open, atomic_write_text

__all__ = ["OptimizerRow", "RunRecord", "load_runs", "markdown_report", "plot_curves",
           "summarize", "write_group_report", "write_report"]


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

    @property
    def epochs(self) -> list[dict]:
        """The completed epochs (without the divergence line)."""
        return [h for h in self.history if not h.get("diverged")]

    def last(self, key: str) -> float | None:
        """The last recorded value of ``key``."""
        vals = [h[key] for h in self.epochs if h.get(key) is not None]
        return vals[-1] if vals else None

    def best(self, key: str) -> float | None:
        """The largest recorded value of ``key``."""
        vals = [h[key] for h in self.epochs if h.get(key) is not None]
        return max(vals) if vals else None


@dataclass
class OptimizerRow:
    """The statistics of one optimizer over its seeds (finite, non-diverged runs)."""

    label: str
    optimizer: str
    lr: str
    values: dict[str, list[float]] = field(default_factory=dict)
    seeds: int = 0
    finished: int = 0
    diverged: int = 0
    epochs: list[int] = field(default_factory=list)


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a partly written last line of a killed run
    return out


def _experiment_info(exp_dir: Path) -> dict:
    path = exp_dir / "experiment.json"
    return json.loads(path.read_text()) if path.exists() else {}


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
            spec = json.loads(spec_path.read_text())
            final_path = run_dir / "final.json"
            final = json.loads(final_path.read_text()) if final_path.exists() else None
            history = _read_jsonl(run_dir / "metrics.jsonl")
            opt = spec["optimizer"]
            runs.append(RunRecord(
                label=label, seed=int(spec["seed"]), optimizer=opt["name"],
                lr=final["lr"] if final else str(opt["lr"]), history=history,
                finished=final is not None,
                diverged=any(h.get("diverged") for h in history),
            ))
    return runs


_KEYS = ("test_acc", "best_test_acc", "val_acc", "train_loss", "time")


def summarize(runs: list[RunRecord]) -> list[OptimizerRow]:
    """Per label: final/best test accuracy, val accuracy, train loss, s/epoch over its seeds."""
    rows: dict[str, OptimizerRow] = {}
    for run in runs:
        row = rows.setdefault(run.label, OptimizerRow(run.label, run.optimizer, run.lr,
                                                      {k: [] for k in _KEYS}))
        row.seeds += 1
        row.finished += run.finished and not run.diverged
        row.diverged += run.diverged
        if run.diverged:
            continue
        row.epochs.append(len(run.epochs))
        times = [h["time"] for h in run.epochs]
        values = {"test_acc": run.last("test_acc"), "best_test_acc": run.best("test_acc"),
                  "val_acc": run.last("val_acc"), "train_loss": run.last("train_loss"),
                  "time": sum(times) / len(times) if times else None}
        for key, v in values.items():
            if v is not None and math.isfinite(v):
                row.values[key].append(v)
    return list(rows.values())


def _mean_std(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    if not values:
        return "-"
    m = statistics.fmean(values) * scale
    if len(values) == 1:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ± {statistics.stdev(values) * scale:.{digits}f}"


def paired_gaps(runs: list[RunRecord], key: str = "test_acc") -> list[tuple[str, str, list[float]]]:
    """(label, reference label, per-seed differences of the final ``key``) for every optimizer
    other than the first plain-SGD one, paired over the seeds both finished without diverging."""
    reference = next((r.label for r in runs if r.optimizer == "sgd"), None)
    if reference is None:
        return []
    by = {(r.label, r.seed): r for r in runs if not r.diverged and r.last(key) is not None}
    labels = list(dict.fromkeys(r.label for r in runs if r.label != reference))
    out = []
    for label in labels:
        seeds = sorted(s for (lab, s) in by if lab == label and (reference, s) in by)
        diffs = [by[(label, s)].last(key) - by[(reference, s)].last(key) for s in seeds]
        out.append((label, reference, diffs))
    return out


def markdown_report(exp_dir: Path, runs: list[RunRecord], title: str = "") -> str:
    """The Markdown text of ``report.md``."""
    info = _experiment_info(exp_dir)
    name = title or info.get("name", exp_dir.name) + (f" / {info['variant']}"
                                                      if info.get("variant") else "")
    lines = [f"# {name}", ""]
    if info.get("description"):
        lines += [info["description"], ""]
    if info.get("data"):
        lines += [f"Data: {info['data']}."]
    if info.get("synthetic"):
        lines += ["", f"**{info.get('note') or 'SYNTHETIC DATA'}: these numbers say nothing "
                  "about the real dataset.**"]
    rows = summarize(runs)
    has_test = any(r.values["test_acc"] for r in rows)
    acc = "test" if has_test else "val"
    lines += [
        "", "Accuracies in %, mean ± std over seeds (final = last epoch; diverged runs are "
        "counted, not averaged).", "",
        "| optimizer | lr | final test acc | best test acc | final val acc | final train loss "
        "| s/epoch | epochs | seeds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        seeds = f"{r.finished}/{r.seeds}" + (f" ({r.diverged} diverged)" if r.diverged else "")
        epochs = "-" if not r.epochs else (str(r.epochs[0]) if len(set(r.epochs)) == 1
                                           else f"{min(r.epochs)}-{max(r.epochs)}")
        lines.append(
            f"| {r.label} | {r.lr} | {_mean_std(r.values['test_acc'], 100)} | "
            f"{_mean_std(r.values['best_test_acc'], 100)} | {_mean_std(r.values['val_acc'], 100)}"
            f" | {_mean_std(r.values['train_loss'], 1, 4)} | {_mean_std(r.values['time'], 1, 1)}"
            f" | {epochs} | {seeds} |")
    gaps = paired_gaps(runs, f"{acc}_acc")
    if gaps:
        lines += ["", f"Gap in final {acc} accuracy (percentage points), paired by seed:", ""]
        for label, ref, diffs in gaps:
            text = _mean_std(diffs, 100) if diffs else "no common finished seeds"
            sign = "+" if diffs and statistics.fmean(diffs) > 0 else ""
            lines.append(f"- {label} − {ref}: {sign}{text} (n = {len(diffs)})")
    lines += ["", "Learning curves: curves.png", ""]
    return "\n".join(lines)


def plot_curves(runs: list[RunRecord], path: Path, title: str = "") -> None:
    """Test (or val) accuracy and train loss per epoch: mean with a min-max band per optimizer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    acc_key = "test_acc" if any(r.last("test_acc") is not None for r in runs) else "val_acc"
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for label in dict.fromkeys(r.label for r in runs):
        group = [r for r in runs if r.label == label]
        for ax, key in zip(axes, (acc_key, "train_loss"), strict=True):
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
            line, = ax.plot(xs, mean, marker="." if len(xs) < 30 else None,
                            label=f"{label} (n={len(group)})")
            ax.fill_between(xs, [min(per_epoch[x]) for x in xs], [max(per_epoch[x]) for x in xs],
                            color=line.get_color(), alpha=0.2)
    axes[0].set_ylabel(f"{acc_key.replace('_acc', '')} accuracy (%)")
    axes[1].set_ylabel("train loss (mean over epoch)")
    if all(v > 0 for line in axes[1].get_lines() for v in line.get_ydata()) \
            and axes[1].get_lines():
        axes[1].set_yscale("log")
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)


def write_report(exp_dir: str | Path) -> Path:
    """Write ``report.md`` and ``curves.png`` into ``exp_dir``; return the report's path."""
    exp_dir = Path(exp_dir)
    runs = load_runs(exp_dir)
    if not runs:
        raise FileNotFoundError(f"{exp_dir}: no runs found (expected <label>/seed<k>/spec.json)")
    text = markdown_report(exp_dir, runs)
    atomic_write_text(exp_dir / "report.md", text)
    info = _experiment_info(exp_dir)
    plot_curves(runs, exp_dir / "curves.png",
                title=info.get("name", exp_dir.name) + (f" / {info['variant']}"
                                                        if info.get("variant") else ""))
    return exp_dir / "report.md"


def write_group_report(group_dir: str | Path, exp_dirs: list[Path]) -> Path:
    """One table over model variants (e.g. widths): each optimizer's final test accuracy and the
    paired gaps to SGD per variant, with links to the per-variant reports."""
    group_dir = Path(group_dir)
    lines = [f"# {group_dir.name}: per model variant", ""]
    header_done = False
    for exp_dir in exp_dirs:
        runs = load_runs(exp_dir)
        rows = summarize(runs)
        gaps = paired_gaps(runs)
        if not header_done:
            cols = [r.label for r in rows] + [f"{g[0]} − {g[1]}" for g in gaps]
            lines += ["Final test accuracy (%), mean ± std over seeds; gaps paired by seed.", "",
                      "| variant | " + " | ".join(cols) + " | report |",
                      "|---" * (len(cols) + 2) + "|"]
            header_done = True
        cells = [_mean_std(r.values["test_acc"], 100) for r in rows]
        cells += [_mean_std(d, 100) if d else "-" for _, _, d in gaps]
        rel = exp_dir.relative_to(group_dir) if exp_dir.is_relative_to(group_dir) else exp_dir
        lines.append(f"| {exp_dir.name} | " + " | ".join(cells) + f" | {rel}/report.md |")
    lines.append("")
    path = group_dir / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path
