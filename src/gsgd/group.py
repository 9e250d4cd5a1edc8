"""The rescaling group G acting on a model's G-blocks (docs/math.md sections 1 and 7).

G ~ (R_{>0})^H: hidden unit u scaled by c multiplies every weight into u (and u's bias) by c and
divides every weight out of u by c. The network function is unchanged. Nothing here is done
silently by the optimizer: these are explicit tools for tests, canonical forms and initialisation.
"""

from __future__ import annotations

import torch
from torch import nn

from gsgd.basis import block_routes, children
from gsgd.structure import Block, Structure, layer_view


def _named(model: nn.Module) -> dict[str, nn.Parameter]:
    return dict(model.named_parameters())


def _check_factors(block: Block, factors: list[torch.Tensor]) -> None:
    hidden = block.widths[1:-1]
    if len(factors) != len(hidden):
        raise ValueError(f"rescaling needs {len(hidden)} factor vectors (one per hidden layer), "
                         f"got {len(factors)}")
    for k, (c, h) in enumerate(zip(factors, hidden, strict=True)):
        if c.shape != (h,):
            raise ValueError(f"factor vector {k} must have shape ({h},), got {tuple(c.shape)}")
        if not bool((c > 0).all()) or not bool(torch.isfinite(c).all()):
            raise ValueError(f"factor vector {k}: rescaling factors must be finite and > 0")


@torch.no_grad()
def rescale_block(model: nn.Module, block: Block, factors: list[torch.Tensor]) -> None:
    """Apply g in G to one block in place: factors[k] scales the units of hidden layer k+1.

    W^{l-1}[u, :, :] *= c_u,  b^{l-1}[u] *= c_u,  W^{l}[:, u, :] /= c_u.
    """
    _check_factors(block, factors)
    named = _named(model)
    for k, c in enumerate(factors):
        into, out_of = block.layers[k], block.layers[k + 1]
        rescale_hidden_layer(layer_view(named[into.weight].data, into),
                             named[into.bias].data if into.bias else None,
                             layer_view(named[out_of.weight].data, out_of), c)


@torch.no_grad()
def rescale_hidden_layer(w_in: torch.Tensor | None, b_in: torch.Tensor | None,
                         w_out: torch.Tensor | None, factors: torch.Tensor) -> None:
    """One hidden layer's part of g in G, in place on ``(out, in, taps)`` views (or None).

    w_in[u, :, :] *= c_u,  b_in[u] *= c_u,  w_out[:, u, :] /= c_u.  Tensors that transform like
    gradients (momentum buffers) take ``factors ** -1``, squared gradients ``factors ** -2``.
    """
    if w_in is not None:
        w_in.mul_(factors.to(w_in)[:, None, None])
    if b_in is not None:
        b_in.mul_(factors.to(b_in))
    if w_out is not None:
        w_out.div_(factors.to(w_out)[None, :, None])


def random_factors(block: Block, generator: torch.Generator, low: float = -2.0,
                   high: float = 2.0, base: float = torch.e) -> list[torch.Tensor]:
    """Factors base^U(low, high) per hidden unit (float64), from a seeded generator."""
    out = []
    for h in block.widths[1:-1]:
        u = torch.rand(h, generator=generator, dtype=torch.float64) * (high - low) + low
        out.append(torch.pow(torch.tensor(base, dtype=torch.float64), u))
    return out


def random_rescale(model: nn.Module, structure: Structure, seed: int = 0, low: float = -2.0,
                   high: float = 2.0, base: float = torch.e) -> list[list[torch.Tensor]]:
    """Rescale every hidden unit of every block by base^U(low, high); returns the factors used."""
    generator = torch.Generator().manual_seed(seed)
    used = []
    for block in structure.blocks:
        factors = random_factors(block, generator, low, high, base)
        rescale_block(model, block, factors)
        used.append(factors)
    return used


@torch.no_grad()
def canonical_form(model: nn.Module, structure: Structure) -> list[list[torch.Tensor]]:
    """Rescale (function-preserving) so every frozen child edge has |w| = 1, signs kept.

    Processing hidden layers from the last to the first, unit u gets c_u = |kappa(u)|: its
    child edge becomes kappa(u) / c_u = sign(kappa(u)). Returns the factors used.
    Raises ValueError if a child edge is 0 (no rescaling can make it +-1).
    """
    named = _named(model)
    used = []
    for block in structure.blocks:
        routes = block_routes(block)
        n = len(block.layers)
        factors: list[torch.Tensor] = [None] * (n - 1)  # type: ignore[list-item]
        for l in range(n - 1, 0, -1):
            layer = block.layers[l]
            kappa = children(layer_view(named[layer.weight].data, layer), routes[l])
            if bool((kappa == 0).any()):
                raise ValueError(f"canonical_form: a designated child weight of {layer.module} "
                                 "is 0; no rescaling makes it +-1")
            factors[l - 1] = kappa.abs().to(torch.float64)
            one_layer = _ones(block)
            one_layer[l - 1] = factors[l - 1]
            rescale_block(model, block, one_layer)
        used.append(factors)
    return used


def _ones(block: Block) -> list[torch.Tensor]:
    return [torch.ones(h, dtype=torch.float64) for h in block.widths[1:-1]]


@torch.no_grad()
def skeleton_init(model: nn.Module, structure: Structure, keep_sign: bool = False) -> None:
    """The paper's initialisation: every designated (skeleton) weight set to 1.

    Designated weights are the parent edges pi(u) and child edges kappa(u) of every hidden unit
    (for convs, the centre tap of the channel pair). With ``keep_sign=True`` they get magnitude 1
    and keep their sign. This changes the network function: it is an initialisation, not an
    element of G. Train SGD from the same init for a fair comparison.
    """
    named = _named(model)
    for block in structure.blocks:
        for layer, r in zip(block.layers, block_routes(block), strict=True):
            flat = layer_view(named[layer.weight].data, layer).reshape(-1)
            for positions in (r.parent_flat(flat.device), r.child_flat(flat.device)):
                if len(positions):
                    values = flat[positions]
                    flat[positions] = torch.where(values < 0, -1.0, 1.0).to(flat) if keep_sign \
                        else torch.ones_like(values)
