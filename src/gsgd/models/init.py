"""Weight initialisations of the experiments' models, deterministic from a seed."""

from __future__ import annotations

import hashlib
import math

import torch
from torch import nn

__all__ = ["he_init"]

_WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _generator(seed: int, tag: str) -> torch.Generator:
    """A CPU generator seeded from ``seed`` mixed with ``tag`` (blake2b): its draws do not
    repeat those of a generator seeded with ``seed`` itself (a run's batch order, rescaling)."""
    digest = hashlib.blake2b(f"{tag}:{seed}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)


@torch.no_grad()
def he_init(model: nn.Module, seed: int) -> nn.Module:
    """He (Kaiming) normal init, fan-in mode, ReLU gain, in place; returns ``model``.

    Every ``nn.Linear`` / ``nn.Conv{1,2,3}d`` weight W is re-drawn as W ~ N(0, 2 / fan_in), with
    fan_in = W[0].numel() (in_features; in_channels / groups * kernel taps), and its bias is set
    to 0; other parameters (batch norm, PReLU, ...) are left as they are. The draws come, module
    by module in ``model.modules()`` order, from a ``torch.Generator`` of its own seeded from
    ``seed`` (in float64, then cast), so the result depends on ``seed`` and the architecture only
    (not on the model's dtype) and the global RNG is untouched.
    """
    generator = _generator(seed, "gsgd.he_init")
    for module in model.modules():
        if not isinstance(module, _WEIGHTED):
            continue
        weight = module.weight
        std = math.sqrt(2.0 / weight[0].numel())
        draw = torch.randn(weight.shape, generator=generator, dtype=torch.float64) * std
        weight.copy_(draw)
        if module.bias is not None:
            module.bias.zero_()
    return model
