"""The functional core of G-SGD: pure O(m) tensor maps for one G-block (no state, no modules).

Notation (gsgd-math.md sections 3-6): weights are ``(out, in, taps)`` views ``w^l``, biases
``b^l``; ``x_e = w_e g_e``; ``v_e = alpha(tail) w_e beta(head) = c_e w_e`` is the basis-path value
of a representative edge e; frozen child edges kappa(u) are not coordinates.

- :func:`g_space_gradient`  -- the *inverse chain rule*: dL/dv for every basis path.
- :func:`allocate`          -- *weight allocation*: new weights for new basis-path values
                               v' = v - lr * s, frozen edges unchanged.
- :func:`gsgd_step`         -- both together (plain G-SGD, no momentum), for tests and users.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from gsgd.basis import LayerIndex, route_products, route_scale

Tensors = list[torch.Tensor]
OptTensors = list[torch.Tensor | None]


def edge_sums(weights: Tensors, grads: Tensors,
              work: Callable[[int, int], torch.Tensor] | None = None,
              row_block: int | None = None) -> Tensors:
    """sum over (out, taps) of x_e = w_e g_e, per tail unit of every layer (an O(h_in) vector).

    Computed from the last layer to the first, so that the first layers, updated first by the
    forward allocation sweep, are still in cache when it reaches them. ``work(rows, cols)``,
    if given, hands out a reusable matrix for the products (no fresh weight-sized memory).
    ``row_block`` (the form for torch.compile) sums blocks of that many rows first: inductor
    vectorises a column sum along the columns and walks the rows one by one (one strided
    stream); summing a block of rows at a time keeps that many streams in flight.
    """
    sums: Tensors = []
    for w, g in zip(reversed(weights), reversed(grads), strict=True):
        out, h_in, taps = w.shape
        w2, g2 = w.reshape(out, h_in * taps), g.reshape(out, h_in * taps)
        if row_block is not None:
            k = row_block if out % row_block == 0 and out > row_block else 1
            col = (w2 * g2).view(out // k, k, h_in * taps).sum(1).sum(0)
        elif work is None:
            col = torch.linalg.vecdot(w2, g2, dim=0)
        else:
            col = torch.mul(w2, g2, out=work(out, h_in * taps)).sum(0)
        sums.append(col if taps == 1 else col.view(h_in, taps).sum(-1))
    return sums[::-1]


def carrier_potentials(weights: Tensors, grads: Tensors, index: tuple[LayerIndex, ...],
                       col_sums: Tensors | None = None) -> list[torch.Tensor | None]:
    """Z(a) per hidden node layer, by one reverse sweep (the inverse chain rule's recursion).

    Z(a) = sum of y over representative edges leaving a + sum of Z(b) over b with tail(pi(b)) = a,
    which simplifies to  Z(a) = sum_out x(a) - x_kappa(a) + [pi(b) = kappa(a)] Z(b).
    Entries for non-hidden node layers are ``None``.
    """
    n = len(weights)
    if col_sums is None:
        col_sums = edge_sums(weights, grads)
    Z: list[torch.Tensor | None] = [None] * (n + 1)
    for l in range(n - 1, 0, -1):
        ix = index[l]
        wf, gf = weights[l].reshape(-1), grads[l].reshape(-1)
        z = col_sums[l] - wf[ix.kap_flat] * gf[ix.kap_flat]
        if ix.head_hidden and len(ix.link_a):
            z = z.index_add(0, ix.link_a, Z[l + 1][ix.link_b])
        Z[l] = z
    return Z


def g_space_gradient(weights: Tensors, grads: Tensors, biases: OptTensors,
                     bias_grads: OptTensors, index: tuple[LayerIndex, ...],
                     routes: tuple[Tensors, Tensors] | None = None,
                     col_sums: Tensors | None = None) -> tuple[Tensors, OptTensors]:
    """Inverse chain rule: dL/dv_e for every representative edge and bias (gsgd-math.md s. 4).

    Non-carrier edge:  dL/dv = g_e / c_e          (x_e = y_e)
    Carrier pi(b):     dL/dv = (x_e - Z(b)) / v_e
    Bias of b:         dL/dv = g_b / beta(b)
    Frozen edges get 0. Returns weight-shaped and bias-shaped tensors.
    """
    alphas, betas = routes if routes is not None else route_products(weights, index)
    Z = carrier_potentials(weights, grads, index, col_sums)
    dw: Tensors = []
    db: OptTensors = []
    for l, (w, g) in enumerate(zip(weights, grads, strict=True)):
        ix = index[l]
        d = g / route_scale(alphas[l], betas[l + 1])
        df = d.view(-1)
        if len(ix.car_flat):
            wf, gf = w.reshape(-1), g.reshape(-1)
            wc = wf[ix.car_flat]
            vc = alphas[l][ix.car_a] * wc * betas[l + 1][ix.car_b]
            df[ix.car_flat] = (wc * gf[ix.car_flat] - Z[l + 1][ix.car_b]) / vc
        if len(ix.kap_flat):
            df[ix.kap_flat] = 0
        dw.append(d)
        gb = bias_grads[l] if l < len(bias_grads) else None
        db.append(None if gb is None else gb / betas[l + 1])
    return dw, db


@dataclass(frozen=True)
class Allocation:
    """Result of :func:`allocate`: new weights/biases and how many carrier ratios were clipped."""

    weights: Tensors
    biases: OptTensors
    clipped: torch.Tensor


def carrier_ratio(w: torch.Tensor, s: torch.Tensor, lr: float, ix: LayerIndex,
                  alpha_in: torch.Tensor, beta_out: torch.Tensor, max_ratio: float
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """R_e = v'_e / v_e = 1 - lr * s_e / v_e at the carriers, clamped to [1/max_ratio, max_ratio].

    Returns (R, number of clipped entries). A non-finite R counts as clipped and is clamped too.
    """
    wc = w.reshape(-1)[ix.car_flat]
    vc = alpha_in[ix.car_a] * wc * beta_out[ix.car_b]
    return clamp_ratio(1 - lr * s.reshape(-1)[ix.car_flat] / vc, max_ratio)


def clamp_ratio(raw: torch.Tensor, max_ratio: float | torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Carrier ratios clamped to [1/max_ratio, max_ratio] (NaN -> 1), and how many were changed."""
    ratio = raw.nan_to_num(nan=1.0).clamp(1 / max_ratio, max_ratio)
    return ratio, (ratio != raw).sum()


def allocate(weights: Tensors, biases: OptTensors, steps: Tensors, bias_steps: OptTensors,
             lr: float, index: tuple[LayerIndex, ...],
             routes: tuple[Tensors, Tensors] | None = None, max_ratio: float = 1e2,
             ) -> Allocation:
    """Weight allocation (gsgd-math.md s. 5): weights whose basis-path values are v - lr * s.

    With the frozen child edges unchanged, beta is unchanged and one forward sweep gives

        rho(input) = 1,  w'_e = (w_e - lr * s_e / c_e) / rho(tail)    (= w_e R_e / rho(tail))
        rho(b) = R_{pi(b)} if pi(b) is a carrier, else rho(tail of pi(b))

    Carrier ratios R are clamped to [1/max_ratio, max_ratio] (see :func:`carrier_ratio`).
    Biases: b' = b - lr * s_b / beta(b).
    """
    alphas, betas = routes if routes is not None else route_products(weights, index)
    rho = torch.ones_like(alphas[0])
    new_w: Tensors = []
    new_b: OptTensors = []
    clipped = torch.zeros((), dtype=torch.long, device=weights[0].device)
    for l, (w, s) in enumerate(zip(weights, steps, strict=True)):
        ix = index[l]
        c = route_scale(alphas[l], betas[l + 1])
        nw = (w - lr * s / c) / rho[None, :, None]
        nf, wf = nw.view(-1), w.reshape(-1)
        if len(ix.kap_flat):
            nf[ix.kap_flat] = wf[ix.kap_flat]
        if ix.head_hidden:
            next_rho = rho[ix.par_tail]
            if len(ix.car_flat):
                ratio, n_clip = carrier_ratio(w, s, lr, ix, alphas[l], betas[l + 1], max_ratio)
                clipped = clipped + n_clip
                nf[ix.car_flat] = wf[ix.car_flat] * ratio / rho[ix.car_a]
                next_rho = next_rho.index_put((ix.car_b,), ratio)
        new_w.append(nw)
        b = biases[l] if l < len(biases) else None
        sb = bias_steps[l] if l < len(bias_steps) else None
        new_b.append(None if b is None else b - lr * sb / betas[l + 1])
        if ix.head_hidden:
            rho = next_rho
    return Allocation(new_w, new_b, clipped)


def gsgd_step(weights: Tensors, biases: OptTensors, grads: Tensors, bias_grads: OptTensors,
              lr: float, index: tuple[LayerIndex, ...], max_ratio: float = 1e2) -> Allocation:
    """One plain G-SGD step of a block: v' = v - lr * dL/dv, then weight allocation."""
    routes = route_products(weights, index)
    dw, db = g_space_gradient(weights, grads, biases, bias_grads, index, routes)
    return allocate(weights, biases, dw, db, lr, index, routes, max_ratio)
