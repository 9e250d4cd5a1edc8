"""Basis paths of a G-block by designated routes (docs/math.md section 3).

For a hidden node u the designated edges are its parent edge pi(u) (one edge into u) and its
child edge kappa(u) (one edge out of u). In layer l (edges from node layer l to l+1, weights
viewed as ``(out, in, taps)``):

    parent edge of head b   pi(b)    = (b, b mod h_in, centre)      (head b hidden)
    child edge of tail a    kappa(a) = (a mod h_out, a, centre)     (tail a hidden)

:class:`LayerRoutes` is the one place these rules live: the reference step, the fast step,
``gsgd.group`` and the error messages all read them from it. The H child edges are frozen; every
other edge (and every bias) is representative and names the basis path back(tail) + e + fwd(head).
A carrier is a parent edge that is not also a child edge.

Route products alpha / beta, basis-path values and node values are pure functions of the weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from gsgd.structure import Block

Tensors = list[torch.Tensor]

@dataclass(frozen=True)
class LayerRoutes:
    """The designated routes through one layer of a G-block (static: widths and flags only).

    ``h_in`` / ``h_out``: widths of node layers l and l+1; ``taps`` parallel edges per unit pair
    (kh*kw for a conv, HW for a Linear after a flatten) and ``centre`` the designated tap;
    ``tail_hidden`` (l >= 1) / ``head_hidden`` (l+1 <= n-1): whether the layer's tail / head
    units are hidden (only hidden units have designated edges). Hashable, so a compiled graph
    can close over it.
    """

    h_in: int
    h_out: int
    taps: int = 1
    centre: int = 0
    tail_hidden: bool = False
    head_hidden: bool = False
    # index vectors per (name, device), built on first use (not part of the value)
    _vectors: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __hash__(self) -> int:  # hashed on every compiled call: computed once
        value = self._vectors.get("hash")
        if value is None:
            value = self._vectors["hash"] = hash((self.h_in, self.h_out, self.taps, self.centre,
                                                  self.tail_hidden, self.head_hidden))
        return value

    # ---- the rules, on ints or integer tensors
    def parent_tail(self, b):
        """Tail of the parent edge pi(b) = (b, b mod h_in)."""
        return b % self.h_in

    def child_head(self, a):
        """Head of the child edge kappa(a) = (a mod h_out, a)."""
        return a % self.h_out

    def flat(self, rows, cols):
        """Flat position of edge (row, col, centre) in the contiguous ``(out, in, taps)`` view."""
        return (rows * self.h_in + cols) * self.taps + self.centre

    def is_carrier(self, b):
        """pi(b) is a carrier: it is not also the child edge kappa of its tail."""
        if not self.tail_hidden:
            return torch.ones_like(b, dtype=torch.bool) if isinstance(b, torch.Tensor) else True
        return self.child_head(self.parent_tail(b)) != b

    def passes_on(self, a):
        """kappa(a) = pi(b) for b = a mod h_out: the child edge of tail a is also the parent edge
        of its head, so Z(b) flows on to a in the inverse chain rule."""
        return self.parent_tail(self.child_head(a)) == a

    # ---- the same as index vectors on a device (cached eagerly, traced when compiling)
    def _vector(self, name: str, device: torch.device | None,
                make: Callable[[torch.device | None], torch.Tensor]) -> torch.Tensor:
        """Index data that depends only on the widths: built once per device and kept eagerly;
        traced (free inside a kernel) under torch.compile."""
        if torch.compiler.is_compiling():  # never a cached tensor: a graph constant would
            return make(device)            # be gathered from memory inside the kernels
        key = (name, device)
        value = self._vectors.get(key)
        if value is None:
            value = self._vectors[key] = make(device)
        return value

    def heads(self, device: torch.device | None = None) -> torch.Tensor:
        """b = 0 .. h_out-1."""
        return self._vector("heads", device, lambda d: torch.arange(self.h_out, device=d))

    def tails(self, device: torch.device | None = None) -> torch.Tensor:
        """a = 0 .. h_in-1."""
        return self._vector("tails", device, lambda d: torch.arange(self.h_in, device=d))

    def parent_tails(self, device: torch.device | None = None) -> torch.Tensor:
        """b mod h_in for every head b."""
        return self._vector("parent tails", device,
                            lambda d: self.parent_tail(self.heads(d)))

    def child_heads(self, device: torch.device | None = None) -> torch.Tensor:
        """a mod h_out for every tail a."""
        return self._vector("child heads", device, lambda d: self.child_head(self.tails(d)))

    def parent_flat(self, device: torch.device | None = None) -> torch.Tensor:
        """Flat positions of pi(b) for every head b (empty unless the heads are hidden)."""
        def make(d: torch.device | None) -> torch.Tensor:
            if not self.head_hidden:
                return torch.zeros(0, dtype=torch.long, device=d)
            return self.flat(self.heads(d), self.parent_tails(d))
        return self._vector("parent flat", device, make)

    def child_flat(self, device: torch.device | None = None) -> torch.Tensor:
        """Flat positions of kappa(a) for every tail a (empty unless the tails are hidden):
        the frozen edges."""
        def make(d: torch.device | None) -> torch.Tensor:
            if not self.tail_hidden:
                return torch.zeros(0, dtype=torch.long, device=d)
            return self.flat(self.child_heads(d), self.tails(d))
        return self._vector("child flat", device, make)

    def carriers(self, device: torch.device | None = None) -> torch.Tensor:
        """Per head b: is pi(b) a carrier (boolean)."""
        return self._vector("carriers", device, lambda d: self.is_carrier(self.heads(d)))

    def passing(self, device: torch.device | None = None) -> torch.Tensor:
        """Per tail a: does kappa(a) = pi(a mod h_out) (boolean; see :meth:`passes_on`)."""
        return self._vector("passing", device, lambda d: self.passes_on(self.tails(d)))

    @property
    def num_carriers(self) -> int:
        """How many parent edges of this layer are carriers (0 unless the heads are hidden)."""
        value = self._vectors.get("num carriers")
        if value is None:
            value = self._vectors["num carriers"] = 0 if not self.head_hidden else sum(
                bool(self.is_carrier(b)) for b in range(self.h_out))
        return value

    def unravel(self, flat: int) -> tuple[int, int, int]:
        """(out, in, tap) of a flat position, for messages."""
        return flat // (self.h_in * self.taps), (flat // self.taps) % self.h_in, flat % self.taps


def chain_routes(widths: tuple[int, ...], taps: tuple[int, ...] | None = None,
                 centres: tuple[int, ...] | None = None) -> tuple[LayerRoutes, ...]:
    """The routes of a bare chain given by its node widths (taps / centres default to 1 / 0)."""
    n = len(widths) - 1
    taps = taps or (1,) * n
    centres = centres or (0,) * n
    return tuple(LayerRoutes(widths[l], widths[l + 1], taps[l], centres[l], l >= 1, l + 1 <= n - 1)
                 for l in range(n))


def block_routes(block: Block) -> tuple[LayerRoutes, ...]:
    """The routes of every layer of a G-block."""
    return chain_routes(block.widths, tuple(layer.taps for layer in block.layers),
                        tuple(layer.centre for layer in block.layers))


# --------------------------------------------------------------------------------------------
# Route products and basis-path values (pure functions of the weights).
# --------------------------------------------------------------------------------------------

class RouteProducts(NamedTuple):
    """alpha and beta per node layer 0..n (docs/math.md section 3)."""

    alphas: Tensors
    betas: Tensors


def parents(t: torch.Tensor, r: LayerRoutes) -> torch.Tensor:
    """Entries of a layer-shaped tensor at the parent edges pi(b), one per head b."""
    return t.reshape(-1)[r.parent_flat(t.device)]


def children(t: torch.Tensor, r: LayerRoutes) -> torch.Tensor:
    """Entries of a layer-shaped tensor at the child edges kappa(a), one per tail a."""
    return t.reshape(-1)[r.child_flat(t.device)]


def route_products(weights: Tensors, routes: tuple[LayerRoutes, ...]) -> RouteProducts:
    """The route products of a block's weights (``(out, in, taps)`` views), O(H): see
    :func:`chain_products`."""
    return chain_products([parents(w, r) if r.head_hidden else None
                           for w, r in zip(weights, routes, strict=True)],
                          [children(w, r) if r.tail_hidden else None
                           for w, r in zip(weights, routes, strict=True)], routes, weights[0])


def chain_products(parent_w: list[torch.Tensor | None], child_w: list[torch.Tensor | None],
                   routes: tuple[LayerRoutes, ...], like: torch.Tensor) -> RouteProducts:
    """The recursions of the route products, from the designated weights of every layer
    (``parent_w[l]`` = w^l[pi(b)] per head, ``child_w[l]`` = w^l[kappa(a)] per tail):

        alpha(input) = 1,  alpha(l+1, b) = alpha(l, b mod h_l) * w^l[pi(b)]
        beta(output) = 1,  beta(l, a)    = w^l[kappa(a)] * beta(l+1, a mod h_{l+1})

    ``like`` gives the dtype and device (a block of one layer has no designated weights).
    """

    def ones(h: int) -> torch.Tensor:
        return torch.ones(h, dtype=like.dtype, device=like.device)

    alphas = [ones(routes[0].h_in)]
    for pw, r in zip(parent_w, routes, strict=True):
        alphas.append(alphas[-1][r.parent_tails(like.device)] * pw if r.head_hidden
                      else ones(r.h_out))
    betas = [ones(routes[-1].h_out)]
    for cw, r in zip(reversed(child_w), reversed(routes), strict=True):
        betas.append(cw * betas[-1][r.child_heads(like.device)] if r.tail_hidden
                     else ones(r.h_in))
    betas.reverse()
    return RouteProducts(alphas, betas)


def route_scale(alpha_in: torch.Tensor, beta_out: torch.Tensor) -> torch.Tensor:
    """c_e = alpha(tail) * beta(head), shaped to broadcast against an ``(out, in, taps)`` view."""
    return beta_out[:, None, None] * alpha_in[None, :, None]


def basis_values(weights: Tensors, biases: list[torch.Tensor | None],
                 routes: tuple[LayerRoutes, ...]) -> tuple[Tensors, list[torch.Tensor | None]]:
    """Basis-path values v_e = alpha(tail) * w_e * beta(head) for every edge, weight-shaped.

    Entries at frozen child edges hold the value of the (already counted) skeleton path through
    their tail; use :func:`representative_mask` to select the m - H basis coordinates.
    A bias of node b is an edge from a bias node: v = bias_b * beta(b).
    """
    alphas, betas = route_products(weights, routes)
    vw = [w * route_scale(alphas[l], betas[l + 1]) for l, w in enumerate(weights)]
    vb = [None if b is None else b * betas[l + 1] for l, b in enumerate(biases)]
    return vw, vb


def representative_mask(routes: tuple[LayerRoutes, ...]) -> Tensors:
    """Boolean ``(out, in, taps)`` masks: True for representative (non-frozen) edges."""
    masks = []
    for r in routes:
        mask = torch.ones(r.h_out * r.h_in * r.taps, dtype=torch.bool)
        mask[r.child_flat()] = False
        masks.append(mask.view(r.h_out, r.h_in, r.taps))
    return masks


def node_values(weights: Tensors, routes: tuple[LayerRoutes, ...]) -> Tensors:
    """N(u) = alpha(u) * beta(u): the value of the skeleton path back(u) + fwd(u), per node."""
    alphas, betas = route_products(weights, routes)
    return [a * b for a, b in zip(alphas, betas, strict=True)]


def path_value_from_basis(basis_w: Tensors, node_vals: Tensors, nodes: tuple[int, ...],
                          taps: tuple[int, ...] | None = None) -> torch.Tensor:
    """Value of ANY weight path from basis-path values (integer exponents).

    For a path through nodes (n_0, ..., n_L) with edges e_k = (n_{k-1} -> n_k, tap t_k):

        v_path = prod_k v_{e_k}  /  prod_{k=1}^{L-1} N(n_k)

    where v_e is the basis-path value of e (for a frozen child edge kappa(u) this is N(u),
    itself a basis-path value: the skeleton path through u) and N(u) the skeleton-path value.
    """
    L = len(nodes) - 1
    taps = taps or (0,) * L
    num = basis_w[0][nodes[1], nodes[0], taps[0]]
    for k in range(1, L):
        num = num * basis_w[k][nodes[k + 1], nodes[k], taps[k]] / node_vals[k][nodes[k]]
    return num
