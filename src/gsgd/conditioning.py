r"""PathCond: one function-preserving rescaling of a ReLU network by path conditioning.

Method of Lebeurrier, Vayer, Gribonval, "Path-conditioned training: a principled way to rescale
ReLU neural networks", arXiv 2602.19799 (2026), restated from what the authors' code computes
(github ``Artim436/pathcond``; the paper's own statement of the criterion was not read), in the
project's notation (docs/math.md section 10).

Per G-block, with the rescaling written c_u = exp(z_u / 2) (z = 0 at the block's input and output
units) and (Bz)_e = z(tail e) - z(head e) (a bias has a bias node, z = 0, as tail):

.. code-block:: text

    g_e   = sum over paths p through e of prod_{f in p, f != e} theta_f^2
          = A(tail e) * B(head e)                 (Path-SGD's gamma_e: optim.pathsgd.path_scales)
    g'_e  = g_e * exp((Bz)_e)                     (the diagonal after the rescaling)
    F(z)  = m * log( sum_e g'_e ) - sum_e (Bz)_e
          = m * log( AM / GM of the g'_e ) + m log m + sum_e log g_e

with m the block's number of edges (every weight tap and every bias, including the output bias,
which is never rescaled). F is convex; with every g_e > 0 it has one minimiser, where, for every
hidden unit u,

.. code-block:: text

    sum_{e out of u} g'_e - sum_{e into u} g'_e = (|out(u)| - |in(u)|) * mean_e g'_e

It is minimised by exact coordinate descent (the authors' algorithm): along z_u alone, with
r = exp(change of z_u), O / I the current sums of g' over out(u) / in(u) (bias included in in(u)),
D the rest of the sum and A_u = |in(u)| - |out(u)|, dF/dz_u = 0 is the quadratic

.. code-block:: text

    (m + A_u) O r^2 + A_u D r + (A_u - m) I = 0

whose one positive root is taken in the cancellation-free form. The result is a canonical-form
map on G-orbits: the network it returns is the same from every point of an orbit.

Scope (ours): F is taken **per G-block**, m counting that block's edges, and the blocks are
solved independently. Reasons: g comes from :func:`gsgd.optim.pathsgd.path_scales`, which treats
each block as a network of its own (A = 1 at the block input, B = 1 at the block output, as
Path-SGD uses it), so the g of two blocks are not on a common scale and one log-sum over all of
them would weigh blocks by where the cut was made; parameters outside every block have no g in
that sense. For a model that is one block (an MLP, a plain conv chain) the per-block F is the
authors' whole-model criterion, up to the conv caveat below. For a residual net it is not: their
code takes g of the whole network and counts every parameter (stem, shortcuts, BN, classifier)
in m.

Other differences from the authors' code, all ours: the stop is max_u |change of z_u| over a
sweep <= tol (theirs: the sum over units < 1e-2, which depends on H, with 10 sweeps at most);
models where some g_e is 0 or not finite are refused instead of patching z; the solve is float64
and the factors are applied in the model's dtype; for convs g is that of the channel multigraph
(taps as parallel edges, no image size), while their code runs the squared net on a 32x32 input.
``method="red-black"`` is a vectorised variant designed here (pathcond.md section 5): a common
shift per hidden layer (the same quadratic, summed over the layer), then all odd hidden layers at
once and all even ones at once, each unit solving r^2 O + A_u c r - I = 0 with c = sum g' / m
held fixed; every step is an exact minimisation, so F decreases monotonically to the same
optimum.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from gsgd.discovery import discover, unwrap
from gsgd.group import rescale_block
from gsgd.optim.pathsgd import path_scales
from gsgd.structure import Block, Structure, layer_view

__all__ = ["METHODS", "BlockDiagonal", "PathCondResult", "criterion", "optimality_residual",
           "path_diagonal", "pathcond", "positive_root", "rescaled_diagonal"]

F64 = torch.float64
METHODS = ("sequential", "red-black")
Tensors = list[torch.Tensor]


class BlockDiagonal(NamedTuple):
    """g = diag of a block's path-magnitude matrix, float64 on the CPU.

    ``weights[l]`` is ``(out, in)``: the g of every tap of a channel pair (parallel taps share
    it); ``biases[l]`` is ``(out,)`` or None; ``taps[l]`` the taps per pair of layer l.
    """

    weights: Tensors
    biases: list[torch.Tensor | None]
    taps: tuple[int, ...]

    @property
    def num_edges(self) -> int:
        """m: weight taps plus biases."""
        return sum(w.numel() * t for w, t in zip(self.weights, self.taps, strict=True)) + \
            sum(b.numel() for b in self.biases if b is not None)


class PathCondResult(NamedTuple):
    """What :func:`pathcond` did.

    ``criterion_*`` and ``history``: sum over blocks of m_b * log(AM / GM of the block's g'),
    i.e. F (module docstring) less its z-independent constant (so it is a function of the network
    alone, the same on a whole orbit at the optimum); ``history`` holds it after each sweep.
    ``residual``: max over hidden units of
    |sum_out g' - sum_in g' - (|out| - |in|) mean g'| / (sum_out g' + sum_in g') at the result.
    ``factors[b][k]``: the c_u applied to hidden layer k + 1 of block b (float64), as
    :func:`gsgd.group.random_rescale` returns them.
    """

    sweeps: int
    converged: bool
    criterion_before: float
    criterion_after: float
    residual: float
    factors: list[Tensors]
    history: tuple[float, ...]


# ------------------------------------------------------------------------------------------------
# Pure maths on a block's diagonal
# ------------------------------------------------------------------------------------------------

def path_diagonal(model: nn.Module, block: Block) -> BlockDiagonal:
    """g_e = A(tail e) * B(head e) of every edge of ``block`` (float64), from the same code as
    Path-SGD's gamma (:func:`gsgd.optim.pathsgd.path_scales`)."""
    named = dict(unwrap(model).named_parameters())
    ws = [layer_view(named[layer.weight].detach(), layer).to("cpu", F64)
          for layer in block.layers]
    bs = [named[layer.bias].detach().to("cpu", F64) if layer.bias else None
          for layer in block.layers]
    gw, gb = path_scales(ws, bs)
    return BlockDiagonal([g[:, :, 0] for g in gw], gb, tuple(layer.taps for layer in block.layers))


def rescaled_diagonal(g: BlockDiagonal, z: Tensors) -> BlockDiagonal:
    """g'_e = g_e * exp((Bz)_e), (Bz)_e = z(tail) - z(head); ``z[k]`` is hidden layer k + 1."""
    n = len(g.weights)
    zs = [torch.zeros(g.weights[0].shape[1], dtype=F64)] + list(z) + \
        [torch.zeros(g.weights[-1].shape[0], dtype=F64)]
    ws = [g.weights[l] * torch.exp(zs[l][None, :] - zs[l + 1][:, None]) for l in range(n)]
    bs = [None if b is None else b * torch.exp(-zs[l + 1]) for l, b in enumerate(g.biases)]
    return BlockDiagonal(ws, bs, g.taps)


def _total(q: BlockDiagonal) -> float:
    """sum_e q_e over all m edges (taps counted)."""
    total = sum(t * float(w.sum()) for w, t in zip(q.weights, q.taps, strict=True))
    return total + sum(float(b.sum()) for b in q.biases if b is not None)


def criterion(q: BlockDiagonal) -> float:
    """m * log(AM / GM of the q_e) = m log(sum q / m) - sum log q  (>= 0, 0 iff all equal)."""
    m = q.num_edges
    logs = sum(t * float(w.log().sum()) for w, t in zip(q.weights, q.taps, strict=True))
    logs += sum(float(b.log().sum()) for b in q.biases if b is not None)
    return m * math.log(_total(q) / m) - logs


class _UnitSums(NamedTuple):
    """Per hidden layer k + 1: sums of q over out(u) and in(u), and the edge counts."""

    out_sums: Tensors
    in_sums: Tensors
    out_counts: list[int]
    in_counts: list[int]


def _unit_sums(q: BlockDiagonal) -> _UnitSums:
    outs, ins, n_out, n_in = [], [], [], []
    for l in range(1, len(q.weights)):
        w_in, b_in, w_out = q.weights[l - 1], q.biases[l - 1], q.weights[l]
        outs.append(q.taps[l] * w_out.sum(dim=0))
        ins.append(q.taps[l - 1] * w_in.sum(dim=1) + (0.0 if b_in is None else b_in))
        counts_in, counts_out = _counts(q, l)
        n_in.append(counts_in)
        n_out.append(counts_out)
    return _UnitSums(outs, ins, n_out, n_in)


def optimality_residual(q: BlockDiagonal) -> float:
    """max_u |sum_out q - sum_in q - (|out(u)| - |in(u)|) mean q| / (sum_out q + sum_in q).

    0 exactly at the minimiser of F (q = g' there); 0.0 for a block without hidden units.
    """
    mean = _total(q) / q.num_edges
    s = _unit_sums(q)
    worst = 0.0
    for o, i, no, ni in zip(s.out_sums, s.in_sums, s.out_counts, s.in_counts, strict=True):
        r = (o - i - (no - ni) * mean).abs() / (o + i)
        worst = max(worst, float(r.max()))
    return worst


def positive_root(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """The positive root of a x^2 + b x + c (a > 0 > c), without cancellation:
    x = (-b + sqrt(b^2 - 4ac)) / (2a) for b <= 0,  x = 2c / (-b - sqrt(b^2 - 4ac)) for b > 0."""
    sq = torch.sqrt(b * b - 4.0 * a * c)
    return torch.where(b > 0, 2.0 * c / (-b - sq), (sq - b) / (2.0 * a))


def _scalar_root(a: float, b: float, c: float) -> float:
    """:func:`positive_root` on Python floats (the sequential loop's inner step)."""
    sq = math.sqrt(b * b - 4.0 * a * c)
    return 2.0 * c / (-b - sq) if b > 0 else (sq - b) / (2.0 * a)


# ------------------------------------------------------------------------------------------------
# The sweeps (in place on the working copy q = g' and on z)
# ------------------------------------------------------------------------------------------------

@dataclass
class _BlockSolve:
    """The working state of one block: g, z per hidden layer, q = g e^{Bz}."""

    g: BlockDiagonal
    z: Tensors
    q: BlockDiagonal

    def scale_layer(self, l: int, r: torch.Tensor) -> None:
        """z of hidden node layer l += log r (per unit): out-edges times r, in-edges over r."""
        self.q.weights[l].mul_(r[None, :])
        self.q.weights[l - 1].div_(r[:, None])
        if self.q.biases[l - 1] is not None:
            self.q.biases[l - 1].div_(r)
        self.z[l - 1].add_(torch.log(r))


def _counts(q: BlockDiagonal, l: int) -> tuple[int, int]:
    """(|in(u)|, |out(u)|) for a unit of hidden node layer l."""
    w_in, w_out = q.weights[l - 1], q.weights[l]
    return (w_in.shape[1] * q.taps[l - 1] + (q.biases[l - 1] is not None),
            w_out.shape[0] * q.taps[l])


def _sequential_sweep(st: _BlockSolve) -> None:
    """One pass of exact coordinate descent over the hidden units, layer by layer.

    The loop runs on NumPy views of the same float64 storage (a few microseconds per unit)."""
    q, m = st.q, st.g.num_edges
    ws = [w.numpy() for w in q.weights]
    bs = [None if b is None else b.numpy() for b in q.biases]
    s = _total(q)
    for l in range(1, len(ws)):
        n_in, n_out = _counts(q, l)
        a_u = n_in - n_out
        w_in, b_in, w_out, z = ws[l - 1], bs[l - 1], ws[l], st.z[l - 1].numpy()
        t_in, t_out = q.taps[l - 1], q.taps[l]
        for j in range(w_in.shape[0]):
            o = t_out * float(w_out[:, j].sum())
            i = t_in * float(w_in[j].sum()) + (0.0 if b_in is None else float(b_in[j]))
            d = max(s - o - i, 0.0)
            r = _scalar_root((m + a_u) * o / s, a_u * d / s, (a_u - m) * i / s)
            w_out[:, j] *= r
            w_in[j] /= r
            if b_in is not None:
                b_in[j] /= r
            z[j] += math.log(r)
            s = d + o * r + i / r


def _layer_shift(st: _BlockSolve, l: int) -> None:
    """Exact minimisation of F along one common change of z over hidden node layer l."""
    q, m = st.q, st.g.num_edges
    n_in, n_out = _counts(q, l)
    h = q.weights[l - 1].shape[0]
    a_l = h * (n_in - n_out)
    s = _total(q)
    o = q.taps[l] * float(q.weights[l].sum())
    i = q.taps[l - 1] * float(q.weights[l - 1].sum())
    i += 0.0 if q.biases[l - 1] is None else float(q.biases[l - 1].sum())
    d = max(s - o - i, 0.0)
    r = _scalar_root((m + a_l) * o / s, a_l * d / s, (a_l - m) * i / s)
    st.scale_layer(l, torch.full((h,), r, dtype=F64))


def _parallel_layer(st: _BlockSolve, l: int, s: float) -> None:
    """All units of hidden node layer l at once: r^2 O + A_u c r - I = 0 per unit, c = s / m
    held fixed (O, I and c divided by s against overflow)."""
    q = st.q
    n_in, n_out = _counts(q, l)
    o = q.taps[l] * q.weights[l].sum(dim=0) / s
    i = q.taps[l - 1] * q.weights[l - 1].sum(dim=1)
    if q.biases[l - 1] is not None:
        i = i + q.biases[l - 1]
    b = torch.full_like(o, (n_in - n_out) / st.g.num_edges)
    st.scale_layer(l, positive_root(o, b, -i / s))


def _red_black_sweep(st: _BlockSolve) -> None:
    """Layer shifts, then odd hidden layers together, then even ones (c = sum q / m each time)."""
    layers = range(1, len(st.q.weights))
    for l in layers:
        _layer_shift(st, l)
    for parity in (1, 0):
        s = _total(st.q)
        for l in layers:
            if l % 2 == parity:
                _parallel_layer(st, l, s)


SWEEPS = {"sequential": _sequential_sweep, "red-black": _red_black_sweep}


# ------------------------------------------------------------------------------------------------
# The entry point
# ------------------------------------------------------------------------------------------------

def _check_model(model: nn.Module, structure: Structure) -> None:
    if not structure.blocks:
        raise ValueError(f"pathcond: no G-block found in {type(model).__name__} (no chain of >= 2 "
                         "layers joined by positively homogeneous maps); nothing to rescale")
    if structure.approximate:
        raise ValueError("pathcond: the structure uses batchnorm='approximate', where the "
                         "rescaling is not a symmetry of the network; use batchnorm='exact'")
    named = dict(model.named_parameters())
    for block in structure.blocks:
        for name in block.param_names:
            if not bool(torch.isfinite(named[name].detach()).all()):
                raise ValueError(f"pathcond: parameter {name} has non-finite values")


def _check_diagonal(g: BlockDiagonal, block: Block) -> None:
    tensors = [(layer.weight, w) for layer, w in zip(block.layers, g.weights, strict=True)]
    tensors += [(layer.bias, b) for layer, b in zip(block.layers, g.biases, strict=True)
                if b is not None]
    for name, t in tensors:
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"pathcond: the path-magnitude diagonal g_e overflows float64 "
                             f"on {name}")
        zeros = int((t <= 0).sum())
        if zeros:
            raise ValueError(f"pathcond: g_e = 0 on {zeros} edge(s) of {name} (every path "
                             "through them has another zero weight, e.g. a unit whose incoming "
                             "or outgoing weights are all 0): F has no minimiser")


def _max_change(before: Tensors, after: Tensors) -> float:
    return max((float((a - b).abs().max()) for a, b in zip(after, before, strict=True)
                if a.numel()), default=0.0)


def pathcond(model: nn.Module, structure: Structure | None = None, *, tol: float = 1e-6,
             max_sweeps: int = 1000, method: str = "sequential") -> PathCondResult:
    """Rescale ``model`` in place (an element of G on every G-block: the function is unchanged)
    to the point of its orbit that minimises F of the module docstring.

    Args:
        model: the network; its G-blocks come from ``structure`` or :func:`gsgd.discover`.
        structure: the G-blocks (e.g. ``discover(model, batchnorm="exact")``).
        tol: stop when max over hidden units of |change of z_u| over one sweep is <= tol
            (z_u = 2 log c_u).
        max_sweeps: at most this many sweeps (0: report the criterion and residual only).
        method: ``"sequential"`` (the authors' exact coordinate descent, unit by unit) or
            ``"red-black"`` (vectorised per layer, with layer shifts; ours).

    Returns a :class:`PathCondResult`. Raises ValueError (one line) when there is no G-block,
    the structure is ``batchnorm="approximate"``, a block parameter is not finite, or some
    g_e is 0 (no minimiser) or overflows.
    """
    if method not in SWEEPS:
        raise ValueError(f"pathcond: method={method!r} is not one of {METHODS}")
    if not tol >= 0 or int(max_sweeps) != max_sweeps or max_sweeps < 0:
        raise ValueError(f"pathcond: need tol >= 0 and an integer max_sweeps >= 0, got "
                         f"tol={tol}, max_sweeps={max_sweeps}")
    model = unwrap(model)
    structure = discover(model) if structure is None else structure
    _check_model(model, structure)
    solves = []
    for block in structure.blocks:
        g = path_diagonal(model, block)
        _check_diagonal(g, block)
        z = [torch.zeros(h, dtype=F64) for h in block.widths[1:-1]]
        solves.append(_BlockSolve(g, z, rescaled_diagonal(g, z)))
    before = sum(criterion(st.q) for st in solves)
    history: list[float] = []
    converged = False
    sweep = SWEEPS[method]
    while len(history) < max_sweeps and not converged:
        change = 0.0
        for st in solves:
            old = [t.clone() for t in st.z]
            sweep(st)
            st.q = rescaled_diagonal(st.g, st.z)  # exact, no drift from the in-place updates
            change = max(change, _max_change(old, st.z))
        history.append(sum(criterion(st.q) for st in solves))
        converged = change <= tol
    factors = [[torch.exp(z / 2) for z in st.z] for st in solves]
    for block, f in zip(structure.blocks, factors, strict=True):
        rescale_block(model, block, f)
    return PathCondResult(
        sweeps=len(history), converged=converged, criterion_before=before,
        criterion_after=history[-1] if history else before,
        residual=max(optimality_residual(st.q) for st in solves), factors=factors,
        history=tuple(history))
