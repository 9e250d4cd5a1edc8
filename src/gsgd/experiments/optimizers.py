"""A registry of the optimizers an experiment compares, built from an :class:`OptimizerSpec`.

``gsgd`` -> :class:`gsgd.optim.GSGD`, ``sgd`` -> ``torch.optim.SGD``, ``adam`` ->
``torch.optim.Adam``, ``pathsgd`` -> ``gsgd.optim.pathsgd.PathSGD``, ``enorm`` ->
``gsgd.optim.enorm.ENormSGD``. All start at the spec's base lr; the runner sets each epoch's lr.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from gsgd.experiments.config import OPTIMIZER_NAMES, OptimizerSpec
from gsgd.structure import Structure

__all__ = ["OPTIMIZERS", "build_optimizer"]

Builder = Callable[[OptimizerSpec, nn.Module, Structure], torch.optim.Optimizer]


def _lazy(module: str, name: str) -> Any:
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise ImportError(f"optimizer {name} ({module}) is not available: {exc}") from exc


def _gsgd(spec: OptimizerSpec, model: nn.Module, structure: Structure) -> torch.optim.Optimizer:
    from gsgd.optim import GSGD

    return GSGD(model, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay,
                nesterov=spec.nesterov, max_ratio=spec.max_ratio, compile=spec.compile,
                structure=structure)


def _sgd(spec: OptimizerSpec, model: nn.Module, structure: Structure) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=spec.lr, momentum=spec.momentum,
                           weight_decay=spec.weight_decay, nesterov=spec.nesterov)


def _adam(spec: OptimizerSpec, model: nn.Module, structure: Structure) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=spec.lr, betas=spec.betas, eps=spec.eps,
                            weight_decay=spec.weight_decay)


def _with_structure(cls: Any, kwargs: dict[str, Any], structure: Structure) -> dict[str, Any]:
    if "structure" in inspect.signature(cls).parameters:
        kwargs["structure"] = structure
    return kwargs


def _pathsgd(spec: OptimizerSpec, model: nn.Module, structure: Structure
             ) -> torch.optim.Optimizer:
    cls = _lazy("gsgd.optim.pathsgd", "PathSGD")
    kwargs = dict(lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay)
    if spec.nesterov:
        kwargs["nesterov"] = True
    return cls(model, **_with_structure(cls, kwargs, structure))


def _enorm(spec: OptimizerSpec, model: nn.Module, structure: Structure) -> torch.optim.Optimizer:
    cls = _lazy("gsgd.optim.enorm", "ENormSGD")
    kwargs = dict(lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay, c=spec.c)
    if spec.nesterov:
        kwargs["nesterov"] = True
    return cls(model, **_with_structure(cls, kwargs, structure))


OPTIMIZERS: dict[str, Builder] = {
    "gsgd": _gsgd,
    "sgd": _sgd,
    "adam": _adam,
    "pathsgd": _pathsgd,
    "enorm": _enorm,
}
assert tuple(sorted(OPTIMIZERS)) == tuple(sorted(OPTIMIZER_NAMES))


def build_optimizer(spec: OptimizerSpec, model: nn.Module, structure: Structure
                    ) -> torch.optim.Optimizer:
    """The optimizer named by ``spec`` over all of ``model``'s parameters."""
    if spec.name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {spec.name!r}; supported: {', '.join(OPTIMIZERS)}")
    return OPTIMIZERS[spec.name](spec, model, structure)
