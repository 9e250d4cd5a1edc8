"""The reference G-SGD step of one G-block: every feature of the optimizer, written plainly.

This is the truth the fast step (:mod:`gsgd.fast`) is tested against, step by step; the dense
brute-force oracle (:mod:`gsgd.bruteforce`) is the independent check of this module. Nothing
here is tuned: fresh tensors everywhere, index tensors from :class:`gsgd.basis.LayerRoutes`.

One step of a block (docs/math.md sections 4-7), weights viewed as ``(out, in, taps)``:

.. code-block:: text

    x_e = w_e g_e,  v_e = c_e w_e,  c_e = alpha(tail) beta(head)        (basis.route_products)
    d_e = dL/dv_e by the inverse chain rule                             (g_space_gradient)
    d_e *= row_scale(row)              batchnorm="approximate" only (the paper's heuristic)
    d_e += weight_decay * v_e          L2 on basis-path values, representative edges and biases
    buf = d (first step) | momentum * buf + (1 - dampening) * d          (momentum_step)
    s   = d + momentum * buf if nesterov else buf   (s = d without momentum)
    v'  = v - lr * s,  carrier ratios R = v'/v with |R| bounded, sign kept (guard_ratio)
    w'  = weights with basis-path values v', frozen child edges unchanged  (allocate)

The recursions -- route products (``gsgd.basis``), the carrier potentials Z
(:func:`carrier_potentials`), the allocation ratios rho (:func:`node_ratios`) -- and the
momentum rule and ratio guard are written once, here and in ``gsgd.basis``; the fast step calls
the same functions.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from gsgd.basis import (
    LayerRoutes,
    RouteProducts,
    children,
    parents,
    route_products,
    route_scale,
)

Tensors = list[torch.Tensor]
OptTensors = list[torch.Tensor | None]


class BlockTensors(NamedTuple):
    """A G-block's tensors for one step, as one record.

    ``weights`` / ``grads`` are ``(out, in, taps)`` views, ``biases`` / ``bias_grads`` one entry
    per layer (None where a layer has no bias). ``buffers`` / ``bias_buffers``: the G-space
    momentum buffers (weight- and bias-shaped), None without momentum; in the reference a None
    entry inside the list means "first step" (the buffer becomes d). ``row_scales``: per layer,
    per output row, the factors of ``batchnorm="approximate"`` (None elsewhere).
    """

    routes: tuple[LayerRoutes, ...]
    weights: Tensors
    grads: Tensors
    biases: OptTensors
    bias_grads: OptTensors
    buffers: OptTensors | None = None
    bias_buffers: OptTensors | None = None
    row_scales: OptTensors | None = None


class StepHyper(NamedTuple):
    """The hyper-parameters of one step (one param group's values)."""

    lr: float
    momentum: float = 0.0
    dampening: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False
    max_ratio: float = 100.0
    maximize: bool = False


class BlockUpdate(NamedTuple):
    """What a step computes for a block: new weights (``(out, in, taps)``), biases, momentum
    buffers (None without momentum) and the number of carrier ratios the guard changed."""

    weights: Tensors
    biases: OptTensors
    buffers: OptTensors | None
    bias_buffers: OptTensors | None
    clipped: torch.Tensor


# --------------------------------------------------------------------------------------------
# The pieces (each used by the fast step too)
# --------------------------------------------------------------------------------------------

def edge_sums(weights: Tensors, grads: Tensors) -> Tensors:
    """sum over out-units and taps of x_e = w_e g_e, per tail unit of every layer."""
    return [(w * g).sum((0, 2)) for w, g in zip(weights, grads, strict=True)]


def carrier_potentials(col_sums: OptTensors, child_x: OptTensors,
                       routes: tuple[LayerRoutes, ...]) -> OptTensors:
    """Z per node layer, by one reverse sweep (the recursion of the inverse chain rule):

        Z(a) = sum_out x(a) - x[kappa(a)] + (Z(a mod h_out) if kappa(a) = pi(a mod h_out))

    i.e. the y of the representative edges leaving a plus the Z of the heads whose parent edge
    leaves a. ``col_sums[l]`` and ``child_x[l]`` (x at the child edges kappa(a)) are per tail
    unit of layer l, needed for l >= 1. Entries for non-hidden node layers are None.
    """
    n = len(routes)
    Z: OptTensors = [None] * (n + 1)
    for l in range(n - 1, 0, -1):
        r = routes[l]
        z = col_sums[l] - child_x[l]
        if r.head_hidden:
            z = z + torch.where(r.passing(z.device), Z[l + 1][r.child_heads(z.device)], 0.0)
        Z[l] = z
    return Z


def carrier_values(parent_w: torch.Tensor, alpha_in: torch.Tensor, beta_out: torch.Tensor,
                   r: LayerRoutes) -> torch.Tensor:
    """v[pi(b)] = alpha(b mod h_in) * w[pi(b)] * beta(b): the basis-path value of every parent
    edge of layer l (``alpha_in`` per tail unit, ``beta_out`` per head unit)."""
    return alpha_in[r.parent_tails(parent_w.device)] * parent_w * beta_out


def carrier_gradient(parent_x: torch.Tensor, z_head: torch.Tensor,
                     values: torch.Tensor) -> torch.Tensor:
    """dL/dv at a carrier pi(b) = (x[pi(b)] - Z(b)) / v[pi(b)]  (y = x - Z, section 4)."""
    return (parent_x - z_head) / values


def carrier_ratio(lr, step: torch.Tensor, values: torch.Tensor,
                  carriers: torch.Tensor) -> torch.Tensor:
    """R(b) = v'/v = 1 - lr * s[pi(b)] / v[pi(b)] at the carriers, 1 at the other heads."""
    return torch.where(carriers, 1 - lr * step / values, 1.0)


def g_space_direction(d: torch.Tensor, row_scale: torch.Tensor | None = None,
                      weight_decay=None, values: torch.Tensor | None = None) -> torch.Tensor:
    """d * row_scale (batchnorm="approximate": the paper's heuristic) + weight_decay * v
    (L2 on basis-path values, section 6); either part is skipped when None."""
    if row_scale is not None:
        d = d * row_scale
    if weight_decay is not None:
        d = d + weight_decay * values
    return d


def g_space_gradient(weights: Tensors, grads: Tensors, bias_grads: OptTensors,
                     routes: tuple[LayerRoutes, ...],
                     products: RouteProducts | None = None) -> tuple[Tensors, OptTensors]:
    """The inverse chain rule: dL/dv_e for every representative edge and bias (section 4).

    Non-carrier edge:  dL/dv = g_e / c_e          (y_e = x_e)
    Carrier pi(b):     dL/dv = (x_e - Z(b)) / v_e
    Bias of b:         dL/dv = g_b / beta(b)
    Frozen edges get 0. Returns weight-shaped and bias-shaped tensors.
    """
    alphas, betas = products if products is not None else route_products(weights, routes)
    x = [w * g for w, g in zip(weights, grads, strict=True)]
    Z = carrier_potentials(edge_sums(weights, grads), [children(t, r) for t, r in
                                                       zip(x, routes, strict=True)], routes)
    dw: Tensors = []
    db: OptTensors = []
    for l, (w, g, r) in enumerate(zip(weights, grads, routes, strict=True)):
        d = g / route_scale(alphas[l], betas[l + 1])
        flat = d.view(-1)
        if r.head_hidden:
            vc = carrier_values(parents(w, r), alphas[l], betas[l + 1], r)
            dc = carrier_gradient(parents(x[l], r), Z[l + 1], vc)
            pos = r.parent_flat(w.device)
            flat[pos] = torch.where(r.carriers(w.device), dc, flat[pos])
        if r.tail_hidden:
            flat[r.child_flat(w.device)] = 0
        dw.append(d)
        gb = bias_grads[l] if l < len(bias_grads) else None
        db.append(None if gb is None else gb / betas[l + 1])
    return dw, db


def guard_ratio(raw: torch.Tensor, max_ratio: float | torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The carrier-ratio guard (section 7): |R| bounded to [1/max_ratio, max_ratio], its sign
    kept (a negative R is an ordinary step: the basis-path value crosses zero); NaN -> 1.
    Returns (R, which entries it changed: a boolean mask). Within bounds R is untouched."""
    ratio = torch.copysign(raw.abs().clamp(1 / max_ratio, max_ratio), raw).nan_to_num(nan=1.0)
    return ratio, ratio != raw


def node_ratios(ratios: OptTensors, routes: tuple[LayerRoutes, ...],
                like: torch.Tensor) -> Tensors:
    """rho per node layer 0..n-1, by one forward sweep (the recursion of weight allocation):

        rho(input) = 1,  rho(b) = R(b) if pi(b) is a carrier else rho(b mod h_in)

    (alpha'(u) = rho(u) alpha(u) after the step). ``ratios[l]`` is per head of layer l;
    ``like`` gives the dtype and device.
    """
    rho = torch.ones(routes[0].h_in, dtype=like.dtype, device=like.device)
    rhos = [rho]
    for l, r in enumerate(routes[:-1]):
        rho = torch.where(r.carriers(rho.device), ratios[l], rho[r.parent_tails(rho.device)])
        rhos.append(rho)
    return rhos


def momentum_step(d: torch.Tensor, buf: torch.Tensor | None, momentum, dampening,
                  nesterov: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Heavy-ball momentum in torch.optim.SGD's convention, on tensors (or floats):

        buf' = d if buf is None (first step) else momentum * buf + (1 - dampening) * d
        s    = d + momentum * buf' if nesterov else buf'

    ``momentum`` / ``dampening`` are numbers or 0-d tensors. Returns (s, buf'). The fast step
    passes a zero buffer and dampening 0 on the first step, which gives the same buf' = d.
    """
    new = d if buf is None else momentum * buf + (1 - dampening) * d
    return (d + momentum * new if nesterov else new), new


class Allocation(NamedTuple):
    """Result of :func:`allocate`: new weights/biases and how many carrier ratios were changed."""

    weights: Tensors
    biases: OptTensors
    clipped: torch.Tensor


def allocate(weights: Tensors, biases: OptTensors, steps: Tensors, bias_steps: OptTensors,
             lr: float, routes: tuple[LayerRoutes, ...],
             products: RouteProducts | None = None, max_ratio: float = 100.0) -> Allocation:
    """Weight allocation (section 5): weights whose basis-path values are v - lr * s.

    With the frozen child edges unchanged, beta is unchanged and one forward sweep gives

        R(b) = 1 - lr * s[pi(b)] / v[pi(b)]  at the carriers (then :func:`guard_ratio`)
        rho  = :func:`node_ratios` of R
        w'_e = (w_e - lr * s_e / c_e) / rho(tail)     every other representative edge
        w'_e = w_e * R(b) / rho(tail)                 carrier pi(b)
        b'   = b - lr * s_b / beta(b)                 bias (a bias node has rho = 1)
    """
    alphas, betas = products if products is not None else route_products(weights, routes)
    clipped = torch.zeros((), dtype=torch.long, device=weights[0].device)
    ratios: OptTensors = []
    for l, (w, s, r) in enumerate(zip(weights, steps, routes, strict=True)):
        if not r.head_hidden:
            ratios.append(None)
            continue
        vc = carrier_values(parents(w, r), alphas[l], betas[l + 1], r)
        raw = carrier_ratio(lr, parents(s, r), vc, r.carriers(w.device))
        ratio, changed = guard_ratio(raw, max_ratio)
        ratios.append(ratio)
        clipped = clipped + changed.sum()
    rhos = node_ratios(ratios, routes, weights[0])
    new_w: Tensors = []
    new_b: OptTensors = []
    for l, (w, s, r) in enumerate(zip(weights, steps, routes, strict=True)):
        nw = (w - lr * s / route_scale(alphas[l], betas[l + 1])) / rhos[l][None, :, None]
        flat = nw.view(-1)
        if r.head_hidden:
            car = r.carriers(w.device)
            carried = parents(w, r) * ratios[l] / rhos[l][r.parent_tails(w.device)]
            pos = r.parent_flat(w.device)
            flat[pos] = torch.where(car, carried, flat[pos])
        if r.tail_hidden:
            flat[r.child_flat(w.device)] = children(w, r)
        new_w.append(nw)
        b = biases[l] if l < len(biases) else None
        sb = bias_steps[l] if l < len(bias_steps) else None
        new_b.append(None if b is None else b - lr * sb / betas[l + 1])
    return Allocation(new_w, new_b, clipped)


# --------------------------------------------------------------------------------------------
# The complete step
# --------------------------------------------------------------------------------------------

def reference_step(t: BlockTensors, hp: StepHyper) -> BlockUpdate:
    """One complete G-SGD step of a block (see the module docstring); pure, returns new tensors.

    With ``hp.momentum > 0`` the buffers of ``t`` are read (a None list or None entries: the
    first step) and new ones returned; without momentum none are kept. ``hp.maximize`` steps
    up the loss (the gradients negated, as torch.optim.SGD does).
    """
    if hp.maximize:
        t = t._replace(grads=[-g for g in t.grads],
                       bias_grads=[None if g is None else -g for g in t.bias_grads])
    routes = t.routes
    products = route_products(t.weights, routes)
    alphas, betas = products
    dw, db = g_space_gradient(t.weights, t.grads, t.bias_grads, routes, products)
    wd = hp.weight_decay or None
    for l, r in enumerate(routes):
        scale = None if t.row_scales is None else t.row_scales[l]
        values = t.weights[l] * route_scale(alphas[l], betas[l + 1])
        if r.tail_hidden:
            values.view(-1)[r.child_flat(values.device)] = 0  # frozen: not a coordinate
        dw[l] = g_space_direction(dw[l], None if scale is None else scale[:, None, None], wd,
                                  values)
        if db[l] is not None:
            db[l] = g_space_direction(db[l], scale, wd, t.biases[l] * betas[l + 1])
    bufs = bias_bufs = None
    steps, bias_steps = dw, db
    if hp.momentum:
        n = len(routes)
        old = list(t.buffers) if t.buffers is not None else [None] * n
        old_b = list(t.bias_buffers) if t.bias_buffers is not None else [None] * n
        moved = [momentum_step(d, b, hp.momentum, hp.dampening, hp.nesterov)
                 for d, b in zip(dw, old, strict=True)]
        moved_b = [(None, None) if d is None else
                   momentum_step(d, b, hp.momentum, hp.dampening, hp.nesterov)
                   for d, b in zip(db, old_b, strict=True)]
        steps, bufs = [s for s, _ in moved], [b for _, b in moved]
        bias_steps, bias_bufs = [s for s, _ in moved_b], [b for _, b in moved_b]
    new = allocate(t.weights, t.biases, steps, bias_steps, hp.lr, routes, products, hp.max_ratio)
    return BlockUpdate(new.weights, new.biases, bufs, bias_bufs, new.clipped)


def gsgd_step(weights: Tensors, biases: OptTensors, grads: Tensors, bias_grads: OptTensors,
              lr: float, routes: tuple[LayerRoutes, ...], max_ratio: float = 100.0
              ) -> Allocation:
    """One plain G-SGD step (no momentum, no weight decay): :func:`reference_step` with only
    ``lr`` and ``max_ratio``, as an :class:`Allocation`."""
    def pad(ts: OptTensors) -> OptTensors:
        return list(ts) + [None] * (len(routes) - len(ts))

    up = reference_step(BlockTensors(routes, weights, grads, pad(biases), pad(bias_grads)),
                        StepHyper(lr, max_ratio=max_ratio))
    return Allocation(up.weights, up.biases, up.clipped)
