"""Tests of the brute-force G-space oracle (gsgd.bruteforce), and the cross-check of gsgd.basis.

All in float64 on tiny chains; gradients come from a real ReLU net (see ``forward``).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from gsgd import bruteforce as bf

F64 = torch.float64

# (widths, taps, centres, has_bias)
CASES = [
    ((4, 6, 3, 5, 3, 5, 2), None, None, False),
    ((4, 6, 3, 5, 3, 5, 2), None, None, True),
    ((5, 2, 7, 2, 6, 3), None, None, False),
    ((5, 2, 7, 2, 6, 3), None, None, True),
    ((3, 9, 2, 9, 4), None, None, False),
    ((3, 9, 2, 9, 4), None, None, True),
    ((3, 9, 2, 9, 4), (2, 1, 3, 1), (1, 0, 2, 0), False),
    ((3, 9, 2, 9, 4), (2, 1, 3, 1), (1, 0, 2, 0), True),
    ((4, 6, 3, 5, 3, 5, 2), (1, 2, 1, 1, 1, 1), (0, 1, 0, 0, 0, 0),
     (True, False, True, False, True, False)),
    ((2, 3, 4, 3, 2), (3, 2, 2, 3), (1, 1, 0, 2), True),
    ((3, 3, 3, 3), (4, 4, 4), (2, 1, 3), (False, True, True)),
    ((3, 2), (2,), (1,), True),  # a single layer: no hidden units
]
IDS = [f"{'-'.join(map(str, w))}-t{t}-b{b}" for w, t, _, b in CASES]


def case_graph(case) -> bf.ChainGraph:
    widths, taps, _, has_bias = case
    return bf.chain_graph(widths, taps, has_bias)


# ------------------------------------------------------------------------------------------------
# A tiny real ReLU net whose tap edges each carry their own gradient
# ------------------------------------------------------------------------------------------------

@dataclass
class Data:
    x: torch.Tensor  # (batch, h_0)
    factors: list[torch.Tensor]  # per layer (batch, h_l, T_l): fixed per-(sample, unit, tap) factor
    target: torch.Tensor  # (batch, h_n)


def make_net(case, seed: int, batch: int = 6):
    """Random weights (out, in, taps), biases and data for a chain."""
    widths, taps, _, has_bias = case
    g = bf.chain_graph(widths, taps, has_bias)
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=F64)

    weights = [randn(g.widths[l + 1], g.widths[l], g.taps[l]) for l in range(g.n)]
    biases = [randn(g.widths[l + 1]) if g.has_bias[l] else None for l in range(g.n)]
    data = Data(randn(batch, g.widths[0]),
                [randn(batch, g.widths[l], g.taps[l]) for l in range(g.n)],
                randn(batch, g.widths[-1]))
    return weights, biases, data


def forward(weights, biases, data: Data, act=torch.relu) -> torch.Tensor:
    """out_j = sum_i sum_t W[j, i, t] * a_i * f_{i,t} + b_j; ``act`` between layers.

    a_i * f_{i,t} is linear in a_i, so every hidden unit stays positively homogeneous (ReLU).
    """
    a = data.x
    n = len(weights)
    for l, (w, b) in enumerate(zip(weights, biases, strict=True)):
        z = torch.einsum("oit,nit->no", w, a[:, :, None] * data.factors[l])
        if b is not None:
            z = z + b
        a = act(z) if l < n - 1 else z
    return a


def loss_fn(weights, biases, data: Data, act=torch.relu) -> torch.Tensor:
    out = forward(weights, biases, data, act)
    return ((out - data.target) ** 2).mean() + 0.1 * torch.sin(out).sum()


def gradients(weights, biases, data: Data, act=torch.relu):
    ws = [w.detach().clone().requires_grad_(True) for w in weights]
    bs = [None if b is None else b.detach().clone().requires_grad_(True) for b in biases]
    loss = loss_fn(ws, bs, data, act)
    params = ws + [b for b in bs if b is not None]
    grads = torch.autograd.grad(loss, params)
    gw = list(grads[:len(ws)])
    it = iter(grads[len(ws):])
    gb = [None if b is None else next(it) for b in bs]
    return gw, gb


def random_rescaling(weights, biases, seed: int):
    """Apply a random element of G: into hidden unit u (and its bias) times c_u, out of it / c_u."""
    gen = torch.Generator().manual_seed(seed)
    ws = [w.clone() for w in weights]
    bs = [None if b is None else b.clone() for b in biases]
    for l in range(1, len(weights)):
        c = torch.exp(torch.randn(ws[l - 1].shape[0], generator=gen, dtype=F64))
        ws[l - 1] = ws[l - 1] * c[:, None, None]
        if bs[l - 1] is not None:
            bs[l - 1] = bs[l - 1] * c
        ws[l] = ws[l] / c[None, :, None]
    return ws, bs


# ------------------------------------------------------------------------------------------------
# Paths and rank
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_enumerated_paths_are_distinct_chained_and_counted(case):
    g = case_graph(case)
    paths = bf.enumerate_paths(g.widths, g.taps, g.has_bias)
    assert len(paths) == bf.count_paths(g.widths, g.taps, g.has_bias)
    assert len(set(paths)) == len(paths)
    for p in paths:
        edges = [g.edges[e] for e in p]
        first = edges[0]
        assert first.is_bias or first.layer == 0  # starts at an input or a bias node
        assert edges[-1].head[0] == g.n  # ends at an output
        for prev, nxt in zip(edges, edges[1:], strict=False):
            assert not nxt.is_bias and nxt.tail == prev.head


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_path_rank_equals_m_minus_H(case):
    g = case_graph(case)
    assert bf.path_rank(g.widths, g.taps, g.has_bias) == g.m - g.num_hidden


def test_enumerate_paths_refuses_large_nets():
    with pytest.raises(ValueError, match="paths"):
        bf.enumerate_paths((20, 20, 20, 20, 20))


def test_edge_numbering_is_weights_in_c_order_then_bias_per_layer():
    g = bf.chain_graph((2, 3, 2), (2, 1), (True, True))
    assert g.weight_edge(0, 0, 0, 1) == 1
    assert g.weight_edge(0, 1, 0, 0) == 4
    assert g.bias_edge(0, 0) == 12
    assert g.weight_edge(1, 0, 0, 0) == 15
    assert g.bias_edge(1, 1) == 22
    assert g.m == 23
    w = [torch.arange(12.0).reshape(3, 2, 2), torch.arange(6.0).reshape(2, 3)]
    b = [torch.arange(3.0), torch.arange(2.0)]
    flat = bf.flatten_edges(w, b)
    assert flat[g.weight_edge(0, 2, 1, 1)] == w[0][2, 1, 1]
    assert flat[g.weight_edge(1, 1, 2, 0)] == w[1][1, 2]
    ws, bs = bf.unflatten_edges(flat, w, b)
    assert all(torch.equal(p, q) for p, q in zip(ws + bs, w + b, strict=True))


# ------------------------------------------------------------------------------------------------
# The designated basis
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_designated_basis_has_H_frozen_child_edges_and_m_minus_H_representatives(case):
    widths, taps, centres, has_bias = case
    basis = bf.designated_basis(widths, taps, centres, has_bias)
    g = basis.graph
    assert len(basis.frozen) == g.num_hidden
    assert len(basis.representative) == g.m - g.num_hidden
    assert sorted(basis.frozen + basis.representative) == list(range(g.m))
    cs = basis.centres
    for e in basis.frozen:  # each frozen edge is kappa(u) of its tail u
        edge = g.edges[e]
        assert not edge.is_bias and g.is_hidden(edge.tail)
        assert edge.out == edge.inp % g.widths[edge.layer + 1] and edge.tap == cs[edge.layer]
    rep = set(basis.representative)
    assert all(e in rep for e, edge in enumerate(g.edges) if edge.is_bias)  # biases never frozen


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_basis_paths_are_distinct_real_paths_containing_their_edge_with_full_rank(case):
    widths, taps, centres, has_bias = case
    basis = bf.designated_basis(widths, taps, centres, has_bias)
    g = basis.graph
    all_paths = set(bf.enumerate_paths(g.widths, g.taps, g.has_bias))
    assert len(set(basis.paths)) == len(basis.paths)
    for e, p in zip(basis.representative, basis.paths, strict=True):
        assert p in all_paths and e in p
    b = basis.matrix
    assert b.shape == (g.m - g.num_hidden, g.m)
    assert len({tuple(row.tolist()) for row in b}) == b.shape[0]
    assert int(torch.linalg.matrix_rank(b)) == g.m - g.num_hidden


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_every_path_is_an_integer_combination_of_basis_paths(case):
    widths, taps, centres, has_bias = case
    basis = bf.designated_basis(widths, taps, centres, has_bias)
    g = basis.graph
    full = bf.incidence_matrix(g.widths, g.taps, g.has_bias)
    coeffs = torch.linalg.lstsq(basis.matrix.T, full.T, driver="gelsd").solution.T
    rounded = coeffs.round()
    assert (coeffs - rounded).abs().max() < 1e-9
    assert torch.equal(rounded @ basis.matrix, full)  # exact in integers


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_representative_block_of_basis_matrix_is_unimodular(case):
    widths, taps, centres, has_bias = case
    basis = bf.designated_basis(widths, taps, centres, has_bias)
    square = basis.matrix[:, list(basis.representative)]
    assert abs(abs(float(torch.linalg.det(square))) - 1.0) < 1e-9
    inv = bf.integer_inverse(square)
    assert torch.equal(square @ inv, torch.eye(square.shape[0], dtype=F64))


def test_integer_inverse_rejects_a_non_unimodular_matrix():
    with pytest.raises(ValueError, match="unimodular"):
        bf.integer_inverse(torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=F64))


@pytest.mark.parametrize("case", CASES[:4] + CASES[7:10], ids=IDS[:4] + IDS[7:10])
def test_every_path_value_is_a_signed_product_of_basis_values(case):
    widths, taps, centres, has_bias = case
    weights, biases, _ = make_net(case, seed=3)
    basis = bf.designated_basis(widths, taps, centres, has_bias)
    full = bf.incidence_matrix(widths, taps, has_bias)
    coeffs = torch.linalg.lstsq(basis.matrix.T, full.T, driver="gelsd").solution.T.round()
    v = bf.basis_path_values(weights, biases, centres)
    from_basis = torch.exp(coeffs @ v.abs().log())
    sign = torch.where(torch.remainder(coeffs @ (v < 0).to(F64), 2.0) > 0.5, -1.0, 1.0)
    direct = bf.path_values(weights, biases)
    torch.testing.assert_close(sign * from_basis, direct, rtol=1e-10, atol=0.0)


# ------------------------------------------------------------------------------------------------
# Scale invariance, inverse chain rule, allocation, one step
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_scale_invariance_identity_holds_for_relu_gradient(case):
    weights, biases, data = make_net(case, seed=1)
    gw, gb = gradients(weights, biases, data)
    res = bf.scale_invariance_residual(weights, biases, gw, gb)
    g = case_graph(case)
    assert res.shape == (g.num_hidden,)
    scale = bf.flatten_edges(weights, biases).mul(bf.flatten_edges(gw, gb)).abs().max()
    assert float(res.abs().sum()) <= 1e-12 * max(float(scale), 1.0) * max(len(res), 1)


def test_scale_invariance_identity_fails_for_tanh_net():
    case = CASES[5]
    weights, biases, data = make_net(case, seed=1)
    gw, gb = gradients(weights, biases, data, act=torch.tanh)
    assert bf.scale_invariance_residual(weights, biases, gw, gb).abs().max() > 1e-4


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_chain_rule_lstsq_is_consistent_for_relu_gradient(case):
    _, _, centres, _ = case
    weights, biases, data = make_net(case, seed=2)
    gw, gb = gradients(weights, biases, data)
    sol = bf.chain_rule_lstsq(weights, biases, gw, gb, centres)
    assert sol.residual <= 1e-11 * max(float(sol.x.norm()), 1.0)
    g = case_graph(case)
    assert sol.dL_dv.shape == (g.m - g.num_hidden,)


def test_chain_rule_lstsq_reports_residual_for_non_scale_invariant_gradient():
    case = CASES[5]
    weights, biases, data = make_net(case, seed=2)
    gw, gb = gradients(weights, biases, data, act=torch.tanh)
    sol = bf.chain_rule_lstsq(weights, biases, gw, gb, case[2])
    assert sol.residual > 1e-4


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_chain_rule_lstsq_matches_autograd_through_allocation(case):
    _, _, centres, _ = case
    weights, biases, data = make_net(case, seed=4)
    gw, gb = gradients(weights, biases, data)
    sol = bf.chain_rule_lstsq(weights, biases, gw, gb, centres)
    v = bf.basis_path_values(weights, biases, centres).clone().requires_grad_(True)
    ws, bs = bf.allocate(weights, biases, v, centres)
    (grad_v,) = torch.autograd.grad(loss_fn(ws, bs, data), v)
    torch.testing.assert_close(sol.dL_dv, grad_v, rtol=1e-8, atol=1e-10 * float(grad_v.abs().max()))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_allocate_realises_target_basis_values_and_keeps_frozen_edges(case):
    widths, taps, centres, has_bias = case
    weights, biases, _ = make_net(case, seed=5)
    basis = bf.designated_basis(widths, taps, centres, has_bias)
    gen = torch.Generator().manual_seed(6)
    v = bf.basis_path_values(weights, biases, centres)
    target = v * torch.exp(0.5 * torch.randn(v.shape, generator=gen, dtype=F64))
    flip = torch.rand(v.shape, generator=gen, dtype=F64) < 0.3  # some sign flips as well
    target = torch.where(flip, -target, target)
    ws, bs = bf.allocate(weights, biases, target, centres)
    torch.testing.assert_close(bf.basis_path_values(ws, bs, centres), target, rtol=1e-10, atol=0.0)
    frozen = list(basis.frozen)
    assert torch.equal(bf.flatten_edges(ws, bs)[frozen], bf.flatten_edges(weights, biases)[frozen])
    assert [w.shape for w in ws] == [w.shape for w in weights]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_allocate_of_current_basis_values_returns_current_weights(case):
    _, _, centres, _ = case
    weights, biases, _ = make_net(case, seed=7)
    ws, bs = bf.allocate(weights, biases, bf.basis_path_values(weights, biases, centres), centres)
    torch.testing.assert_close(bf.flatten_edges(ws, bs), bf.flatten_edges(weights, biases),
                               rtol=1e-12, atol=0.0)


def test_allocate_rejects_zero_basis_value_and_zero_frozen_weight():
    case = CASES[1]
    weights, biases, _ = make_net(case, seed=8)
    v = bf.basis_path_values(weights, biases)
    with pytest.raises(ValueError, match="zero"):
        bf.allocate(weights, biases, torch.where(torch.arange(len(v)) == 3, 0.0, v))
    weights[1][0, 0, 0] = 0.0  # kappa of hidden node (1, 0)
    with pytest.raises(ValueError, match="frozen"):
        bf.allocate(weights, biases, v)


def test_conv_shaped_weights_keep_their_shape():
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(3, 2, 3, 3, generator=gen, dtype=F64),
               torch.randn(4, 3, 3, 3, generator=gen, dtype=F64)]
    biases = [torch.randn(3, generator=gen, dtype=F64), None]
    centres = (4, 4)
    v = bf.basis_path_values(weights, biases, centres)
    ws, bs = bf.allocate(weights, biases, 2.0 * v, centres)
    assert ws[0].shape == (3, 2, 3, 3) and bs[1] is None
    torch.testing.assert_close(bf.basis_path_values(ws, bs, centres), 2.0 * v, rtol=1e-10, atol=0)


@pytest.mark.parametrize("case", [CASES[1], CASES[7], CASES[8], CASES[9]],
                         ids=[IDS[1], IDS[7], IDS[8], IDS[9]])
def test_oracle_step_is_invariant_under_positive_rescaling_while_sgd_is_not(case):
    _, _, centres, _ = case
    weights, biases, data = make_net(case, seed=9)
    ws2, bs2 = random_rescaling(weights, biases, seed=10)
    torch.testing.assert_close(forward(ws2, bs2, data), forward(weights, biases, data))
    lr = 0.05
    new = []
    for w, b in ((weights, biases), (ws2, bs2)):
        gw, gb = gradients(w, b, data)
        new.append(bf.oracle_step(w, b, gw, gb, lr, centres))
    (wa, ba), (wb, bb) = new
    va = bf.basis_path_values(wa, ba, centres)
    torch.testing.assert_close(va, bf.basis_path_values(wb, bb, centres),
                               rtol=1e-9, atol=1e-12 * float(va.abs().max()))
    torch.testing.assert_close(forward(wa, ba, data), forward(wb, bb, data), rtol=1e-9, atol=1e-12)
    # plain SGD from the same two equivalent points ends at different functions
    sgd = []
    for w, b in ((weights, biases), (ws2, bs2)):
        gw, gb = gradients(w, b, data)
        sgd.append(([p - lr * q for p, q in zip(w, gw, strict=True)],
                    [None if p is None else p - lr * q for p, q in zip(b, gb, strict=True)]))
    gap = (forward(*sgd[0], data) - forward(*sgd[1], data)).abs().max()
    assert gap > 1e-4


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_oracle_step_moves_basis_values_by_lr_times_gradient_and_decreases_loss(case):
    _, _, centres, _ = case
    weights, biases, data = make_net(case, seed=11)
    gw, gb = gradients(weights, biases, data)
    sol = bf.chain_rule_lstsq(weights, biases, gw, gb, centres)
    loss0 = float(loss_fn(weights, biases, data))
    sq = float((sol.dL_dv ** 2).sum())
    lr = 1e-7 * abs(loss0) / sq  # predicted first-order change: 1e-7 * |L|
    ws, bs = bf.oracle_step(weights, biases, gw, gb, lr, centres)
    torch.testing.assert_close(bf.basis_path_values(ws, bs, centres),
                               sol.values - lr * sol.dL_dv, rtol=1e-10, atol=0.0)
    change = float(loss_fn(ws, bs, data)) - loss0
    assert change < 0
    assert abs(change / (-lr * sq) - 1.0) < 1e-3


# ------------------------------------------------------------------------------------------------
# Cross-check of the project's O(H) designated-route index (gsgd.basis)
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_gsgd_basis_frozen_edges_match_bruteforce(case):
    basis_mod = pytest.importorskip("gsgd.basis")
    widths, taps, centres, has_bias = case
    g = case_graph(case)
    index = basis_mod.chain_routes(g.widths, g.taps, centres)
    masks = basis_mod.representative_mask(index)
    frozen = []
    offset = 0
    for l, mask in enumerate(masks):
        assert tuple(mask.shape) == (g.widths[l + 1], g.widths[l], g.taps[l])
        frozen += (offset + torch.nonzero(~mask.reshape(-1))[:, 0]).tolist()
        offset += mask.numel() + (g.widths[l + 1] if g.has_bias[l] else 0)
    assert tuple(frozen) == bf.designated_basis(widths, taps, centres, has_bias).frozen


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_gsgd_basis_values_match_bruteforce(case):
    basis_mod = pytest.importorskip("gsgd.basis")
    _, _, centres, _ = case
    g = case_graph(case)
    index = basis_mod.chain_routes(g.widths, g.taps, centres)
    masks = basis_mod.representative_mask(index)
    for seed in (12, 13):
        weights, biases, _ = make_net(case, seed=seed)
        vw, vb = basis_mod.basis_values(weights, biases, index)
        fast = []
        for w, b, mask in zip(vw, vb, masks, strict=True):
            fast.append(w.reshape(-1)[mask.reshape(-1)])
            if b is not None:
                fast.append(b)
        torch.testing.assert_close(torch.cat(fast), bf.basis_path_values(weights, biases, centres),
                                   rtol=1e-12, atol=0.0)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_gsgd_basis_path_value_from_basis_matches_bruteforce_path_values(case):
    basis_mod = pytest.importorskip("gsgd.basis")
    _, _, centres, _ = case
    g = case_graph(case)
    index = basis_mod.chain_routes(g.widths, g.taps, centres)
    weights, biases, _ = make_net(case, seed=14)
    vw, _ = basis_mod.basis_values(weights, biases, index)
    nodes_val = basis_mod.node_values(weights, index)
    paths = [p for p in bf.enumerate_paths(g.widths, g.taps, g.has_bias)
             if not g.edges[p[0]].is_bias][::37]  # weight paths from the inputs, a sample
    direct = bf.path_values(weights, biases, paths)
    for p, want in zip(paths, direct, strict=True):
        edges = [g.edges[e] for e in p]
        nodes = (edges[0].inp,) + tuple(e.out for e in edges)
        got = basis_mod.path_value_from_basis(vw, nodes_val, nodes, tuple(e.tap for e in edges))
        torch.testing.assert_close(got, want, rtol=1e-10, atol=0.0)
