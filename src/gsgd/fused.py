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

from gsgd.basis import LayerIndex
from gsgd.functional import carrier_potentials

DenseFn = Callable[..., None]


@dataclass(frozen=True)
class HyperParameters:
    """One step's hyper-parameters (read from the param group at every step)."""

    lr: float
    momentum: float
    dampening: float
    weight_decay: float
    nesterov: bool
    max_ratio: float


def dense_update(w: torch.Tensor, g: torch.Tensor, buf: torch.Tensor | None,
                 inv_alpha: torch.Tensor, inv_beta: torch.Tensor, inv_rho: torch.Tensor,
                 lr: torch.Tensor, mu: torch.Tensor, damp: torch.Tensor, wd: torch.Tensor,
                 nesterov: bool, first: bool, has_wd: bool) -> None:
    """Phase B for one layer as an ``(out, in * taps)`` matrix, in place on ``w`` (and ``buf``).

    ``inv_alpha`` and ``inv_rho`` are per column (tail units repeated over their taps),
    ``inv_beta`` per row.
    """
    inv_c = inv_beta[:, None] * inv_alpha[None, :]
    d = g * inv_c
    if has_wd:
        d = d + wd * w / inv_c
    if buf is None:
        s = d
    else:
        new_buf = d if first else mu * buf + (1 - damp) * d
        s = d + mu * new_buf if nesterov else new_buf
        buf.copy_(new_buf)
    w.copy_((w - lr * s * inv_c) * inv_rho[None, :])


_COMPILED: dict[str, DenseFn] = {}


def compiled_dense_update() -> DenseFn:
    """``dense_update`` fused by torch.compile (compiled lazily, once per process)."""
    if "dense" not in _COMPILED:
        _COMPILED["dense"] = torch.compile(dense_update, dynamic=None, fullgraph=True)
    return _COMPILED["dense"]


def fused_block_step(ws: list[torch.Tensor], gs: list[torch.Tensor],
                     bs: list[torch.Tensor | None], gbs: list[torch.Tensor | None],
                     bufs: list[torch.Tensor | None], bias_bufs: list[torch.Tensor | None],
                     index: tuple[LayerIndex, ...], routes, sums: list[torch.Tensor],
                     hp: HyperParameters, first: bool, dense: DenseFn = dense_update
                     ) -> torch.Tensor:
    """One G-SGD step of a block, in place. Returns the number of clipped carrier ratios.

    ``routes`` = (alphas, betas) and ``sums`` = edge sums, already computed (and checked finite
    by the caller). ``bufs`` / ``bias_bufs`` are the G-space momentum buffers (None without
    momentum); ``first`` says they hold no history yet.
    """
    alphas, betas = routes
    Z = carrier_potentials(ws, gs, index, sums)
    mu, damp, wd, lr = hp.momentum, hp.dampening, hp.weight_decay, hp.lr
    device, dtype = ws[0].device, ws[0].dtype
    scalars = [torch.tensor(x, dtype=dtype, device=device) for x in (lr, mu, damp, wd)]
    rho = torch.ones_like(alphas[0])
    clipped = torch.zeros((), dtype=torch.long, device=device)
    lo, hi = 1.0 / hp.max_ratio, hp.max_ratio
    for l, (w, g) in enumerate(zip(ws, gs, strict=True)):
        ix = index[l]
        wf, gf = w.view(-1), g.reshape(-1)
        buf = bufs[l]
        frozen_w = wf[ix.kap_flat]
        next_rho = rho[ix.par_tail] if ix.head_hidden else None
        if len(ix.car_flat):
            # Phase A for the carriers of this layer: d = (x - Z) / v + wd * v, momentum, R.
            wc = wf[ix.car_flat]
            vc = alphas[l][ix.car_a] * wc * betas[l + 1][ix.car_b]
            dc = (wc * gf[ix.car_flat] - Z[l + 1][ix.car_b]) / vc
            if wd:
                dc = dc + wd * vc
            sc, bufc = dc, None
            if buf is not None:
                bufc = dc if first else mu * buf.view(-1)[ix.car_flat] + (1 - damp) * dc
                sc = dc + mu * bufc if hp.nesterov else bufc
            raw = 1 - lr * sc / vc
            ratio = raw.nan_to_num(nan=1.0).clamp(lo, hi)
            clipped = clipped + ((raw < lo) | (raw > hi) | raw.isnan()).sum()
            new_wc = wc * ratio / rho[ix.car_a]
            next_rho = next_rho.index_put((ix.car_b,), ratio)
        taps = ix.taps
        dense(w.view(ix.h_out, -1), g.reshape(ix.h_out, -1),
              None if buf is None else buf.view(ix.h_out, -1),
              _per_tap(1 / alphas[l], taps), 1 / betas[l + 1], _per_tap(1 / rho, taps),
              *scalars, hp.nesterov, first, bool(wd))
        # Phase C: frozen edges keep their weight and a zero buffer; carriers exact.
        wf[ix.kap_flat] = frozen_w
        if buf is not None:
            buf.view(-1)[ix.kap_flat] = 0
        if len(ix.car_flat):
            wf[ix.car_flat] = new_wc
            if buf is not None:
                buf.view(-1)[ix.car_flat] = bufc
        if bs[l] is not None:
            _bias_update(bs[l], gbs[l], bias_bufs[l], betas[l + 1], hp, first)
        if next_rho is not None:
            rho = next_rho
    return clipped


def _per_tap(v: torch.Tensor, taps: int) -> torch.Tensor:
    """A per-tail-unit vector expanded to the ``in * taps`` columns of the matrix view."""
    return v if taps == 1 else v.repeat_interleave(taps)


def _bias_update(b: torch.Tensor, gb: torch.Tensor, buf: torch.Tensor | None,
                 beta: torch.Tensor, hp: HyperParameters, first: bool) -> None:
    """Bias of node b (an edge from a bias node, rho = 1): v = b * beta(b), dL/dv = g / beta."""
    d = gb / beta
    if hp.weight_decay:
        d = d + hp.weight_decay * b * beta
    s = d
    if buf is not None:
        if first:
            buf.copy_(d)
        else:
            buf.mul_(hp.momentum).add_(d, alpha=1 - hp.dampening)
        s = d + hp.momentum * buf if hp.nesterov else buf
    b.sub_(hp.lr * s / beta)
