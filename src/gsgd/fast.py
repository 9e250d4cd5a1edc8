"""The fast G-SGD step: :func:`fast_step`, the one entry point the optimizer calls.

It computes what :func:`gsgd.reference.reference_step` computes (tested step by step against
it), in few memory passes, and picks its form itself, the way ``torch.optim.sgd()`` picks its
single-tensor, foreach or fused form:

- eager (``compile=False``): per block a plan (:func:`block_plan`: route products, column sums,
  carrier potentials Z, everything about the carriers, the ratios rho; O(H) besides the column
  sums) and one in-place dense pass per layer (:func:`block_apply_inplace`);
- eager and gated (``gated=True``): the plan, then :func:`block_apply_masked` eagerly, every
  write ``where(ok, new, old)`` (weight-sized temporaries: slower, but no host sync);
- compiled (``compile=True``), when every layer of the compiled blocks is small
  (< :data:`SMALL_LAYER` weights): ONE single-threaded graph for the whole step
  (:func:`fused_step`); otherwise a plan graph and an apply graph per block
  (:func:`block_apply_masked`: one pointwise kernel per layer reading w, g, buf and writing w,
  buf).

The recursions (route products, Z, rho), the momentum rule and the ratio guard are the
reference's own functions; only the column sums and the dense pass have fast forms here.

Host syncs: ``gated=False`` reads one boolean per step (is every value finite?) before writing;
``gated=True`` reads nothing: every write is ``where(ok, new, old)`` on the device.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch.optim.sgd import sgd as torch_sgd

from gsgd.basis import chain_products, children, parents
from gsgd.graphs import CompileFailed, compiled
from gsgd.reference import (
    BlockTensors,
    OptTensors,
    StepHyper,
    Tensors,
    carrier_gradient,
    carrier_potentials,
    carrier_ratio,
    carrier_values,
    g_space_direction,
    guard_ratio,
    momentum_step,
    node_ratios,
)

__all__ = ["BlockStep", "CompileFailed", "PlainStep", "StepOutcome", "fast_step"]

#: rows summed per block by the compiled column sums (see :func:`column_sums`)
ROW_BLOCK = 8

#: compile=True takes the whole step as ONE single-threaded graph when every G-block layer has
#: fewer weights than this; larger layers get a plan graph and an apply graph per block (see
#: benchmarks/README.md for the measurements behind the choice).
SMALL_LAYER = 1 << 17

#: reusable work matrices: work(rows, cols, like) -> an empty (rows, cols) tensor like ``like``
Work = Callable[[int, int, torch.Tensor], torch.Tensor]


class Numbers(NamedTuple):
    """The numeric hyper-parameters of a step: floats eagerly; in a graph, 0-d tensors (a
    graph takes them as ONE 1-d tensor, so a schedule never triggers a recompile)."""

    lr: float | torch.Tensor
    momentum: float | torch.Tensor
    dampening: float | torch.Tensor
    weight_decay: float | torch.Tensor
    max_ratio: float | torch.Tensor


#: what the phase functions take: Numbers, or their 1-d tensor in a graph
Hyper = Numbers | torch.Tensor


def _numbers(hp: Hyper) -> Numbers:
    return hp if isinstance(hp, Numbers) else Numbers(*hp.unbind())


class StepFlags(NamedTuple):
    """The structural choices of a step (static for a compiled graph)."""

    nesterov: bool
    has_wd: bool


class BlockStep(NamedTuple):
    """One block's work in a step: its tensors, its group's hyper-parameters, whether this is
    the first momentum step and whether to compile. Unlike the reference (None entries on the
    first step), the fast step writes into existing buffers: with momentum, ``tensors.buffers``
    are tensors, fresh zeros on the first step (``first=True`` makes buf' = d)."""

    tensors: BlockTensors
    hyper: StepHyper
    first: bool = False
    compile: bool = False


class PlainStep(NamedTuple):
    """Parameters outside every G-block, one param group's: plain torch SGD. ``buffers``
    (None without momentum) is filled in place with new buffers where an entry is None."""

    params: Tensors
    grads: Tensors
    buffers: OptTensors | None
    hyper: StepHyper


class StepOutcome(NamedTuple):
    """``taken``: a bool (``gated=False``) or a 0-d device bool (``gated=True``); ``clipped``:
    per block, the carrier ratios the guard changed in a taken step (0-d device tensors);
    ``compile_error``: set when a graph failed to compile and its block ran eagerly;
    ``clipped_total``: with ``gated=False``, the changed ratios of all blocks (read with the
    step's one host sync)."""

    taken: bool | torch.Tensor
    clipped: Tensors
    compile_error: str | None = None
    clipped_total: int | None = None


# --------------------------------------------------------------------------------------------
# Phase A: the plan of a block (reads only)
# --------------------------------------------------------------------------------------------

class Plan(NamedTuple):
    """Everything the dense pass of a block needs, all O(H) vectors (a tuple: a compiled graph
    can return it). ``ratios[l]`` (per head; 1 where pi(b) is not a carrier) and
    ``carrier_bufs[l]`` are None unless the heads of layer l are hidden; ``inv_rhos[l]`` is
    1 / rho per tail unit; ``inv_alphas`` / ``inv_betas`` are 1 / alpha and 1 / beta per node
    layer (inverted once, so the weight-sized pass only multiplies)."""

    ok: torch.Tensor
    clipped: torch.Tensor
    inv_alphas: Tensors
    inv_betas: Tensors
    inv_rhos: Tensors
    ratios: OptTensors
    carrier_bufs: OptTensors


def column_sums(weights: Tensors, grads: Tensors, work: Work | None = None,
                row_block: int | None = None) -> Tensors:
    """The fast form of :func:`gsgd.reference.edge_sums`: sum over (out, taps) of w * g.

    Computed from the last layer to the first (the first layers, updated first, stay in cache).
    ``work(rows, cols, like)`` hands out a reusable matrix for the products (eager: no fresh
    weight-sized memory); ``row_block`` (torch.compile) sums blocks of that many rows first, so
    that inductor's column sum keeps that many row streams in flight.
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
            col = torch.mul(w2, g2, out=work(out, h_in * taps, w)).sum(0)
        sums.append(col if taps == 1 else col.view(h_in, taps).sum(-1))
    return sums[::-1]


def _total(w: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """sum of w * g over a layer: finite iff every weight and gradient is (one contiguous pass,
    a BLAS dot eagerly)."""
    if torch.compiler.is_compiling():
        return (w * g).sum()
    return torch.dot(w.reshape(-1), g.reshape(-1))


def block_plan(t: BlockTensors, hp: Hyper, flags: StepFlags, work: Work | None = None) -> Plan:
    """Phase A of one block (reads only), with the reference's recursions:

        alpha, beta = route_products(w)                  Z = carrier_potentials(sums, x_kappa)
        carrier pi(b):  d = (x - Z(b)) / v (* row scale) + wd * v,  s by momentum_step,
                        R = guard_ratio(1 - lr * s / v)
        rho = node_ratios(R)

    ``ok``: every weight and gradient finite, every designated route finite and non-zero.
    """
    routes, ws, gs, gbs = t.routes, t.weights, t.grads, t.bias_grads
    n = _numbers(hp)
    par_w = [parents(w, r) if r.head_hidden else None for w, r in zip(ws, routes, strict=True)]
    kap_w = [children(w, r) if r.tail_hidden else None for w, r in zip(ws, routes, strict=True)]
    alphas, betas = chain_products(par_w, kap_w, routes, ws[0])
    # Z needs column sums only where the tail units are hidden; the first layer's total serves
    # the finite check.
    inner = [l for l, r in enumerate(routes) if r.tail_hidden]
    sub_w, sub_g = [ws[l] for l in inner], [gs[l] for l in inner]
    compiling = torch.compiler.is_compiling()
    cols = column_sums(sub_w, sub_g, row_block=ROW_BLOCK) if compiling \
        else column_sums(sub_w, sub_g, work)
    sums: OptTensors = [None] * len(routes)
    for l, col in zip(inner, cols, strict=True):
        sums[l] = col
    totals = [col.sum() for col in cols]
    totals += [_total(ws[l], gs[l]) for l, r in enumerate(routes) if not r.tail_hidden]
    totals = torch.stack(totals + [gb.sum() for gb in gbs if gb is not None])
    route_values = torch.cat(alphas + betas)
    ok = torch.isfinite(totals).all() & torch.isfinite(route_values).all() \
        & (route_values != 0).all()
    child_x = [kw * children(g, r) if r.tail_hidden else None
               for kw, g, r in zip(kap_w, gs, routes, strict=True)]
    Z = carrier_potentials(sums, child_x, routes)

    changed: Tensors = []
    ratios: OptTensors = []
    carrier_bufs: OptTensors = []
    for l, (w, g, r) in enumerate(zip(ws, gs, routes, strict=True)):
        if not r.head_hidden:
            ratios.append(None)
            carrier_bufs.append(None)
            continue
        car = r.carriers(w.device)
        vc = carrier_values(par_w[l], alphas[l], betas[l + 1], r)
        dc = carrier_gradient(par_w[l] * parents(g, r), Z[l + 1], vc)
        dc = g_space_direction(dc, None if t.row_scales is None else t.row_scales[l],
                               n.weight_decay if flags.has_wd else None, vc)
        old = None if t.buffers is None else parents(t.buffers[l], r)
        sc, bufc = (dc, None) if old is None else momentum_step(dc, old, n.momentum,
                                                                n.dampening, flags.nesterov)
        ratio, mask = guard_ratio(carrier_ratio(n.lr, sc, vc, car), n.max_ratio)
        changed.append(mask)
        ratios.append(ratio)
        carrier_bufs.append(None if bufc is None else torch.where(car, bufc, 0.0))
    inv_rhos = [rho.reciprocal() for rho in node_ratios(ratios, routes, ws[0])]
    clipped = torch.cat(changed).sum() if changed else \
        torch.zeros((), dtype=torch.long, device=ws[0].device)
    return Plan(ok, clipped, [a.reciprocal() for a in alphas], [b.reciprocal() for b in betas],
                inv_rhos, ratios, carrier_bufs)


# --------------------------------------------------------------------------------------------
# Phase B: the dense pass of a block
# --------------------------------------------------------------------------------------------

def _bias_update(b: torch.Tensor, gb: torch.Tensor, bias_buf: torch.Tensor | None,
                 inv_beta: torch.Tensor, hp: Hyper, flags: StepFlags,
                 row_scale: torch.Tensor | None, gate: torch.Tensor | None = None) -> None:
    """Bias of node b (an edge from a bias node: rho = 1, v = b * beta): b -= lr * s / beta.
    Nothing changes unless ``gate`` (when given) is true."""
    n = _numbers(hp)
    lr = n.lr
    db = g_space_direction(gb * inv_beta, row_scale, n.weight_decay if flags.has_wd else None,
                           b / inv_beta if flags.has_wd else None)
    sb, new_bb = (db, None) if bias_buf is None else momentum_step(db, bias_buf, n.momentum,
                                                                   n.dampening, flags.nesterov)
    if gate is None:
        if new_bb is not None:
            bias_buf.copy_(new_bb)
        b.sub_(lr * sb * inv_beta)
        return
    if new_bb is not None:
        bias_buf.copy_(torch.where(gate, new_bb, bias_buf))
    b.copy_(torch.where(gate, b - lr * sb * inv_beta, b))


def _layer_tensors(t: BlockTensors, l: int
                   ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(buffer, bias buffer, row scale) of layer l (None where absent)."""
    buf = None if t.buffers is None else t.buffers[l]
    bias_buf = None if t.bias_buffers is None else t.bias_buffers[l]
    row_scale = None if t.row_scales is None else t.row_scales[l]
    return buf, bias_buf, row_scale


def block_apply_masked(t: BlockTensors, plan: Plan, hp: Hyper, flags: StepFlags,
                       gate: torch.Tensor | None = None) -> None:
    """Phase B with the frozen and carrier edges selected by predicates (the compile form, and
    the eager form of a gated step). Each layer is ONE pointwise map reading w, g, buf:

        w'   = w                                         frozen kappa(a) = (a mod h_out, a)
        w'   = w * R(b) / rho(tail)                      carrier pi(b) = (b, b mod h_in)
        w'   = (w - lr * s / c) / rho(tail)              every other edge
        buf' = 0 | carrier buffer(b) | momentum_step(d, buf)   (same cases)

    With ``gate`` (a 0-d bool) every value is written back unchanged unless it is true.
    """
    n = _numbers(hp)
    for l, (w, g, r) in enumerate(zip(t.weights, t.grads, t.routes, strict=True)):
        buf, bias_buf, row_scale = _layer_tensors(t, l)
        dev = w.device
        o = r.heads(dev)[:, None, None]
        i = r.tails(dev)[None, :, None]
        centre = torch.arange(r.taps, device=dev)[None, None, :] == r.centre
        inv_c = plan.inv_betas[l + 1][:, None, None] * plan.inv_alphas[l][None, :, None]
        d = g_space_direction(g * inv_c, None if row_scale is None else row_scale[:, None, None],
                              n.weight_decay if flags.has_wd else None,
                              w / inv_c if flags.has_wd else None)
        s, new_buf = (d, None) if buf is None else momentum_step(d, buf, n.momentum,
                                                                 n.dampening, flags.nesterov)
        new_w = w - n.lr * s * inv_c
        if r.head_hidden:
            car = r.carriers(dev)[:, None, None] & (r.parent_tail(o) == i) & centre
            new_w = torch.where(car, w * plan.ratios[l][:, None, None], new_w)
            if buf is not None:
                new_buf = torch.where(car, plan.carrier_bufs[l][:, None, None], new_buf)
        new_w = new_w * plan.inv_rhos[l][None, :, None]
        if r.tail_hidden:
            frozen = (r.child_head(i) == o) & centre
            new_w = torch.where(frozen, w, new_w)
            if buf is not None:
                new_buf = torch.where(frozen, 0.0, new_buf)
        if gate is not None:
            new_w = torch.where(gate, new_w, w)
            new_buf = None if buf is None else torch.where(gate, new_buf, buf)
        w.copy_(new_w)
        if buf is not None:
            buf.copy_(new_buf)
        if t.biases[l] is not None:
            _bias_update(t.biases[l], t.bias_grads[l], bias_buf, plan.inv_betas[l + 1], hp,
                         flags, row_scale, gate)


def dense_update_inplace(w: torch.Tensor, g: torch.Tensor, buf: torch.Tensor | None,
                         inv_alpha: torch.Tensor, inv_beta: torch.Tensor, inv_rho: torch.Tensor,
                         hp: Numbers, flags: StepFlags, row_scale: torch.Tensor | None = None,
                         scratch: torch.Tensor | None = None) -> None:
    """The non-carrier update of phase B on an ``(out, in * taps)`` matrix, in place:

        d = g / c (* row scale) + wd * c * w,  s, buf = momentum_step(d, buf),
        w = (w - lr * s / c) / rho(tail)

    (:func:`gsgd.reference.g_space_direction` and :func:`gsgd.reference.momentum_step` in
    in-place form). ``inv_alpha`` / ``inv_rho`` are per column (tail units repeated over their
    taps), ``inv_beta`` per row. With momentum (no nesterov, no row scale) it allocates
    nothing: 1/c goes into ``scratch`` (a reusable work tensor, not state) and d straight into
    the buffer.
    """
    lr, mu, damp, wd = hp.lr, hp.momentum, hp.dampening, hp.weight_decay
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


def block_apply_inplace(t: BlockTensors, plan: Plan, hp: Numbers, flags: StepFlags,
                        scratch: Work | None = None) -> None:
    """Phase B eagerly: :func:`dense_update_inplace` on every edge, then O(H) scatters write
    the carriers (w * R / rho(tail)) and restore the frozen edges (old w, zero buffer)."""
    for l, (w, g, r) in enumerate(zip(t.weights, t.grads, t.routes, strict=True)):
        buf, bias_buf, row_scale = _layer_tensors(t, l)
        dev = w.device
        wf = w.view(-1)
        bf = None if buf is None else buf.view(-1)
        frozen_w = children(w, r) if r.tail_hidden else None
        if r.head_hidden:
            new_par = parents(w, r) * plan.ratios[l] * plan.inv_rhos[l][r.parent_tails(dev)]
        dense_update_inplace(w.view(r.h_out, -1), g.reshape(r.h_out, -1),
                             None if buf is None else buf.view(r.h_out, -1),
                             _per_tap(plan.inv_alphas[l], r.taps), plan.inv_betas[l + 1],
                             _per_tap(plan.inv_rhos[l], r.taps), hp, flags, row_scale,
                             None if scratch is None else scratch(r.h_out, r.h_in * r.taps, w))
        if r.head_hidden:  # every parent edge; the frozen ones are restored just below
            wf[r.parent_flat(dev)] = new_par
            if bf is not None:
                bf[r.parent_flat(dev)] = plan.carrier_bufs[l]
        if r.tail_hidden:
            wf[r.child_flat(dev)] = frozen_w
            if bf is not None:
                bf[r.child_flat(dev)] = 0
        if t.biases[l] is not None:
            _bias_update(t.biases[l], t.bias_grads[l], bias_buf, plan.inv_betas[l + 1], hp,
                         flags, row_scale)


def _per_tap(v: torch.Tensor, taps: int) -> torch.Tensor:
    """A per-tail-unit vector expanded to the ``in * taps`` columns of the matrix view."""
    return v if taps == 1 else v.repeat_interleave(taps)


# --------------------------------------------------------------------------------------------
# The whole step as one function (the one-graph compiled form)
# --------------------------------------------------------------------------------------------

def fused_step(blocks: list[tuple[BlockTensors, Hyper, StepFlags]], plain_grads: Tensors,
               gate: torch.Tensor | None = None) -> tuple[torch.Tensor, Tensors]:
    """Plans every block; ``ok`` = every plan ok, every plain gradient finite (and ``gate``);
    then the dense passes of all blocks, which change nothing unless ``ok``.
    Returns (ok, clip counts)."""
    plans = [block_plan(t, hp, flags) for t, hp, flags in blocks]
    oks = [plan.ok for plan in plans] + [torch.isfinite(g.sum()) for g in plain_grads]
    if gate is not None:
        oks.append(gate)
    ok = torch.stack(oks).all()
    for (t, hp, flags), plan in zip(blocks, plans, strict=True):
        block_apply_masked(t, plan, hp, flags, ok)
    return ok, [plan.clipped for plan in plans]


# --------------------------------------------------------------------------------------------
# The entry point
# --------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=64)
def _hyper_tensor(values: tuple[float, ...], dtype: torch.dtype,
                  device: torch.device) -> torch.Tensor:
    """The numeric hyper-parameters as one tensor, so a schedule never triggers a recompile."""
    return torch.tensor(values, dtype=dtype, device=device)


def _hyper(step: BlockStep) -> tuple[Hyper, StepFlags]:
    """(numbers, static flags) of a block step: floats eagerly, a tensor for a graph. On the
    first momentum step dampening is 0 (the zero buffer then becomes d). A tensor lr is read
    on the host here (a sync)."""
    h = step.hyper
    values = Numbers(float(h.lr), float(h.momentum), 0.0 if step.first else float(h.dampening),
                     float(h.weight_decay), float(h.max_ratio))
    flags = StepFlags(bool(h.nesterov), bool(h.weight_decay))
    if not step.compile:
        return values, flags
    w = step.tensors.weights[0]
    # at least float32: bf16 / fp16 weights must not round lr or momentum (0.9 -> 0.8984375)
    dtype = w.dtype if w.dtype == torch.float64 else torch.float32
    return _hyper_tensor(values, dtype, w.device), flags


def _largest_layer(step: BlockStep) -> int:
    return max(w.numel() for w in step.tensors.weights)


def fast_step(blocks: Sequence[BlockStep], plain: Sequence[PlainStep], *, gated: bool,
              work: Work | None = None) -> StepOutcome:
    """One G-SGD step of every block (and plain SGD of ``plain``), all or nothing.

    ``gated=False``: plans, ONE host sync (all finite?), then in-place writes; a refused step
    writes nothing and returns ``taken=False``. ``gated=True``: no host sync; every write is
    gated on the device and ``taken`` is a 0-d device bool (a first momentum step then needs
    dampening 0, or zero buffers would be damped: the optimizer takes such steps ungated).
    ``work(rows, cols, like)`` hands the eager forms reusable matrices.

    If a graph cannot be compiled before anything is written, :class:`CompileFailed` is raised
    (the caller retries with ``compile=False``); if an apply graph fails after other blocks were
    written, that block is applied by the same function eagerly and the outcome says so.
    """
    hypers = [_hyper(b) for b in blocks]
    to_compile = [i for i, b in enumerate(blocks) if b.compile]
    one_graph = bool(to_compile) and \
        max(_largest_layer(blocks[i]) for i in to_compile) < SMALL_LAYER
    planned = [i for i, b in enumerate(blocks) if not (one_graph and b.compile)]
    plans: dict[int, Plan] = {}
    for i in planned:
        t, (hp, flags) = blocks[i].tensors, hypers[i]
        plans[i] = compiled(block_plan)(t, hp, flags) if blocks[i].compile \
            else block_plan(t, hp, flags, work)
    clipped: dict[int, torch.Tensor] = {i: plans[i].clipped for i in planned}
    oks = [plans[i].ok for i in planned]
    plain_grads = [g for p in plain for g in p.grads]
    if one_graph:  # plans, checks and writes (gated on ok) of the compiled blocks
        gate = torch.stack(oks).all() if oks else None
        args = [(blocks[i].tensors, *hypers[i]) for i in to_compile]
        ok, counts = compiled(fused_step, 1)(args, plain_grads, gate)
        clipped.update(zip(to_compile, counts, strict=True))
    else:
        oks += [torch.isfinite(g.sum()) for g in plain_grads]
        ok = torch.stack(oks).all() if oks else torch.ones((), dtype=torch.bool)
    total = None
    if not gated:  # the one host sync of the step: all finite? how many ratios changed?
        sums = [ok.long()] + list(clipped.values())
        taken, *counts_now = torch.stack(sums).tolist()
        if not taken:
            return StepOutcome(False, [])
        total = sum(counts_now)
    gate = ok if gated else None
    compile_error = None
    for i in planned:
        t, (hp, flags) = blocks[i].tensors, hypers[i]
        if blocks[i].compile:
            try:
                compiled(block_apply_masked)(t, plans[i], hp, flags, gate)
            except CompileFailed as exc:
                compile_error = str(exc)
                block_apply_masked(t, plans[i], hp, flags, gate)
        elif gated:
            block_apply_masked(t, plans[i], hp, flags, gate)
        else:
            block_apply_inplace(t, plans[i], hp, flags, work)
    for p in plain:
        _plain_sgd(p, gate)
    counts = [clipped[i] for i in range(len(blocks))]
    if gated:
        counts = [c * ok for c in counts]
    return StepOutcome(ok if gated else True, counts, compile_error, total)


def _plain_sgd(p: PlainStep, gate: torch.Tensor | None) -> None:
    """torch.optim.SGD's own update (``torch.optim.sgd.sgd``) of the plain parameters; gated:
    computed on copies and written where ``gate``."""
    h = p.hyper
    kwargs = dict(weight_decay=h.weight_decay, momentum=h.momentum, lr=h.lr,
                  dampening=h.dampening, nesterov=bool(h.nesterov), maximize=bool(h.maximize))
    bufs = p.buffers if p.buffers is not None else [None] * len(p.params)
    if gate is None:
        torch_sgd(p.params, p.grads, bufs, **kwargs)
        return
    new_params = [q.clone() for q in p.params]
    new_bufs = [None if b is None else b.clone() for b in bufs]
    torch_sgd(new_params, p.grads, new_bufs, **kwargs)
    for q, new in zip(p.params, new_params, strict=True):
        q.copy_(torch.where(gate, new, q))
    for b, new in zip(bufs, new_bufs, strict=True):
        if b is not None:
            b.copy_(torch.where(gate, new, b))
