"""Basis paths of a G-block by designated routes (gsgd-math.md section 3), as index tensors.

For hidden node u = (l, j) the designated edges are

    parent edge  pi(u)    = W^{l-1}[ j , j mod h_{l-1}, centre ]
    child edge   kappa(u) = W^{l}  [ j mod h_{l+1} , j, centre ]

The H child edges are frozen; every other edge (and every bias) is representative and names the
basis path  P_e = back(tail) + e + fwd(head).  Carriers are parent edges that are not frozen.

Everything here is built once per block (O(H) integers); the per-step maths lives in
``gsgd.functional``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gsgd.structure import Block


@dataclass(frozen=True)
class LayerIndex:
    """Designated-route indices of layer l (edges from node layer l to node layer l+1).

    Flat indices address the ``(out, in, taps)`` view flattened to 1-D.
    """

    h_in: int
    h_out: int
    taps: int
    centre: int  # the designated tap
    tail_hidden: bool  # node layer l is hidden (l >= 1)
    head_hidden: bool  # node layer l+1 is hidden (l+1 <= n-1)
    par_flat: torch.Tensor  # pi(b) for every b of layer l+1 (empty unless head_hidden)
    par_tail: torch.Tensor  # b mod h_in: the tail of pi(b)
    kap_flat: torch.Tensor  # kappa(a) for every a of layer l (empty unless tail_hidden)
    kap_head: torch.Tensor  # a mod h_out: the head of kappa(a)
    car_b: torch.Tensor  # heads b whose parent edge is a carrier
    car_a: torch.Tensor  # their tails
    car_flat: torch.Tensor  # flat indices of the carriers
    link_a: torch.Tensor  # tails a with kappa(a) = pi(b) (a frozen parent edge) ...
    link_b: torch.Tensor  # ... and the matching heads b: Z(a) += Z(b)

    def to(self, device: torch.device) -> LayerIndex:
        fields = {k: (v.to(device) if isinstance(v, torch.Tensor) else v)
                  for k, v in self.__dict__.items()}
        return LayerIndex(**fields)


def flat_index(rows: torch.Tensor, cols: torch.Tensor, h_in: int, taps: int,
               tap: int) -> torch.Tensor:
    """Flat position of edge (row, col, tap) in a contiguous ``(out, in, taps)`` tensor."""
    return (rows * h_in + cols) * taps + tap


def layer_index(widths: tuple[int, ...], l: int, taps: int, centre: int) -> LayerIndex:
    """Indices of the designated routes through layer l of a chain with node widths ``widths``."""
    n = len(widths) - 1
    h_in, h_out = widths[l], widths[l + 1]
    tail_hidden = l >= 1
    head_hidden = l + 1 <= n - 1
    empty = torch.zeros(0, dtype=torch.long)
    if head_hidden:
        b = torch.arange(h_out)
        par_tail = b % h_in
        par_flat = flat_index(b, par_tail, h_in, taps, centre)
    else:
        b, par_tail, par_flat = empty, empty, empty
    if tail_hidden:
        a = torch.arange(h_in)
        kap_head = a % h_out
        kap_flat = flat_index(kap_head, a, h_in, taps, centre)
    else:
        a, kap_head, kap_flat = empty, empty, empty
    if head_hidden and tail_hidden:
        # pi(b) is frozen iff it is kappa of its tail: b == (b mod h_in) mod h_out
        frozen_parent = (par_tail % h_out) == b
    else:
        frozen_parent = torch.zeros(len(b), dtype=torch.bool)
    car = ~frozen_parent
    link_b = b[frozen_parent]
    return LayerIndex(
        h_in=h_in, h_out=h_out, taps=taps, centre=centre, tail_hidden=tail_hidden,
        head_hidden=head_hidden,
        par_flat=par_flat, par_tail=par_tail, kap_flat=kap_flat, kap_head=kap_head,
        car_b=b[car], car_a=par_tail[car], car_flat=par_flat[car],
        link_a=par_tail[frozen_parent], link_b=link_b,
    )


def block_index(block: Block) -> tuple[LayerIndex, ...]:
    """The designated-route indices of every layer of a block."""
    widths = block.widths
    return tuple(layer_index(widths, l, layer.taps, layer.centre)
                 for l, layer in enumerate(block.layers))


def chain_index(widths: tuple[int, ...], taps: tuple[int, ...] | None = None,
                centres: tuple[int, ...] | None = None) -> tuple[LayerIndex, ...]:
    """Indices for a bare chain given by its node widths (taps/centres default to 1/0)."""
    n = len(widths) - 1
    taps = taps or (1,) * n
    centres = centres or (0,) * n
    return tuple(layer_index(widths, l, taps[l], centres[l]) for l in range(n))


# --------------------------------------------------------------------------------------------
# Route products and basis-path values (pure functions of the weights).
# --------------------------------------------------------------------------------------------

def route_products(weights: list[torch.Tensor], index: tuple[LayerIndex, ...]
                   ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """alpha and beta per node layer (O(H)).

    alpha(input) = 1,  alpha(l+1, j) = alpha(l, j mod h_l) * W^l[j, j mod h_l, centre]
    beta(output) = 1,  beta(l, j)    = W^l[j mod h_{l+1}, j, centre] * beta(l+1, j mod h_{l+1})

    ``weights`` are the ``(out, in, taps)`` views. Returns lists of length n+1.
    """
    n = len(weights)
    w0 = weights[0]
    alphas = [torch.ones(index[0].h_in, dtype=w0.dtype, device=w0.device)]
    for l in range(n):
        ix = index[l]
        if ix.head_hidden:
            alphas.append(alphas[l][ix.par_tail] * weights[l].reshape(-1)[ix.par_flat])
        else:
            alphas.append(torch.ones(ix.h_out, dtype=w0.dtype, device=w0.device))
    betas = [torch.ones(index[-1].h_out, dtype=w0.dtype, device=w0.device)]
    for l in range(n - 1, -1, -1):
        ix = index[l]
        if ix.tail_hidden:
            betas.append(weights[l].reshape(-1)[ix.kap_flat] * betas[-1][ix.kap_head])
        else:
            betas.append(torch.ones(ix.h_in, dtype=w0.dtype, device=w0.device))
    betas.reverse()
    return alphas, betas


def route_scale(alpha_in: torch.Tensor, beta_out: torch.Tensor) -> torch.Tensor:
    """c_e = alpha(tail) * beta(head), shaped to broadcast against an ``(out, in, taps)`` view."""
    return beta_out[:, None, None] * alpha_in[None, :, None]


def basis_values(weights: list[torch.Tensor], biases: list[torch.Tensor | None],
                 index: tuple[LayerIndex, ...]
                 ) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    """Basis-path values v_e = alpha(tail) * w_e * beta(head) for every edge, weight-shaped.

    Entries at frozen child edges hold the value of the (already counted) skeleton path through
    their tail; use :func:`representative_mask` to select the m - H basis coordinates.
    A bias of node b is an edge from a bias node: v = bias_b * beta(b).
    """
    alphas, betas = route_products(weights, index)
    vw = [w * route_scale(alphas[l], betas[l + 1]) for l, w in enumerate(weights)]
    vb = [None if b is None else b * betas[l + 1] for l, b in enumerate(biases)]
    return vw, vb


def representative_mask(index: tuple[LayerIndex, ...]) -> list[torch.Tensor]:
    """Boolean ``(out, in, taps)`` masks: True for representative (non-frozen) edges."""
    masks = []
    for ix in index:
        mask = torch.ones(ix.h_out * ix.h_in * ix.taps, dtype=torch.bool)
        mask[ix.kap_flat] = False
        masks.append(mask.view(ix.h_out, ix.h_in, ix.taps))
    return masks


def node_values(weights: list[torch.Tensor], index: tuple[LayerIndex, ...]
                ) -> list[torch.Tensor]:
    """N(u) = alpha(u) * beta(u): the value of the skeleton path back(u) + fwd(u), per node."""
    alphas, betas = route_products(weights, index)
    return [a * b for a, b in zip(alphas, betas, strict=True)]


def path_value_from_basis(basis_w: list[torch.Tensor], node_vals: list[torch.Tensor],
                          nodes: tuple[int, ...], taps: tuple[int, ...] | None = None
                          ) -> torch.Tensor:
    """Value of ANY weight path from basis-path values (integer exponents +1 / -1).

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
