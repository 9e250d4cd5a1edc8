"""Build an experiment's model from its [model] section, deterministically from a seed."""

from __future__ import annotations

import importlib
import inspect
from typing import Any

import torch
from torch import nn

from gsgd.discovery import discover
from gsgd.experiments.config import ModelSection
from gsgd.models import mlp
from gsgd.structure import Structure

__all__ = ["build_model", "model_structure"]

_CNN_NAMES = {"plainnet": "PlainNet", "resnet": "ResNet"}


def _cnn_module() -> Any:
    try:
        return importlib.import_module("gsgd.models.cnn")
    except ImportError as exc:
        raise ImportError(
            "[model] kind = 'plainnet' / 'resnet' needs gsgd.models.cnn (PlainNet, ResNet), "
            f"which cannot be imported here: {exc}") from exc


def _call_with_supported(factory: Any, what: str, **kwargs: Any) -> nn.Module:
    """Call ``factory`` with the keyword arguments it accepts; refuse if one that matters is not.

    ``depth``, ``num_classes`` and ``in_channels`` must be accepted; ``width``, ``batchnorm`` and
    ``seed`` are passed where the signature has them.
    """
    params = inspect.signature(factory).parameters
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    names = {"in_channels": ("in_channels", "channels"), "width": ("width", "base_width"),
             "batchnorm": ("batchnorm", "batch_norm", "bn")}
    call: dict[str, Any] = {}
    for key, value in kwargs.items():
        for candidate in names.get(key, (key,)):
            if accepts_any or candidate in params:
                call[candidate] = value
                break
        else:
            if key in ("depth", "num_classes"):
                raise TypeError(f"{what} does not take {key}=: cannot build [model] from the "
                                "config")
    return factory(**call)


def build_model(cfg: ModelSection, input_shape: tuple[int, int, int], num_classes: int,
                seed: int) -> nn.Module:
    """The model of ``cfg`` for inputs of ``input_shape``, PyTorch default init from ``seed``."""
    if cfg.kind == "mlp":
        widths = tuple(cfg.widths)  # type: ignore[arg-type]
        features = input_shape[0] * input_shape[1] * input_shape[2]
        if widths[0] != features or widths[-1] != num_classes:
            raise ValueError(f"[model] widths = {list(widths)}: the data needs widths[0] = "
                             f"{features} and widths[-1] = {num_classes}")
        return mlp(widths, bias=cfg.bias, seed=seed)
    cnn = _cnn_module()
    cls_name = _CNN_NAMES[cfg.kind]
    factory = getattr(cnn, cls_name.lower(), None) or getattr(cnn, cls_name, None)
    if factory is None:
        raise ImportError(f"gsgd.models.cnn has no {cls_name}: cannot build kind = {cfg.kind!r}")
    kwargs = dict(depth=cfg.depth, num_classes=num_classes, in_channels=input_shape[0],
                  width=cfg.width, batchnorm=cfg.batchnorm)
    params = inspect.signature(factory).parameters
    if "seed" in params:
        return _call_with_supported(factory, f"gsgd.models.cnn.{factory.__name__}",
                                    seed=seed, **kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _call_with_supported(factory, f"gsgd.models.cnn.{factory.__name__}", **kwargs)


def _has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def model_structure(model: nn.Module, cfg: ModelSection) -> Structure:
    """The G-structure of ``model``; with batch norm, discovered in ``cfg.bn_mode``."""
    if _has_batchnorm(model) and "batchnorm" in inspect.signature(discover).parameters:
        return discover(model, batchnorm=cfg.bn_mode)  # type: ignore[call-arg]
    return discover(model)
