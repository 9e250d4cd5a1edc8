"""Experiment configuration: the TOML schema, strict validation, and a TOML writer.

A config file has four parts (every key optional unless marked)::

    [experiment]   name (required), dataset (required), description, data_root, seeds, epochs,
                   batch_size, val_size, split_seed, eval_every, train_eval_size,
                   eval_batch_size, checkpoint_every, device, dtype, threads, sweep_seeds,
                   report_last_k, pool
    [model]        kind ("mlp" | "plainnet" | "resnet"), widths (MLP: units per layer, input
                   first, classes last; CNN: channels per stage; a list of lists gives several
                   model variants), bias, depth, batchnorm, bn_mode, cut, shortcut
    [init]         weights ("default" | "he"), skeleton, keep_sign, rescale = {base, low, high},
                   pathcond
    [[optimizers]] name (required), lr (required), label, momentum, weight_decay, nesterov,
                   lr_schedule ("constant" | "exp" | "step"), gamma, milestones, factor, sweep,
                   pathcond, skeleton, weights, and per optimizer: max_ratio, compile,
                   on_nonfinite, bp_norm, bn_mode
                   (gsgd), betas / eps (adam), betas / eps / amsgrad / decay_carriers /
                   bp_norm / max_ratio / on_nonfinite / bn_mode (gadam, gadamw), c (enorm)

The experiment ``name`` names its results directory ``<out>/<name>``: one path component of
letters, digits and ``-_.``. Unknown keys and bad values raise :class:`ConfigError` naming the
section, the key and what is allowed. Learning-rate schedules are per epoch: constant lr;
``exp``: lr * exp(-gamma * epoch) (the paper's MNIST setting, gamma = 0.01); ``step``:
lr * factor ** (number of milestones <= epoch), epochs counted from 0.

``gsgd sweep`` trains on ``sweep_seeds``, by default disjoint from the evaluation ``seeds``
(:func:`sweep_seeds`: as many seeds as ``seeds``, counted up from :data:`SWEEP_SEED_BASE` = 1000
and skipping the evaluation seeds), so that the lr is not chosen on the runs it is then judged
by. ``report_last_k``: the reports' "final" numbers are the mean of each run's last k evaluated
epochs (default 1: the last epoch). ``on_nonfinite`` (gsgd): "raise" (default; the run is
recorded as diverged) or "skip" (a step with non-finite values is not taken, and counted).

``pool = k`` (default 1: none): every split (train / val / test) is average-pooled once at load
time with a k x k window and stride k, x'[c, i, j] = mean of x[c, k*i : k*i + k, k*j : k*j + k]
(28x28 Fashion-MNIST with k = 4: 7x7 = 49 inputs, the paper's [49:h:h:10] nets); k must divide
both image sides, and MLP widths[0] is checked against the pooled shape (:func:`input_shape`).

The init, in this order: the model is built from the seed (``weights = "default"``: PyTorch's
default init; ``"he"``: every Linear / Conv weight re-drawn by :func:`gsgd.models.he_init`,
N(0, 2 / fan_in), biases 0), then the skeleton init (designated weights := 1, ``skeleton``),
the optional ``rescale`` and PathCond. ``skeleton`` and ``weights`` in one ``[[optimizers]]``
entry override ``[init]``'s for that optimizer's runs only (omitted: ``[init]``'s value), so
one experiment can hold "G-SGD from the skeleton init", "SGD from the same skeleton init" and
"SGD from He init", paired by seed (same base draw, same batch order; :meth:`Config.init_for`).
``bn_mode`` in a G-optimizer's entry (gsgd, gadam, gadamw; a CNN with batch norm only) overrides
``[model] bn_mode`` for its runs (:meth:`Config.model_for`): its G-structure, and so the
designation of its skeleton init, e.g. "G-SGD (exact BN)" beside "G-SGD (the paper's
approximate heuristic)" in one experiment, paired by seed with the SGD arms.

PathCond (:func:`gsgd.pathcond`, a function-preserving rescaling of every G-block) at the start:
``[init] pathcond = true`` applies it for every optimizer, after the skeleton init and the
rescaling; ``pathcond = true`` in one ``[[optimizers]]`` entry applies it to that optimizer's
model copy only (after the common init: "SGD + PathCond" beside plain "Adam" in one experiment).
Either way every optimizer starts from the same function. ``bp_norm = [lam_pos, lam_neg]``
(gsgd, gadam, gadamw): the weights of the basis-path-norm regulariser (our design, see
:class:`gsgd.optim.GSGD`); default [0, 0], off.
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from gsgd.experiments.optimizers import OPTIMIZERS

__all__ = [
    "ADAM_FAMILY",
    "DATASET_SHAPES",
    "NAME_RULE",
    "OPTIMIZER_NAMES",
    "Config",
    "ConfigError",
    "INIT_OVERRIDES",
    "MODEL_OVERRIDES",
    "INIT_WEIGHTS",
    "ExperimentSection",
    "InitSection",
    "ModelSection",
    "OptimizerSpec",
    "RescaleSpec",
    "check_name",
    "config_from_dict",
    "config_to_dict",
    "config_to_toml",
    "input_shape",
    "load_config",
    "sweep_seeds",
]


class ConfigError(ValueError):
    """An invalid experiment config; the message names the section, the key and what is allowed."""


# (channels, height, width), classes: used to check MLP widths before any data is loaded.
DATASET_SHAPES: dict[str, tuple[tuple[int, int, int], int]] = {
    "mnist": ((1, 28, 28), 10),
    "fashion-mnist": ((1, 28, 28), 10),
    "digits": ((1, 8, 8), 10),
    "cifar10": ((3, 32, 32), 10),
    "cifar100": ((3, 32, 32), 100),
    "synthetic": ((1, 28, 28), 10),
}
MODEL_KINDS = ("mlp", "plainnet", "resnet")
BN_MODES = ("exact", "approximate")
OPTIMIZER_NAMES = tuple(OPTIMIZERS)  # the registry's names, in its order
SCHEDULES = ("constant", "exp", "step")
INIT_WEIGHTS = ("default", "he")
INIT_OVERRIDES = ("skeleton", "weights")  # [[optimizers]] keys that override [init]'s
MODEL_OVERRIDES = ("bn_mode",)  # [[optimizers]] keys that override [model]'s
DEVICES = ("cpu", "cuda", "auto")
DTYPES = ("float32", "float64")
ON_NONFINITE = ("raise", "skip")
SWEEP_SEED_BASE = 1000
_LABEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@=+-]*$")
# An experiment name is one path component under --out (it names the results directory).
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
NAME_RULE = ("one directory name of letters, digits and -_. (at most 100, starting with a "
             "letter or digit: no '/', no '..', not an absolute path)")


# --------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class ExperimentSection:
    """[experiment]: what data, how long, which seeds, where it runs."""

    name: str
    dataset: str
    description: str = ""
    data_root: str = ""
    seeds: tuple[int, ...] = (0,)
    epochs: int = 10
    batch_size: int = 64
    val_size: int | float | None = None
    split_seed: int = 0
    eval_every: int = 1
    train_eval_size: int = 10000
    eval_batch_size: int = 1000
    checkpoint_every: int = 500
    device: str = "cpu"
    dtype: str = "float32"
    threads: int = 0  # torch threads while training (0: leave torch's default)
    sweep_seeds: tuple[int, ...] = ()  # () : disjoint from seeds, see sweep_seeds()
    report_last_k: int = 1  # reports: "final" = mean of the last k evaluated epochs
    pool: int = 1  # every split average-pooled k x k, stride k, at load time (1: none)


@dataclass(frozen=True)
class ModelSection:
    """[model]: an MLP (widths: units, input first, classes last) or a PlainNet / ResNet
    (depth 6n+2 or 34; widths: channels per stage, default by depth). ``bias`` defaults to true
    for MLPs and false for CNNs. With ``batchnorm``, G-blocks are found in ``bn_mode`` ("exact":
    BN affine pairs as incoming edges; "approximate": the paper's heuristic). ``cut = "stages"``
    gives one G-block per PlainNet stage (the paper's choice); ``shortcut``: ResNet "A" / "B"
    ("": by depth)."""

    kind: str = "mlp"
    widths: tuple[int, ...] | tuple[tuple[int, ...], ...] = ()
    bias: bool | None = None
    depth: int = 20
    batchnorm: bool = False
    bn_mode: str = "exact"
    cut: str = ""
    shortcut: str = ""

    @property
    def variants(self) -> tuple[tuple[int, ...], ...]:
        """The width profiles: one for a flat ``widths`` list, several for a list of lists."""
        if self.widths and isinstance(self.widths[0], tuple):
            return self.widths  # type: ignore[return-value]
        return (self.widths,)  # type: ignore[return-value]


@dataclass(frozen=True)
class RescaleSpec:
    """A random rescaling of every hidden unit by base ** U(low, high) (unbalanced init)."""

    base: float = 10.0
    low: float = -1.0
    high: float = 1.0


@dataclass(frozen=True)
class InitSection:
    """[init]: the base weights ("default": PyTorch's init; "he": N(0, 2 / fan_in), biases 0),
    then the paper's skeleton init (designated weights := 1), then an optional rescaling."""

    skeleton: bool = True
    keep_sign: bool = False
    rescale: RescaleSpec | None = None
    pathcond: bool = False  # gsgd.pathcond after skeleton / rescale, for every optimizer
    weights: str = "default"  # "he": gsgd.models.he_init before the skeleton init


@dataclass(frozen=True)
class OptimizerSpec:
    """One [[optimizers]] entry: which optimizer, its hyper-parameters and lr schedule."""

    name: str
    lr: float
    label: str = ""
    momentum: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False
    lr_schedule: str = "constant"
    gamma: float = 0.0
    milestones: tuple[int, ...] = ()
    factor: float = 0.1
    sweep: tuple[float, ...] = ()
    max_ratio: float = 100.0
    c: float = 1.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    compile: bool | str = "auto"
    on_nonfinite: str = "raise"
    bp_norm: tuple[float, float] = (0.0, 0.0)
    amsgrad: bool = False
    decay_carriers: bool = False
    pathcond: bool = False  # gsgd.pathcond on this optimizer's model copy, after the init
    skeleton: bool | None = None  # None: [init] skeleton; else this optimizer's own
    weights: str | None = None  # None: [init] weights; else this optimizer's own
    bn_mode: str | None = None  # None: [model] bn_mode; else this optimizer's own (G-optimizers)

    def lr_at(self, epoch: int) -> float:
        """The learning rate of ``epoch`` (counted from 0) under this spec's schedule."""
        if self.lr_schedule == "exp":
            return self.lr * math.exp(-self.gamma * epoch)
        if self.lr_schedule == "step":
            return self.lr * self.factor ** sum(1 for m in self.milestones if m <= epoch)
        return self.lr

    def describe_lr(self) -> str:
        """A short text of the schedule, e.g. ``0.1*exp(-0.01*epoch)``."""
        lr = f"{self.lr:g}"
        if self.lr_schedule == "exp":
            return f"{lr}*exp(-{self.gamma:g}*epoch)"
        if self.lr_schedule == "step":
            return f"{lr} x{self.factor:g} at {','.join(map(str, self.milestones))}"
        return lr


@dataclass(frozen=True)
class Config:
    """A whole experiment: one dataset and model, several optimizers and seeds."""

    experiment: ExperimentSection
    model: ModelSection
    init: InitSection
    optimizers: tuple[OptimizerSpec, ...]

    def variants(self) -> list[tuple[str, Config]]:
        """One single-model config per width profile, with its name ("" when only one)."""
        profiles = self.model.variants
        if len(profiles) == 1:
            return [("", replace(self, model=replace(self.model, widths=profiles[0])))]
        return [("-".join(map(str, w)), replace(self, model=replace(self.model, widths=w)))
                for w in profiles]

    def init_for(self, spec: OptimizerSpec | None = None) -> InitSection:
        """The init ``spec``'s runs start from: ``[init]`` with the ``skeleton`` / ``weights``
        that ``spec`` sets itself in place of ``[init]``'s (``[init]`` when None)."""
        if spec is None:
            return self.init
        own = {k: getattr(spec, k) for k in INIT_OVERRIDES if getattr(spec, k) is not None}
        return replace(self.init, **own) if own else self.init

    def model_for(self, spec: OptimizerSpec | None = None) -> ModelSection:
        """The model ``spec``'s runs use: ``[model]`` with the ``bn_mode`` that ``spec`` sets
        itself (its G-structure and so its skeleton init; ``[model]`` when None)."""
        if spec is None:
            return self.model
        own = {k: getattr(spec, k) for k in MODEL_OVERRIDES if getattr(spec, k) is not None}
        return replace(self.model, **own) if own else self.model

    def optimizer(self, label: str) -> OptimizerSpec:
        """The optimizer spec with this label."""
        for spec in self.optimizers:
            if spec.label == label:
                return spec
        raise KeyError(f"no optimizer labelled {label!r}; labels: "
                       f"{[s.label for s in self.optimizers]}")


def sweep_seeds(exp: ExperimentSection) -> tuple[int, ...]:
    """The seeds of ``gsgd sweep``: ``exp.sweep_seeds`` when given, else ``len(exp.seeds)``
    seeds counted up from :data:`SWEEP_SEED_BASE`, skipping the evaluation seeds."""
    if exp.sweep_seeds:
        return exp.sweep_seeds
    out: list[int] = []
    seed = SWEEP_SEED_BASE
    while len(out) < len(exp.seeds):
        if seed not in exp.seeds:
            out.append(seed)
        seed += 1
    return tuple(out)


def input_shape(exp: ExperimentSection) -> tuple[int, int, int]:
    """(channels, height, width) of the inputs ``exp`` trains on: the dataset's shape
    (:data:`DATASET_SHAPES`) with both image sides divided by ``exp.pool``."""
    (c, h, w), _ = DATASET_SHAPES[exp.dataset]
    return c, h // exp.pool, w // exp.pool


# --------------------------------------------------------------------------- checkers

Check = Callable[[Any], Any]  # returns the normalised value or raises _Bad(message)


class _Bad(Exception):
    """A value failed a check; carries what is allowed."""


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _string(v: Any) -> str:
    if not isinstance(v, str):
        raise _Bad("must be a string")
    return v


def _nonempty_string(v: Any) -> str:
    if not isinstance(v, str) or not v.strip():
        raise _Bad("must be a non-empty string")
    return v


def _experiment_name(v: Any) -> str:
    if not isinstance(v, str) or not _NAME_RE.fullmatch(v):
        raise _Bad(f"must be {NAME_RULE}")
    return v


def check_name(name: Any, where: str) -> str:
    """``name`` if it is a valid experiment name; else a :class:`ConfigError` naming ``where``
    (the flag or config key it came from) and what is allowed."""
    try:
        return _experiment_name(name)
    except _Bad as exc:
        raise ConfigError(f"{where} {name!r}: {exc}") from None


def _boolean(v: Any) -> bool:
    if not isinstance(v, bool):
        raise _Bad("must be true or false")
    return v


def _compile_choice(v: Any) -> bool | str:
    if v == "auto" or isinstance(v, bool):
        return v
    raise _Bad('must be true, false or "auto" (compile where a working compiler is found)')


def _int_at_least(low: int) -> Check:
    def check(v: Any) -> int:
        if not _is_int(v) or v < low:
            raise _Bad(f"must be an integer >= {low}")
        return int(v)
    return check


def _number(low: float | None = None, high: float | None = None, *, open_low: bool = False,
            open_high: bool = False) -> Check:
    lo_txt = "" if low is None else (f"> {low:g}" if open_low else f">= {low:g}")
    hi_txt = "" if high is None else (f"< {high:g}" if open_high else f"<= {high:g}")
    bounds = " and ".join(t for t in (lo_txt, hi_txt) if t)

    def check(v: Any) -> float:
        ok = _is_num(v) and math.isfinite(v)
        if ok and low is not None:
            ok = v > low if open_low else v >= low
        if ok and high is not None:
            ok = v < high if open_high else v <= high
        if not ok:
            raise _Bad("must be a finite number" + (f" {bounds}" if bounds else ""))
        return float(v)
    return check


def _choice(options: tuple[str, ...]) -> Check:
    def check(v: Any) -> str:
        if v not in options:
            raise _Bad(f"allowed values: {', '.join(repr(o) for o in options)}")
        return v
    return check


def _list_of(item: Check, what: str, nonempty: bool = True) -> Check:
    def check(v: Any) -> tuple:
        if not isinstance(v, list) or (nonempty and not v):
            raise _Bad(f"must be a {'non-empty ' if nonempty else ''}list of {what}")
        try:
            return tuple(item(x) for x in v)
        except _Bad as exc:
            raise _Bad(f"must be a list of {what} ({exc})") from None
    return check


def _seeds(v: Any) -> tuple[int, ...]:
    seeds = _list_of(_int_at_least(0), "integers >= 0")(v)
    if len(set(seeds)) != len(seeds):
        raise _Bad("must not repeat a seed")
    return seeds


def _val_size(v: Any) -> int | float:
    if _is_int(v) and v >= 0:
        return int(v)
    if _is_num(v) and 0 < v < 1:
        return float(v)
    raise _Bad("must be a count >= 0 or a fraction in (0, 1)")


def _widths(v: Any) -> tuple:
    profile = _list_of(_int_at_least(1), "integers >= 1")
    if isinstance(v, list) and v and all(isinstance(x, list) for x in v):
        profiles = tuple(profile(x) for x in v)
        if any(len(p) < 2 for p in profiles):
            raise _Bad("every width profile needs >= 2 entries (input, ..., classes)")
        if len(set(profiles)) != len(profiles):
            raise _Bad("must not repeat a width profile")
        return profiles
    widths = profile(v)
    if len(widths) < 2:
        raise _Bad("needs >= 2 entries (input, ..., classes)")
    return widths


def _betas(v: Any) -> tuple[float, float]:
    if not isinstance(v, list) or len(v) != 2:
        raise _Bad("must be a list of two numbers in [0, 1)")
    b = _number(0.0, 1.0, open_high=True)
    return (b(v[0]), b(v[1]))


def _bp_norm(v: Any) -> tuple[float, float]:
    if not (isinstance(v, list) and len(v) == 2
            and all(_is_num(x) and math.isfinite(x) and x >= 0 for x in v)):
        raise _Bad("must be a list of two finite numbers >= 0 [lam_pos, lam_neg] (the "
                   "basis-path-norm regulariser's weights; [0, 0]: off)")
    return (float(v[0]), float(v[1]))


def _milestones(v: Any) -> tuple[int, ...]:
    ms = _list_of(_int_at_least(1), "integers >= 1", nonempty=False)(v)
    if list(ms) != sorted(set(ms)):
        raise _Bad("must be strictly increasing")
    return ms


# --------------------------------------------------------------------------- sections' schema

_EXPERIMENT_KEYS: dict[str, Check] = {
    "name": _experiment_name,
    "dataset": _choice(tuple(DATASET_SHAPES)),
    "description": _string,
    "data_root": _string,
    "seeds": _seeds,
    "epochs": _int_at_least(1),
    "batch_size": _int_at_least(1),
    "val_size": _val_size,
    "split_seed": _int_at_least(0),
    "eval_every": _int_at_least(1),
    "train_eval_size": _int_at_least(0),
    "eval_batch_size": _int_at_least(1),
    "checkpoint_every": _int_at_least(0),
    "device": _choice(DEVICES),
    "dtype": _choice(DTYPES),
    "threads": _int_at_least(0),
    "sweep_seeds": _seeds,
    "report_last_k": _int_at_least(1),
    "pool": _int_at_least(1),
}
_MODEL_KEYS: dict[str, Check] = {
    "kind": _choice(MODEL_KINDS),
    "widths": _widths,
    "bias": _boolean,
    "depth": _int_at_least(1),
    "batchnorm": _boolean,
    "bn_mode": _choice(BN_MODES),
    "cut": _choice(("", "stages")),
    "shortcut": _choice(("", "A", "B")),
}
_RESCALE_KEYS: dict[str, Check] = {
    "base": _number(1.0, open_low=True),
    "low": _number(),
    "high": _number(),
}
_INIT_KEYS: dict[str, Check] = {
    "skeleton": _boolean,
    "keep_sign": _boolean,
    "pathcond": _boolean,
    "weights": _choice(INIT_WEIGHTS),
}
_OPTIMIZER_KEYS: dict[str, Check] = {
    "name": _choice(OPTIMIZER_NAMES),
    "lr": _number(0.0, open_low=True),
    "label": _nonempty_string,
    "momentum": _number(0.0, 1.0, open_high=True),
    "weight_decay": _number(0.0),
    "nesterov": _boolean,
    "lr_schedule": _choice(SCHEDULES),
    "gamma": _number(0.0),
    "milestones": _milestones,
    "factor": _number(0.0, open_low=True),
    "sweep": _list_of(_number(0.0, open_low=True), "learning rates > 0"),
    "max_ratio": _number(1.0, open_low=True),
    "c": _number(0.0, open_low=True),
    "betas": _betas,
    "eps": _number(0.0, open_low=True),
    "compile": _compile_choice,
    "on_nonfinite": _choice(ON_NONFINITE),
    "bp_norm": _bp_norm,
    "amsgrad": _boolean,
    "decay_carriers": _boolean,
    "pathcond": _boolean,
    "skeleton": _boolean,
    "weights": _choice(INIT_WEIGHTS),
    "bn_mode": _choice(BN_MODES),
}
_COMMON_OPTIMIZER_KEYS = tuple(k for k in _OPTIMIZER_KEYS
                               if not any(k in r.keys for r in OPTIMIZERS.values()))


def _section(table: Any, section: str, schema: Mapping[str, Check],
             required: tuple[str, ...] = (), allowed: tuple[str, ...] | None = None
             ) -> dict[str, Any]:
    """Check one TOML table against ``schema``: unknown keys, missing keys, bad values."""
    if not isinstance(table, dict):
        raise ConfigError(f"[{section}] must be a table, got {type(table).__name__}")
    allowed = tuple(schema) if allowed is None else allowed
    for key in table:
        if key not in allowed:
            raise ConfigError(f"[{section}]: unknown key {key!r}; allowed keys: "
                              f"{', '.join(allowed)}")
    for key in required:
        if key not in table:
            raise ConfigError(f"[{section}]: missing required key {key!r}")
    out = {}
    for key, value in table.items():
        try:
            out[key] = schema[key](value)
        except _Bad as exc:
            raise ConfigError(f"[{section}] {key} = {value!r}: {exc}") from None
    return out


def _experiment(table: Any) -> ExperimentSection:
    exp = ExperimentSection(**_section(table, "experiment", _EXPERIMENT_KEYS,
                                       required=("name", "dataset")))
    (_c, h, w), _ = DATASET_SHAPES[exp.dataset]
    if h % exp.pool or w % exp.pool:
        allowed = [k for k in range(1, min(h, w) + 1) if h % k == 0 and w % k == 0]
        raise ConfigError(f"[experiment] pool = {exp.pool}: dataset {exp.dataset!r} has {h}x{w} "
                          "images and the pooling window must divide both sides; allowed "
                          f"values: {', '.join(map(str, allowed))}")
    return exp


def _model(table: Any, exp: ExperimentSection) -> ModelSection:
    model = ModelSection(**_section(table, "model", _MODEL_KEYS))
    if model.kind == "mlp":
        if not model.widths:
            raise ConfigError("[model]: kind = 'mlp' needs widths = [input, hidden..., classes]")
        c, h, w = input_shape(exp)
        classes = DATASET_SHAPES[exp.dataset][1]
        pooled = f" pooled {exp.pool}x{exp.pool} to {c}x{h}x{w}" if exp.pool > 1 else ""
        for profile in model.variants:
            if profile[0] != c * h * w or profile[-1] != classes:
                raise ConfigError(
                    f"[model] widths = {list(profile)}: dataset {exp.dataset!r}{pooled} needs "
                    f"widths[0] = {c * h * w} (input features) and widths[-1] = {classes} "
                    "(classes)")
    else:
        if model.depth != 34 and (model.depth < 8 or (model.depth - 2) % 6):
            raise ConfigError(f"[model] depth = {model.depth}: kind = {model.kind!r} supports "
                              "depths 6n+2 (20, 32, 44, 56, 110) and 34")
        if model.shortcut and model.kind != "resnet":
            raise ConfigError("[model] shortcut: only for kind = 'resnet'")
        if model.cut and model.kind != "plainnet":
            raise ConfigError("[model] cut: only for kind = 'plainnet'")
        from gsgd.models.cnn import stage_layout

        stages = len(stage_layout(model.depth)[0])
        for profile in model.variants if model.widths else ():
            if len(profile) != stages:
                raise ConfigError(
                    f"[model] widths = {list(profile)}: a {model.kind} of depth {model.depth} "
                    f"has {stages} stages; give one channel count per stage (--widths "
                    f"{','.join(['C'] * stages)} on the command line)")
    return model


def _init(table: Any) -> InitSection:
    table = dict(table) if isinstance(table, dict) else table
    rescale = None
    if isinstance(table, dict) and "rescale" in table:
        raw = table.pop("rescale")
        if raw is not False:
            rescale = RescaleSpec(**_section(raw, "init.rescale", _RESCALE_KEYS))
            if rescale.low > rescale.high:
                raise ConfigError(f"[init.rescale]: low = {rescale.low:g} must be <= high = "
                                  f"{rescale.high:g}")
    allowed = (*_INIT_KEYS, "rescale")
    return InitSection(**_section(table, "init", {**_INIT_KEYS, "rescale": _boolean},
                                  allowed=allowed), rescale=rescale)


ADAM_FAMILY = ("adam", "gadam", "gadamw")  # no momentum / nesterov keys: betas instead


def _optimizer(table: Any, k: int, init: InitSection) -> OptimizerSpec:
    section = f"optimizers #{k + 1}"
    if isinstance(table, dict) and table.get("name") in OPTIMIZERS:
        section = f"optimizers #{k + 1} ({table['name']})"
        allowed = (*_COMMON_OPTIMIZER_KEYS, *OPTIMIZERS[table["name"]].keys)
    else:
        allowed = tuple(_OPTIMIZER_KEYS)
    values = _section(table, section, _OPTIMIZER_KEYS, required=("name", "lr"), allowed=allowed)
    if values.get("pathcond") and init.pathcond:
        raise ConfigError(f"[{section}] pathcond: [init] pathcond = true already applies "
                          "PathCond for every optimizer")
    values.setdefault("label", OPTIMIZERS[values["name"]].label
                      + ("+PathCond" if values.get("pathcond") else ""))
    if not _LABEL_RE.match(values["label"]):
        raise ConfigError(f"[{section}] label = {values['label']!r}: use letters, digits and "
                          "._@=+- (it names a directory)")
    spec = OptimizerSpec(**values)
    if spec.nesterov and spec.momentum <= 0:
        raise ConfigError(f"[{section}] nesterov = true needs momentum > 0")
    if spec.name in ADAM_FAMILY and spec.momentum:
        raise ConfigError(f"[{section}] momentum: {OPTIMIZERS[spec.name].label} has no "
                          "momentum key, use betas")
    if spec.lr_schedule == "exp" and "gamma" not in values:
        raise ConfigError(f"[{section}]: lr_schedule = 'exp' needs gamma (lr*exp(-gamma*epoch))")
    if spec.lr_schedule == "step" and not spec.milestones:
        raise ConfigError(f"[{section}]: lr_schedule = 'step' needs milestones = [epochs...]")
    for key, schedule in (("gamma", "exp"), ("milestones", "step"), ("factor", "step")):
        if key in values and spec.lr_schedule != schedule:
            raise ConfigError(f"[{section}] {key}: only used by lr_schedule = {schedule!r}, "
                              f"not {spec.lr_schedule!r}")
    return spec


_TOP_LEVEL = ("experiment", "model", "init", "optimizers")


def config_from_dict(data: Mapping[str, Any]) -> Config:
    """Validate a parsed TOML document and build the :class:`Config`."""
    for key in data:
        if key not in _TOP_LEVEL:
            raise ConfigError(f"unknown section [{key}]; allowed sections: [experiment], "
                              "[model], [init], [[optimizers]]")
    if "experiment" not in data:
        raise ConfigError("missing section [experiment] (name, dataset, ...)")
    experiment = _experiment(data["experiment"])
    model = _model(data.get("model", {}), experiment)
    init = _init(data.get("init", {}))
    raw_opts = data.get("optimizers")
    if not isinstance(raw_opts, list) or not raw_opts:
        raise ConfigError("missing [[optimizers]]: give at least one [[optimizers]] table with "
                          f"name (one of {', '.join(OPTIMIZER_NAMES)}) and lr")
    optimizers = tuple(_optimizer(t, k, init) for k, t in enumerate(raw_opts))
    for k, spec in enumerate(optimizers):
        if spec.bn_mode is not None and not (model.kind != "mlp" and model.batchnorm):
            raise ConfigError(f"[optimizers #{k + 1} ({spec.name})] bn_mode: only for a CNN "
                              "with [model] batchnorm = true (it says how the optimizer's "
                              "G-structure treats batch norm)")
    labels = [o.label for o in optimizers]
    dupes = sorted({x for x in labels if labels.count(x) > 1})
    if dupes:
        raise ConfigError(f"[[optimizers]]: labels {dupes} are used more than once; give each "
                          "entry a distinct label")
    return Config(experiment, model, init, optimizers)


def load_config(path: str | Path) -> Config:
    """Read and validate a TOML experiment config."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path} is a directory, not a config file: give a .toml file (e.g. "
                          "configs/mnist_mlp_short.toml)") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a text file ({exc.reason} at byte {exc.start}): give a "
                          "TOML config") from None
    except OSError as exc:
        raise ConfigError(f"config file {path}: cannot read it ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    try:
        return config_from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


# --------------------------------------------------------------------------- writing


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def _changed(obj: Any, base: Any) -> dict[str, Any]:
    """The fields of a dataclass ``obj`` that differ from those of ``base``."""
    return {f.name: _plain(getattr(obj, f.name)) for f in fields(obj)
            if getattr(obj, f.name) != getattr(base, f.name)}


def config_to_dict(config: Config) -> dict[str, Any]:
    """A TOML-ready dict (defaults left out) that :func:`config_from_dict` maps back."""
    exp = config.experiment
    model = _changed(config.model, ModelSection())
    init = _changed(replace(config.init, rescale=None), InitSection())
    if config.init.rescale is not None:
        init["rescale"] = {f.name: getattr(config.init.rescale, f.name)
                           for f in fields(RescaleSpec)}
    opts = []
    for spec in config.optimizers:
        entry = {"name": spec.name, "lr": spec.lr}
        entry.update(_changed(spec, OptimizerSpec(spec.name, spec.lr)))
        if spec.lr_schedule == "step":
            entry["factor"] = spec.factor
        if spec.lr_schedule == "exp":
            entry["gamma"] = spec.gamma
        opts.append(entry)
    return {
        "experiment": {"name": exp.name, "dataset": exp.dataset,
                       **_changed(exp, ExperimentSection(exp.name, exp.dataset))},
        "model": model,
        "init": init,
        "optimizers": opts,
    }


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, str):
        escaped = v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        return f'"{escaped}"'
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"config_to_toml: cannot write {type(v).__name__}")


def config_to_toml(config: Config, header: str = "") -> str:
    """Write ``config`` as TOML (``header``: comment lines put first)."""
    data = config_to_dict(config)
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]
    for section in ("experiment", "model", "init"):
        lines += ["", f"[{section}]"]
        lines += [f"{k} = {_toml_value(v)}" for k, v in data[section].items()]
    for entry in data["optimizers"]:
        lines += ["", "[[optimizers]]"]
        lines += [f"{k} = {_toml_value(v)}" for k, v in entry.items()]
    return "\n".join(lines).lstrip("\n") + "\n"

