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
    d_e += dR/dv_e                     bp_norm: the basis-path regulariser (section 11, our design)
    buf = d (first step) | momentum * buf + (1 - dampening) * d          (momentum_step)
    s   = d + momentum * buf if nesterov else buf   (s = d without momentum)
    v'  = v - lr * s,  carrier ratios R = v'/v with |R| bounded, sign kept (guard_ratio)
    w'  = weights with basis-path values v', frozen child edges unchanged  (allocate)

G-space Adam / AdamW (:func:`reference_adam_step`, docs/math.md section 11) feeds Adam's
direction of the same d to the same allocation and guard.

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
    bp_norm: tuple[float, float] = (0.0, 0.0)


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


def g_space_values(weights: Tensors, biases: OptTensors, routes: tuple[LayerRoutes, ...],
                   products: RouteProducts | None = None, carriers: bool = True
                   ) -> tuple[Tensors, OptTensors]:
    """The G-space coordinates v_e = c_e w_e of a block, weight- and bias-shaped (a bias of b:
    v = bias_b * beta(b)); 0 at the frozen child edges (not coordinates) and, with
    ``carriers=False``, 0 at the carriers too (the positive basis paths P+ only)."""
    alphas, betas = products if products is not None else route_products(weights, routes)
    vw: Tensors = []
    vb: OptTensors = []
    for l, (w, r) in enumerate(zip(weights, routes, strict=True)):
        v = w * route_scale(alphas[l], betas[l + 1])
        flat = v.view(-1)
        if r.tail_hidden:
            flat[r.child_flat(v.device)] = 0  # frozen: not a coordinate
        if not carriers and r.head_hidden:
            flat[carrier_flat(r, v.device)] = 0
        vw.append(v)
        b = biases[l] if l < len(biases) else None
        vb.append(None if b is None else b * betas[l + 1])
    return vw, vb


def carrier_flat(r: LayerRoutes, device: torch.device | None = None) -> torch.Tensor:
    """Flat positions (in the ``(out, in, taps)`` view) of the layer's carriers."""
    return r.parent_flat(device)[r.carriers(device)]


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
    vw, vb = g_space_values(t.weights, t.biases, routes, products)
    for l in range(len(routes)):
        scale = None if t.row_scales is None else t.row_scales[l]
        dw[l] = g_space_direction(dw[l], None if scale is None else scale[:, None, None], wd,
                                  vw[l])
        if db[l] is not None:
            db[l] = g_space_direction(db[l], scale, wd, vb[l])
    if any(hp.bp_norm):  # + dR/dv of the basis-path regulariser (our design, section 11)
        rw, rb = basis_path_norm_gradient(t.weights, t.biases, routes, *hp.bp_norm, products)
        dw = [d + r for d, r in zip(dw, rw, strict=True)]
        db = [None if d is None else d + r for d, r in zip(db, rb, strict=True)]
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


# --------------------------------------------------------------------------------------------
# G-space Adam / AdamW (docs/math.md section 11)
# --------------------------------------------------------------------------------------------

class AdamHyper(NamedTuple):
    """The hyper-parameters of one G-Adam step (one param group's values).

    ``decoupled``: AdamW's decay (s' = u + weight_decay * v) instead of Adam's coupled L2
    (d += weight_decay * v). ``decay_carriers``: whether either decay also acts on the carriers'
    basis paths (False: the positive basis paths P+ only, i.e. non-carrier edges and biases).
    ``bp_norm``: (lam_pos, lam_neg) of :func:`basis_path_norm`, added to d (coupled).
    """

    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    decoupled: bool = False
    decay_carriers: bool = False
    amsgrad: bool = False
    max_ratio: float = 100.0
    maximize: bool = False
    bp_norm: tuple[float, float] = (0.0, 0.0)


class AdamMoments(NamedTuple):
    """torch.optim.Adam's state of one tensor: the step count t, the first and second moments,
    and (AMSGrad) the running maximum of the second moment (else None)."""

    step: float
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    max_exp_avg_sq: torch.Tensor | None = None


class AdamState(NamedTuple):
    """The G-Adam state of a block: per layer, the moments of its weight and of its bias (None:
    not started, i.e. t = 0 and zero moments; always None for a layer without a bias)."""

    weights: list[AdamMoments | None]
    biases: list[AdamMoments | None]

    @staticmethod
    def fresh(layers: int) -> AdamState:
        """The state of a block of ``layers`` layers before its first step."""
        return AdamState([None] * layers, [None] * layers)


class AdamUpdate(NamedTuple):
    """What a G-Adam step computes for a block: new weights (``(out, in, taps)``), biases, the
    new state and the number of carrier ratios the guard changed."""

    weights: Tensors
    biases: OptTensors
    state: AdamState
    clipped: torch.Tensor


def adam_direction(d: torch.Tensor, moments: AdamMoments | None, beta1: float, beta2: float,
                   eps: float, amsgrad: bool) -> tuple[torch.Tensor, AdamMoments]:
    """Adam's direction in torch.optim.Adam's conventions, on one tensor of G-space gradients:

        t' = t + 1,  m' = beta1 m + (1 - beta1) d,  s' = beta2 s + (1 - beta2) d^2
        s_max' = max(s_max, s')                               (AMSGrad; the root uses it)
        u = (m' / (1 - beta1^t')) / (sqrt(s' / (1 - beta2^t')) + eps)

    (eps outside the bias-corrected root, as torch). ``moments`` None: t = 0, zero moments.
    Returns (u, the new moments); pure.
    """
    if moments is None:
        zero = torch.zeros_like(d)
        moments = AdamMoments(0.0, zero, zero, zero if amsgrad else None)
    t = moments.step + 1
    m = torch.lerp(moments.exp_avg, d, 1 - beta1)
    s = moments.exp_avg_sq * beta2 + (1 - beta2) * d * d
    peak = None
    if amsgrad:
        old = moments.max_exp_avg_sq
        peak = s if old is None else torch.maximum(old, s)
    root = (s if peak is None else peak).sqrt() / (1 - beta2 ** t) ** 0.5
    u = m / (1 - beta1 ** t) / (root + eps)
    return u, AdamMoments(t, m, s, peak)


def basis_path_norm(weights: Tensors, biases: OptTensors, routes: tuple[LayerRoutes, ...],
                    lam_pos: float, lam_neg: float, products: RouteProducts | None = None
                    ) -> torch.Tensor:
    """The basis-path regulariser (OUR DESIGN, docs/math.md section 11; the BP-norm paper's
    own formula is unconfirmed), a function of the basis-path values only:

        R(v) = lam_pos / 2 * sum_{p in P+} v_p^2  +  lam_neg / 2 * sum_{carriers c} log(|v_c|)^2

    P+: non-carrier representative edges and biases. log|v_c| is taken as log|alpha(tail)| +
    log|w_c| + log|beta(b)| (route products underflow in float32 before the log)."""
    products = products if products is not None else route_products(weights, routes)
    vw, vb = g_space_values(weights, biases, routes, products, carriers=False)
    pos = sum(v.square().sum() for v in [*vw, *vb] if v is not None)
    neg = sum(logs.square().sum() for logs in _carrier_logs(weights, routes, products)
              if logs is not None)
    return lam_pos / 2 * pos + lam_neg / 2 * neg


def carrier_logs(parent_w: torch.Tensor, alpha_in: torch.Tensor, beta_out: torch.Tensor,
                 r: LayerRoutes) -> torch.Tensor:
    """log|v[pi(b)]| = log|alpha(b mod h_in)| + log|w[pi(b)]| + log|beta(b)| for every parent
    edge of a layer (summed logs: the product underflows in float32 first)."""
    return (alpha_in[r.parent_tails(parent_w.device)].abs().log() + parent_w.abs().log()
            + beta_out.abs().log())


def _carrier_logs(weights: Tensors, routes: tuple[LayerRoutes, ...], products: RouteProducts
                  ) -> OptTensors:
    """log|v_c| per head of every layer whose heads are hidden (entries at non-carrier heads are
    meaningless; mask with ``r.carriers()``), None elsewhere."""
    alphas, betas = products
    out: OptTensors = []
    for l, (w, r) in enumerate(zip(weights, routes, strict=True)):
        if not r.head_hidden:
            out.append(None)
            continue
        logs = carrier_logs(parents(w, r), alphas[l], betas[l + 1], r)
        out.append(torch.where(r.carriers(w.device), logs, 0.0))
    return out


def basis_path_norm_gradient(weights: Tensors, biases: OptTensors,
                             routes: tuple[LayerRoutes, ...], lam_pos: float, lam_neg: float,
                             products: RouteProducts | None = None) -> tuple[Tensors, OptTensors]:
    """dR/dv of :func:`basis_path_norm`, weight- and bias-shaped (0 at the frozen edges):

        lam_pos * v_e                 positive basis paths (non-carrier edges, biases)
        lam_neg * log|v_c| / v_c      carriers
    """
    products = products if products is not None else route_products(weights, routes)
    alphas, betas = products
    vw, vb = g_space_values(weights, biases, routes, products, carriers=False)
    dw = [lam_pos * v for v in vw]
    db = [None if v is None else lam_pos * v for v in vb]
    for l, (w, r, logs) in enumerate(zip(weights, routes, _carrier_logs(weights, routes,
                                                                        products), strict=True)):
        if logs is None:
            continue
        vc = carrier_values(parents(w, r), alphas[l], betas[l + 1], r)
        pos = r.parent_flat(w.device)
        flat = dw[l].view(-1)
        flat[pos] = torch.where(r.carriers(w.device), lam_neg * logs / vc, flat[pos])
    return dw, db


def reference_adam_step(t: BlockTensors, state: AdamState, hp: AdamHyper) -> AdamUpdate:
    """One G-Adam (G-AdamW) step of a block; pure, returns new tensors (docs/math.md s. 11):

        d   = dL/dv by the inverse chain rule                      (g_space_gradient)
        d  *= row_scale                        batchnorm="approximate" only (NOT invariant)
        d  += weight_decay * v~                Adam's coupled L2 (not ``decoupled``)
        d  += dR/dv                            basis-path regulariser (``bp_norm``, our design)
        u   = Adam's direction of d, per basis path                (adam_direction)
        s'  = u + weight_decay * v~ if decoupled else u              (AdamW's decay)
        v'  = v - lr * s'  -> weights by allocate: the same guard of R and count as G-SGD

    v~ = v on every basis path with ``decay_carriers``, else on P+ only (carriers 0).
    ``hp.maximize`` negates the gradients first (as torch.optim.Adam).
    """
    if hp.maximize:
        t = t._replace(grads=[-g for g in t.grads],
                       bias_grads=[None if g is None else -g for g in t.bias_grads])
    routes = t.routes
    n = len(routes)
    products = route_products(t.weights, routes)
    dw, db = g_space_gradient(t.weights, t.grads, t.bias_grads, routes, products)
    vw, vb = g_space_values(t.weights, t.biases, routes, products, carriers=hp.decay_carriers)
    coupled = None if hp.decoupled or not hp.weight_decay else hp.weight_decay
    reg = (basis_path_norm_gradient(t.weights, t.biases, routes, *hp.bp_norm, products)
           if any(hp.bp_norm) else None)
    for l in range(n):
        scale = None if t.row_scales is None else t.row_scales[l]
        dw[l] = g_space_direction(dw[l], None if scale is None else scale[:, None, None],
                                  coupled, vw[l])
        if db[l] is not None:
            db[l] = g_space_direction(db[l], scale, coupled, vb[l])
        if reg is not None:
            dw[l] = dw[l] + reg[0][l]
            db[l] = None if db[l] is None else db[l] + reg[1][l]
    moved = [adam_direction(d, m, hp.beta1, hp.beta2, hp.eps, hp.amsgrad)
             for d, m in zip(dw, state.weights, strict=True)]
    moved_b = [(None, None) if d is None else
               adam_direction(d, m, hp.beta1, hp.beta2, hp.eps, hp.amsgrad)
               for d, m in zip(db, state.biases, strict=True)]
    steps = [u for u, _ in moved]
    bias_steps = [u for u, _ in moved_b]
    if hp.decoupled and hp.weight_decay:
        steps = [u + hp.weight_decay * v for u, v in zip(steps, vw, strict=True)]
        bias_steps = [None if u is None else u + hp.weight_decay * v
                      for u, v in zip(bias_steps, vb, strict=True)]
    new = allocate(t.weights, t.biases, steps, bias_steps, hp.lr, routes, products, hp.max_ratio)
    return AdamUpdate(new.weights, new.biases,
                      AdamState([m for _, m in moved], [m for _, m in moved_b]), new.clipped)
