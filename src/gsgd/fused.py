"""The optimizer's in-place G-SGD step: the maths of ``gsgd.functional`` in few memory passes.

Per block, in two phases (gsgd-math.md sections 4-6):

A. :func:`block_plan` (pure, nothing written): route products alpha/beta, the edge sums
   sum_out w*g where the tail units are hidden (the one extra read pass over w and g; the
   block's first layer needs only a total), the finite check, the carrier potentials Z, and
   everything about the carriers (their G-space gradient (x - Z)/v, momentum, ratio R,
   clamping) and the per-node ratios rho of the forward sweep. O(H) besides the edge sums.
B. One dense pass per layer, the same formula for every edge (the non-carrier update):

       d   = g / c + wd * c * w                 c = beta(head) * alpha(tail)
       buf = mu * buf + (1 - dampening) * d     (buf = 0, dampening = 0 on the first step)
       s   = d + mu * buf  if nesterov else buf
       w'  = (w - lr * s / c) / rho(tail)

   except at the frozen child edges (w and a zero buffer kept) and the carriers (w * R / rho).
   :func:`block_apply_masked` selects those by predicates inside the pass (the torch.compile
   form: one kernel per layer reading w, g, buf and writing w, buf); :func:`block_apply_eager`
   runs the pass with in-place ops and writes them back by O(H) scatters.

Every index is arithmetic on the node widths (pi(b) = (b, b mod h_in), kappa(a) =
(a mod h_out, a)), so a compiled graph needs no index tensors as inputs. The result equals
``functional.gsgd_step`` (plus momentum / weight decay) to rounding; the tests check both paths
against the brute-force oracle and against each other.

:func:`fused_step` runs A and B of several blocks as one function (the one-graph form of
``GSGD(compile=True)`` for small layers); ``compiled_*`` give the torch.compile forms.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from gsgd.basis import LayerIndex, flat_index
from gsgd.functional import clamp_ratio, edge_sums

#: rows summed per block by the compiled column sums (``functional.edge_sums(row_block=)``)
ROW_BLOCK = 8

#: [lr, momentum, dampening, weight_decay, max_ratio]: a tensor (compiled) or floats (eager)
Hyper = torch.Tensor | list[float]

#: per layer (h_in, h_out, taps, centre, tail_hidden, head_hidden): static for a compiled graph
Meta = tuple[tuple[int, int, int, int, bool, bool], ...]


@dataclass(frozen=True)
class StepFlags:
    """The structural choices of a step (static for a compiled graph)."""

    nesterov: bool
    has_wd: bool


def block_meta(index: tuple[LayerIndex, ...]) -> Meta:
    """The static shape of a block's designated routes, one tuple per layer."""
    return tuple((ix.h_in, ix.h_out, ix.taps, ix.centre, ix.tail_hidden, ix.head_hidden)
                 for ix in index)


def hyper_tensor(lr: float, momentum: float, dampening: float, weight_decay: float,
                 max_ratio: float, like: torch.Tensor) -> torch.Tensor:
    """The numeric hyper-parameters as one tensor, so a schedule never triggers a recompile."""
    return torch.tensor([lr, momentum, dampening, weight_decay, max_ratio], dtype=like.dtype,
                        device=like.device)


_STATIC: dict[tuple, object] = {}


def _static(key: tuple, make: Callable[[], object]) -> object:
    """Index data that depends only on the widths: traced under torch.compile (free inside a
    kernel), built once and cached in eager mode."""
    if torch.compiler.is_compiling():
        return make()
    if key not in _STATIC:
        _STATIC[key] = make()
    return _STATIC[key]


def _iota_mod(n: int, m: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(arange(n), arange(n) mod m)."""
    def make() -> tuple[torch.Tensor, torch.Tensor]:
        i = torch.arange(n, device=device)
        return i, i % m
    return _static(("iota", n, m, device), make)


def _parent_index(h_in: int, h_out: int, taps: int, centre: int,
                  device: torch.device) -> torch.Tensor:
    """Flat positions of the parent edges pi(b) = (b, b mod h_in, centre) in ``(out, in, taps)``."""
    def make() -> torch.Tensor:
        b, tail = _iota_mod(h_out, h_in, device)
        return flat_index(b, tail, h_in, taps, centre)
    return _static(("parent", h_in, h_out, taps, centre, device), make)


def _child_index(h_in: int, h_out: int, taps: int, centre: int,
                 device: torch.device) -> torch.Tensor:
    """Flat positions of the child edges kappa(a) = (a mod h_out, a, centre) (frozen edges)."""
    def make() -> torch.Tensor:
        a, head = _iota_mod(h_in, h_out, device)
        return flat_index(head, a, h_in, taps, centre)
    return _static(("child", h_in, h_out, taps, centre, device), make)


def _parents(t: torch.Tensor, h_in: int, h_out: int, centre: int) -> torch.Tensor:
    """Entries of an ``(out, in, taps)`` tensor at the parent edges."""
    return t.reshape(-1)[_parent_index(h_in, h_out, t.shape[-1], centre, t.device)]


def _children(t: torch.Tensor, h_in: int, h_out: int, centre: int) -> torch.Tensor:
    """Entries of an ``(out, in, taps)`` tensor at the child edges."""
    return t.reshape(-1)[_child_index(h_in, h_out, t.shape[-1], centre, t.device)]


def _is_carrier(h_in: int, h_out: int, tail_hidden: bool, device: torch.device) -> torch.Tensor:
    """Per head b: is pi(b) a carrier, i.e. not also kappa of its tail (b mod h_in)?"""
    def make() -> torch.Tensor:
        if not tail_hidden:
            return torch.ones(h_out, dtype=torch.bool, device=device)
        b, tail = _iota_mod(h_out, h_in, device)
        return tail % h_out != b
    return _static(("carrier", h_in, h_out, tail_hidden, device), make)


def _numbers(hp: Hyper) -> Hyper:
    """The hyper-parameters as Python floats in eager mode (each use of a 0-d tensor would be
    one more small op); under torch.compile they stay a tensor (no recompile per schedule)."""
    return hp if isinstance(hp, list) or torch.compiler.is_compiling() else hp.tolist()


def _momentum(d: torch.Tensor, old: torch.Tensor | None, hp: Hyper, flags: StepFlags
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(step s, new buffer) of heavy-ball momentum for a small vector (torch.optim.SGD rules).

    ``old`` is zero on the first step and ``hp`` then carries dampening 0, so the new buffer is
    exactly d, as in torch.optim.SGD.
    """
    if old is None:
        return d, None
    mu, damp = hp[1], hp[2]
    if isinstance(hp, list):  # eager: two ops
        new = (d * (1 - damp)).add_(old, alpha=mu)
    else:
        new = mu * old + (1 - damp) * d
    return (d + mu * new if flags.nesterov else new), new


class Plan(NamedTuple):
    """Phase A of a block: everything the dense pass needs, all O(H) vectors (a tuple, so
    that a compiled graph can return it).

    ``ratios[l]`` (per head b; 1 where pi(b) is not a carrier) and ``carrier_bufs[l]`` are None
    unless the heads of layer l are hidden; ``inv_rhos[l]`` is 1 / rho per tail unit;
    ``inv_alphas`` / ``inv_betas`` are 1 / alpha and 1 / beta per node layer (inverted once
    here, so the weight-sized pass only multiplies).
    """

    ok: torch.Tensor
    clipped: torch.Tensor
    inv_alphas: list[torch.Tensor]
    inv_betas: list[torch.Tensor]
    inv_rhos: list[torch.Tensor]
    ratios: list[torch.Tensor | None]
    carrier_bufs: list[torch.Tensor | None]


def block_plan(ws: list[torch.Tensor], gs: list[torch.Tensor], gbs: list[torch.Tensor | None],
               bufs: list[torch.Tensor | None], meta: Meta, hp: Hyper, flags: StepFlags,
               row_scales: list[torch.Tensor | None] | None = None,
               work: Callable[[int, int], torch.Tensor] | None = None) -> Plan:
    """Phase A of one block (reads only).

    alpha(l+1, b) = alpha(l, b mod h_l) w[pi(b)],  beta(l, a) = w[kappa(a)] beta(l+1, a mod h_l+1)
    Z(a) = sum_out x(a) - x[kappa(a)] + [kappa(a) = pi(b)] Z(b)          (inverse chain rule)
    carrier pi(b):  d = (x - Z(b)) / v + wd * v,  s by momentum,  R = clamp(1 - lr * s / v)
    rho(b) = R(b) at a carrier, rho(b mod h_l) otherwise                  (weight allocation)
    ``ok``: edge sums finite and every designated route finite and non-zero.
    ``work`` (eager only): reusable matrices for the products w * g of the edge sums.
    """
    n = len(ws)
    w0 = ws[0]
    hp = _numbers(hp)
    lr, wd, max_ratio = hp[0], hp[3], hp[4]
    par_w = [_parents(w, h_in, h_out, c) if hh else None
             for w, (h_in, h_out, _, c, _, hh) in zip(ws, meta, strict=True)]
    kap_w = [_children(w, h_in, h_out, c) if th else None
             for w, (h_in, h_out, _, c, th, _) in zip(ws, meta, strict=True)]
    alphas = [torch.ones(meta[0][0], dtype=w0.dtype, device=w0.device)]
    for l, (h_in, h_out, _, _, _, hh) in enumerate(meta):
        alphas.append(alphas[l][_iota_mod(h_out, h_in, w0.device)[1]] * par_w[l] if hh else
                      torch.ones(h_out, dtype=w0.dtype, device=w0.device))
    betas = [torch.ones(meta[-1][1], dtype=w0.dtype, device=w0.device)]
    for l in range(n - 1, -1, -1):
        h_in, h_out, _, _, th, _ = meta[l]
        betas.append(kap_w[l] * betas[-1][_iota_mod(h_in, h_out, w0.device)[1]] if th else
                     torch.ones(h_in, dtype=w0.dtype, device=w0.device))
    betas.reverse()
    # Z needs the edge sums (column sums of x = w * g) only where the tail units are hidden;
    # elsewhere (the block's first layer) a plain total of x serves the finite check.
    inner = [l for l, m in enumerate(meta) if m[4]]
    sub_w, sub_g = [ws[l] for l in inner], [gs[l] for l in inner]
    col_sums = edge_sums(sub_w, sub_g, row_block=ROW_BLOCK) if torch.compiler.is_compiling() \
        else edge_sums(sub_w, sub_g, work)
    sums: list[torch.Tensor | None] = [None] * n
    for l, col in zip(inner, col_sums, strict=True):
        sums[l] = col
    totals = [col.sum() for col in col_sums]
    totals += [_total(ws[l], gs[l]) for l, m in enumerate(meta) if not m[4]]
    totals = torch.stack(totals + [gb.sum() for gb in gbs if gb is not None])
    routes = torch.cat(alphas + betas)
    ok = torch.isfinite(totals).all() & torch.isfinite(routes).all() & (routes != 0).all()

    Z: list[torch.Tensor | None] = [None] * (n + 1)
    for l in range(n - 1, 0, -1):
        h_in, h_out, _, c, _, hh = meta[l]
        z = sums[l] - kap_w[l] * _children(gs[l], h_in, h_out, c)
        if hh:  # kappa(a) = pi(a mod h_out) passes Z of that head on to a
            a, head = _iota_mod(h_in, h_out, w0.device)
            unlinked = _static(("unlinked", h_in, h_out, w0.device),
                               lambda a=a, head=head, h_in=h_in: head % h_in != a)
            z = z + Z[l + 1][head].masked_fill(unlinked, 0)
        Z[l] = z

    rho = torch.ones_like(alphas[0])
    clipped = torch.zeros((), dtype=torch.long, device=w0.device)
    inv_rhos: list[torch.Tensor] = []
    ratios: list[torch.Tensor | None] = []
    carrier_bufs: list[torch.Tensor | None] = []
    for l, (h_in, h_out, _, c, th, hh) in enumerate(meta):
        inv_rhos.append(rho.reciprocal())
        if not hh:
            ratios.append(None)
            carrier_bufs.append(None)
            continue
        tail = _iota_mod(h_out, h_in, w0.device)[1]
        car = _is_carrier(h_in, h_out, th, w0.device)
        wc = par_w[l]
        vc = alphas[l][tail] * wc * betas[l + 1]
        dc = (wc * _parents(gs[l], h_in, h_out, c) - Z[l + 1]) / vc
        if row_scales is not None and row_scales[l] is not None:
            dc = dc * row_scales[l]
        if flags.has_wd:
            dc = dc + wd * vc
        old = None if bufs[l] is None else _parents(bufs[l], h_in, h_out, c)
        sc, bufc = _momentum(dc, old, hp, flags)
        not_car = _static(("not carrier", h_in, h_out, th, w0.device), lambda car=car: ~car)
        ratio, n_clipped = clamp_ratio((1 - lr * sc / vc).masked_fill(not_car, 1), max_ratio)
        clipped = clipped + n_clipped
        ratios.append(ratio)
        carrier_bufs.append(None if bufc is None else bufc.masked_fill(not_car, 0))
        rho = torch.where(car, ratio, rho[tail])
    return Plan(ok, clipped, [a.reciprocal() for a in alphas], [b.reciprocal() for b in betas],
                inv_rhos, ratios, carrier_bufs)


def _total(w: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """sum of w * g over a whole layer: one contiguous pass (a BLAS dot eagerly), finite iff
    every weight and gradient of the layer is (0 * inf and inf - inf give NaN)."""
    if torch.compiler.is_compiling():
        return (w * g).sum()
    return torch.dot(w.reshape(-1), g.reshape(-1))


def _bias_update(b: torch.Tensor, gb: torch.Tensor, bias_buf: torch.Tensor | None,
                 inv_beta: torch.Tensor, hp: Hyper, flags: StepFlags,
                 row_scale: torch.Tensor | None, gate: torch.Tensor | None = None) -> None:
    """Bias of node b, an edge from a bias node (rho = 1, v = b * beta): b -= lr * s / beta.
    Nothing changes unless ``gate`` (when given) is true."""
    lr, wd = hp[0], hp[3]
    db = gb * inv_beta
    if row_scale is not None:
        db = db * row_scale
    if flags.has_wd:
        db = db + wd * b / inv_beta
    sb, new_bb = _momentum(db, bias_buf, hp, flags)
    if gate is None:
        if new_bb is not None:
            bias_buf.copy_(new_bb)
        b.sub_(lr * sb * inv_beta)
        return
    if new_bb is not None:
        bias_buf.copy_(torch.where(gate, new_bb, bias_buf))
    b.copy_(torch.where(gate, b - lr * sb * inv_beta, b))


def block_apply_masked(ws: list[torch.Tensor], gs: list[torch.Tensor],
                       bs: list[torch.Tensor | None], gbs: list[torch.Tensor | None],
                       bufs: list[torch.Tensor | None], bias_bufs: list[torch.Tensor | None],
                       meta: Meta, plan: Plan, hp: Hyper, flags: StepFlags,
                       row_scales: list[torch.Tensor | None] | None = None,
                       gate: torch.Tensor | None = None) -> None:
    """Phase B with the frozen and carrier edges selected by predicates (the compile form).

    Each layer is ONE pointwise map reading w, g, buf and writing w, buf:

        w'   = w                                         frozen kappa(a) = (a mod h_out, a)
        w'   = w * R(b) / rho(tail)                      carrier pi(b) = (b, b mod h_in)
        w'   = (w - lr * s / c) / rho(tail)              every other edge
        buf' = 0 | carrier buffer(b) | mu * buf + (1 - dampening) * d   (same cases)

    Eagerly this materialises masks and temporaries; compiled it is one fused kernel per layer.
    With ``gate`` (a boolean scalar) every value is written back unchanged unless it is true.
    """
    inv_alphas, inv_betas, inv_rhos = plan.inv_alphas, plan.inv_betas, plan.inv_rhos
    ratios, carrier_bufs = plan.ratios, plan.carrier_bufs
    lr, mu, damp, wd = hp[0], hp[1], hp[2], hp[3]
    for l, (w, g) in enumerate(zip(ws, gs, strict=True)):
        h_in, h_out, taps, c, th, hh = meta[l]
        buf = bufs[l]
        row_scale = None if row_scales is None else row_scales[l]
        o = torch.arange(h_out, device=w.device)[:, None, None]
        i = torch.arange(h_in, device=w.device)[None, :, None]
        centre = torch.arange(taps, device=w.device)[None, None, :] == c
        inv_c = inv_betas[l + 1][:, None, None] * inv_alphas[l][None, :, None]
        d = g * inv_c
        if row_scale is not None:
            d = d * row_scale[:, None, None]
        if flags.has_wd:
            d = d + wd * w / inv_c
        new_buf = None if buf is None else mu * buf + (1 - damp) * d
        s = d if buf is None else (d + mu * new_buf if flags.nesterov else new_buf)
        new_w = w - lr * s * inv_c
        if hh:
            car = _is_carrier(h_in, h_out, th, w.device)[:, None, None] & (o % h_in == i) & centre
            new_w = torch.where(car, w * ratios[l][:, None, None], new_w)
            if buf is not None:
                new_buf = torch.where(car, carrier_bufs[l][:, None, None], new_buf)
        new_w = new_w * inv_rhos[l][None, :, None]
        if th:
            frozen = (i % h_out == o) & centre
            new_w = torch.where(frozen, w, new_w)
            if buf is not None:
                new_buf = torch.where(frozen, 0, new_buf)
        if gate is not None:
            new_w = torch.where(gate, new_w, w)
            new_buf = None if buf is None else torch.where(gate, new_buf, buf)
        w.copy_(new_w)
        if buf is not None:
            buf.copy_(new_buf)
        if bs[l] is not None:
            _bias_update(bs[l], gbs[l], bias_bufs[l], inv_betas[l + 1], hp, flags, row_scale,
                         gate)


def fused_step(blocks: list[tuple], plain_grads: list[torch.Tensor],
               gate: torch.Tensor | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A whole G-SGD step of several blocks as ONE function (the torch.compile form).

    ``blocks``: per block ``(ws, gs, bs, gbs, bufs, bias_bufs, meta, hp, flags, row_scales)``.
    Plans every block, then ``ok`` = every plan ok, every plain-SGD gradient finite (and
    ``gate``), then the dense passes of all blocks, which change nothing unless ``ok``: a step
    with a non-finite value anywhere leaves every block as it was. Returns (ok, clip counts).
    """
    plans = [block_plan(ws, gs, gbs, bufs, meta, hp, flags, rs)
             for ws, gs, bs, gbs, bufs, bias_bufs, meta, hp, flags, rs in blocks]
    flags_ok = [plan.ok for plan in plans] + [torch.isfinite(g.sum()) for g in plain_grads]
    if gate is not None:
        flags_ok.append(gate)
    ok = torch.stack(flags_ok).all()
    for (ws, gs, bs, gbs, bufs, bias_bufs, meta, hp, flags, rs), plan in zip(blocks, plans,
                                                                           strict=True):
        block_apply_masked(ws, gs, bs, gbs, bufs, bias_bufs, meta, plan, hp, flags, rs, ok)
    return ok, [plan.clipped for plan in plans]


def dense_update_inplace(w: torch.Tensor, g: torch.Tensor, buf: torch.Tensor | None,
                         inv_alpha: torch.Tensor, inv_beta: torch.Tensor, inv_rho: torch.Tensor,
                         hp: Hyper, flags: StepFlags,
                         row_scale: torch.Tensor | None = None,
                         scratch: torch.Tensor | None = None) -> None:
    """The non-carrier update of phase B for a layer as an ``(out, in * taps)`` matrix, in place.

    ``inv_alpha`` and ``inv_rho`` are per column (tail units repeated over their taps),
    ``inv_beta`` per row; ``hp`` = [lr, momentum, dampening, weight_decay, max_ratio].
    ``row_scale`` multiplies the G-space gradient of each row (batchnorm="approximate" only).

    With momentum (no nesterov, no row scale) it allocates nothing: 1/c goes into ``scratch``
    (a reusable weight-shaped work tensor, not optimizer state) and the G-space direction goes
    straight into the momentum buffer. Fresh weight-sized temporaries cost page faults that
    made each pass several times slower than an in-place one.
    """
    lr, mu, damp, wd, _ = _numbers(hp)
    inv_c = torch.outer(inv_beta, inv_alpha, out=scratch) if scratch is not None \
        else torch.outer(inv_beta, inv_alpha)
    if buf is not None and row_scale is None and not flags.nesterov:
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
            buf.mul_(mu).add_(d, alpha=1 - damp)
            s = d.add_(buf, alpha=mu) if flags.nesterov else buf
    inv_c.mul_(inv_rho[None, :])
    w.mul_(inv_rho[None, :])
    w.addcmul_(s, inv_c, value=-lr)


def block_apply_eager(ws: list[torch.Tensor], gs: list[torch.Tensor],
                      bs: list[torch.Tensor | None], gbs: list[torch.Tensor | None],
                      bufs: list[torch.Tensor | None], bias_bufs: list[torch.Tensor | None],
                      meta: Meta, plan: Plan, hp: Hyper, flags: StepFlags,
                      row_scales: list[torch.Tensor | None] | None = None,
                      scratch: Callable[[int, int], torch.Tensor | None] | None = None) -> None:
    """Phase B for eager mode: :func:`dense_update_inplace` on every edge, then O(H) scatters
    write the carriers (w * R / rho(tail)) and restore the frozen edges (old w, zero buffer).
    ``scratch(rows, cols)`` hands the dense pass a reusable work tensor."""
    hp = _numbers(hp)
    inv_alphas, inv_betas, inv_rhos = plan.inv_alphas, plan.inv_betas, plan.inv_rhos
    ratios, carrier_bufs = plan.ratios, plan.carrier_bufs
    for l, (w, g) in enumerate(zip(ws, gs, strict=True)):
        h_in, h_out, taps, c, th, hh = meta[l]
        buf = bufs[l]
        row_scale = None if row_scales is None else row_scales[l]
        wf = w.view(-1)
        bf = None if buf is None else buf.view(-1)
        kap = _child_index(h_in, h_out, taps, c, w.device) if th else None
        par = _parent_index(h_in, h_out, taps, c, w.device) if hh else None
        frozen_w = wf[kap] if th else None
        if hh:
            new_par = wf[par] * ratios[l] * inv_rhos[l][_iota_mod(h_out, h_in, w.device)[1]]
        dense_update_inplace(w.view(h_out, -1), g.reshape(h_out, -1),
                             None if buf is None else buf.view(h_out, -1),
                             _per_tap(inv_alphas[l], taps), inv_betas[l + 1],
                             _per_tap(inv_rhos[l], taps), hp, flags, row_scale,
                             *(() if scratch is None else (scratch(h_out, h_in * taps),)))
        if hh:  # all parent edges; those that are frozen are restored just below
            wf[par] = new_par
            if bf is not None:
                bf[par] = carrier_bufs[l]
        if th:
            wf[kap] = frozen_w
            if bf is not None:
                bf[kap] = 0
        if bs[l] is not None:
            _bias_update(bs[l], gbs[l], bias_bufs[l], inv_betas[l + 1], hp, flags, row_scale)


def _per_tap(v: torch.Tensor, taps: int) -> torch.Tensor:
    """A per-tail-unit vector expanded to the ``in * taps`` columns of the matrix view."""
    return v if taps == 1 else v.repeat_interleave(taps)


_COMPILED: dict[tuple, Callable] = {}

#: compile=True takes the whole step as ONE single-threaded graph when every G-block layer has
#: fewer weights than this: the O(H) work is many tiny loops, thread barriers between them cost
#: more than the loops, and one graph call costs less than two per block. Larger layers get a
#: plan graph and an apply graph per block (2 threads): in one graph inductor recomputes the
#: plan's gathers inside the weight-sized loops (3.1 ms against 1.8 ms on a 784-512x3-10 MLP).
SMALL_LAYER = 1 << 17


class _TensorSlot:
    """Marks where a tensor stood in a call's arguments."""

    def __repr__(self) -> str:
        return "<tensor>"


_SLOT = _TensorSlot()


@dataclass(frozen=True)
class _Seq:
    """A list, tuple or named tuple (its type kept) in a call's structure."""

    kind: type
    items: tuple


def _flatten(x: object, tensors: list[torch.Tensor]) -> object:
    """The structure of ``x`` (hashable), its tensors appended to ``tensors`` in order."""
    if isinstance(x, torch.Tensor):
        tensors.append(x)
        return _SLOT
    if isinstance(x, (list, tuple)):
        return _Seq(type(x), tuple(_flatten(item, tensors) for item in x))
    return x  # None, numbers, bools, StepFlags: part of the structure


def _unflatten(structure: object, tensors) -> object:
    if structure is _SLOT:
        return next(tensors)
    if isinstance(structure, _Seq):
        items = [_unflatten(item, tensors) for item in structure.items]
        kind = structure.kind
        return kind(items) if kind in (list, tuple) else kind(*items)
    return structure


class _FlatCompiled:
    """``fn`` compiled with the TENSORS of its arguments as the graph's only inputs.

    The rest of the arguments (lists, None, the static ``meta`` and ``flags``) is the structure
    of the call: one compiled graph per structure, which it closes over as constants. Guards
    then check a flat tuple of tensors instead of nested lists and dataclasses, which cut the
    per-call cost of a graph from ~310 to ~165 us on the small MLP.
    """

    def __init__(self, fn: Callable, threads: int) -> None:
        self.fn, self.threads = fn, threads
        self.graphs: dict[object, Callable] = {}

    def __call__(self, *args):
        tensors: list[torch.Tensor] = []
        structure = _flatten(args, tensors)
        graph = self.graphs.get(structure)
        if graph is None:
            graph = self.graphs[structure] = self._compile(structure)
        return graph(*tensors)

    def _compile(self, structure: object) -> Callable:
        import torch._dynamo

        limit = torch._dynamo.config.recompile_limit
        torch._dynamo.config.recompile_limit = max(limit, 256)
        fn = self.fn

        def graph(*tensors):
            return fn(*_unflatten(structure, iter(tensors)))

        graph.__name__ = f"gsgd_{fn.__name__}"
        options = {"cpp.threads": self.threads} if self.threads >= 1 else None
        return torch.compile(graph, dynamic=False, options=options)


def _compiled(fn: Callable, threads: int = -1) -> Callable:
    """``fn`` compiled by torch.compile (lazily, once per process and call structure; static
    shapes), taking the same arguments as ``fn``. ``threads`` >= 1 fixes the kernels' thread
    count (inductor's ``cpp.threads``)."""
    key = (fn.__name__, threads)
    if key not in _COMPILED:
        _COMPILED[key] = _FlatCompiled(fn, threads)
    return _COMPILED[key]


def compiled_step() -> Callable:
    """:func:`fused_step` compiled: one graph call per optimizer step, single-threaded kernels
    (for layers smaller than SMALL_LAYER)."""
    return _compiled(fused_step, 1)


def compiled_block_plan() -> Callable:
    """:func:`block_plan` compiled (for blocks too large for :func:`compiled_step`)."""
    return _compiled(block_plan)


def compiled_block_apply() -> Callable:
    """:func:`block_apply_masked` compiled: one pointwise kernel per layer. A graph of its own,
    so that inductor reads the plan's vectors instead of recomputing them (gathers, clamps)
    inside the weight-sized loop, which made one whole-step graph 2x slower on large blocks."""
    return _compiled(block_apply_masked)
