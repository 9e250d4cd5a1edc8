"""The optimizers an experiment compares: one :class:`OptimizerRecord` each, in :data:`OPTIMIZERS`.

``gsgd`` -> :class:`gsgd.optim.GSGD`, ``sgd`` -> ``torch.optim.SGD``, ``pathsgd`` ->
:class:`gsgd.optim.PathSGD`, ``enorm`` -> :class:`gsgd.optim.ENormSGD`, ``adam`` ->
``torch.optim.Adam``, ``gadam`` / ``gadamw`` -> :class:`gsgd.optim.GAdam` /
:class:`gsgd.optim.GAdamW` (Adam / AdamW in G-space, eager). Config validation (names, default
labels, per-optimizer keys), the CLI and :func:`build_optimizer` all read this one registry. All
start at the spec's base lr; the runner sets each epoch's lr. ``weight_decay`` is the common key
(GAdamW: decoupled, default 0 as for every optimizer here, not GAdamW's own 1e-2).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from gsgd.graphs import compiler_works
from gsgd.optim import GSGD, ENormSGD, GAdam, GAdamW, PathSGD
from gsgd.structure import Structure

if TYPE_CHECKING:  # config.py reads OPTIMIZERS, so the spec's type is imported for hints only
    from gsgd.experiments.config import OptimizerSpec

__all__ = ["OPTIMIZERS", "OptimizerRecord", "build_optimizer", "step_compiled"]

Builder = Callable[..., torch.optim.Optimizer]
"""``build(spec, model, **extra)``; ``extra`` is ``structure=`` when the record needs it."""


@dataclass(frozen=True)
class OptimizerRecord:
    """One optimizer an experiment can name in ``[[optimizers]] name``."""

    name: str  # the config name, e.g. "gsgd"
    label: str  # the default label (it names the results directory), e.g. "G-SGD"
    build: Builder  # build(spec, model[, structure=...]) -> torch.optim.Optimizer
    keys: tuple[str, ...] = ()  # the config keys it takes besides the common ones
    needs_structure: bool = False  # build gets the model's G-structure as structure=


def _sgd_like(spec: OptimizerSpec) -> dict[str, Any]:
    """The hyper-parameters every SGD-style optimizer takes from the spec."""
    return dict(lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay,
                nesterov=spec.nesterov)


def step_compiled(spec: OptimizerSpec, model: nn.Module) -> bool:
    """Whether the G-SGD step of this run is compiled: ``compile = true / false``, or with
    ``"auto"`` (the default) wherever torch.compile works for the model's device
    (:func:`gsgd.graphs.compiler_works`), unless the environment sets ``GSGD_COMPILE=0``."""
    if isinstance(spec.compile, bool):
        return spec.compile
    if os.environ.get("GSGD_COMPILE", "").strip() == "0":
        return False
    device = next(model.parameters()).device
    return compiler_works(device.type)


def _gsgd(spec: OptimizerSpec, model: nn.Module, **extra: Any) -> torch.optim.Optimizer:
    return GSGD(model, **_sgd_like(spec), max_ratio=spec.max_ratio,
                compile=step_compiled(spec, model), on_nonfinite=spec.on_nonfinite,
                bp_norm=spec.bp_norm, **extra)


def _sgd(spec: OptimizerSpec, model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), **_sgd_like(spec))


def _pathsgd(spec: OptimizerSpec, model: nn.Module, **extra: Any) -> torch.optim.Optimizer:
    return PathSGD(model, **_sgd_like(spec), **extra)


def _enorm(spec: OptimizerSpec, model: nn.Module, **extra: Any) -> torch.optim.Optimizer:
    return ENormSGD(model, **_sgd_like(spec), c=spec.c, **extra)


def _adam(spec: OptimizerSpec, model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=spec.lr, betas=spec.betas, eps=spec.eps,
                            weight_decay=spec.weight_decay)


def _gadam(spec: OptimizerSpec, model: nn.Module, **extra: Any) -> torch.optim.Optimizer:
    cls = GAdamW if spec.name == "gadamw" else GAdam
    return cls(model, lr=spec.lr, betas=spec.betas, eps=spec.eps,
               weight_decay=spec.weight_decay, amsgrad=spec.amsgrad,
               decay_carriers=spec.decay_carriers, bp_norm=spec.bp_norm,
               max_ratio=spec.max_ratio, on_nonfinite=spec.on_nonfinite, **extra)


_GADAM_KEYS = ("betas", "eps", "amsgrad", "decay_carriers", "bp_norm", "max_ratio",
               "on_nonfinite", "bn_mode")


def _registry(*records: OptimizerRecord) -> dict[str, OptimizerRecord]:
    return {r.name: r for r in records}


OPTIMIZERS: dict[str, OptimizerRecord] = _registry(
    OptimizerRecord("gsgd", "G-SGD", _gsgd, ("max_ratio", "compile", "on_nonfinite", "bp_norm",
                                               "bn_mode"),
                    needs_structure=True),
    OptimizerRecord("sgd", "SGD", _sgd),
    OptimizerRecord("pathsgd", "Path-SGD", _pathsgd, needs_structure=True),
    OptimizerRecord("enorm", "ENorm", _enorm, ("c",), needs_structure=True),
    OptimizerRecord("adam", "Adam", _adam, ("betas", "eps")),
    OptimizerRecord("gadam", "G-Adam", _gadam, _GADAM_KEYS, needs_structure=True),
    OptimizerRecord("gadamw", "G-AdamW", _gadam, _GADAM_KEYS, needs_structure=True),
)
"""name -> record, in the order configs and the CLI list them."""


def build_optimizer(spec: OptimizerSpec, model: nn.Module, structure: Structure
                    ) -> torch.optim.Optimizer:
    """The optimizer named by ``spec`` over all of ``model``'s parameters."""
    record = OPTIMIZERS.get(spec.name)
    if record is None:
        raise ValueError(f"unknown optimizer {spec.name!r}; supported: {', '.join(OPTIMIZERS)}")
    extra = {"structure": structure} if record.needs_structure else {}
    return record.build(spec, model, **extra)
