"""Train one model with several optimizers and seeds: deterministic, checkpointed, resumable.

One run = (config, optimizer spec, seed), stored in ``<exp_dir>/<label>/seed<k>/``:

* ``spec.json``     what the run is (a rerun with a different spec into the same place is refused);
* ``metrics.jsonl`` one JSON line per epoch, flushed and fsync'ed: ``train_loss`` = the mean of
  the minibatch losses optimised in the epoch; ``train_eval_loss`` / ``train_eval_acc`` = eval
  mode on a fixed subset of ``train_eval_size`` training examples; val / test loss and accuracy,
  lr, seconds. A diverged run ends with a line ``{"diverged": true, "reason": ...}``: its
  training loss or optimizer step turned non-finite, or an evaluated loss did;
* ``checkpoint.pt`` model, optimizer and RNG states, epoch, batch index, loss so far and the
  metrics history, written atomically (temp file + ``os.replace``) at every epoch end and every
  ``checkpoint_every`` batches;
* ``final.json``    the run's summary; a run with it is skipped when the experiment is rerun;
* ``.gsgd.lock``    an OS file lock held while the run trains: one writer per run directory (a
  second process fails at once, naming the directory; a dead process's lock is gone with it).

Experiment directories ``<out>/<name>`` hold a shared lock while runs train in them; a dry run
marks the directory it creates (``.gsgd-dry-run``) and :func:`clear_dir` removes only marked
directories. Temp files of killed writers (``.<file>.tmp<PID>`` of a dead PID) are removed at the
next start. With ``jobs > 1`` the worker processes exit when the parent dies, and an interrupt
or a failed run cancels the queued runs and ends the workers (a rerun resumes them).

Determinism: the model is built from the seed (PyTorch default init, or ``[init] weights =
"he"``: :func:`gsgd.models.he_init` from the seed, with a generator of its own), the batch order
is drawn from a ``torch.Generator`` seeded with the seed, and the generator state at the start
of the epoch is checkpointed, so a resumed run replays the same batches
(``iterate_batches(start=k)``) and ends with bit-identical metrics. The init is the same for
every optimizer: the paper's skeleton init (designated weights := 1) when ``[init] skeleton``,
then the optional random rescaling, so SGD from the skeleton init is the fair control; an
``[[optimizers]]`` entry's own ``skeleton`` / ``weights`` change that optimizer's init only
(:meth:`Config.init_for`), on the same seed, so its runs stay paired with the others (same base
draw, same batch order) and its ``final.json`` records the init it used (``"init"``). PathCond
(:func:`gsgd.pathcond`,
``[init] pathcond`` for every optimizer or ``pathcond`` of one optimizer entry, applied after
that common init) rescales the network without changing its function, so every optimizer still
starts from the same function; what it did (sweeps, criterion before / after) is in the run's
``final.json`` under ``"pathcond"``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from gsgd._process import die_with_parent
from gsgd.conditioning import PathCondResult, pathcond
from gsgd.data import DatasetSplits, iterate_batches, num_batches
from gsgd.experiments.config import (
    INIT_OVERRIDES,
    MODEL_OVERRIDES,
    Config,
    InitSection,
    OptimizerSpec,
    config_to_dict,
)
from gsgd.experiments.datasets import ExperimentData, load_experiment_data
from gsgd.experiments.files import (
    DamagedRunFile,
    DirectoryBusy,
    ForeignDirectoryError,
    append_json_line,
    atomic_open,
    atomic_write_text,
    hold_lock,
    read_json,
    remove_stale_temp_files,
)
from gsgd.experiments.models import build_model, model_structure
from gsgd.experiments.optimizers import OPTIMIZERS, build_optimizer
from gsgd.experiments.report import (
    best_val_epoch,
    nonfinite_losses,
    upgrade_record,
    write_group_report,
    write_report,
)
from gsgd.graphs import compile_seconds
from gsgd.group import random_rescale, skeleton_init
from gsgd.models import he_init
from gsgd.optim import GSGD
from gsgd.optim.common import NonFiniteError, PlainParametersWarning
from gsgd.structure import Structure

__all__ = [
    "DRY_RUN_MARKER",
    "DamagedRunFile",
    "DeviceUnavailable",
    "DirectoryBusy",
    "ForeignDirectoryError",
    "RunInterrupted",
    "RunOptions",
    "SpecMismatch",
    "clear_dir",
    "evaluate",
    "experiment_dir",
    "initial_model",
    "experiment_dirs",
    "prepare_model",
    "structure_dims",
    "resolve_device",
    "torch_threads",
    "run_dir_for",
    "run_experiment",
    "run_tasks",
    "train_run",
]

CHECKPOINT_VERSION = 1
DRY_RUN_MARKER = ".gsgd-dry-run"  # written into the experiment directory a dry run creates
_RUN_FILES = ("checkpoint.pt", "metrics.jsonl", "final.json")  # written after spec.json


class RunInterrupted(RuntimeError):
    """Raised by ``RunOptions.stop_after_batches``: simulates a kill (nothing extra is saved)."""


class SpecMismatch(ValueError):
    """A run directory holds a run with another spec; the message names it and the fixes."""


class DeviceUnavailable(RuntimeError):
    """The configured device is not available here."""


@dataclass(frozen=True)
class RunOptions:
    """How runs are executed (not what they compute, except the dry-run limits)."""

    resume: bool = True
    progress: bool = False
    log: Callable[[str], None] | None = print
    max_batches_per_epoch: int | None = None  # dry runs
    eval_limit: int | None = None  # dry runs: evaluate on the first N examples of each split
    evaluate_test: bool = True  # lr sweeps never look at the test split
    stop_after_batches: int | None = None  # tests: stop (as if killed) after N batches
    synthetic: bool = False  # train on labelled synthetic data of the dataset's shape
    fallback_to_synthetic: bool = False  # dry runs: synthetic data when the dataset is absent
    allow_cpu_fallback: bool = False  # dry runs: device "cuda" runs on the CPU when absent
    jobs: int = 1  # runs trained in parallel worker processes
    dry_run: bool = False  # mark the experiment directory as a dry run's (clear_dir removes it)
    rerun_changed: bool = False  # a run whose spec changed is started over, not refused


# --------------------------------------------------------------------------- small helpers


def resolve_device(name: str, allow_cpu_fallback: bool = False) -> torch.device:
    """``"cpu"``, ``"cuda"`` (refused when absent, unless ``allow_cpu_fallback``) or ``"auto"``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        if allow_cpu_fallback:
            return torch.device("cpu")
        raise DeviceUnavailable("device 'cuda' (--device or [experiment] device) but CUDA is "
                                "not available here: use --device cpu or --device auto")
    return torch.device(name)


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Use ``n`` torch threads inside the block (0: leave the setting alone)."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if n:
            torch.set_num_threads(before)


def run_dir_for(exp_dir: Path, label: str, seed: int) -> Path:
    """``<exp_dir>/<label>/seed<k>``."""
    return Path(exp_dir) / label / f"seed{seed}"


def experiment_dirs(config: Config, out_dir: Path) -> list[tuple[str, Config, Path]]:
    """(variant name, single-model config, directory) per model variant of ``config``."""
    base = Path(out_dir) / config.experiment.name
    return [(v, c, base / v if v else base) for v, c in config.variants()]


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int
             ) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of ``model`` on ``(x, y)``, in eval mode."""
    if len(y) == 0:
        return float("nan"), float("nan")
    was_training = model.training
    model.eval()
    loss, correct = 0.0, 0
    for lo in range(0, len(y), batch_size):
        out = model(x[lo:lo + batch_size])
        yb = y[lo:lo + batch_size]
        loss += float(F.cross_entropy(out, yb, reduction="sum"))
        correct += int((out.argmax(1) == yb).sum())
    model.train(was_training)
    return loss / len(y), correct / len(y)


def initial_model(config: Config, seed: int, data: DatasetSplits,
                  spec: OptimizerSpec | None = None
                  ) -> tuple[nn.Module, Structure, PathCondResult | None]:
    """Model from ``seed`` and its structure, in the init ``spec`` starts from
    (:meth:`Config.init_for`: ``[init]`` with ``spec``'s own ``skeleton`` / ``weights``): He
    weights when ``weights = "he"``, then the skeleton init, the optional rescaling, then
    PathCond when ``[init] pathcond`` or ``spec.pathcond`` asks for it; with what PathCond did
    (None when it did not run). The structure is that of :meth:`Config.model_for` (``spec``'s
    own ``bn_mode``): the optimizer's G-structure and the skeleton init's designation."""
    init = config.init_for(spec)
    model = build_model(config.model, data.input_shape, data.num_classes, seed)
    if init.weights == "he":
        he_init(model, seed)
    structure = model_structure(model, config.model_for(spec))
    if init.skeleton:
        skeleton_init(model, structure, keep_sign=init.keep_sign)
    r = init.rescale
    if r is not None:
        random_rescale(model, structure, seed=seed, low=r.low, high=r.high, base=r.base)
    conditioned = None
    if init.pathcond or (spec is not None and spec.pathcond):
        conditioned = pathcond(model, structure)
    return model, structure, conditioned


def prepare_model(config: Config, seed: int, data: DatasetSplits,
                  spec: OptimizerSpec | None = None):
    """(model, structure) of :func:`initial_model`: the init every optimizer of ``config``
    starts from (and ``spec``'s own init overrides and PathCond when it asks for them)."""
    model, structure, _ = initial_model(config, seed, data, spec)
    return model, structure


def _pathcond_summary(result: PathCondResult | None) -> dict | None:
    if result is None:
        return None
    return {"sweeps": result.sweeps, "converged": result.converged,
            "criterion_before": result.criterion_before,
            "criterion_after": result.criterion_after, "residual": result.residual}


# [experiment] keys that do not change a run's numbers (``epochs``: a run can be extended).
_NOT_IN_SPEC = ("name", "description", "seeds", "sweep_seeds", "epochs", "eval_every",
                "checkpoint_every", "device", "threads", "report_last_k")
# Optimizer keys added after runs were recorded: in spec.json only when not at their default,
# so that the spec.json of an earlier run still matches.
_LATER_OPTIMIZER_KEYS = {"on_nonfinite": "raise", "bp_norm": (0.0, 0.0), "amsgrad": False,
                         "decay_carriers": False, "pathcond": False}
# The same for [experiment] and [init] keys (config_to_dict leaves defaults out already; this
# keeps them out of spec.json even if it did not).
_LATER_EXPERIMENT_KEYS = {"pool": 1}
_LATER_INIT_KEYS = {"weights": "default"}
_NO_DEFAULT = object()


def _without_later_defaults(table: dict, later: dict) -> dict:
    return {k: v for k, v in table.items() if later.get(k, _NO_DEFAULT) != v}


def _run_spec(config: Config, spec: OptimizerSpec, seed: int, data_name: str,
              options: RunOptions) -> dict:
    """What determines a run's numbers (epochs excluded: a finished run can be extended).

    ``"init"`` is the init this run starts from (:meth:`Config.init_for`): an optimizer's own
    ``skeleton`` / ``weights`` enter it there, not under ``"optimizer"``, so a run has the same
    spec whether its init comes from ``[init]`` or from its optimizer entry; the same for an
    optimizer's own ``bn_mode`` under ``"model"`` (:meth:`Config.model_for`)."""
    cfg = config_to_dict(replace(config, init=config.init_for(spec),
                                 model=config.model_for(spec)))
    exp = {k: v for k, v in cfg["experiment"].items() if k not in _NOT_IN_SPEC}
    return {
        "experiment": _without_later_defaults(exp, _LATER_EXPERIMENT_KEYS),
        "model": cfg["model"], "init": _without_later_defaults(cfg["init"], _LATER_INIT_KEYS),
        "optimizer": {k: list(v) if isinstance(v, tuple) else v
                      for k, v in asdict(spec).items()
                      if k != "sweep" and k not in INIT_OVERRIDES and k not in MODEL_OVERRIDES
                      and _LATER_OPTIMIZER_KEYS.get(k, _NO_DEFAULT) != v},
        "seed": seed, "data": data_name,
        "limits": {"max_batches_per_epoch": options.max_batches_per_epoch,
                   "eval_limit": options.eval_limit, "evaluate_test": options.evaluate_test},
    }


# --------------------------------------------------------------------------- one run


def _check_spec(run_dir: Path, spec: dict, rerun_changed: bool = False) -> None:
    """Write ``spec.json``, or check that the one there is ``spec``; ``rerun_changed``: a run
    with another spec is cleared (and so trained again) instead of refused."""
    path = run_dir / "spec.json"
    if not path.exists():
        found = [name for name in _RUN_FILES if (run_dir / name).exists()]
        if found:  # the runner writes spec.json first: these files are not a run of its own
            raise ForeignDirectoryError(
                f"{run_dir} holds {', '.join(found)} but no spec.json, so not a gsgd run; "
                "nothing was changed: move them away or use another --out")
    if path.exists():
        old = read_json(path)
        if old != spec and rerun_changed:
            _clear_run(run_dir)
            atomic_write_text(path, json.dumps(spec, indent=1) + "\n")
        elif old != spec:
            diff = sorted(k for k in set(old) | set(spec) if old.get(k) != spec.get(k))
            raise SpecMismatch(
                f"{run_dir} holds a run with a different spec (differs in {diff}): rerun with "
                "--rerun-changed to start over only the runs whose spec changed (--no-resume "
                "starts every run over), or choose another --out")
    else:
        atomic_write_text(path, json.dumps(spec, indent=1) + "\n")


def _load_checkpoint(path: Path) -> dict:
    """``checkpoint.pt``; :class:`DamagedRunFile` naming it when it cannot be read (truncated
    by a full disk or a copy, not written by the runner: its own writes are atomic)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises RuntimeError, EOFError, UnpicklingError, ...
        raise DamagedRunFile(
            f"{path} is damaged ({type(exc).__name__}: {str(exc).splitlines()[0][:160]}); "
            "delete it to restart that run from scratch, or rerun with --no-resume") from None
    if not isinstance(ckpt, dict):
        raise DamagedRunFile(f"{path} is not a gsgd checkpoint; delete it to restart that run")
    return ckpt


def _clear_run(run_dir: Path) -> None:
    """Remove the files of the run in ``run_dir`` (``--no-resume``): only the runner's own files,
    only when its ``spec.json`` says the directory holds a gsgd run."""
    if not (run_dir / "spec.json").is_file():
        return
    for name in (*_RUN_FILES, "spec.json"):
        (run_dir / name).unlink(missing_ok=True)


def _total(optimizer: torch.optim.Optimizer, counter: str) -> int | None:
    """The sum of ``optimizer.<counter>()`` (clip_counts, skipped_steps), None without one."""
    counts = getattr(optimizer, counter, None)
    return int(sum(counts())) if callable(counts) else None


def _final_summary(history: list[dict], label: str, spec: OptimizerSpec, seed: int,
                   epochs: int, conditioned: dict | None = None,
                   init: InitSection | None = None) -> dict:
    """final.json: status, the last evaluated epoch, the best-validation epoch and the test
    accuracy there (nothing is selected on the test split), and the init the run used."""
    diverged = [h for h in history if h.get("diverged")]
    done = [h for h in history if not h.get("diverged")]
    evaluated = [h for h in done if h.get("val_acc") is not None]
    best = best_val_epoch(evaluated)
    extra: dict = {} if init is None else {
        "init": {"weights": init.weights, "skeleton": init.skeleton}}
    if conditioned is not None:
        extra["pathcond"] = conditioned
    return {
        "label": label, "optimizer": spec.name, "lr": spec.describe_lr(), "seed": seed,
        "status": "diverged" if diverged else "finished",
        "reason": diverged[0]["reason"] if diverged else None,
        "epochs": len(done), "epochs_planned": epochs,
        "final": evaluated[-1] if evaluated else None,
        "best_val_acc": best["val_acc"] if best else None,
        "best_val_epoch": best["epoch"] if best else None,
        "test_acc_at_best_val": best.get("test_acc") if best else None,
        "time_per_epoch": (sum(h["time"] for h in done) / len(done)) if done else None,
        **extra,
    }


def _epoch_line(label: str, seed: int, rec: dict, epochs: int) -> str:
    def pct(key: str) -> str:
        v = rec.get(key)
        return "  -  " if v is None else f"{100 * v:5.2f}%"

    return (f"{label} seed{seed} epoch {rec['epoch']}/{epochs}: lr {rec['lr']:.4g} "
            f"train loss {rec['train_loss']:.4f} train-eval {pct('train_eval_acc')} "
            f"val {pct('val_acc')} test {pct('test_acc')} ({rec['time']:.1f} s)")


def train_run(config: Config, spec: OptimizerSpec, seed: int, run_dir: Path,
              data: DatasetSplits, options: RunOptions | None = None) -> dict:
    """Train (or resume, or skip when finished) one run; return its ``final.json`` summary.

    Holds the run directory's lock throughout: :class:`DirectoryBusy` at once when another live
    process trains the same run. Temp files of killed writers are removed first."""
    options = options or RunOptions()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with hold_lock(run_dir):
        remove_stale_temp_files(run_dir)
        return _train_locked(config, spec, seed, run_dir, data, options)


def _train_locked(config: Config, spec: OptimizerSpec, seed: int, run_dir: Path,
                  data: DatasetSplits, options: RunOptions) -> dict:
    """:func:`train_run` once the run directory is locked."""
    exp = config.experiment
    if not options.resume:
        _clear_run(run_dir)
    _check_spec(run_dir, _run_spec(config, spec, seed, data.name, options),
                options.rerun_changed)
    final_path, ckpt_path, metrics_path = (run_dir / "final.json", run_dir / "checkpoint.pt",
                                           run_dir / "metrics.jsonl")
    if final_path.exists():
        final = read_json(final_path)
        if final["status"] == "diverged" or final["epochs_planned"] == exp.epochs:
            return final
        if final["epochs"] > exp.epochs:
            raise SpecMismatch(f"{run_dir} already ran {final['epochs']} epochs, more than "
                               f"epochs = {exp.epochs}: use --no-resume or another --out")
        final_path.unlink()  # extend a finished run to more epochs

    device = resolve_device(exp.device, options.allow_cpu_fallback)
    dtype = getattr(torch, exp.dtype)
    torch.manual_seed(seed)
    model, structure, conditioned = initial_model(config, seed, data, spec)
    conditioned = _pathcond_summary(conditioned)  # recomputed on resume (cheap, deterministic)
    model.to(device=device, dtype=dtype)
    with warnings.catch_warnings():  # the report records the structure and its plain params
        warnings.simplefilter("ignore", PlainParametersWarning)
        optimizer = build_optimizer(spec, model, structure)
    generator = torch.Generator().manual_seed(seed)

    def to_device(split, limit: int | None):
        n = len(split.y) if limit is None else min(limit, len(split.y))
        return split.x[:n].to(device=device, dtype=dtype), split.y[:n].to(device)

    train_x, train_y = to_device(data.train, None)
    limit = options.eval_limit
    sub = exp.train_eval_size if limit is None else min(exp.train_eval_size, limit)
    evals = {"train_eval": to_device(data.train, sub), "val": to_device(data.val, limit)}
    if options.evaluate_test:
        evals["test"] = to_device(data.test, limit)

    per_epoch = num_batches(len(train_y), exp.batch_size)
    if options.max_batches_per_epoch is not None:
        per_epoch = min(per_epoch, options.max_batches_per_epoch)
    state = {"epoch": 0, "batch": 0, "loss_sum": 0.0, "loss_count": 0, "elapsed": 0.0,
             "history": [], "gen_state": generator.get_state()}
    if ckpt_path.exists():
        ckpt = _load_checkpoint(ckpt_path)
        if ckpt.get("version") != CHECKPOINT_VERSION:
            raise DamagedRunFile(f"{ckpt_path}: unknown checkpoint version "
                                 f"{ckpt.get('version')}; delete it to restart that run")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["torch_rng"])
        state = {k: ckpt[k] for k in state}
        generator.set_state(state["gen_state"])
        if state["epoch"] > exp.epochs:
            raise SpecMismatch(f"{ckpt_path} is at epoch {state['epoch']}, past epochs = "
                               f"{exp.epochs}: use --no-resume or another --out")
    history: list[dict] = [upgrade_record(h) for h in state["history"]]  # today's names
    atomic_write_text(metrics_path, "".join(json.dumps(h) + "\n" for h in history))

    def checkpoint(epoch: int, batch: int, gen_state: torch.Tensor, loss_sum: float,
                   loss_count: int, elapsed: float) -> None:
        with atomic_open(ckpt_path, "wb") as f:
            torch.save({
                "version": CHECKPOINT_VERSION, "model": model.state_dict(),
                "optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state(),
                "epoch": epoch, "batch": batch, "loss_sum": loss_sum, "loss_count": loss_count,
                "elapsed": elapsed, "history": history, "gen_state": gen_state,
            }, f)

    log = options.log or (lambda _msg: None)
    if conditioned is not None and not history:
        log(f"{spec.label} seed{seed}: PathCond {conditioned['sweeps']} sweeps, criterion "
            f"{conditioned['criterion_before']:.4g} -> {conditioned['criterion_after']:.4g}")
    bar = tqdm(total=exp.epochs * per_epoch, initial=state["epoch"] * per_epoch + state["batch"],
               desc=f"{spec.label} seed{seed}", disable=not options.progress, leave=False,
               dynamic_ncols=True)
    done_here = 0
    try:
        for epoch in range(state["epoch"], exp.epochs):
            lr = spec.lr_at(epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            start = state["batch"] if epoch == state["epoch"] else 0
            loss_sum = state["loss_sum"] if epoch == state["epoch"] else 0.0
            loss_count = state["loss_count"] if epoch == state["epoch"] else 0
            elapsed = state["elapsed"] if epoch == state["epoch"] else 0.0
            epoch_gen_state = generator.get_state()
            batches = iterate_batches(train_x, train_y, exp.batch_size, shuffle=True,
                                      generator=generator, augment=data.train_augment,
                                      start=start)
            model.train()
            t0 = time.perf_counter()
            compiling = compile_seconds()  # graphs built in this epoch: reported apart
            diverged = None
            for i, (xb, yb) in zip(range(start, per_epoch), batches, strict=False):
                if options.stop_after_batches is not None \
                        and done_here >= options.stop_after_batches:
                    raise RunInterrupted(f"stopped after {done_here} batches (simulated kill)")
                optimizer.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(xb), yb)
                value = loss.detach().item()
                if not math.isfinite(value):
                    diverged = (i, f"non-finite training loss {value}")
                    break
                loss.backward()
                try:
                    optimizer.step()
                except NonFiniteError as exc:
                    diverged = (i, f"{type(exc).__name__}: {exc}")
                    break
                loss_sum += value
                loss_count += 1
                done_here += 1
                bar.update(1)
                if exp.checkpoint_every and (i + 1) % exp.checkpoint_every == 0 \
                        and i + 1 < per_epoch:
                    checkpoint(epoch, i + 1, epoch_gen_state, loss_sum, loss_count,
                               elapsed + time.perf_counter() - t0)
            epoch_compile = compile_seconds() - compiling
            train_time = elapsed + time.perf_counter() - t0 - epoch_compile
            if diverged is not None:
                rec = {"epoch": epoch + 1, "diverged": True, "batch": diverged[0],
                       "reason": diverged[1], "lr": lr}
                history.append(rec)
                append_json_line(metrics_path, rec)
                (tqdm.write if options.progress else log)(
                    f"{spec.label} seed{seed} DIVERGED in epoch {epoch + 1} at batch "
                    f"{diverged[0]}: {diverged[1]}")
                break
            rec = {"epoch": epoch + 1, "lr": lr,
                   "train_loss": loss_sum / max(loss_count, 1), "time": train_time}
            if isinstance(optimizer, GSGD):  # which step ran (a failed compile falls back)
                rec["step_path"] = "compiled" if optimizer.param_groups[0]["compile"] \
                    else "eager"
            if epoch_compile:
                rec["compile_time"] = epoch_compile
            t1 = time.perf_counter()
            last = epoch + 1 == exp.epochs
            if last or (epoch + 1) % exp.eval_every == 0:
                for name, (x, y) in evals.items():
                    rec[f"{name}_loss"], rec[f"{name}_acc"] = evaluate(
                        model, x, y, exp.eval_batch_size)
            rec["eval_time"] = time.perf_counter() - t1
            for counter, key in (("clip_counts", "clipped"), ("skipped_steps", "skipped_steps")):
                total = _total(optimizer, counter)
                if total is not None:
                    rec[key] = total
            bad = nonfinite_losses(rec)
            if bad:  # the model is of no use: a diverged run, not a result
                rec.update(diverged=True, reason=f"non-finite {', '.join(bad)} (eval mode) "
                                                 f"after epoch {epoch + 1}")
                history.append(rec)
                append_json_line(metrics_path, rec)
                (tqdm.write if options.progress else log)(
                    f"{spec.label} seed{seed} DIVERGED after epoch {epoch + 1}: {rec['reason']}")
                break
            history.append(rec)
            checkpoint(epoch + 1, 0, generator.get_state(), 0.0, 0, 0.0)
            append_json_line(metrics_path, rec)
            (tqdm.write if options.progress else log)(_epoch_line(spec.label, seed, rec,
                                                                  exp.epochs))
    finally:
        bar.close()
    final = _final_summary(history, spec.label, spec, seed, exp.epochs, conditioned,
                           config.init_for(spec))
    atomic_write_text(final_path, json.dumps(final, indent=1) + "\n")
    return final


# --------------------------------------------------------------------------- experiments


def _write_experiment_json(exp_dir: Path, config: Config, variant: str,
                           data: ExperimentData) -> None:
    info = {"name": config.experiment.name, "variant": variant,
            "description": config.experiment.description,
            "dataset": config.experiment.dataset, "data": data.splits.name,
            "synthetic": data.synthetic, "note": data.note,
            "num_classes": data.splits.num_classes,
            "sizes": {k: len(getattr(data.splits, k).y) for k in ("train", "val", "test")},
            "labels": [s.label for s in config.optimizers],
            "optimizers": {s.label: s.name for s in config.optimizers},
            "structure": structure_dims(config, data.splits),
            "config": config_to_dict(config)}
    atomic_write_text(exp_dir / "experiment.json", json.dumps(info, indent=1) + "\n")


def structure_dims(config: Config, data: DatasetSplits) -> dict:
    """The [model] G-structure's sizes: m weights in G-blocks, H hidden units, the blocks, and
    the invariant ratio H / m (the share of weight-space directions that only rescale)."""
    model = build_model(config.model, data.input_shape, data.num_classes, seed=0)
    structure = model_structure(model, config.model)
    m, h = structure.num_weights, structure.num_hidden
    return {"m": m, "H": h, "blocks": len(structure.blocks), "H_over_m": h / m if m else None}


def _is_marked(path: Path) -> bool:
    marker = Path(path) / DRY_RUN_MARKER
    return marker.is_file() and not marker.is_symlink()


@contextmanager
def experiment_dir(base: Path, options: RunOptions) -> Iterator[Path]:
    """Create (or reuse) the experiment directory ``base`` and hold its shared lock for the
    block: other processes may train other runs in it meanwhile (each run has its own lock),
    but :func:`clear_dir` cannot remove it.

    A dry run marks a directory it creates (or finds empty) with ``.gsgd-dry-run`` and refuses
    an unmarked one with contents; a real run refuses a marked one (a dry run would clear it).
    Stale temp files of killed writers in ``base`` are removed."""
    base = Path(base)
    try:
        base.mkdir(parents=True)
        created = True
    except FileExistsError:
        created = False
    if (options.dry_run and base.is_symlink()) or not base.is_dir():
        raise ForeignDirectoryError(f"{base} exists and is not a directory gsgd can write its "
                                    "results into: move it away or use another --out")
    marked = _is_marked(base)
    if options.dry_run and not marked:
        if not created and any(base.iterdir()):
            raise ForeignDirectoryError(
                f"{base} exists and was not made by a gsgd dry run (no {DRY_RUN_MARKER} in it); "
                "a dry run writes only into its own directories: move it away or use another "
                "--out")
        atomic_write_text(base / DRY_RUN_MARKER,
                          json.dumps({"made_by": "gsgd dry run", "pid": os.getpid()}) + "\n")
    if marked and not options.dry_run:
        raise ForeignDirectoryError(
            f"{base} is a dry run's directory ({DRY_RUN_MARKER}; the next dry run clears it): "
            "use another --out for real runs")
    with hold_lock(base, shared=True):
        remove_stale_temp_files(base)
        yield base


def run_experiment(config: Config, out_dir: Path, options: RunOptions | None = None,
                   report: bool = True, data: ExperimentData | None = None) -> list[Path]:
    """Run every (variant, optimizer, seed) of ``config`` under ``out_dir/<name>``.

    Returns the experiment directories (one per model variant). Writes ``report.md`` and
    ``curves.png`` into each (and a per-variant summary into ``out_dir/<name>`` when there are
    several variants) unless ``report`` is False. ``data``: train on these splits instead of
    loading ``[experiment] dataset``.
    """
    options = options or RunOptions()
    if options.jobs < 1:
        raise ValueError(f"run_experiment: jobs = {options.jobs} must be >= 1")
    log = options.log or (lambda _msg: None)
    given = data
    if data is None:
        data = load_experiment_data(config.experiment, synthetic=options.synthetic,
                                    fallback_to_synthetic=options.fallback_to_synthetic)
    if data.synthetic:
        log(f"NOTE: {data.note}")
    base = Path(out_dir) / config.experiment.name
    with experiment_dir(base, options):
        dirs, tasks = [], []
        for _variant, cfg, exp_dir in experiment_dirs(config, out_dir):
            exp_dir.mkdir(parents=True, exist_ok=True)
            remove_stale_temp_files(exp_dir)
            _write_experiment_json(exp_dir, cfg, _variant, data)
            dirs.append(exp_dir)
            tasks += [(cfg, spec, seed, run_dir_for(exp_dir, spec.label, seed))
                      for spec in cfg.optimizers for seed in cfg.experiment.seeds]
        run_tasks(tasks, options, data, given)
        if report:
            for exp_dir in dirs:
                write_report(exp_dir)
            if len(dirs) > 1:
                write_group_report(base, dirs)
    return dirs


Task = tuple[Config, OptimizerSpec, int, Path]
"""One run: (single-model config, optimizer spec, seed, run directory)."""


def run_tasks(tasks: list[Task], options: RunOptions, data: ExperimentData,
              given: ExperimentData | None = None) -> list[dict]:
    """Train ``tasks`` (in this process, or in ``options.jobs`` workers); return their
    ``final.json`` summaries in task order. ``given``: the data the caller passed in (workers
    load their own otherwise)."""
    if options.jobs == 1:
        finals = []
        for cfg, spec, seed, run_dir in tasks:
            with torch_threads(cfg.experiment.threads):
                finals.append(train_run(cfg, spec, seed, run_dir, data.splits, options))
        return finals
    return _run_in_workers(tasks, options, given)


def _worker_run(cfg: Config, spec: OptimizerSpec, seed: int, run_dir: Path,
                options: RunOptions, data: ExperimentData | None) -> dict:
    """One run in a worker process: its own data (cached per process) and thread count."""
    if data is None:
        data = load_experiment_data(cfg.experiment, synthetic=options.synthetic,
                                    fallback_to_synthetic=options.fallback_to_synthetic)
    threads = cfg.experiment.threads or max(1, (os.cpu_count() or 1) // options.jobs)
    with torch_threads(threads):
        return train_run(cfg, spec, seed, run_dir, data.splits, options)


def _worker_init(parent_pid: int) -> None:
    """A worker's start: it exits when the parent dies, and leaves Ctrl-C to the parent (which
    ends the workers itself, so that nothing queued starts after an interrupt)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent(parent_pid)
    # tqdm's default lock is a multiprocessing semaphore that a terminated worker would leave to
    # the resource tracker (a "leaked semaphore" warning); workers draw no bars.
    tqdm.set_lock(threading.RLock())


def _stop_pool(pool) -> None:
    """Cancel the queued runs and end the workers now (checkpoints stay: a rerun resumes)."""
    processes = list((getattr(pool, "_processes", None) or {}).values())  # private, 3.8+
    manager = getattr(pool, "_executor_manager_thread", None)
    pool.shutdown(wait=False, cancel_futures=True)
    for p in processes:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + 5.0
    for p in processes:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join(1.0)
    if manager is not None:  # it sees the workers gone, fails what was queued and ends
        manager.join(max(0.0, deadline - time.monotonic()))


def _run_in_workers(tasks: list[Task], options: RunOptions, data: ExperimentData | None
                    ) -> list[dict]:
    """Train ``tasks`` in ``options.jobs`` spawned processes (runs are independent and each is
    deterministic, so the results equal a sequential run's); one-line-per-epoch logs only.

    The first failed run, Ctrl-C or any other exception here cancels the queued runs and ends
    the workers before it propagates; workers exit by themselves when this process dies."""
    import multiprocessing
    from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait

    # Workers print their epoch lines themselves (a custom log callable may not pickle).
    worker_options = replace(options, progress=False, log=print if options.log else None)
    context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(max_workers=options.jobs, mp_context=context,
                               initializer=_worker_init, initargs=(os.getpid(),))
    try:
        futures = [pool.submit(_worker_run, cfg, spec, seed, run_dir, worker_options, data)
                   for cfg, spec, seed, run_dir in tasks]
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        for future in futures:  # the first failure in task order, if any
            if future in done and future.exception() is not None:
                future.result()
    except BaseException:
        _stop_pool(pool)
        raise
    pool.shutdown(wait=True)
    return [future.result() for future in futures]


def dry_run_config(config: Config, batch_size: int = 8) -> Config:
    """The dry-run version of ``config``: 1 epoch, its first seed, small batches, checkpoints
    every 2 batches (so the mid-epoch checkpoint path runs too), and ``compile = "auto"``
    eager for the optimizers that take ``compile`` (a dry run checks the pipeline in seconds;
    the compiler would take longer); the others keep their specs, so that a dry run's tuned
    config stays a valid config."""
    exp = replace(config.experiment, epochs=1, seeds=config.experiment.seeds[:1],
                  sweep_seeds=config.experiment.sweep_seeds[:1],
                  batch_size=min(config.experiment.batch_size, batch_size), checkpoint_every=2,
                  eval_every=1)
    specs = tuple(replace(s, compile=False)
                  if s.compile == "auto" and "compile" in OPTIMIZERS[s.name].keys else s
                  for s in config.optimizers)
    return replace(config, experiment=exp, optimizers=specs)


def dry_run_options(options: RunOptions) -> RunOptions:
    """Limits of a dry run: 3 batches per epoch, 32 examples per evaluation."""
    return replace(options, max_batches_per_epoch=3, eval_limit=32, resume=False,
                   fallback_to_synthetic=True, allow_cpu_fallback=True, dry_run=True)


def clear_dir(path: Path) -> None:
    """Remove ``path`` if it is a dry run's directory (one a dry run made and marked with
    ``.gsgd-dry-run``) and no process is using it; an empty or absent one is left as it is.
    Anything else is refused with :class:`ForeignDirectoryError`, and nothing is deleted."""
    path = Path(path)
    if not os.path.lexists(path):
        return
    if path.is_symlink() or not path.is_dir():
        raise ForeignDirectoryError(f"{path} is not a directory made by a gsgd dry run; nothing "
                                    "was deleted: move it away or use another --out")
    if not _is_marked(path):
        if not any(path.iterdir()):
            return
        raise ForeignDirectoryError(
            f"{path} exists and was not made by a gsgd dry run (no {DRY_RUN_MARKER} in it); "
            "nothing was deleted: move it away or use another --out")
    with hold_lock(path):  # fails at once while a run of another process uses it
        shutil.rmtree(path)
