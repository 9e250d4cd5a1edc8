"""Shared pieces of the project's optimizers: argument checks, parameter resolution, plain SGD."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


class NonFiniteError(FloatingPointError):
    """A non-finite gradient or weight, or a zero designated route; the message names it."""


ON_NONFINITE = ("raise", "skip")


def check_hyper_parameters(owner: str, hp: dict) -> None:
    """Raise ValueError naming the bad hyper-parameter of optimizer ``owner``."""
    def bad(name: str, why: str) -> ValueError:
        return ValueError(f"{owner}: invalid {name}={hp[name]!r}: {why}")

    if "lr" in hp and not (isinstance(hp["lr"], float | int | torch.Tensor) and hp["lr"] >= 0):
        raise bad("lr", "must be a number >= 0")
    for name in ("momentum", "weight_decay", "dampening"):
        if name in hp and not (isinstance(hp[name], float | int) and hp[name] >= 0):
            raise bad(name, "must be a number >= 0")
    if "momentum" in hp and hp["momentum"] >= 1:
        raise bad("momentum", "must be < 1")
    if hp.get("nesterov") and (hp.get("momentum", 0) <= 0 or hp.get("dampening", 0) != 0):
        raise ValueError(f"{owner}: nesterov=True requires momentum > 0 and dampening = 0")
    if "max_ratio" in hp and not (isinstance(hp["max_ratio"], float | int)
                                  and hp["max_ratio"] > 1):
        raise bad("max_ratio", "must be a number > 1 (carrier ratios are clamped to [1/B, B])")
    if "compile" in hp and not isinstance(hp["compile"], bool):
        raise bad("compile", "must be True or False")
    if "on_nonfinite" in hp and hp["on_nonfinite"] not in ON_NONFINITE:
        raise bad("on_nonfinite", f"supported values are {ON_NONFINITE}")


def resolve_params(owner: str, params: nn.Module | Iterable, model: nn.Module | None
                   ) -> tuple[list, nn.Module, dict[str, nn.Parameter]]:
    """Accept a module (all its trainable parameters) or parameters / groups plus ``model=``.

    Returns (params or param groups, the model, the model's named parameters).
    """
    if isinstance(params, nn.Module):
        if model is not None and model is not params:
            raise ValueError(f"{owner}: pass the model either positionally or as model=, not both")
        model = params
        params = [p for p in model.parameters() if p.requires_grad]
    elif model is None:
        raise ValueError(
            f"{owner}: needs the model to find its G-blocks: {owner}(model, lr=...) or "
            f"{owner}(params, lr=..., model=model)"
        )
    params = list(params)
    if not params:
        raise ValueError(f"{owner}: got an empty parameter list")
    named = dict(model.named_parameters())
    return params, model, named


def momentum_direction(state: dict, d: torch.Tensor, mu: float, damp: float,
                       nesterov: bool) -> torch.Tensor:
    """Heavy-ball momentum in torch.optim.SGD's convention; the buffer lives in ``state``.

    buf = d (first step), else buf = mu * buf + (1 - damp) * d;  returns d + mu * buf if
    nesterov else buf.  With mu = 0 returns d and keeps no buffer.
    """
    if not mu:
        return d
    buf = state.get("momentum_buffer")
    if buf is None:
        buf = d.detach().clone()
        state["momentum_buffer"] = buf
    else:
        buf.mul_(mu).add_(d, alpha=1 - damp)
    return d.add(buf, alpha=mu) if nesterov else buf


def plain_sgd_update(optimizer: torch.optim.Optimizer, params: list[torch.Tensor],
                     group: dict) -> None:
    """torch.optim.SGD's update (weight-space momentum / weight decay) for non-G parameters."""
    for p in params:
        d = p.grad
        if group["weight_decay"]:
            d = d.add(p, alpha=group["weight_decay"])
        d = momentum_direction(optimizer.state[p], d, group["momentum"], group["dampening"],
                               group["nesterov"])
        p.add_(d, alpha=-group["lr"])
