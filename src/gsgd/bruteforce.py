"""Brute-force G-space oracle for tiny G-blocks (chains), in float64.

Everything here is built the slow, explicit way (docs/math.md sections 2-5, 8): enumerate every
path, build the dense path-incidence matrix, walk the designated routes edge by edge, solve the
chain rule by least squares and allocate weights with the integer inverse of the basis matrix.
It deliberately shares no code with :mod:`gsgd.basis` or the fast optimizer, so that tests can use
it as an independent oracle; users can use it to inspect small blocks.

Conventions (shared with the rest of the project):

* A chain has n layers; layer l has a weight viewed as ``(h_{l+1}, h_l, T_l)`` (out, in, taps)
  and an optional bias ``(h_{l+1},)``. Weights may be passed in any shape whose first two
  dimensions are (out, in) (e.g. a conv kernel ``(out, in, kh, kw)``); results keep that shape.
* Node layers 0..n; 1..n-1 are hidden. The bias of layer l is an edge from a "bias node" (which
  behaves like an input) into node (l+1, j).
* Global edge numbering: for l = 0..n-1, all weight entries of layer l in the C-order flat order of
  the (out, in, T) tensor, then the bias entries of layer l (if present). m edges in all.
* Designated routes, for hidden node u = (l, j):
  parent edge ``pi(u) = W^{l-1}[j, j mod h_{l-1}, centre_{l-1}]``,
  child edge ``kappa(u) = W^l[j mod h_{l+1}, j, centre_l]``.
  The basis path of edge e = (a -> b) is ``back(a) + e + fwd(b)``. The H child edges are frozen;
  the other m - H edges are representative, each naming one basis path.
* Basis-path vectors are in representative-edge order (increasing global edge id).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "MAX_PATHS",
    "ChainGraph",
    "ChainRuleSolution",
    "DesignatedBasis",
    "Edge",
    "allocate",
    "basis_path_values",
    "chain_graph",
    "chain_rule_lstsq",
    "count_paths",
    "designated_basis",
    "enumerate_paths",
    "flatten_edges",
    "graph_of",
    "incidence_matrix",
    "integer_inverse",
    "oracle_step",
    "path_rank",
    "path_values",
    "scale_invariance_residual",
    "unflatten_edges",
]

MAX_PATHS = 200_000

Node = tuple[int, int]  # (node layer, unit)
BiasTail = tuple[str, int]  # ("bias", layer l) feeds node layer l + 1


# ------------------------------------------------------------------------------------------------
# The graph of a chain
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Edge:
    """One edge: a weight tap W^layer[out, inp, tap], or the bias b^layer[out] (inp is None)."""

    layer: int
    out: int
    inp: int | None
    tap: int | None

    @property
    def is_bias(self) -> bool:
        return self.inp is None

    @property
    def tail(self) -> Node | BiasTail:
        return ("bias", self.layer) if self.inp is None else (self.layer, self.inp)

    @property
    def head(self) -> Node:
        return (self.layer + 1, self.out)


@dataclass(frozen=True)
class ChainGraph:
    """The multigraph of a chain: widths, taps per layer, bias flags, and every edge in order."""

    widths: tuple[int, ...]
    taps: tuple[int, ...]
    has_bias: tuple[bool, ...]
    edges: tuple[Edge, ...]

    @property
    def n(self) -> int:
        """Number of layers."""
        return len(self.widths) - 1

    @property
    def m(self) -> int:
        """Number of edges (weights and biases)."""
        return len(self.edges)

    @property
    def num_hidden(self) -> int:
        """H: number of hidden units."""
        return sum(self.widths[1:-1])

    def is_hidden(self, node: Node | BiasTail) -> bool:
        return isinstance(node[0], int) and 1 <= node[0] <= self.n - 1

    def hidden_nodes(self) -> list[Node]:
        return [(l, j) for l in range(1, self.n) for j in range(self.widths[l])]

    def weight_edge(self, l: int, out: int, inp: int, tap: int) -> int:
        """Global id of W^l[out, inp, tap]."""
        h_in, taps = self.widths[l], self.taps[l]
        if not (0 <= out < self.widths[l + 1] and 0 <= inp < h_in and 0 <= tap < taps):
            raise IndexError(f"no edge W^{l}[{out}, {inp}, {tap}]")
        return self._offsets[l] + (out * h_in + inp) * taps + tap

    def bias_edge(self, l: int, out: int) -> int:
        """Global id of b^l[out]."""
        if not self.has_bias[l]:
            raise IndexError(f"layer {l} has no bias")
        h_out, h_in = self.widths[l + 1], self.widths[l]
        return self._offsets[l] + h_out * h_in * self.taps[l] + out

    @property
    def _offsets(self) -> list[int]:
        offsets, total = [], 0
        for l in range(self.n):
            offsets.append(total)
            total += self.widths[l + 1] * self.widths[l] * self.taps[l]
            total += self.widths[l + 1] if self.has_bias[l] else 0
        return offsets


def chain_graph(widths: Sequence[int], taps: Sequence[int] | None = None,
                has_bias: bool | Sequence[bool] = False) -> ChainGraph:
    """Build the edge list of a chain with node widths ``(h_0, ..., h_n)``."""
    widths = tuple(int(h) for h in widths)
    n = len(widths) - 1
    if n < 1 or any(h < 1 for h in widths):
        raise ValueError(f"a chain needs at least two node layers of positive width, got {widths}")
    taps = (1,) * n if taps is None else tuple(int(t) for t in taps)
    if len(taps) != n or any(t < 1 for t in taps):
        raise ValueError(f"taps must give a positive count for each of the {n} layers, got {taps}")
    flags = (bool(has_bias),) * n if isinstance(has_bias, bool) else tuple(map(bool, has_bias))
    if len(flags) != n:
        raise ValueError(f"has_bias must be a bool or one flag per layer ({n}), got {has_bias}")
    edges: list[Edge] = []
    for l in range(n):
        for out in range(widths[l + 1]):
            for inp in range(widths[l]):
                for t in range(taps[l]):
                    edges.append(Edge(l, out, inp, t))
        if flags[l]:
            edges.extend(Edge(l, out, None, None) for out in range(widths[l + 1]))
    return ChainGraph(widths, taps, flags, tuple(edges))


def _centres(graph: ChainGraph, centres: Sequence[int] | None) -> tuple[int, ...]:
    centres = (0,) * graph.n if centres is None else tuple(int(c) for c in centres)
    if len(centres) != graph.n:
        raise ValueError(f"need one centre tap per layer ({graph.n}), got {centres}")
    for l, (c, t) in enumerate(zip(centres, graph.taps, strict=True)):
        if not 0 <= c < t:
            raise ValueError(f"centre tap {c} of layer {l} is outside 0..{t - 1}")
    return centres


def _view(w: torch.Tensor) -> torch.Tensor:
    if w.dim() < 2:
        raise ValueError(f"a weight needs (out, in, ...) dimensions, got shape {tuple(w.shape)}")
    return w.reshape(w.shape[0], w.shape[1], -1)


def graph_of(weights: Sequence[torch.Tensor],
             biases: Sequence[torch.Tensor | None] | None = None) -> ChainGraph:
    """The chain graph of concrete weights (``(out, in, ...)``) and optional biases."""
    weights = list(weights)
    biases = [None] * len(weights) if biases is None else list(biases)
    if len(biases) != len(weights):
        raise ValueError(f"{len(weights)} weights but {len(biases)} bias entries")
    views = [_view(w) for w in weights]
    widths = (views[0].shape[1],) + tuple(v.shape[0] for v in views)
    for l in range(1, len(views)):
        if views[l].shape[1] != views[l - 1].shape[0]:
            raise ValueError(f"layer {l} reads {views[l].shape[1]} units, layer {l - 1} "
                             f"writes {views[l - 1].shape[0]}")
    for l, b in enumerate(biases):
        if b is not None and tuple(b.shape) != (widths[l + 1],):
            raise ValueError(f"bias {l} has shape {tuple(b.shape)}, expected ({widths[l + 1]},)")
    return chain_graph(widths, [v.shape[2] for v in views], [b is not None for b in biases])


def flatten_edges(weights: Sequence[torch.Tensor],
                  biases: Sequence[torch.Tensor | None] | None = None) -> torch.Tensor:
    """All edge values in global order (weights of layer l in C order, then its bias)."""
    biases = [None] * len(weights) if biases is None else list(biases)
    parts: list[torch.Tensor] = []
    for w, b in zip(weights, biases, strict=True):
        parts.append(w.reshape(-1))
        if b is not None:
            parts.append(b.reshape(-1))
    return torch.cat(parts)


def unflatten_edges(flat: torch.Tensor, weights_like: Sequence[torch.Tensor],
                    biases_like: Sequence[torch.Tensor | None] | None = None
                    ) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    """Inverse of :func:`flatten_edges`, shaped like the given templates."""
    biases_like = [None] * len(weights_like) if biases_like is None else list(biases_like)
    ws: list[torch.Tensor] = []
    bs: list[torch.Tensor | None] = []
    pos = 0
    for w, b in zip(weights_like, biases_like, strict=True):
        ws.append(flat[pos:pos + w.numel()].reshape(w.shape))
        pos += w.numel()
        if b is None:
            bs.append(None)
        else:
            bs.append(flat[pos:pos + b.numel()].reshape(b.shape))
            pos += b.numel()
    if pos != flat.numel():
        raise ValueError(f"{flat.numel()} edge values for {pos} edges")
    return ws, bs


# ------------------------------------------------------------------------------------------------
# All paths
# ------------------------------------------------------------------------------------------------

def count_paths(widths: Sequence[int], taps: Sequence[int] | None = None,
                has_bias: bool | Sequence[bool] = False) -> int:
    """Number of paths (from inputs and bias nodes to outputs), without enumerating them."""
    g = chain_graph(widths, taps, has_bias)
    # onward[l] = number of ways to continue from one node of layer l to an output
    onward = [1] * (g.n + 1)
    for l in range(g.n - 1, -1, -1):
        onward[l] = g.taps[l] * g.widths[l + 1] * onward[l + 1]
    total = g.widths[0] * onward[0]
    total += sum(g.widths[l + 1] * onward[l + 1] for l in range(g.n) if g.has_bias[l])
    return total


def enumerate_paths(widths: Sequence[int], taps: Sequence[int] | None = None,
                    has_bias: bool | Sequence[bool] = False,
                    max_paths: int = MAX_PATHS) -> list[tuple[int, ...]]:
    """Every path as a tuple of global edge ids in forward order.

    Paths from the inputs come first (input 0, 1, ...), then those starting at the bias of layer
    0, 1, ... Raises ValueError if there are more than ``max_paths`` paths.
    """
    g = chain_graph(widths, taps, has_bias)
    total = count_paths(g.widths, g.taps, g.has_bias)
    if total > max_paths:
        raise ValueError(f"chain {g.widths} with taps {g.taps} has {total} paths "
                         f"(more than max_paths={max_paths}); the brute force is for tiny nets")
    # onward[l][j]: every edge sequence from node (l, j) to an output
    onward: list[list[list[tuple[int, ...]]]] = [[] for _ in range(g.n + 1)]
    onward[g.n] = [[()] for _ in range(g.widths[g.n])]
    for l in range(g.n - 1, -1, -1):
        for j in range(g.widths[l]):
            seqs: list[tuple[int, ...]] = []
            for k in range(g.widths[l + 1]):
                for t in range(g.taps[l]):
                    e = g.weight_edge(l, k, j, t)
                    seqs.extend((e,) + rest for rest in onward[l + 1][k])
            onward[l].append(seqs)
    paths = [p for j in range(g.widths[0]) for p in onward[0][j]]
    for l in range(g.n):
        if g.has_bias[l]:
            for j in range(g.widths[l + 1]):
                e = g.bias_edge(l, j)
                paths.extend((e,) + rest for rest in onward[l + 1][j])
    assert len(paths) == total
    return paths


def _incidence(paths: Sequence[Sequence[int]], m: int) -> torch.Tensor:
    rows = [r for r, p in enumerate(paths) for _ in p]
    cols = [e for p in paths for e in p]
    mat = torch.zeros(len(paths), m, dtype=torch.float64)
    ones = torch.ones(len(cols), dtype=torch.float64)
    mat.index_put_((torch.tensor(rows, dtype=torch.long), torch.tensor(cols, dtype=torch.long)),
                   ones, accumulate=True)
    return mat


def incidence_matrix(widths: Sequence[int], taps: Sequence[int] | None = None,
                     has_bias: bool | Sequence[bool] = False,
                     max_paths: int = MAX_PATHS) -> torch.Tensor:
    """(num_paths x m) float64 0/1 path-edge incidence matrix, rows in :func:`enumerate_paths`
    order."""
    g = chain_graph(widths, taps, has_bias)
    return _incidence(enumerate_paths(widths, taps, has_bias, max_paths), g.m)


def path_rank(widths: Sequence[int], taps: Sequence[int] | None = None,
              has_bias: bool | Sequence[bool] = False, max_paths: int = MAX_PATHS) -> int:
    """Rank of the full path incidence matrix (docs/math.md section 2: it is m - H)."""
    mat = incidence_matrix(widths, taps, has_bias, max_paths)
    return int(torch.linalg.matrix_rank(mat).item())


def path_values(weights: Sequence[torch.Tensor],
                biases: Sequence[torch.Tensor | None] | None = None,
                paths: Sequence[Sequence[int]] | None = None) -> torch.Tensor:
    """Value (product of edge values) of each path; all enumerated paths by default."""
    g = graph_of(weights, biases)
    if paths is None:
        paths = enumerate_paths(g.widths, g.taps, g.has_bias)
    w = flatten_edges(weights, biases)
    on_path = _incidence(paths, g.m) > 0
    return torch.where(on_path, w[None, :], torch.ones_like(w)[None, :]).prod(dim=1)


# ------------------------------------------------------------------------------------------------
# Designated routes
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DesignatedBasis:
    """The designated-route basis of a chain.

    ``representative``: the m - H representative edge ids, increasing; row r of ``matrix`` and
    ``paths[r]`` belong to ``representative[r]``.
    ``frozen``: the H child edges kappa(u), increasing.
    ``matrix``: the (m - H) x m float64 0/1 incidence matrix of the basis paths.
    ``paths``: each basis path as a tuple of global edge ids in forward order.
    """

    graph: ChainGraph
    centres: tuple[int, ...]
    representative: tuple[int, ...]
    frozen: tuple[int, ...]
    paths: tuple[tuple[int, ...], ...]
    matrix: torch.Tensor


def _parent(g: ChainGraph, centres: tuple[int, ...], node: Node) -> tuple[int, Node]:
    """pi(u) = W^{l-1}[j, j mod h_{l-1}, centre] and its tail."""
    l, j = node
    tail = (l - 1, j % g.widths[l - 1])
    return g.weight_edge(l - 1, j, tail[1], centres[l - 1]), tail


def _child(g: ChainGraph, centres: tuple[int, ...], node: Node) -> tuple[int, Node]:
    """kappa(u) = W^l[j mod h_{l+1}, j, centre] and its head."""
    l, j = node
    head = (l + 1, j % g.widths[l + 1])
    return g.weight_edge(l, head[1], j, centres[l]), head


def _back(g: ChainGraph, centres: tuple[int, ...], node: Node | BiasTail) -> list[int]:
    """Parent edges from ``node`` back to an input, in forward order (empty unless hidden)."""
    route: list[int] = []
    while g.is_hidden(node):
        e, node = _parent(g, centres, node)  # type: ignore[arg-type]
        route.append(e)
    route.reverse()
    return route


def _fwd(g: ChainGraph, centres: tuple[int, ...], node: Node) -> list[int]:
    """Child edges from ``node`` forward to an output (empty unless hidden)."""
    route: list[int] = []
    while g.is_hidden(node):
        e, node = _child(g, centres, node)
        route.append(e)
    return route


def designated_basis(widths: Sequence[int], taps: Sequence[int] | None = None,
                     centres: Sequence[int] | None = None,
                     has_bias: bool | Sequence[bool] = False) -> DesignatedBasis:
    """Representative edges, frozen edges and basis-path incidence matrix, by walking the routes."""
    g = chain_graph(widths, taps, has_bias)
    cs = _centres(g, centres)
    frozen = sorted({_child(g, cs, u)[0] for u in g.hidden_nodes()})
    if len(frozen) != g.num_hidden:  # kappa is injective: it names its tail
        raise AssertionError("two hidden nodes share a child edge")
    frozen_set = set(frozen)
    rep: list[int] = []
    paths: list[tuple[int, ...]] = []
    for e, edge in enumerate(g.edges):
        if e in frozen_set:
            continue
        rep.append(e)
        paths.append(tuple(_back(g, cs, edge.tail)) + (e,) + tuple(_fwd(g, cs, edge.head)))
    return DesignatedBasis(g, cs, tuple(rep), tuple(frozen), tuple(paths),
                           _incidence(paths, g.m))


def integer_inverse(square: torch.Tensor, tol: float = 1e-8) -> torch.Tensor:
    """Exact inverse of an integer matrix with an integer inverse (unimodular), as float64.

    Raises ValueError if the matrix is singular or its inverse is not integral.
    """
    inv = torch.linalg.inv(square.to(torch.float64))
    rounded = inv.round()
    if not torch.isfinite(inv).all() or (inv - rounded).abs().max() > tol:
        raise ValueError("matrix is not unimodular: its inverse is not integral")
    eye = torch.eye(square.shape[0], dtype=torch.float64)
    if not torch.equal(rounded @ square.to(torch.float64), eye):
        raise ValueError("rounded inverse is not exact")
    return rounded


# ------------------------------------------------------------------------------------------------
# Values, the chain rule, allocation, one step
# ------------------------------------------------------------------------------------------------

def _basis_for(weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None] | None,
               centres: Sequence[int] | None) -> DesignatedBasis:
    g = graph_of(weights, biases)
    return designated_basis(g.widths, g.taps, centres, g.has_bias)


def basis_path_values(weights: Sequence[torch.Tensor],
                      biases: Sequence[torch.Tensor | None] | None = None,
                      centres: Sequence[int] | None = None) -> torch.Tensor:
    """v_p = product of the weights on each basis path, in representative-edge order."""
    basis = _basis_for(weights, biases, centres)
    w = flatten_edges(weights, biases)
    on_path = basis.matrix > 0
    return torch.where(on_path, w[None, :], torch.ones_like(w)[None, :]).prod(dim=1)


@dataclass(frozen=True)
class ChainRuleSolution:
    """Least-squares solution of x = B^T y.

    ``dL_dv`` and ``y`` (= v * dL/dv) are in representative-edge order; ``x`` (= w * g) is over
    all m edges; ``residual`` = ||B^T y - x||_2 (about 0 for a scale-invariant loss).
    """

    dL_dv: torch.Tensor
    y: torch.Tensor
    x: torch.Tensor
    values: torch.Tensor
    residual: float


def chain_rule_lstsq(weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None] | None,
                     grad_w: Sequence[torch.Tensor], grad_b: Sequence[torch.Tensor | None] | None,
                     centres: Sequence[int] | None = None) -> ChainRuleSolution:
    """dL/dv for every basis path, by solving the chain rule x_e = sum_{p ni e} y_p densely."""
    basis = _basis_for(weights, biases, centres)
    w = flatten_edges(weights, biases).to(torch.float64)
    g = flatten_edges(grad_w, grad_b).to(torch.float64)
    if g.shape != w.shape:
        raise ValueError(f"{g.numel()} gradient entries for {w.numel()} edges")
    x = w * g
    bt = basis.matrix.T
    y = torch.linalg.lstsq(bt, x[:, None], driver="gelsd").solution[:, 0]
    residual = float(torch.linalg.vector_norm(bt @ y - x))
    v = basis_path_values(weights, biases, centres).to(torch.float64)
    return ChainRuleSolution(dL_dv=y / v, y=y, x=x, values=v, residual=residual)


def allocate(weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None] | None,
             new_values: torch.Tensor, centres: Sequence[int] | None = None
             ) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    """New weights whose basis-path values are ``new_values``, every frozen edge unchanged.

    In log-magnitude coordinates log|v'_p| = sum_{e in P_p} log|w'_e|; restricted to the
    representative columns the basis matrix is unimodular, so its integer inverse gives
    log|w'_rep| from log|v'| and the frozen weights. Sign bits solve the same system mod 2.
    Differentiable with respect to ``new_values`` (magnitudes; signs are piecewise constant).
    Old representative weights do not matter: only the frozen ones and the shapes are used.
    """
    basis = _basis_for(weights, biases, centres)
    w = flatten_edges(weights, biases)
    new_values = torch.as_tensor(new_values, dtype=w.dtype)
    rep = torch.tensor(basis.representative, dtype=torch.long)
    frz = torch.tensor(basis.frozen, dtype=torch.long)
    if new_values.shape != rep.shape:
        raise ValueError(f"{new_values.numel()} values for {rep.numel()} basis paths")
    if (new_values == 0).any():
        raise ValueError("a basis-path value is zero: no weights realise it")
    w_frozen = w.detach()[frz]
    if (w_frozen == 0).any():
        raise ValueError("a frozen (designated child) weight is zero: its routes are dead")
    b_rep = basis.matrix[:, rep]
    b_frz = basis.matrix[:, frz]
    inv = integer_inverse(b_rep)
    log_rep = inv @ (new_values.abs().log() - b_frz @ w_frozen.abs().log())
    neg_v = (new_values.detach() < 0).to(torch.float64)
    neg_f = (w_frozen < 0).to(torch.float64)
    neg_rep = torch.remainder(inv @ (neg_v - b_frz @ neg_f), 2.0).round()
    w_rep = (1.0 - 2.0 * neg_rep) * log_rep.exp()
    new = w.detach().clone().index_put((rep,), w_rep)
    return unflatten_edges(new, weights, biases)


def oracle_step(weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None] | None,
                grad_w: Sequence[torch.Tensor], grad_b: Sequence[torch.Tensor | None] | None,
                lr: float, centres: Sequence[int] | None = None
                ) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    """One plain G-SGD step: v' = v - lr * dL/dv, then :func:`allocate`."""
    sol = chain_rule_lstsq(weights, biases, grad_w, grad_b, centres)
    return allocate(weights, biases, sol.values - lr * sol.dL_dv, centres)


def scale_invariance_residual(weights: Sequence[torch.Tensor],
                              biases: Sequence[torch.Tensor | None] | None,
                              grad_w: Sequence[torch.Tensor],
                              grad_b: Sequence[torch.Tensor | None] | None) -> torch.Tensor:
    """Per hidden node (layer 1 units, then layer 2, ...): sum of x = w * g over incoming edges
    (its bias included) minus the sum over outgoing edges. About 0 for a scale-invariant loss."""
    g = graph_of(weights, biases)
    x = flatten_edges(weights, biases) * flatten_edges(grad_w, grad_b)
    position = {u: i for i, u in enumerate(g.hidden_nodes())}
    res = [x.new_zeros(()) for _ in position]
    for e, edge in enumerate(g.edges):
        if edge.head in position:
            res[position[edge.head]] = res[position[edge.head]] + x[e]
        if edge.tail in position:
            res[position[edge.tail]] = res[position[edge.tail]] - x[e]
    return torch.stack(res) if res else x.new_zeros(0)
