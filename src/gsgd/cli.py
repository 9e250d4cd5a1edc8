"""The gsgd command: run experiment configs, quick comparisons, lr sweeps, reports, a demo.

    gsgd demo                          the README's comparison: G-SGD vs SGD on MNIST, 3 seeds
    gsgd run CONFIG [--dry-run] ...    every optimizer x seed of a TOML config, then the report
    gsgd compare --dataset mnist ...   an ad-hoc comparison without a config file
    gsgd sweep CONFIG [--widen N]      pick each optimizer's lr on the validation split
    gsgd report DIR                    rebuild report.md / curves.png of a results directory
    gsgd summary CONFIG | --widths ... print a model's G-structure (blocks, m, H, plain params)
    gsgd figures DIR... --x depth      a paired gap against depth or H/m over experiments (plot)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from gsgd.experiments.config import (
    ADAM_FAMILY,
    DATASET_SHAPES,
    INIT_WEIGHTS,
    MODEL_KINDS,
    SCHEDULES,
    Config,
    ConfigError,
    check_name,
    config_from_dict,
    input_shape,
    load_config,
)
from gsgd.experiments.figures import AXES as FIGURE_AXES
from gsgd.experiments.files import DirectoryBusy, ForeignDirectoryError
from gsgd.experiments.optimizers import OPTIMIZERS
from gsgd.experiments.sweep import DEFAULT_WIDEN

__all__ = ["build_parser", "demo_config", "main"]

DEMO_EPOCHS = 10
DEMO_SEEDS = (0, 1, 2)


def demo_config(epochs: int = DEMO_EPOCHS, seeds: Sequence[int] = DEMO_SEEDS) -> Config:
    """The README's job: MNIST, MLP 784-64x4-10 without biases, batch 64, G-SGD vs SGD from the
    same skeleton init with the same lr schedule 0.1*exp(-0.01*epoch) (the paper's setting,
    shortened to a few epochs)."""
    opt = {"lr": 0.1, "lr_schedule": "exp", "gamma": 0.01}
    return config_from_dict({
        "experiment": {
            "name": "demo", "dataset": "mnist", "seeds": list(seeds), "epochs": epochs,
            "batch_size": 64, "val_size": 5000, "threads": 1,
            "description": "G-SGD vs SGD, MNIST MLP 784-64-64-64-64-10 without biases, batch 64,"
                           " lr 0.1*exp(-0.01*epoch), both from the skeleton init "
                           f"(the paper's 300-epoch setting shortened to {epochs} epochs).",
        },
        "model": {"kind": "mlp", "widths": [784, 64, 64, 64, 64, 10], "bias": False},
        "init": {"skeleton": True},
        "optimizers": [{"name": "gsgd", **opt}, {"name": "sgd", **opt}],
    })


# --------------------------------------------------------------------------- argument helpers


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}"
                                         ) from None


def _float_list(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}"
                                         ) from None


def _str_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _add_run_options(p: argparse.ArgumentParser, out_default: str = "runs") -> None:
    p.add_argument("--out", default=out_default, help="results directory (default: %(default)s)")
    p.add_argument("--seeds", type=_int_list, help="override [experiment] seeds, e.g. 0,1,2")
    p.add_argument("--epochs", type=int, help="override [experiment] epochs")
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), help="override the device")
    p.add_argument("--threads", type=int, help="torch threads (overrides [experiment] threads)")
    p.add_argument("--data", choices=("real", "synthetic"), default="real",
                   help="'synthetic': random data of the dataset's shape (clearly labelled)")
    p.add_argument("--dry-run", action="store_true",
                   help="1 epoch, 3 batches of <= 8, first seed, 32 examples per evaluation, into "
                        "<out>/dry-run/<name> (cleared by the next dry run; synthetic data if "
                        "the dataset is not available)")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="continue interrupted runs and skip finished ones (default); "
                        "--no-resume starts them over")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bars (the one-line-per-epoch log stays)")
    p.add_argument("--rerun-changed", action="store_true",
                   help="start over only the runs whose spec (config) changed since they were "
                        "trained; the others resume or are skipped as usual")
    p.add_argument("--jobs", type=int, default=1,
                   help="train this many runs in parallel processes (default: %(default)s)")
    _add_last_k(p)


def _add_last_k(p: argparse.ArgumentParser) -> None:
    p.add_argument("--last-k", type=int, metavar="K",
                   help="reports: 'final' numbers are the mean of each run's last K evaluated "
                        "epochs (overrides [experiment] report_last_k; default 1)")


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--widths", type=_int_list,
                   help="MLP: units per layer, input first (default: input,64,64,64,64,classes)"
                        "; CNN: channels per stage (default: by depth)")
    p.add_argument("--bias", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--depth", type=int, default=20, help="CNN depth: 6n+2 or 34")
    p.add_argument("--batchnorm", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--bn-mode", choices=("exact", "approximate"), default="exact")


def _model_table(args: argparse.Namespace) -> dict:
    """The [model] table of the ad-hoc commands (compare, summary)."""
    table: dict = {"kind": args.model, "bias": args.bias}
    if args.model == "mlp":
        (c, h, w), classes = DATASET_SHAPES[args.dataset]
        table["widths"] = args.widths or [c * h * w, 64, 64, 64, 64, classes]
    else:
        table.update(depth=args.depth, batchnorm=args.batchnorm, bn_mode=args.bn_mode)
        if args.widths:
            table["widths"] = args.widths
    return table


def build_parser() -> argparse.ArgumentParser:
    """The ``gsgd`` argument parser."""
    parser = argparse.ArgumentParser(prog="gsgd", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run a TOML experiment config")
    p.add_argument("config", type=Path)
    _add_run_options(p)

    p = sub.add_parser("sweep", help="choose each optimizer's lr on the validation split")
    p.add_argument("config", type=Path)
    _add_run_options(p)
    p.add_argument("--widen", type=int, default=DEFAULT_WIDEN, metavar="N",
                   help="when a choice is the smallest or largest lr of its grid, add one lr "
                        "beyond that edge (geometric) and choose again, up to N times "
                        "(default: %(default)s; 0: keep the grid)")

    p = sub.add_parser("compare", help="ad-hoc comparison without a config file")
    p.add_argument("--name", help="experiment name, the results directory under --out: letters,"
                                  " digits and -_. (default: compare-<dataset>-<model>)")
    p.add_argument("--dataset", default="mnist", choices=tuple(DATASET_SHAPES))
    p.add_argument("--data-root", default="")
    p.add_argument("--model", default="mlp", choices=MODEL_KINDS)
    _add_model_options(p)
    p.add_argument("--optimizers", type=_str_list, default=["gsgd", "sgd"],
                   help=f"comma-separated, from {', '.join(OPTIMIZERS)}")
    p.add_argument("--lr", type=_float_list, default=[0.1],
                   help="one lr for all optimizers, or one per optimizer")
    p.add_argument("--momentum", type=float, default=0.0)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--schedule", choices=SCHEDULES, default="constant")
    p.add_argument("--gamma", type=float, default=0.01, help="exp schedule: lr*exp(-gamma*ep)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--skeleton", action=argparse.BooleanOptionalAction, default=True,
                   help="the paper's skeleton init for every optimizer (default on)")
    p.add_argument("--init-weights", choices=INIT_WEIGHTS, default="default",
                   help="the weights before the skeleton init, for every optimizer: 'default' "
                        "(PyTorch's init) or 'he' (N(0, 2/fan_in), biases 0; [init] weights)")
    p.add_argument("--pathcond", action=argparse.BooleanOptionalAction, default=False,
                   help="PathCond (gsgd.pathcond, function-preserving) after the init, for "
                        "every optimizer (default off; a config file can ask for it per "
                        "optimizer)")
    _add_run_options(p)

    p = sub.add_parser("report", help="rebuild report.md and curves.png of a results directory")
    p.add_argument("dir", type=Path, help="an experiment directory, e.g. runs/demo")
    _add_last_k(p)

    p = sub.add_parser("summary", help="print a model's G-structure")
    p.add_argument("config", type=Path, nargs="?", help="a TOML config (or use --widths)")
    p.add_argument("--model", default="mlp", choices=MODEL_KINDS)
    p.add_argument("--dataset", default="mnist", choices=tuple(DATASET_SHAPES))
    _add_model_options(p)

    p = sub.add_parser("figures", help="plot a paired gap against a model property over "
                                       "experiment directories")
    p.add_argument("dirs", type=Path, nargs="+",
                   help="experiment directories, or group directories of model variants")
    p.add_argument("--x", required=True, choices=FIGURE_AXES,
                   help="depth: hidden layers of an MLP; H_over_m: the invariant ratio H/m; "
                        "width: the first hidden width")
    p.add_argument("--metric", default="test_acc",
                   help="test_acc (default), test_acc_at_best_val or train_loss")
    p.add_argument("--baseline", default=None,
                   help="the label the gaps are taken against (default: the first plain SGD)")
    p.add_argument("--out", type=Path, required=True,
                   help="the .png to write (the table goes beside it as .md)")
    p.add_argument("--title", default="")

    p = sub.add_parser("demo", help="the README's comparison: G-SGD vs SGD on MNIST")
    p.add_argument("--out", default="runs", help="results directory (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=DEMO_EPOCHS)
    p.add_argument("--seeds", type=_int_list, default=list(DEMO_SEEDS))
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--dry-run", action="store_true", help="3 batches of one seed (a smoke test)")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                   help="runs trained in parallel processes (default: %(default)s)")
    _add_last_k(p)
    return parser


# --------------------------------------------------------------------------- commands


def _options(args: argparse.Namespace):
    from gsgd.experiments.runner import RunOptions, dry_run_options

    jobs = getattr(args, "jobs", 1)
    if jobs < 1:
        raise ConfigError(f"--jobs {jobs}: must be >= 1")
    options = RunOptions(resume=args.resume,
                         progress=not args.quiet and sys.stderr.isatty() and jobs == 1,
                         synthetic=getattr(args, "data", "real") == "synthetic", jobs=jobs,
                         rerun_changed=getattr(args, "rerun_changed", False))
    return dry_run_options(options) if getattr(args, "dry_run", False) else options


def _last_k(args: argparse.Namespace) -> int | None:
    k = getattr(args, "last_k", None)
    if k is not None and k < 1:
        raise ConfigError(f"--last-k {k}: must be >= 1")
    return k


def _override(config: Config, args: argparse.Namespace) -> Config:
    exp = config.experiment
    if args.seeds is not None:
        if not args.seeds or len(set(args.seeds)) != len(args.seeds) or min(args.seeds) < 0:
            raise ConfigError(f"--seeds {args.seeds}: give distinct integers >= 0")
        exp = replace(exp, seeds=tuple(args.seeds))
    if args.epochs is not None:
        if args.epochs < 1:
            raise ConfigError(f"--epochs {args.epochs}: must be >= 1")
        exp = replace(exp, epochs=args.epochs)
    if getattr(args, "device", None):
        exp = replace(exp, device=args.device)
    if getattr(args, "threads", None) is not None:
        if args.threads < 0:
            raise ConfigError(f"--threads {args.threads}: must be >= 0 (0: torch's default)")
        exp = replace(exp, threads=args.threads)
    last_k = _last_k(args)
    if last_k is not None:
        exp = replace(exp, report_last_k=last_k)
    config = replace(config, experiment=exp)
    if getattr(args, "dry_run", False):
        from gsgd.experiments.runner import dry_run_config

        config = dry_run_config(config)
    return config


def _check_paths(out: Path) -> None:
    """Refuse an ``--out`` that is not a writable directory and a ``GSGD_DATA`` that is not a
    directory, naming them (before anything is trained)."""
    data = os.environ.get("GSGD_DATA")
    if data and os.path.exists(data) and not os.path.isdir(data):
        raise ConfigError(f"GSGD_DATA={data} is a file: point GSGD_DATA at a directory (the "
                          "dataset cache), or unset it to use ~/.cache/gsgd")
    existing = next((p for p in (out, *out.parents) if os.path.lexists(p)), None)
    if existing is not None and not existing.is_dir():
        raise ConfigError(f"--out {out}: {existing} is a file, not a directory: give a "
                          "directory for the results")
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {out}: {existing} is not writable: give a directory you can "
                          "write to")


def _out_dir(args: argparse.Namespace, config: Config, suffix: str = "") -> Path:
    """``--out``; for a dry run ``<out>/dry-run``, after clearing the directory the command
    writes (``<name><suffix>``) if an earlier dry run made it (anything else is refused)."""
    out = Path(args.out)
    _check_paths(out)
    if getattr(args, "dry_run", False):
        from gsgd.experiments.runner import clear_dir

        out = out / "dry-run"
        clear_dir(out / f"{config.experiment.name}{suffix}")
    return out


def _print_reports(dirs: list[Path], out: Path, name: str) -> None:
    for d in dirs:
        print()
        print((d / "report.md").read_text().rstrip())
        print(f"\nReport: {d / 'report.md'}\nPlot:   {d / 'curves.png'}")
    if len(dirs) > 1:
        print(f"\nPer-variant summary: {out / name / 'report.md'}")


def _cmd_run(args: argparse.Namespace, config: Config | None = None) -> int:
    from gsgd.experiments.runner import run_experiment

    config = _override(config or load_config(args.config), args)
    out = _out_dir(args, config)
    if args.dry_run:
        print(f"DRY RUN of {config.experiment.name}: 1 epoch, <= 3 batches of "
              f"{config.experiment.batch_size}, seed {config.experiment.seeds[0]}, into "
              f"{out / config.experiment.name}")
    dirs = run_experiment(config, out, _options(args))
    _print_reports(dirs, out, config.experiment.name)
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from gsgd.experiments.sweep import run_sweep

    if args.widen < 0:
        raise ConfigError(f"--widen {args.widen}: must be >= 0 (0: no widening)")
    preset = load_config(args.config)
    config = _override(preset, args)
    out = _out_dir(args, config, "-sweep")
    # --epochs shortens the sweep only: the tuned configs train the preset's epochs (a dry run
    # keeps its own, shortened ones)
    tuned_epochs = None if getattr(args, "dry_run", False) else preset.experiment.epochs
    result = run_sweep(config, out, _options(args), widen=args.widen, tuned_epochs=tuned_epochs)
    print(result.report.read_text().rstrip())
    print(f"\nSweep report: {result.report}")
    for path in result.configs:
        print(f"Tuned config: {path}   (run it: gsgd run {path})")
    return 0


def _compare_config(args: argparse.Namespace) -> Config:
    lrs = args.lr
    if len(lrs) not in (1, len(args.optimizers)):
        raise ConfigError(f"--lr: give one lr or one per optimizer ({len(args.optimizers)}), "
                          f"got {len(lrs)}")
    if len(lrs) == 1:
        lrs = lrs * len(args.optimizers)
    opts = []
    for name, lr in zip(args.optimizers, lrs, strict=True):
        entry = {"name": name, "lr": lr, "momentum": args.momentum,
                 "weight_decay": args.weight_decay, "lr_schedule": args.schedule}
        if args.schedule == "exp":
            entry["gamma"] = args.gamma
        if args.schedule == "step":
            raise ConfigError("--schedule step: use a config file (milestones, factor)")
        if name in ADAM_FAMILY:
            entry.pop("momentum")
        opts.append(entry)
    model = _model_table(args)
    return config_from_dict({
        "experiment": {"name": args.name or f"compare-{args.dataset}-{args.model}",
                       "dataset": args.dataset, "data_root": args.data_root,
                       "batch_size": args.batch_size,
                       "seeds": args.seeds or [0], "epochs": args.epochs or 3},
        "model": model,
        "init": {"skeleton": args.skeleton, "pathcond": args.pathcond,
                 "weights": args.init_weights},
        "optimizers": opts,
    })


def _cmd_compare(args: argparse.Namespace) -> int:
    unknown = [o for o in args.optimizers if o not in OPTIMIZERS]
    if unknown:
        raise ConfigError(f"--optimizers: unknown {unknown}; allowed: {', '.join(OPTIMIZERS)}")
    labels = [OPTIMIZERS[o].label for o in args.optimizers]
    if len(set(labels)) != len(labels):
        raise ConfigError("--optimizers: name each optimizer once (use a config file to compare "
                          "several settings of one optimizer)")
    if args.name is not None:
        check_name(args.name, "--name")
    config = _compare_config(args)
    args.seeds = args.epochs = None  # already applied
    return _cmd_run(args, config)


def _natural_key(path: Path) -> list:
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", path.name)]


def _cmd_figures(args: argparse.Namespace) -> int:
    from gsgd.experiments.figures import experiment_dirs_under, gap_points, gap_table, plot_gaps

    if args.out.suffix != ".png":
        raise ConfigError(f"--out {args.out}: give a .png path (the table goes beside it as .md)")
    dirs = experiment_dirs_under(args.dirs)
    points = gap_points(dirs, args.x, args.metric, args.baseline)
    if not points:
        raise ConfigError(f"{', '.join(map(str, args.dirs))}: no paired gap to plot (no runs, or "
                          "one optimizer only)")
    path = plot_gaps(points, args.out, args.x, args.title)
    print(gap_table(points, args.x).rstrip())
    print(f"\nPlot:  {path}\nTable: {path.with_suffix('.md')}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from gsgd.experiments.report import write_group_report, write_report

    d, last_k = args.dir, _last_k(args)
    if not d.is_dir():
        raise FileNotFoundError(f"{d}: no such directory")
    if (d / "experiment.json").exists() or any(d.glob("*/seed*/spec.json")):
        report = write_report(d, last_k)
        print(report.read_text().rstrip())
        print(f"\nReport: {report}\nPlot:   {d / 'curves.png'}")
        return 0
    variants = sorted((x for x in d.iterdir() if (x / "experiment.json").exists()),
                      key=_natural_key)  # e.g. widths 784-32-32-10 before 784-128-128-10
    if not variants:
        raise FileNotFoundError(f"{d}: no experiment found (expected experiment.json or "
                                "<label>/seed<k>/ directories)")
    for v in variants:
        write_report(v, last_k)
    path = write_group_report(d, variants, last_k)
    print(path.read_text().rstrip())
    return 0


def _cmd_summary(args: argparse.Namespace) -> int:
    from gsgd.experiments.models import build_model, model_structure

    if args.config is not None:
        config = load_config(args.config)
        variants = [(v, c.model, c.experiment) for v, c in config.variants()]
    else:
        config = config_from_dict({"experiment": {"name": "summary", "dataset": args.dataset},
                                   "model": _model_table(args),
                                   "optimizers": [{"name": "gsgd", "lr": 0.1}]})
        variants = [("", config.model, config.experiment)]
    for variant, model_cfg, exp in variants:
        classes = DATASET_SHAPES[exp.dataset][1]
        model = build_model(model_cfg, input_shape(exp), classes, seed=0)
        if variant:
            print(f"== {variant}")
        print(model_structure(model, model_cfg).summary())
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from gsgd.experiments.runner import dry_run_config, run_experiment

    config = demo_config(args.epochs, args.seeds)
    if _last_k(args) is not None:
        config = replace(config, experiment=replace(config.experiment,
                                                    report_last_k=args.last_k))
    if args.dry_run:
        config = dry_run_config(config)
    out = _out_dir(args, config)
    print(f"gsgd demo: {config.experiment.description}\nSeeds {list(config.experiment.seeds)};"
          f" results in {out / 'demo'} (rerun resumes / skips finished runs).")
    dirs = run_experiment(config, out, _options(args))
    _print_reports(dirs, out, "demo")
    return 0


_COMMANDS = {"run": _cmd_run, "sweep": _cmd_sweep, "compare": _cmd_compare,
             "report": _cmd_report, "summary": _cmd_summary, "figures": _cmd_figures,
             "demo": _cmd_demo}


class _Terminated(KeyboardInterrupt):
    """SIGTERM, turned into an exception so that it stops the runs like Ctrl-C does."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise _Terminated()


def _cli_words(text: str) -> str:
    """A library message in the CLI's words, on one line."""
    text = text.replace("pass root=DIR", "pass --data-root DIR (gsgd compare) or set "
                        "[experiment] data_root = DIR in the config")
    text = text.replace("(root=DIR,", "(--data-root DIR or [experiment] data_root,")
    return " ".join(text.split())


_PATH_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
                PermissionError)


def _exit_status(exc: BaseException) -> int | None:
    """2 for an error in what the user gave (config, flags, paths, environment), 1 for a runtime
    failure (a damaged run file or dataset, a failed fetch, a busy directory); None: a bug (the
    traceback is shown)."""
    from gsgd.data import DatasetError, DataUnavailableError
    from gsgd.experiments.files import DamagedRunFile
    from gsgd.experiments.runner import DeviceUnavailable, SpecMismatch

    if isinstance(exc, ConfigError | ForeignDirectoryError | SpecMismatch | DeviceUnavailable
                  | DataUnavailableError):
        return 2
    if isinstance(exc, DirectoryBusy | DamagedRunFile | DatasetError):
        return 1
    if isinstance(exc, _PATH_ERRORS):  # a path the user gave, or its permissions
        return 2
    if isinstance(exc, OSError) and exc.filename is not None:  # e.g. a full disk
        return 1
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gsgd`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        before, installed = signal.signal(signal.SIGTERM, _on_sigterm), True
    except ValueError:  # not the main thread: leave SIGTERM alone
        before, installed = None, False
    try:
        status = _COMMANDS[args.command](args)
        sys.stdout.flush()  # a closed pipe shows here, not at exit
        return status
    except BrokenPipeError:  # e.g. `gsgd summary | head`: the reader is gone, nothing to say
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return 1
    except KeyboardInterrupt as exc:
        what = "terminated" if isinstance(exc, _Terminated) else "interrupted"
        print(f"\n{what}: rerun the same command to resume from the last checkpoint",
              file=sys.stderr)
        return 143 if isinstance(exc, _Terminated) else 130
    except Exception as exc:
        status = _exit_status(exc)
        if status is None:
            raise
        text = str(exc) if not isinstance(exc, OSError) or exc.filename is None \
            else f"{exc.filename}: {exc.strerror}"
        print(f"gsgd {args.command}: error: {_cli_words(text)}", file=sys.stderr)
        return status
    finally:
        if installed:
            signal.signal(signal.SIGTERM, before if before is not None else signal.SIG_DFL)


if __name__ == "__main__":
    sys.exit(main())
