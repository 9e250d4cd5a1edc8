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

Writes that would not be finite: besides its inputs, every plan bounds what the dense pass can
write (:func:`write_bound`, from the norms of w, g, buf and the O(H) route factors). A step
whose bound stays far below the dtype's range is written in place; one whose bound does not
(an lr / c^2 near the dtype's range) is computed out of place and its values checked first
(``gated=False``), or refused (``gated=True``, no host sync to decide with). A step whose values
would not be finite is refused like one with non-finite gradients (``StepOutcome.overflow``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch.optim.sgd import sgd as torch_sgd

from gsgd.basis import chain_products, children, parents
from gsgd.graphs import CompileFailed, compiled
from gsgd.graphs import flatten as graphs_flatten
from gsgd.reference import (
    BlockTensors,
    OptTensors,
    StepHyper,
    Tensors,
    carrier_gradient,
    carrier_logs,
    carrier_potentials,
    carrier_ratio,
    carrier_values,
    g_space_direction,
    guard_ratio,
    momentum_step,
    node_ratios,
)

__all__ = ["BlockStep", "CompileFailed", "PlainStep", "PreparedStep", "StepOutcome", "fast_step",
           "prepare_fused", "run_prepared", "step_numbers"]

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
    path_decay: float | torch.Tensor = 0.0  # bp_norm's lam_pos: L2 on the positive basis paths
    carrier_log: float | torch.Tensor = 0.0  # bp_norm's lam_neg: log|v|^2 on the carriers


#: what the phase functions take: Numbers, or their 1-d tensor in a graph
Hyper = Numbers | torch.Tensor


def _numbers(hp: Hyper) -> Numbers:
    return hp if isinstance(hp, Numbers) else Numbers(*hp.unbind())


def _decay(n: Numbers):
    """The L2 factor of the dense entries and biases (the positive basis paths): weight decay
    plus bp_norm's lam_pos (the carriers take weight decay and the log term, in the plan)."""
    return n.weight_decay + n.path_decay


class StepFlags(NamedTuple):
    """The structural choices of a step (static for a compiled graph)."""

    nesterov: bool
    has_wd: bool  # weight decay or bp_norm's lam_pos on the dense entries
    has_log: bool = False  # bp_norm's lam_neg on the carriers


class BlockStep(NamedTuple):
    """One block's work in a step: its tensors, its group's hyper-parameters, whether this is
    the first momentum step and whether to compile. Unlike the reference (None entries on the
    first step), the fast step writes into existing buffers: with momentum, ``tensors.buffers``
    are tensors, fresh zeros on the first step (``first=True`` makes buf' = d). ``carried``:
    squared bounds of |w|, |buf|, |b|, |bias buf| from the previous write (``StepOutcome.
    carried``), valid only if nothing else wrote these tensors since; None: measure them."""

    tensors: BlockTensors
    hyper: StepHyper
    first: bool = False
    compile: bool = False
    carried: torch.Tensor | None = None


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
    step's one host sync); ``overflow``: the step was refused because the values it would write
    are not finite (its inputs were); ``carried``: per block, what its next step may take as
    ``BlockStep.carried`` if nothing else writes its tensors (None: nothing to carry)."""

    taken: bool | torch.Tensor
    clipped: Tensors
    compile_error: str | None = None
    clipped_total: int | None = None
    overflow: bool = False
    carried: OptTensors | None = None


# --------------------------------------------------------------------------------------------
# Phase A: the plan of a block (reads only)
# --------------------------------------------------------------------------------------------

class Plan(NamedTuple):
    """Everything the dense pass of a block needs, all O(H) vectors (a tuple: a compiled graph
    can return it). ``ratios[l]`` (per head; 1 where pi(b) is not a carrier) and
    ``carrier_bufs[l]`` are None unless the heads of layer l are hidden; ``inv_rhos[l]`` is
    1 / rho per tail unit; ``inv_alphas`` / ``inv_betas`` are 1 / alpha and 1 / beta per node
    layer (inverted once, so the weight-sized pass only multiplies). ``safe``: the
    :func:`write_bound` of the block is far below the dtype's range (the dense pass can be
    written in place without a check of its values); with ``bound_on_host`` it is None and
    ``magnitudes`` (:func:`block_magnitudes`) is what the host decides it from. ``carry``: the
    squared bounds of the new w, buf, biases and bias buffers (:data:`CARRIED` entries), which
    the next step may take instead of their norms (None with ``bound_on_host``)."""

    ok: torch.Tensor
    safe: torch.Tensor | None
    magnitudes: torch.Tensor
    carry: torch.Tensor | None
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


class Magnitudes(NamedTuple):
    """Upper bounds on the magnitude of every entry a dense pass reads (0-d tensors, or floats
    on the host): w, g, buf (None: no momentum; L2 norms bound every entry) and the largest
    1 / c, c, 1 / rho (at least 1) and row scale."""

    w: torch.Tensor | float
    g: torch.Tensor | float
    buf: torch.Tensor | float | None
    inv_c: torch.Tensor | float
    c: torch.Tensor | float
    inv_rho: torch.Tensor | float
    row_scale: torch.Tensor | float


def _max(a, b):
    """max of two numbers (0-d tensors or floats; NaN wins, as in torch.maximum)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return torch.maximum(torch.as_tensor(a), torch.as_tensor(b))
    return a if a != a or a >= b else b


class Bound(NamedTuple):
    """What :func:`write_bound` bounds: every value computed, the new weights (or biases) and
    the new buffers (0 without momentum)."""

    top: torch.Tensor | float
    weights: torch.Tensor | float
    buffers: torch.Tensor | float


def write_bound(m: Magnitudes, hp: Hyper, flags: StepFlags, ratio=None) -> Bound:
    """A bound on |every value| the dense pass computes, by the triangle inequality:

        |d|   <= |g| / c * row_scale + wd * c * |w|
        |buf'| <= momentum * |buf| + |1 - dampening| * |d|,  |s| <= |buf'| (+ |d| + momentum |buf'|)
        |w'|  <= (|w| + lr * |s| / c) / rho,   carriers: |w| * |R| / rho,  1 / (c rho)

    with the largest 1 / c, c, 1 / rho of :class:`Magnitudes` and (for a block's weights) the
    largest carrier ratio |R| (docs/math.md section 7); frozen weights keep |w| <= |w| / rho
    (1 / rho is at least 1). Pure arithmetic: on 0-d tensors (a graph, no host sync) or on
    floats (the host)."""
    n = _numbers(hp)
    d = m.g * m.inv_c * m.row_scale
    if flags.has_wd:
        d = d + _decay(n) * m.c * m.w
    b = s = d
    if m.buf is not None:
        b = n.momentum * m.buf + abs(1 - n.dampening) * d
        s = d + n.momentum * b if flags.nesterov else b
    new_w = (m.w + n.lr * s * m.inv_c) * m.inv_rho
    if ratio is not None:
        new_w = _max(new_w, m.w * ratio * m.inv_rho)
    top = _max(_max(d, b), _max(new_w, m.inv_c * m.inv_rho))
    return Bound(top, new_w, b if m.buf is not None else 0.0 * d)


def _squares(ts: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """sum of squares of each tensor (at least float32). In a graph, summed by rows first like
    :func:`column_sums`, so that the compiler can fuse it into the same kernels."""
    if torch.compiler.is_compiling():
        out = []
        for t in ts:
            t = t.float() if t.dtype in (torch.float16, torch.bfloat16) else t
            rows = t.reshape(t.shape[0], -1) if t.dim() > 1 else t.reshape(1, -1)
            k = ROW_BLOCK if rows.shape[0] % ROW_BLOCK == 0 and rows.shape[0] > ROW_BLOCK else 1
            out.append((rows * rows).view(rows.shape[0] // k, k, -1).sum(1).sum(0).sum())
        return out
    if ts[0].dtype in (torch.float16, torch.bfloat16):
        return [t.float().square().sum() for t in ts]
    return [torch.dot(t.reshape(-1), t.reshape(-1)) for t in ts]


def _range(ts: Sequence[torch.Tensor]) -> torch.Tensor:
    """(smallest, largest) |entry| of several tensors, as one 2-vector."""
    lo, hi = torch.cat([t.reshape(-1) for t in ts]).abs().aminmax()
    return torch.stack([lo, hi])


def _limit(dtype: torch.dtype) -> float:
    """What a write bound must stay under: far inside the range of ``dtype``, so that the
    rounding of the bound's own arithmetic cannot matter."""
    return torch.finfo(dtype).max / 64


#: the entries of a block's magnitude vector (:func:`block_magnitudes`); the first four can
#: be carried over from the bound of the previous write (:data:`CARRIED`)
MAGNITUDES = ("w2", "buf2", "b2", "bb2", "g2", "gb2", "inv_alpha", "alpha_inv_min", "inv_beta",
              "beta_inv_min", "inv_beta_bias", "beta_inv_min_bias", "inv_rho", "row_scale",
              "carrier_buf", "ratio")
CARRIED = 4


def block_magnitudes(t: BlockTensors, inv_alphas: Tensors, inv_betas: Tensors,
                     inv_rhos: Tensors, carrier_bufs: OptTensors, ratios: OptTensors,
                     carried: torch.Tensor | None = None) -> torch.Tensor:
    """What the write bound of a block needs, as ONE vector (entries named by
    :data:`MAGNITUDES`): sums of squares of w, buf, the biases and their buffers (0 where
    absent; or ``carried``: squared bounds of them from the previous write), of g and of the
    bias gradients; the largest |1/alpha|, |1/beta|, |1/rho|, |row scale|, |carrier buffer|,
    |carrier ratio R| and the smallest |1/alpha|, |1/beta| (1 / the largest alpha, beta)."""
    ws = t.weights
    acc = torch.float64 if ws[0].dtype == torch.float64 else torch.float32
    zero = torch.zeros((), dtype=acc, device=ws[0].device)

    def total(ts: Sequence[torch.Tensor | None] | None) -> torch.Tensor:
        ts = [x for x in ts or [] if x is not None]
        return torch.stack(_squares(ts)).sum().to(acc) if ts else zero

    a, b = _range(inv_alphas).to(acc), _range(inv_betas).to(acc)
    bias_heads = [ib for ib, bias in zip(inv_betas[1:], t.biases, strict=True) if bias is not None]
    bb = _range(bias_heads).to(acc) if bias_heads else torch.stack([zero, zero])
    scales = [r for r in (t.row_scales or []) if r is not None]
    rs = _range(scales)[1].to(acc) if scales else zero + 1
    kept = [c for c in carrier_bufs if c is not None]
    cb = _range(kept)[1].to(acc) if kept else zero
    rs_kept = [r for r in ratios if r is not None]
    top_ratio = _range(rs_kept)[1].to(acc) if rs_kept else zero
    own = [total(ws), total(t.buffers), total(t.biases), total(t.bias_buffers)] \
        if carried is None else list(carried.to(acc).unbind())
    return torch.stack(own + [total(t.grads), total(t.bias_grads), a[1], a[0], b[1], b[0],
                              bb[1], bb[0], torch.clamp(_range(inv_rhos)[1].to(acc), min=1), rs,
                              cb, top_ratio])


def magnitudes_bound(v, hp: Hyper, flags: StepFlags, has_buf: bool, has_bias: bool):
    """(the write bound of a block, the squared bounds of its new w, buf, biases and bias
    buffers: what the next step may carry) from its magnitude vector ``v`` (a tensor, or a
    list of floats on the host)."""
    e = dict(zip(MAGNITUDES, v, strict=True))
    on_device = isinstance(e["w2"], torch.Tensor)
    sqrt = (lambda x: x.sqrt()) if on_device else (lambda x: x ** 0.5)
    weights = write_bound(
        Magnitudes(sqrt(e["w2"]), sqrt(e["g2"]), sqrt(e["buf2"]) if has_buf else None,
                   e["inv_alpha"] * e["inv_beta"], 1 / (e["alpha_inv_min"] * e["beta_inv_min"]),
                   e["inv_rho"], e["row_scale"]), hp, flags, e["ratio"])
    top, new_buf = weights.top, _max(weights.buffers, e["carrier_buf"])
    new_b = new_bb = 0.0 * e["w2"]
    if has_bias:
        biases = write_bound(
            Magnitudes(sqrt(e["b2"]), sqrt(e["gb2"]), sqrt(e["bb2"]) if has_buf else None,
                       e["inv_beta_bias"], 1 / e["beta_inv_min_bias"], 1.0, e["row_scale"]),
            hp, flags)
        top, new_b, new_bb = _max(top, biases.top), biases.weights, biases.buffers
    carry = [x * x for x in (weights.weights, new_buf, new_b, new_bb)]
    return top, (torch.stack(torch.broadcast_tensors(*carry)) if on_device else carry)


def block_bound(t: BlockTensors, plan: Plan, hp: Hyper, flags: StepFlags) -> torch.Tensor:
    """A bound on |every value| the dense pass of a block computes (on the device)."""
    v = block_magnitudes(t, plan.inv_alphas, plan.inv_betas, plan.inv_rhos, plan.carrier_bufs,
                         plan.ratios)
    return magnitudes_bound(v, hp, flags, t.buffers is not None,
                            any(b is not None for b in t.biases))[0]


def block_plan(t: BlockTensors, hp: Hyper, flags: StepFlags, work: Work | None = None,
               bound_on_host: bool = False, carried: torch.Tensor | None = None) -> Plan:
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
        if flags.has_log:  # bp_norm's carrier term: d/dv of lam_neg / 2 * log|v|^2
            dc = dc + n.carrier_log * carrier_logs(par_w[l], alphas[l], betas[l + 1], r) / vc
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
    inv_alphas, inv_betas = [a.reciprocal() for a in alphas], [b.reciprocal() for b in betas]
    mags = block_magnitudes(t, inv_alphas, inv_betas, inv_rhos, carrier_bufs, ratios, carried)
    safe = carry = None
    if not bound_on_host:
        top, carry = magnitudes_bound(mags, hp, flags, t.buffers is not None,
                                      any(b is not None for b in t.biases))
        safe = top < _limit(ws[0].dtype)
    return Plan(ok, safe, mags, carry, clipped, inv_alphas, inv_betas, inv_rhos, ratios,
                carrier_bufs)


# --------------------------------------------------------------------------------------------
# Phase B: the dense pass of a block
# --------------------------------------------------------------------------------------------

def _bias_values(b: torch.Tensor, gb: torch.Tensor, bias_buf: torch.Tensor | None,
                 inv_beta: torch.Tensor, hp: Hyper, flags: StepFlags,
                 row_scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """New (bias, bias buffer) of node b (an edge from a bias node: rho = 1, v = b * beta):
    b' = b - lr * s / beta."""
    n = _numbers(hp)
    db = g_space_direction(gb * inv_beta, row_scale, _decay(n) if flags.has_wd else None,
                           b / inv_beta if flags.has_wd else None)
    sb, new_bb = (db, None) if bias_buf is None else momentum_step(db, bias_buf, n.momentum,
                                                                   n.dampening, flags.nesterov)
    return b - n.lr * sb * inv_beta, new_bb


class LayerValues(NamedTuple):
    """What the dense pass writes for one layer (None where the layer has no such tensor)."""

    weight: torch.Tensor
    buffer: torch.Tensor | None
    bias: torch.Tensor | None
    bias_buffer: torch.Tensor | None


def _write(t: BlockTensors, l: int, v: LayerValues, gate: torch.Tensor | None = None) -> None:
    """Write the values of layer l (each where ``gate``, when given)."""
    buf, bias_buf, _ = _layer_tensors(t, l)
    for dst, new in ((t.weights[l], v.weight), (buf, v.buffer), (t.biases[l], v.bias),
                     (bias_buf, v.bias_buffer)):
        if dst is not None and new is not None:
            dst.copy_(new if gate is None else torch.where(gate, new, dst))


def _layer_tensors(t: BlockTensors, l: int
                   ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(buffer, bias buffer, row scale) of layer l (None where absent)."""
    buf = None if t.buffers is None else t.buffers[l]
    bias_buf = None if t.bias_buffers is None else t.bias_buffers[l]
    row_scale = None if t.row_scales is None else t.row_scales[l]
    return buf, bias_buf, row_scale


def layer_values(t: BlockTensors, plan: Plan, hp: Hyper, flags: StepFlags,
                 l: int) -> LayerValues:
    """Phase B of layer l out of place, with the frozen and carrier edges selected by
    predicates (the compile form, the eager form of a gated step and of a checked one). ONE
    pointwise map reading w, g, buf:

        w'   = w                                         frozen kappa(a) = (a mod h_out, a)
        w'   = w * R(b) / rho(tail)                      carrier pi(b) = (b, b mod h_in)
        w'   = (w - lr * s / c) / rho(tail)              every other edge
        buf' = 0 | carrier buffer(b) | momentum_step(d, buf)   (same cases)
    """
    n = _numbers(hp)
    w, g, r = t.weights[l], t.grads[l], t.routes[l]
    buf, bias_buf, row_scale = _layer_tensors(t, l)
    dev = w.device
    o = r.heads(dev)[:, None, None]
    i = r.tails(dev)[None, :, None]
    centre = torch.arange(r.taps, device=dev)[None, None, :] == r.centre
    inv_c = plan.inv_betas[l + 1][:, None, None] * plan.inv_alphas[l][None, :, None]
    d = g_space_direction(g * inv_c, None if row_scale is None else row_scale[:, None, None],
                          _decay(n) if flags.has_wd else None,
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
    new_b = new_bb = None
    if t.biases[l] is not None:
        new_b, new_bb = _bias_values(t.biases[l], t.bias_grads[l], bias_buf,
                                     plan.inv_betas[l + 1], hp, flags, row_scale)
    return LayerValues(new_w, new_buf, new_b, new_bb)


def block_apply_masked(t: BlockTensors, plan: Plan, hp: Hyper, flags: StepFlags,
                       gate: torch.Tensor | None = None) -> None:
    """Phase B out of place (:func:`layer_values`), written layer by layer; with ``gate`` (a
    0-d bool) every value is written back unchanged unless it is true."""
    for l in range(len(t.routes)):
        _write(t, l, layer_values(t, plan, hp, flags, l), gate)


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
    lr, mu, damp, wd = hp.lr, hp.momentum, hp.dampening, _decay(hp)
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
            new_b, new_bb = _bias_values(t.biases[l], t.bias_grads[l], bias_buf,
                                         plan.inv_betas[l + 1], hp, flags, row_scale)
            t.biases[l].copy_(new_b)
            if new_bb is not None:
                bias_buf.copy_(new_bb)


def _per_tap(v: torch.Tensor, taps: int) -> torch.Tensor:
    """A per-tail-unit vector expanded to the ``in * taps`` columns of the matrix view."""
    return v if taps == 1 else v.repeat_interleave(taps)


# --------------------------------------------------------------------------------------------
# The whole step as one function (the one-graph compiled form)
# --------------------------------------------------------------------------------------------

def fused_step(blocks: list[tuple[BlockTensors, Hyper, StepFlags, torch.Tensor | None]],
               plain_grads: Tensors, gate: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, Tensors, Tensors]:
    """Plans every block; ``ok`` = every plan ok, every plain gradient finite; ``safe`` =
    every plan safe; then the dense passes of all blocks, which change nothing unless ``ok``,
    ``safe`` and ``gate`` (everything outside the graph is ok and safe).
    Returns (ok, safe, clip counts, what each block carries to the next step)."""
    plans = [block_plan(t, hp, flags, carried=c) for t, hp, flags, c in blocks]
    ok = torch.stack([plan.ok for plan in plans]
                     + [torch.isfinite(g.sum()) for g in plain_grads]).all()
    safe = torch.stack([plan.safe for plan in plans]).all()
    write = ok & safe if gate is None else ok & safe & gate
    for (t, hp, flags, _), plan in zip(blocks, plans, strict=True):
        block_apply_masked(t, plan, hp, flags, write)
    return ok, safe, [plan.clipped for plan in plans], \
        [_carry(plan, write) for plan in plans]


def _carry(plan: Plan, written: torch.Tensor | None = None) -> torch.Tensor:
    """What a block carries to the next step: the bounds of what was written, or, where the
    step was not (``written`` false), the magnitudes of the unchanged tensors."""
    if written is None:
        return plan.carry
    return torch.where(written, plan.carry, plan.magnitudes[:CARRIED])


class PreparedStep(NamedTuple):
    """A one-graph step (:func:`fused_step`, non-gated, no plain parameters) flattened once, for
    a caller that repeats it with new gradients, hyper-parameters and carried bounds: the
    graph, its flat inputs (None in those slots: no gradient is kept alive) and the slots, as
    (slot, block) and, for gradients, (slot, block, layer, 0 weight | 1 bias)."""

    graph: Callable
    inputs: tuple[torch.Tensor | None, ...]
    grad_slots: tuple[tuple[int, int, int, int], ...]
    hyper_slots: tuple[tuple[int, int], ...]
    carried_slots: tuple[tuple[int, int], ...]


def _one_graph(blocks: Sequence[BlockStep]) -> bool:
    """Does :func:`fast_step` take ``blocks`` (all compiled) as ONE graph?"""
    return max(_largest_layer(b) for b in blocks) < SMALL_LAYER


def prepare_fused(blocks: Sequence[BlockStep]) -> PreparedStep | None:
    """The flattened call of the one graph :func:`fast_step` just ran for ``blocks`` (every
    block compiled, with carried bounds, no plain parameters, not gated); None where the step
    does not take that form or its graph is not built."""
    if not blocks or not all(b.compile and b.carried is not None for b in blocks) \
            or not _one_graph(blocks):
        return None
    hypers = [_hyper(b) for b in blocks]
    found = compiled(fused_step, 1).prepared(
        [(b.tensors, *h, b.carried) for b, h in zip(blocks, hypers, strict=True)], [], None)
    if found is None:
        return None
    graph, tensors = found
    inputs: list[torch.Tensor | None] = list(tensors)
    grad_slots, hyper_slots, carried_slots = [], [], []
    start = 0
    for i, (b, (hp, _)) in enumerate(zip(blocks, hypers, strict=True)):
        mine: list[torch.Tensor] = []
        graphs_flatten((b.tensors, hp, b.carried), mine, [])
        roles = {id(g): (i, l, 0) for l, g in enumerate(b.tensors.grads)}
        roles.update({id(g): (i, l, 1) for l, g in enumerate(b.tensors.bias_grads)
                      if g is not None})
        for slot in range(start, start + len(mine)):
            t = tensors[slot]
            if id(t) in roles:
                grad_slots.append((slot, *roles[id(t)]))
                inputs[slot] = None
            elif t is hp:
                hyper_slots.append((slot, i))
                inputs[slot] = None
            elif t is b.carried:
                carried_slots.append((slot, i))
                inputs[slot] = None
        start += len(mine)
    return PreparedStep(graph, tuple(inputs), tuple(grad_slots), tuple(hyper_slots),
                        tuple(carried_slots))


def run_prepared(prep: PreparedStep, grads: Sequence[tuple[Tensors, OptTensors]],
                 hypers: Sequence[torch.Tensor], carried: Sequence[torch.Tensor]
                 ) -> StepOutcome | None:
    """The step of :func:`prepare_fused`'s graph with each block's (weight grads, bias grads)
    (``(out, in, taps)`` views), hyper tensor (:func:`step_numbers`) and carried bound: one
    host sync; None (nothing written) where the step is not finite or not bounded, for
    :func:`fast_step` to decide (it measures the norms afresh, or refuses)."""
    x = list(prep.inputs)
    for slot, i, l, kind in prep.grad_slots:
        x[slot] = grads[i][kind][l]
    for slot, i in prep.hyper_slots:
        x[slot] = hypers[i]
    for slot, i in prep.carried_slots:
        x[slot] = carried[i]
    ok, safe, counts, carries = prep.graph(*x)
    head = torch.stack([ok, safe, *counts]).tolist()
    if not (head[0] and head[1]):
        return None
    clipped = [int(c) for c in head[2:]]
    return StepOutcome(True, clipped, None, sum(clipped), carried=list(carries))


# --------------------------------------------------------------------------------------------
# The entry point
# --------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=64)
def _hyper_tensor(values: tuple[float, ...], dtype: torch.dtype,
                  device: torch.device) -> torch.Tensor:
    """The numeric hyper-parameters as one tensor, so a schedule never triggers a recompile."""
    return torch.tensor(values, dtype=dtype, device=device)


def step_numbers(h: StepHyper, first: bool, like: torch.Tensor | None = None
                 ) -> tuple[Hyper, StepFlags]:
    """(numbers, static flags) of a group's hyper-parameters: floats, or with ``like`` (a
    weight of a compiled block) one tensor on its device. On the first momentum step dampening
    is 0 (the zero buffer then becomes d). A tensor lr is read on the host here (a sync)."""
    lam_pos, lam_neg = (float(x) for x in h.bp_norm)
    values = Numbers(float(h.lr), float(h.momentum), 0.0 if first else float(h.dampening),
                     float(h.weight_decay), float(h.max_ratio), lam_pos, lam_neg)
    flags = StepFlags(bool(h.nesterov), bool(h.weight_decay or lam_pos), bool(lam_neg))
    if like is None:
        return values, flags
    # at least float32: bf16 / fp16 weights must not round lr or momentum (0.9 -> 0.8984375)
    dtype = like.dtype if like.dtype == torch.float64 else torch.float32
    return _hyper_tensor(values, dtype, like.device), flags


def _hyper(step: BlockStep) -> tuple[Hyper, StepFlags]:
    """:func:`step_numbers` of a block step: floats eagerly, a tensor for a graph."""
    return step_numbers(step.hyper, step.first,
                        step.tensors.weights[0] if step.compile else None)


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
    if gated:  # no host to retry with fresh norms if a carried bound were too loose
        blocks = [b._replace(carried=None) for b in blocks]
    else:  # a step that measures its norms (the first, one in CARRY_STEPS) runs eagerly: the
        # graphs are built for the carried form only (half the one-off compile time)
        blocks = [b._replace(compile=False) if b.compile and b.carried is None else b
                  for b in blocks]
    hypers = [_hyper(b) for b in blocks]
    to_compile = [i for i, b in enumerate(blocks) if b.compile]
    one_graph = bool(to_compile) and _one_graph([blocks[i] for i in to_compile])
    planned = [i for i, b in enumerate(blocks) if not (one_graph and b.compile)]
    # the write bounds of eager blocks and plain parameters are decided on the host, with the
    # step's one sync -- unless there is no sync (gated) or one graph needs them as its gate
    host = not gated and not one_graph
    on_host = [i for i in planned if host and not blocks[i].compile]
    plans: dict[int, Plan] = {}
    for i in planned:
        t, (hp, flags) = blocks[i].tensors, hypers[i]
        c = blocks[i].carried
        plans[i] = compiled(block_plan)(t, hp, flags, None, False, c) if blocks[i].compile \
            else block_plan(t, hp, flags, work, i in on_host, c)
    clipped: dict[int, torch.Tensor] = {i: plans[i].clipped for i in planned}
    carries: dict[int, torch.Tensor] = {}
    oks = [plans[i].ok for i in planned]
    safes = [plans[i].safe for i in planned if i not in on_host]
    plain_mags = [plain_magnitudes(p) for p in plain]
    if not host:
        safes += [plain_bound(v, p) < _limit(p.params[0].dtype)
                  for v, p in zip(plain_mags, plain, strict=True)]
    plain_grads = [g for p in plain for g in p.grads]
    if one_graph:  # plans, checks and writes (gated on everything being ok) of the compiled blocks
        gate = torch.stack(oks + safes).all() if oks or safes else None
        args = [(blocks[i].tensors, *hypers[i], blocks[i].carried) for i in to_compile]
        ok_graph, safe_graph, counts, graph_carries = compiled(fused_step, 1)(args, plain_grads,
                                                                               gate)
        clipped.update(zip(to_compile, counts, strict=True))
        carries.update(zip(to_compile, graph_carries, strict=True))
        oks.append(ok_graph)
        safes.append(safe_graph)
    else:
        oks += [torch.isfinite(g.sum()) for g in plain_grads]
    one = torch.ones((), dtype=torch.bool, device=_device(blocks, plain))
    ok = torch.stack(oks).all() if oks else one
    safe = torch.stack(safes).all() if safes else one
    total = None
    if not gated:  # the one host sync of the step: all finite? bounded? ratios changed?
        host_mags = [plans[i].magnitudes for i in on_host] + (plain_mags if host else [])
        head = torch.stack([ok, safe, *clipped.values()]).double()
        values = torch.cat([head] + [m.double() for m in host_mags]).tolist()
        taken, bounded = bool(values[0]), bool(values[1])
        counts_now = values[2:2 + len(clipped)]
        rest = values[2 + len(clipped):]
        host_carries = {}
        for i in on_host:
            v, rest = rest[:len(MAGNITUDES)], rest[len(MAGNITUDES):]
            t, (hp, flags) = blocks[i].tensors, hypers[i]
            bound, host_carries[i] = magnitudes_bound(v, hp, flags, t.buffers is not None,
                                                      any(b is not None for b in t.biases))
            bounded = bounded and _host_safe(bound, v, t.weights[0].dtype)
        for p in plain if host else []:
            v, rest = rest[:3], rest[3:]
            bounded = bounded and _host_safe(plain_bound(v, p), v, p.params[0].dtype)
        if not taken:
            return StepOutcome(False, [])
        if not bounded and any(b.carried is not None for b in blocks):
            # nothing was written: measure the norms instead of the carried bounds, and decide
            # again
            return fast_step([b._replace(carried=None) for b in blocks], plain, gated=False,
                             work=work)
        if not bounded:  # nothing was written: compute out of place, check, then write
            return checked_step(blocks, hypers, plain)
        total = int(sum(counts_now))
        for i, carry in host_carries.items():
            mags = plans[i].magnitudes
            carries[i] = torch.tensor(carry, dtype=mags.dtype, device=mags.device)
    gate = ok & safe if gated else None
    for i in planned:
        if i not in on_host:
            carries[i] = _carry(plans[i], gate)
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
        counts = [c * gate for c in counts]
    return StepOutcome(gate if gated else True, counts, compile_error, total,
                       carried=[carries.get(i) for i in range(len(blocks))])


def _device(blocks: Sequence[BlockStep], plain: Sequence[PlainStep]) -> torch.device:
    return blocks[0].tensors.weights[0].device if blocks else plain[0].params[0].device


def checked_step(blocks: Sequence[BlockStep], hypers: list[tuple[Hyper, StepFlags]],
                 plain: Sequence[PlainStep]) -> StepOutcome:
    """The step when its write bound is not small enough to write in place unchecked: every
    value computed out of place (eagerly), all checked to be finite, then written; or nothing
    written (``overflow=True``) if one is not."""
    plans = [block_plan(b.tensors, hp, flags) for b, (hp, flags) in zip(blocks, hypers,
                                                                        strict=True)]
    values = [[layer_values(b.tensors, plan, hp, flags, l) for l in range(len(b.tensors.routes))]
              for b, plan, (hp, flags) in zip(blocks, plans, hypers, strict=True)]
    plain_new = [_plain_values(p) for p in plain]
    news = [x for vs in values for v in vs for x in v if x is not None]
    news += [x for params, bufs in plain_new for x in [*params, *bufs] if x is not None]
    if news and not bool(torch.stack([torch.isfinite(x).all() for x in news]).all()):
        return StepOutcome(False, [], overflow=True)
    for b, vs in zip(blocks, values, strict=True):
        for l, v in enumerate(vs):
            _write(b.tensors, l, v)
    for p, (params, bufs) in zip(plain, plain_new, strict=True):
        _write_plain(p, params, bufs)
    counts = [plan.clipped for plan in plans]
    total = int(torch.stack(counts).sum()) if counts else 0
    return StepOutcome(True, counts, None, total, carried=[None] * len(blocks))


def plain_magnitudes(p: PlainStep) -> torch.Tensor:
    """Sums of squares of a plain-SGD parameter set, its gradients and buffers (0 if none)."""
    acc = torch.float64 if p.params[0].dtype == torch.float64 else torch.float32
    bufs = [b for b in (p.buffers or []) if b is not None]
    zero = torch.zeros((), dtype=acc, device=p.params[0].device)
    return torch.stack([torch.stack(_squares(ts)).sum().to(acc) if ts else zero
                        for ts in (p.params, p.grads, bufs)])


def plain_bound(v, p: PlainStep):
    """:func:`write_bound` of a plain-SGD parameter set (c = rho = 1) from its magnitudes."""
    h = p.hyper
    sqrt = (lambda x: x.sqrt()) if isinstance(v, torch.Tensor) else (lambda x: x ** 0.5)
    m = Magnitudes(sqrt(v[0]), sqrt(v[1]), sqrt(v[2]) if h.momentum else None, 1.0, 1.0, 1.0,
                   1.0)
    hp = Numbers(float(h.lr), float(h.momentum), float(h.dampening), float(h.weight_decay), 1.0)
    return write_bound(m, hp, StepFlags(bool(h.nesterov), bool(h.weight_decay))).top


def _host_safe(bound: float, magnitudes: Sequence[float], dtype: torch.dtype) -> bool:
    return all(math.isfinite(x) for x in magnitudes) and bound < _limit(dtype)


def _sgd_kwargs(h: StepHyper) -> dict:
    return dict(weight_decay=h.weight_decay, momentum=h.momentum, lr=h.lr,
                dampening=h.dampening, nesterov=bool(h.nesterov), maximize=bool(h.maximize))


def _plain_values(p: PlainStep) -> tuple[Tensors, OptTensors]:
    """torch.optim.SGD's own update (``torch.optim.sgd.sgd``) of the plain parameters, on
    copies: (new parameters, new buffers; None where there is no buffer to write)."""
    bufs = p.buffers if p.buffers is not None else [None] * len(p.params)
    new_params = [q.clone() for q in p.params]
    new_bufs = [None if b is None else b.clone() for b in bufs]
    torch_sgd(new_params, p.grads, new_bufs, **_sgd_kwargs(p.hyper))
    return new_params, new_bufs


def _write_plain(p: PlainStep, params: Tensors, bufs: OptTensors,
                 gate: torch.Tensor | None = None) -> None:
    """Write new plain parameters and buffers (where ``gate``, when given); a buffer torch
    SGD created for a None entry is handed over into ``p.buffers``."""
    for q, new in zip(p.params, params, strict=True):
        q.copy_(new if gate is None else torch.where(gate, new, q))
    if p.buffers is None:
        return
    for k, (b, new) in enumerate(zip(p.buffers, bufs, strict=True)):
        if b is not None:
            b.copy_(new if gate is None else torch.where(gate, new, b))
        elif gate is None:
            p.buffers[k] = new


def _plain_sgd(p: PlainStep, gate: torch.Tensor | None) -> None:
    """torch.optim.SGD's own update of the plain parameters: in place, or gated: computed on
    copies and written where ``gate``."""
    if gate is None:
        bufs = p.buffers if p.buffers is not None else [None] * len(p.params)
        torch_sgd(p.params, p.grads, bufs, **_sgd_kwargs(p.hyper))
        return
    _write_plain(p, *_plain_values(p), gate)
