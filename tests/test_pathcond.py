"""PathCond (gsgd.conditioning): function preservation, optimality, orbit invariance, the criterion
against a dense brute-force minimisation, the diagonal against the sum over paths, refusals.

Float64 throughout. The oracles are written here from the definitions (pathcond.md sections
3-4): g_e from enumerating every path (gsgd.bruteforce), F(z) from the explicit edge list with its
signed incidence B, minimised by damped Newton with autograd derivatives.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from conftest import F64, block_tensors, chain_net, only_block, relative_difference, two_block_net
from gsgd import bruteforce as bf
from gsgd import pathcond
from gsgd.conditioning import METHODS, path_diagonal
from gsgd.discovery import discover
from gsgd.group import random_rescale, rescale_block

CHAINS = [
    ((4, 6, 3, 5, 3, 5, 2), True, "relu"),  # non-unimodal widths, biases
    ((5, 2, 7, 2, 6, 3), (True, False, True, False, True), ("leaky", "relu", "prelu", "identity")),
    ((3, 9, 2, 9, 4), False, "leaky"),
    ((3, 5, 4, 2), True, "relu"),
]
CHAIN_IDS = ["-".join(map(str, w)) for w, _, _ in CHAINS]
TIGHT = dict(tol=1e-13, max_sweeps=20_000)


def conv_net() -> nn.Sequential:
    """conv -> ReLU -> avg pool -> conv -> LeakyReLU -> flatten -> Linear, biases on, 2x4x4 in."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
            nn.Conv2d(3, 2, 3, padding=1), nn.LeakyReLU(0.1), nn.Flatten(),
            nn.Linear(2 * 2 * 2, 3),
        ).to(F64)


def bn_net() -> nn.Sequential:
    """conv -> BN -> ReLU -> conv -> ReLU -> flatten -> Linear with trained-looking BN stats."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)
        net = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(),
                            nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                            nn.Linear(4 * 4 * 4, 3)).to(F64)
        with torch.no_grad():
            net[1].weight.uniform_(0.5, 2.0)
            net[1].bias.normal_()
            net[1].running_mean.normal_()
            net[1].running_var.uniform_(0.5, 2.0)
    return net


def chain_nets():
    gen = torch.Generator().manual_seed(0)
    for widths, bias, act in CHAINS:
        yield chain_net(widths, bias, act, seed=1), torch.randn(16, widths[0], generator=gen,
                                                                dtype=F64)


def all_nets():
    """(net, input, structure) for every chain, the conv chain and the two-block residual net."""
    for net, x in chain_nets():
        yield net, x, discover(net, strict=True)
    gen = torch.Generator().manual_seed(1)
    net = conv_net()
    yield net, torch.randn(16, 2, 4, 4, generator=gen, dtype=F64), discover(net, strict=True)
    net = two_block_net()
    yield net, torch.randn(16, 6, generator=gen, dtype=F64), discover(net)


NET_IDS = CHAIN_IDS + ["conv", "two-blocks"]


def net_case(k: int):
    return list(all_nets())[k]


def close_params(a: nn.Module, b: nn.Module) -> float:
    return max(relative_difference(p.detach(), q.detach())
               for p, q in zip(a.parameters(), b.parameters(), strict=True))


# ------------------------------------------------------------------------------------------------
# Brute-force oracles, from the definitions
# ------------------------------------------------------------------------------------------------

def brute_g(ws, bs) -> torch.Tensor:
    """g_e = sum over paths p through e of prod_{f in p, f != e} theta_f^2 (flat, edge order)."""
    graph = bf.graph_of(ws, bs)
    w2 = bf.flatten_edges(ws, bs).square()
    g = torch.zeros(graph.m, dtype=F64)
    by_length: dict[int, list[tuple[int, ...]]] = {}
    for p in bf.enumerate_paths(graph.widths, graph.taps, graph.has_bias):
        by_length.setdefault(len(p), []).append(p)
    for length, paths in by_length.items():
        idx = torch.tensor(paths)
        vals = w2[idx]
        for j in range(length):
            others = [c for c in range(length) if c != j]
            g.index_add_(0, idx[:, j], vals[:, others].prod(dim=1) if others
                         else torch.ones(len(paths), dtype=F64))
    return g


def jacobian_g(ws, bs) -> torch.Tensor:
    """diag(J^T J), J = d(path values) / d(theta): the path-magnitude matrix's diagonal."""
    flat = bf.flatten_edges(ws, bs)

    def phi(theta):
        w, b = bf.unflatten_edges(theta, ws, bs)
        return bf.path_values(w, b)

    jac = torch.autograd.functional.jacobian(phi, flat)
    return jac.square().sum(dim=0)


def incidence_b(graph: bf.ChainGraph) -> torch.Tensor:
    """Signed incidence (m x H): +1 if the edge leaves hidden unit u, -1 if it enters u."""
    hidden = {node: k for k, node in enumerate(graph.hidden_nodes())}
    mat = torch.zeros(graph.m, len(hidden), dtype=F64)
    for e, edge in enumerate(graph.edges):
        if edge.tail in hidden:
            mat[e, hidden[edge.tail]] += 1.0
        if edge.head in hidden:
            mat[e, hidden[edge.head]] -= 1.0
    return mat


def brute_F(g: torch.Tensor, b: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """F(z) = m log(sum_e g_e exp((Bz)_e)) - sum_e (Bz)_e (pathcond.md section 4)."""
    y = b @ z
    return g.numel() * torch.logsumexp(g.log() + y, dim=0) - y.sum()


def newton_minimum(g: torch.Tensor, b: torch.Tensor, iters: int = 200) -> torch.Tensor:
    """Damped Newton (backtracking) on the convex F, from z = 0, to |grad| ~ 1e-13."""
    z = torch.zeros(b.shape[1], dtype=F64)
    for _ in range(iters):
        grad = torch.autograd.functional.jacobian(lambda v: brute_F(g, b, v), z)
        if float(grad.abs().max()) < 1e-13:
            break
        hess = torch.autograd.functional.hessian(lambda v: brute_F(g, b, v), z)
        step = torch.linalg.solve(hess, grad)
        t, f0 = 1.0, float(brute_F(g, b, z))
        while float(brute_F(g, b, z - t * step)) > f0 - 1e-4 * t * float(grad @ step) \
                and t > 1e-12:
            t /= 2
        z = z - t * step
    return z


def hidden_z(result, block_index: int = 0) -> torch.Tensor:
    """z_u = 2 log c_u of the factors pathcond applied, in hidden_nodes() order."""
    return torch.cat([2 * torch.log(c) for c in result.factors[block_index]])


def unit_residuals(ws, bs) -> torch.Tensor:
    """|sum_out g - sum_in g - (|out| - |in|) mean g| / (sum_out g + sum_in g) per hidden unit,
    from the brute-force g and the edge list."""
    graph = bf.graph_of(ws, bs)
    g = brute_g(ws, bs)
    mean = g.mean()
    out = []
    for node in graph.hidden_nodes():
        leaving = [e for e, edge in enumerate(graph.edges) if edge.tail == node]
        entering = [e for e, edge in enumerate(graph.edges) if edge.head == node]
        so, si = g[leaving].sum(), g[entering].sum()
        out.append(((so - si - (len(leaving) - len(entering)) * mean) / (so + si)).abs())
    return torch.stack(out)


# ------------------------------------------------------------------------------------------------
# (a) the function is unchanged
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("k", range(len(NET_IDS)), ids=NET_IDS)
def test_function_is_unchanged(k, method):
    net, x, structure = net_case(k)
    with torch.no_grad():
        before = net(x)
    result = pathcond(net, structure, method=method, **TIGHT)
    assert result.converged
    with torch.no_grad():
        assert relative_difference(net(x), before) < 1e-10
    # and it did something: factors far from 1 on every block
    assert all(max(float(c.log().abs().max()) for c in f) > 0.05 for f in result.factors)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_function_is_unchanged_with_exact_batchnorm_in_both_modes(train):
    net = bn_net()
    x = torch.randn(8, 2, 4, 4, generator=torch.Generator().manual_seed(3), dtype=F64)
    ref = copy.deepcopy(net)
    pathcond(net, discover(net, batchnorm="exact"), **TIGHT)
    net.train(train)
    ref.train(train)
    with torch.no_grad():
        a, b = net(x), ref(x)
    assert relative_difference(a, b) < 1e-10
    assert close_params(net, ref) > 0.05


# ------------------------------------------------------------------------------------------------
# (b) the optimality condition at the result
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("k", range(len(NET_IDS)), ids=NET_IDS)
def test_optimality_condition_holds_at_the_result(k, method):
    net, _, structure = net_case(k)
    worst = max(float(unit_residuals(*block_tensors(net, block)).max())
                for block in structure.blocks)
    assert worst > 1e-3  # not optimal before
    result = pathcond(net, structure, method=method, **TIGHT)
    assert result.residual < 1e-11
    for block in structure.blocks:  # recomputed by brute force from the rescaled network
        assert float(unit_residuals(*block_tensors(net, block)).max()) < 1e-10


@pytest.mark.parametrize("k", range(len(NET_IDS)), ids=NET_IDS)
def test_reported_residual_is_small_for_every_kind_of_block(k):
    net, _, structure = net_case(k)
    before = pathcond(copy.deepcopy(net), structure, max_sweeps=0)
    result = pathcond(net, structure, **TIGHT)
    assert before.residual > 1e-3 and before.sweeps == 0 and not before.converged
    assert result.residual < 1e-11
    assert pathcond(net, structure, max_sweeps=0).residual < 1e-11  # recomputed from the net


def test_the_factors_reported_are_the_ones_applied():
    net, _, structure = net_case(0)
    other = copy.deepcopy(net)
    result = pathcond(net, structure, tol=1e-8)
    for block, factors in zip(structure.blocks, result.factors, strict=True):
        rescale_block(other, block, factors)
    assert close_params(other, net) < 1e-14


# ------------------------------------------------------------------------------------------------
# (c) the same network from every point of an orbit
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("k", range(len(NET_IDS)), ids=NET_IDS)
def test_result_is_the_same_from_every_point_of_the_orbit(k, method):
    net, _, structure = net_case(k)
    other = copy.deepcopy(net)
    random_rescale(other, structure, seed=5)
    assert close_params(other, net) > 0.5
    a = pathcond(net, structure, method=method, **TIGHT)
    b = pathcond(other, structure, method=method, **TIGHT)
    assert close_params(other, net) < 1e-8
    assert a.criterion_after == pytest.approx(b.criterion_after, rel=1e-12)
    assert a.criterion_before != pytest.approx(b.criterion_before, rel=1e-3)


# ------------------------------------------------------------------------------------------------
# (d) monotone decrease, and the optimum of a dense brute-force minimisation of F
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("k", range(len(NET_IDS)), ids=NET_IDS)
def test_criterion_decreases_to_the_brute_force_minimum(k, method):
    net, _, structure = net_case(k)
    f0 = f_star = const = 0.0
    z_star = []
    for block in structure.blocks:  # F is per block (module docstring): one minimisation each
        ws, bs = block_tensors(net, block)
        g, graph = brute_g(ws, bs), bf.graph_of(ws, bs)
        b = incidence_b(graph)
        z_star.append(newton_minimum(g, b))
        f0 += float(brute_F(g, b, torch.zeros_like(z_star[-1])))
        f_star += float(brute_F(g, b, z_star[-1]))
        const += graph.m * math.log(graph.m) + float(g.log().sum())  # F = criterion + const

    result = pathcond(net, structure, method=method, **TIGHT)
    values = (result.criterion_before,) + result.history
    assert all(nxt <= cur + 1e-12 * abs(cur) for cur, nxt in zip(values, values[1:], strict=False))
    assert result.criterion_before + const == pytest.approx(f0, rel=1e-12)
    assert result.criterion_after + const == pytest.approx(f_star, rel=1e-12, abs=1e-12)
    assert f0 - f_star > 0.1
    for i, z in enumerate(z_star):
        torch.testing.assert_close(hidden_z(result, i), z, rtol=0, atol=1e-8)


def test_the_two_methods_reach_the_same_network_on_a_residual_net():
    a, b = two_block_net(), two_block_net()
    structure = discover(a)
    assert len(structure.blocks) == 2
    pathcond(a, structure, method="sequential", **TIGHT)
    pathcond(b, structure, method="red-black", **TIGHT)
    assert close_params(a, b) < 1e-10


def test_a_float32_model_gets_the_float64_solution():
    net64 = chain_net((3, 5, 4, 2), True, "relu", seed=2)
    net32 = copy.deepcopy(net64).float()
    r64 = pathcond(net64, tol=1e-10)
    r32 = pathcond(net32, tol=1e-10)
    assert r32.criterion_after == pytest.approx(r64.criterion_after, rel=1e-6)
    for p, q in zip(net32.parameters(), net64.parameters(), strict=True):
        assert p.dtype == torch.float32
        assert relative_difference(p.detach().double(), q.detach()) < 1e-6


# ------------------------------------------------------------------------------------------------
# (e) the diagonal is the sum over paths of the product of the other squared weights
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("k", range(len(NET_IDS) - 1), ids=NET_IDS[:-1])
def test_diagonal_equals_the_sum_over_paths(k):
    net, _, structure = net_case(k)
    block = only_block(structure)
    ws, bs = block_tensors(net, block)
    diag = path_diagonal(net, block)
    got = bf.flatten_edges([w[:, :, None].expand(-1, -1, t) for w, t in
                            zip(diag.weights, diag.taps, strict=True)], diag.biases)
    want = brute_g(ws, bs)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    assert diag.num_edges == block.num_weights
    if k == 3:  # and the Jacobian definition diag(dPhi^T dPhi) on a small chain
        torch.testing.assert_close(got, jacobian_g(ws, bs), rtol=1e-12, atol=0)


def test_diagonal_of_every_block_of_a_residual_net():
    net = two_block_net()
    for block in discover(net).blocks:
        ws, bs = block_tensors(net, block)
        diag = path_diagonal(net, block)
        got = bf.flatten_edges([w[:, :, None] for w in diag.weights], diag.biases)
        torch.testing.assert_close(got, brute_g(ws, bs), rtol=1e-12, atol=0)


# ------------------------------------------------------------------------------------------------
# (f) refusals, in one line, before anything is written
# ------------------------------------------------------------------------------------------------

def refused(net: nn.Module, match: str, structure=None, **kwargs) -> str:
    before = copy.deepcopy(net)
    with pytest.raises(ValueError, match=match) as info:
        pathcond(net, structure, **kwargs)
    assert "\n" not in str(info.value)
    for p, q in zip(net.parameters(), before.parameters(), strict=True):
        assert torch.equal(p, q) or (torch.isnan(p).any() and torch.isnan(q).any())
    return str(info.value)


def test_refuses_a_model_without_g_blocks():
    refused(nn.Sequential(nn.Linear(3, 2)), "no G-block found in Sequential")
    refused(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)), "no G-block found")


def test_refuses_a_dead_unit_whose_edges_have_g_zero():
    net = chain_net((3, 4, 2), True, "relu")
    with torch.no_grad():
        net[0].weight[1].zero_()
        net[0].bias[1] = 0.0
    refused(net, r"pathcond: g_e = 0 on 2 edge\(s\) of 2.weight")


def test_refuses_non_finite_weights():
    net = chain_net((3, 4, 2), True, "relu")
    with torch.no_grad():
        net[2].weight[0, 1] = float("nan")
    refused(net, "parameter 2.weight has non-finite values")


def test_refuses_the_approximate_batchnorm_structure():
    net = bn_net()
    refused(net, "batchnorm='approximate'", discover(net, batchnorm="approximate"))


@pytest.mark.parametrize("kwargs, match", [
    (dict(method="newton"), "method='newton'"),
    (dict(tol=-1.0), "tol >= 0"),
    (dict(tol=float("nan")), "tol >= 0"),
    (dict(max_sweeps=2.5), "max_sweeps >= 0"),
    (dict(max_sweeps=-1), "max_sweeps >= 0"),
])
def test_refuses_bad_arguments(kwargs, match):
    refused(chain_net((3, 4, 2), True, "relu"), match, **kwargs)
