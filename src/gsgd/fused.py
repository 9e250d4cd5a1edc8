"""The optimizer's in-place G-SGD step: the maths of ``gsgd.functional`` in few memory passes.

Per block, in three phases (gsgd-math.md sections 4-6):

A. O(H) + one reduction pass: route products alpha/beta, the edge sums sum_out w*g, the carrier
   potentials Z, and everything about the carriers (their G-space gradient (x - Z)/v, momentum,
   ratio R, clamping) and the per-node ratios rho of the forward sweep.
B. One dense pass per layer, the same formula for every edge (the non-carrier update):

       d   = g / c + wd * c * w                 c = beta(head) * alpha(tail)
       buf = mu * buf + (1 - dampening) * d     (buf = d on the first step)
       s   = d + mu * buf  if nesterov else buf
       w'  = (w - lr * s / c) / rho(tail)

   written so that it can run eagerly or fused by ``torch.compile`` into one kernel that reads
   w, g, buf and writes w, buf (the same traffic as an SGD step).
C. O(H) fix-ups: frozen child edges keep their weight (and a zero buffer); carriers get their
   exact values w * R / rho(tail).

The result equals ``functional.gsgd_step`` (plus momentum / weight decay) to rounding; the tests
check both against the brute-force oracle.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from gsgd.basis import LayerIndex, route_products
from gsgd.functional import carrier_potentials, clamp_ratio, edge_sums


@dataclass(frozen=True)
class StepFlags:
    """The structural choices of a step (static for a compiled graph)."""

    nesterov: bool
    first: bool
    has_wd: bool


def hyper_tensor(lr: float, momentum: float, dampening: float, weight_decay: float,
                 max_ratio: float, like: torch.Tensor) -> torch.Tensor:
    """The numeric hyper-parameters as one tensor, so a schedule never triggers a recompile."""
    return torch.tensor([lr, momentum, dampening, weight_decay, max_ratio], dtype=like.dtype,
                        device=like.device)


def block_prepare(ws: list[torch.Tensor], gs: list[torch.Tensor],
                  gbs: list[torch.Tensor | None], index: tuple[LayerIndex, ...]):
    """Route products, edge sums, and ``ok``: all finite and no designated route is zero."""
    alphas, betas = route_products(ws, index)
    sums = edge_sums(ws, gs)
    totals = torch.stack([s.sum() for s in sums] + [gb.sum() for gb in gbs if gb is not None])
    routes = torch.cat(alphas + betas)
    ok = torch.isfinite(totals).all() & torch.isfinite(routes).all() & (routes != 0).all()
    return alphas, betas, sums, ok


def dense_update(w: torch.Tensor, g: torch.Tensor, buf: torch.Tensor | None,
                 inv_alpha: torch.Tensor, inv_beta: torch.Tensor, inv_rho: torch.Tensor,
                 hp: torch.Tensor, flags: StepFlags, row_scale: torch.Tensor | None = None
                 ) -> None:
    """Phase B for one layer as an ``(out, in * taps)`` matrix, in place on ``w`` (and ``buf``).

    ``inv_alpha`` and ``inv_rho`` are per column (tail units repeated over their taps),
    ``inv_beta`` per row; ``hp`` = [lr, momentum, dampening, weight_decay, max_ratio].
    ``row_scale`` multiplies the G-space gradient of each row (batchnorm="approximate" only).
    """
    lr, mu, damp, wd = hp[0], hp[1], hp[2], hp[3]
    inv_c = inv_beta[:, None] * inv_alpha[None, :]
    d = g * inv_c
    if row_scale is not None:
        d = d * row_scale[:, None]
    if flags.has_wd:
        d = d + wd * w / inv_c
    if buf is None:
        s = d
    else:
        new_buf = d if flags.first else mu * buf + (1 - damp) * d
        s = d + mu * new_buf if flags.nesterov else new_buf
        buf.copy_(new_buf)
    w.copy_((w - lr * s * inv_c) * inv_rho[None, :])


def dense_update_inplace(w: torch.Tensor, g: torch.Tensor, buf: torch.Tensor | None,
                         inv_alpha: torch.Tensor, inv_beta: torch.Tensor, inv_rho: torch.Tensor,
                         hp: torch.Tensor, flags: StepFlags,
                         row_scale: torch.Tensor | None = None,
                         scratch: torch.Tensor | None = None) -> None:
    """:func:`dense_update` for eager mode: the same formula with in-place fused ops.

    With momentum (no nesterov, no row scale) it allocates nothing: 1/c goes into ``scratch``
    (a reusable weight-shaped work tensor, not optimizer state) and the G-space direction goes
    straight into the momentum buffer. Fresh weight-sized temporaries cost page faults that
    made each pass several times slower than an in-place one.
    """
    lr, mu, damp, wd, _ = hp.tolist()
    inv_c = torch.outer(inv_beta, inv_alpha, out=scratch) if scratch is not None \
        else torch.outer(inv_beta, inv_alpha)
    if buf is not None and row_scale is None and not flags.nesterov:
        if flags.first:
            torch.mul(g, inv_c, out=buf)
            if flags.has_wd:
                buf.addcdiv_(w, inv_c, value=wd)
        else:
            buf.mul_(mu).addcmul_(g, inv_c, value=1 - damp)
            if flags.has_wd:
                buf.addcdiv_(w, inv_c, value=wd * (1 - damp))
        s = buf
    else:
        d = torch.mul(g, inv_c)
        if row_scale is not None:
            d.mul_(row_scale[:, None])
        if flags.has_wd:
            d.addcdiv_(w, inv_c, value=wd)
        s = d
        if buf is not None:
            if flags.first:
                buf.copy_(d)
            else:
                buf.mul_(mu).add_(d, alpha=1 - damp)
            s = d.add_(buf, alpha=mu) if flags.nesterov else buf
    inv_c.mul_(inv_rho[None, :])
    w.mul_(inv_rho[None, :])
    w.addcmul_(s, inv_c, value=-lr)


def _momentum(d: torch.Tensor, old: torch.Tensor | None, hp: torch.Tensor, flags: StepFlags
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(step s, new buffer) of heavy-ball momentum for a small vector (torch.optim.SGD rules)."""
    if old is None:
        return d, None
    mu, damp = hp[1], hp[2]
    new = d if flags.first else mu * old + (1 - damp) * d
    return (d + mu * new if flags.nesterov else new), new


def block_update(ws: list[torch.Tensor], gs: list[torch.Tensor],
                 bs: list[torch.Tensor | None], gbs: list[torch.Tensor | None],
                 bufs: list[torch.Tensor | None], bias_bufs: list[torch.Tensor | None],
                 index: tuple[LayerIndex, ...], alphas: list[torch.Tensor],
                 betas: list[torch.Tensor], sums: list[torch.Tensor], hp: torch.Tensor,
                 flags: StepFlags, row_scales: list[torch.Tensor | None] | None = None,
                 dense: Callable = dense_update_inplace,
                 scratch: Callable[[int, int], torch.Tensor | None] | None = None
                 ) -> torch.Tensor:
    """One G-SGD step of a block, in place. Returns the number of clipped carrier ratios.

    ``alphas``, ``betas``, ``sums`` come from :func:`block_prepare` (checked by the caller).
    ``bufs`` / ``bias_bufs`` are the G-space momentum buffers (None without momentum).
    ``row_scales[l]``, where given, multiplies the G-space gradient of every output unit of
    layer l: the paper's heuristic for BN-followed layers (batchnorm="approximate"), NOT exact.
    ``dense`` is the phase-B kernel; ``scratch(rows, cols)`` hands it a reusable work tensor.
    """
    Z = carrier_potentials(ws, gs, index, sums)
    lr, wd, max_ratio = hp[0], hp[3], hp[4]
    rho = torch.ones_like(alphas[0])
    clipped = torch.zeros((), dtype=torch.long, device=ws[0].device)
    for l, (w, g) in enumerate(zip(ws, gs, strict=True)):
        ix = index[l]
        wf, gf = w.view(-1), g.reshape(-1)
        buf = bufs[l]
        row_scale = None if row_scales is None else row_scales[l]
        frozen_w = wf[ix.kap_flat]
        next_rho = rho[ix.par_tail] if ix.head_hidden else None
        if len(ix.car_flat):
            # Phase A for the carriers of this layer: d = (x - Z) / v + wd * v, momentum, R.
            wc = wf[ix.car_flat]
            vc = alphas[l][ix.car_a] * wc * betas[l + 1][ix.car_b]
            dc = (wc * gf[ix.car_flat] - Z[l + 1][ix.car_b]) / vc
            if row_scale is not None:
                dc = dc * row_scale[ix.car_b]
            if flags.has_wd:
                dc = dc + wd * vc
            sc, bufc = _momentum(dc, None if buf is None else buf.view(-1)[ix.car_flat], hp,
                                 flags)
            ratio, n_clipped = clamp_ratio(1 - lr * sc / vc, max_ratio)
            clipped = clipped + n_clipped
            new_wc = wc * ratio / rho[ix.car_a]
            next_rho = next_rho.index_put((ix.car_b,), ratio)
        dense(w.view(ix.h_out, -1), g.reshape(ix.h_out, -1),
              None if buf is None else buf.view(ix.h_out, -1),
              _per_tap(1 / alphas[l], ix.taps), 1 / betas[l + 1],
              _per_tap(1 / rho, ix.taps), hp, flags, row_scale,
              *(() if scratch is None else (scratch(ix.h_out, ix.h_in * ix.taps),)))
        # Phase C: frozen edges keep their weight and a zero buffer; carriers exact.
        wf[ix.kap_flat] = frozen_w
        if buf is not None:
            buf.view(-1)[ix.kap_flat] = 0
        if len(ix.car_flat):
            wf[ix.car_flat] = new_wc
            if buf is not None:
                buf.view(-1)[ix.car_flat] = bufc
        if bs[l] is not None:
            # bias of node b: an edge from a bias node (rho = 1), v = b * beta(b)
            beta = betas[l + 1]
            db = gbs[l] / beta
            if row_scale is not None:
                db = db * row_scale
            if flags.has_wd:
                db = db + wd * bs[l] * beta
            sb, new_bb = _momentum(db, bias_bufs[l], hp, flags)
            if new_bb is not None:
                bias_bufs[l].copy_(new_bb)
            bs[l].sub_(lr * sb / beta)
        if next_rho is not None:
            rho = next_rho
    return clipped


def _per_tap(v: torch.Tensor, taps: int) -> torch.Tensor:
    """A per-tail-unit vector expanded to the ``in * taps`` columns of the matrix view."""
    return v if taps == 1 else v.repeat_interleave(taps)


_COMPILED: dict[str, Callable] = {}


def compiled_dense_update() -> Callable:
    """:func:`dense_update` fused by torch.compile into one kernel per layer shape (lazily).

    Only the dense pass is compiled: inductor's column reductions and its scatters into the
    freshly written weights are slower than eager ``vecdot`` / ``index_put_`` here. The
    recompile limit is raised so deep networks with many layer shapes stay compiled.
    """
    if "dense" not in _COMPILED:
        import torch._dynamo

        limit = torch._dynamo.config.recompile_limit
        torch._dynamo.config.recompile_limit = max(limit, 256)
        _COMPILED["dense"] = torch.compile(dense_update, dynamic=False)
    return _COMPILED["dense"]
