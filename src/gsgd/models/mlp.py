"""Multi-layer perceptrons with ReLU hidden units (the paper's MNIST / Fashion-MNIST nets)."""

from __future__ import annotations

import torch
from torch import nn


class MLP(nn.Sequential):
    """Flatten, then Linear-ReLU-...-Linear with the given widths (input first, classes last)."""

    def __init__(self, widths: list[int] | tuple[int, ...], bias: bool = True) -> None:
        widths = tuple(int(w) for w in widths)
        if len(widths) < 2 or any(w < 1 for w in widths):
            raise ValueError(f"MLP: widths must be >= 2 positive integers, got {widths}")
        layers: list[nn.Module] = [nn.Flatten()]
        for k, (a, b) in enumerate(zip(widths, widths[1:], strict=False)):
            layers.append(nn.Linear(a, b, bias=bias))
            if k < len(widths) - 2:
                layers.append(nn.ReLU())
        super().__init__(*layers)
        self.widths = widths


def mlp(widths: list[int] | tuple[int, ...], bias: bool = True, seed: int = 0) -> MLP:
    """An :class:`MLP` with PyTorch's default init drawn from ``seed`` (deterministic)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MLP(widths, bias=bias)
