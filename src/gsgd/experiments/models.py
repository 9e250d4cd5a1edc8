"""Build an experiment's model from its [model] section, deterministically from a seed."""

from __future__ import annotations

from torch import nn

from gsgd.discovery import discover
from gsgd.experiments.config import ModelSection
from gsgd.models import mlp
from gsgd.structure import Structure

__all__ = ["build_model", "model_structure"]


def build_model(cfg: ModelSection, input_shape: tuple[int, int, int], num_classes: int,
                seed: int) -> nn.Module:
    """The model of ``cfg`` for inputs of ``input_shape``, default init drawn from ``seed``."""
    if cfg.kind == "mlp":
        widths = tuple(cfg.widths)  # type: ignore[arg-type]
        features = input_shape[0] * input_shape[1] * input_shape[2]
        if widths[0] != features or widths[-1] != num_classes:
            raise ValueError(f"[model] widths = {list(widths)}: the data needs widths[0] = "
                             f"{features} and widths[-1] = {num_classes}")
        return mlp(widths, bias=True if cfg.bias is None else cfg.bias, seed=seed)
    from gsgd.models.cnn import plainnet, resnet

    common = dict(depth=cfg.depth, in_channels=input_shape[0], num_classes=num_classes,
                  batchnorm=cfg.batchnorm, bias=bool(cfg.bias),
                  widths=tuple(cfg.widths) if cfg.widths else None, seed=seed)
    if cfg.kind == "plainnet":
        return plainnet(**common)  # type: ignore[arg-type]
    if cfg.kind == "resnet":
        return resnet(shortcut=cfg.shortcut or None, **common)  # type: ignore[arg-type]
    raise ValueError(f"[model] kind = {cfg.kind!r}: supported kinds are mlp, plainnet, resnet")


def model_structure(model: nn.Module, cfg: ModelSection) -> Structure:
    """The G-structure of ``model``: batch norm in ``cfg.bn_mode``, PlainNet cut per ``cfg.cut``."""
    return discover(model, batchnorm=cfg.bn_mode if cfg.batchnorm else None,
                    cut=cfg.cut or None)
