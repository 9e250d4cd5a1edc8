"""ENorm (gsgd.optim.enorm): function preservation, the balance it converges to, state transforms.

Every cycle is an element of the rescaling group G, so the function is unchanged (float64, 1e-10);
repeated cycles converge to ||out_u|| = c ||in_u||, the minimiser over G of
sum_l c^(-2l) ||W^l||^2; one sweep equals an explicit unit-by-unit reference; gradient-like
optimizer state transforms inversely to the weights (it stays the gradient in the new coordinates).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from gsgd.discovery import discover
from gsgd.group import random_rescale, rescale_block, skeleton_init
from gsgd.optim import GSGD, ENorm, ENormSGD, PathSGD
from gsgd.optim.enorm import enorm_cost, enorm_sweep_
from gsgd.structure import layer_view

F64 = torch.float64




def mlp_net(bias: bool = True, widths=(5, 7, 6, 4, 3), seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    mods: list[nn.Module] = []
    for l in range(len(widths) - 1):
        mods.append(nn.Linear(widths[l], widths[l + 1], bias=bias))
        if l < len(widths) - 2:
            mods.append(nn.ReLU())
    net = nn.Sequential(*mods).to(F64)
    # unbalance it: random rescaling keeps the function, moves the weights far from balance
    random_rescale(net, discover(net), seed=seed + 1)
    return net


def conv_net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 4, 3, padding=1),
                        nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16, 3)).to(F64)
    random_rescale(net, discover(net), seed=seed + 1)
    return net


NETS = {"mlp-bias": lambda: mlp_net(True), "mlp-nobias": lambda: mlp_net(False),
        "conv": conv_net}


def inputs(net_name: str, size: int = 12, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shape = (2, 4, 4) if net_name == "conv" else (5,)
    return (torch.randn(size, *shape, generator=gen, dtype=F64),
            torch.randn(size, 3, generator=gen, dtype=F64))


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def views(net: nn.Module, block):
    named = dict(net.named_parameters())
    ws = [layer_view(named[layer.weight].detach(), layer) for layer in block.layers]
    bs = [named[layer.bias].detach() if layer.bias else None for layer in block.layers]
    return ws, bs


def norms_by_unit(net: nn.Module, block, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """||in_u||, ||out_u|| of hidden layer k computed unit by unit (independent of unit_norms)."""
    ws, bs = views(net, block)
    h = ws[k - 1].shape[0]
    n_in = torch.zeros(h, dtype=F64)
    n_out = torch.zeros(h, dtype=F64)
    for u in range(h):
        sq = float((ws[k - 1][u] ** 2).sum()) + (float(bs[k - 1][u]) ** 2 if bs[k - 1] is not None
                                                  else 0.0)
        n_in[u] = math.sqrt(sq)
        n_out[u] = math.sqrt(float((ws[k][:, u] ** 2).sum()))
    return n_in, n_out


# ------------------------------------------------------------------------------------------------
# The rescaling itself
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("net_name", list(NETS))
def test_each_cycle_preserves_the_function(net_name):
    net = NETS[net_name]()
    x, _ = inputs(net_name)
    before = [p.detach().clone() for p in net.parameters()]
    with torch.no_grad():
        out = net(x).clone()
    enorm = ENorm(net, c=1.5)
    for _ in range(3):
        enorm.step()
        with torch.no_grad():
            assert rel_diff(net(x), out) < 1e-10
    moved = max(rel_diff(p.detach(), q) for p, q in zip(net.parameters(), before, strict=True))
    assert moved > 1e-2, "ENorm did not change the weights: the check above would be vacuous"


@pytest.mark.parametrize("c", [1.0, 2.0, 0.7])
@pytest.mark.parametrize("net_name", list(NETS))
def test_repeated_cycles_converge_to_balance(net_name, c):
    """The fixed point: ||out_u|| = c ||in_u|| for every hidden unit of every block."""
    net = NETS[net_name]()
    enorm = ENorm(net, c=c, iterations=20)
    for _ in range(50):
        enorm.step()
        if enorm.imbalance() < 1e-12:
            break
    block = enorm.structure.blocks[0]
    for k in range(1, len(block.layers)):
        n_in, n_out = norms_by_unit(net, block, k)
        torch.testing.assert_close(n_out, c * n_in, rtol=1e-10, atol=0)


@pytest.mark.parametrize("c", [1.0, 2.0])
def test_sweeps_decrease_the_cost_to_its_minimum_over_g(c):
    """Each sweep lowers sum_l c^(-2l) ||W^l||^2; at the fixed point any rescaling raises it."""
    net = mlp_net(True)
    block = discover(net).blocks[0]
    ws, bs = views(net, block)
    costs = [float(enorm_cost(ws, bs, c))]
    for _ in range(200):
        enorm_sweep_(ws, bs, c)
        costs.append(float(enorm_cost(ws, bs, c)))
    assert all(b <= a * (1 + 1e-14) for a, b in zip(costs, costs[1:], strict=False))
    assert costs[-1] < 0.9 * costs[0]
    for seed in range(5):
        other = copy.deepcopy(net)
        random_rescale(other, discover(other), seed=seed, low=-0.05, high=0.05)
        assert float(enorm_cost(*views(other, block), c)) > costs[-1]


def test_single_hidden_layer_balances_in_one_sweep_with_the_formula():
    """With one hidden layer nothing disturbs it: d = sqrt(||out|| / (c ||in||)) balances it."""
    net = mlp_net(True, widths=(4, 6, 3))
    block = discover(net).blocks[0]
    c = 1.7
    n_in, n_out = norms_by_unit(net, block, 1)
    (factors,) = ENorm(net, c=c).step()
    torch.testing.assert_close(factors[0], (n_out / (c * n_in)).sqrt(), rtol=1e-14, atol=0)
    n_in, n_out = norms_by_unit(net, block, 1)
    torch.testing.assert_close(n_out, c * n_in, rtol=1e-12, atol=0)


def reference_sweep(net: nn.Module, block, c: float) -> None:
    """One Gauss-Seidel sweep written unit by unit with explicit loops."""
    named = dict(net.named_parameters())
    with torch.no_grad():
        for k in range(1, len(block.layers)):
            into, out_of = block.layers[k - 1], block.layers[k]
            w_in = layer_view(named[into.weight].data, into)
            w_out = layer_view(named[out_of.weight].data, out_of)
            b_in = named[into.bias].data if into.bias else None
            n_in, n_out = norms_by_unit(net, block, k)
            for u in range(w_in.shape[0]):
                d = math.sqrt(float(n_out[u]) / (c * float(n_in[u])))
                w_in[u] *= d
                if b_in is not None:
                    b_in[u] *= d
                w_out[:, u] /= d


@pytest.mark.parametrize("net_name", list(NETS))
def test_sweep_matches_unit_by_unit_reference(net_name):
    net = NETS[net_name]()
    ref = copy.deepcopy(net)
    ENorm(net, c=1.3).step()
    reference_sweep(ref, discover(ref).blocks[0], 1.3)
    for (name, p), q in zip(net.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-13, atol=1e-15, msg=name)


def test_dead_unit_is_left_alone():
    net = mlp_net(True)
    with torch.no_grad():
        net[0].weight[2].zero_()
        net[0].bias[2] = 0.0
    (factors,) = ENorm(net).step()
    assert factors[0][2] == 1.0
    assert all(torch.isfinite(p).all() for p in net.parameters())


def test_invalid_arguments_are_named():
    net = mlp_net(True)
    with pytest.raises(ValueError, match="ENorm: invalid c"):
        ENorm(net, c=0.0)
    with pytest.raises(ValueError, match="ENorm: invalid iterations"):
        ENorm(net, iterations=0)
    with pytest.raises(ValueError, match="a G-block is updated as a whole"):
        ENorm(net, torch.optim.SGD([net[0].weight], lr=0.1))
    with pytest.raises(ValueError, match="ENormSGD: invalid momentum"):
        ENormSGD(net, lr=0.1, momentum=-0.5)


# ------------------------------------------------------------------------------------------------
# Optimizer state
# ------------------------------------------------------------------------------------------------

def edge_factors(factors: list[torch.Tensor], widths) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer: d(head) / d(tail) per weight, shaped (out, in, 1), and d(head) per bias;
    d = 1 at the block's input and output units."""
    node = [torch.ones(widths[0], dtype=F64)] + factors + [torch.ones(widths[-1], dtype=F64)]
    return [((node[l + 1][:, None] / node[l][None, :])[:, :, None], node[l + 1])
            for l in range(len(widths) - 1)]


def test_momentum_buffers_transform_inversely_to_the_weights():
    """A weight scaled by d_head / d_tail has its momentum buffer scaled by d_tail / d_head."""
    net = mlp_net(True)
    block = discover(net).blocks[0]
    named = dict(net.named_parameters())
    x, y = inputs("mlp-bias")
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    for _ in range(2):
        opt.zero_grad()
        nn.functional.mse_loss(net(x), y).backward()
        opt.step()
    bufs = {n: opt.state[p]["momentum_buffer"].clone() for n, p in named.items()}
    (factors,) = ENorm(net, opt).step()
    for layer, (scale, scale_b) in zip(block.layers, edge_factors(factors, block.widths),
                                       strict=True):
        got = layer_view(opt.state[named[layer.weight]]["momentum_buffer"], layer)
        want = layer_view(bufs[layer.weight], layer) / scale
        torch.testing.assert_close(got, want, rtol=1e-14, atol=0)
        got_b = opt.state[named[layer.bias]]["momentum_buffer"]
        torch.testing.assert_close(got_b, bufs[layer.bias] / scale_b, rtol=1e-14, atol=0)
    assert any(float((f - 1).abs().max()) > 1e-2 for f in factors)


def gradient_at(net: nn.Module, x, y) -> dict[str, torch.Tensor]:
    net.zero_grad()
    nn.functional.mse_loss(net(x), y).backward()
    return {n: p.grad.clone() for n, p in net.named_parameters()}


@pytest.mark.parametrize("net_name", ["mlp-bias", "conv"])
def test_buffer_and_grad_stay_the_gradient_in_new_coordinates(net_name):
    """After one momentum-SGD step the buffer (and p.grad) is the gradient at the old weights w0.
    After ENorm with factors D they equal the gradient at D.w0, the same point seen in the
    rescaled coordinates (exact consistency of the inverse transform)."""
    net = NETS[net_name]()
    x, y = inputs(net_name)
    w0 = copy.deepcopy(net)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    gradient_at(net, x, y)
    opt.step()
    enorm = ENorm(net, opt)
    (factors,) = enorm.step()
    rescale_block(w0, enorm.structure.blocks[0], factors)
    want = gradient_at(w0, x, y)
    for name, p in net.named_parameters():
        torch.testing.assert_close(opt.state[p]["momentum_buffer"], want[name], rtol=1e-10,
                                   atol=1e-13, msg=name)
        torch.testing.assert_close(p.grad, want[name], rtol=1e-10, atol=1e-13, msg=name)


def test_adam_moments_stay_consistent_in_new_coordinates():
    """Adam after one step: exp_avg = (1 - b1) g, exp_avg_sq = (1 - b2) g^2; after ENorm with g
    the gradient at the rescaled point (first moment takes d^-1, second d^-2)."""
    net = mlp_net(True)
    x, y = inputs("mlp-bias")
    w0 = copy.deepcopy(net)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, betas=(0.8, 0.9), amsgrad=True)
    gradient_at(net, x, y)
    opt.step()
    enorm = ENorm(net, opt)
    (factors,) = enorm.step()
    rescale_block(w0, enorm.structure.blocks[0], factors)
    g = gradient_at(w0, x, y)
    for name, p in net.named_parameters():
        state = opt.state[p]
        torch.testing.assert_close(state["exp_avg"], 0.2 * g[name], rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(state["exp_avg_sq"], 0.1 * g[name] ** 2, rtol=1e-10,
                                   atol=1e-16)
        torch.testing.assert_close(state["max_exp_avg_sq"], 0.1 * g[name] ** 2, rtol=1e-10,
                                   atol=1e-16)


def test_unknown_optimizer_state_is_refused_unless_its_power_is_given():
    net = mlp_net(True)
    x, y = inputs("mlp-bias")
    opt = torch.optim.Rprop(net.parameters(), lr=1e-3)
    gradient_at(net, x, y)
    opt.step()
    with pytest.raises(ValueError, match="optimizer state 'prev' of Rprop"):
        ENorm(net, opt).step()
    ENorm(net, opt, state_powers={"prev": -1, "step_size": 1}).step()


# ------------------------------------------------------------------------------------------------
# ENormSGD
# ------------------------------------------------------------------------------------------------

def run(net: nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int = 5) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(8, 5, generator=gen, dtype=F64)
        y = torch.randn(8, 3, generator=gen, dtype=F64)
        opt.zero_grad()
        nn.functional.mse_loss(net(x), y).backward()
        opt.step()


def test_enormsgd_is_sgd_then_one_enorm_cycle():
    hyper = dict(lr=0.05, momentum=0.9, weight_decay=1e-3, nesterov=True)
    a, b, c = mlp_net(True), mlp_net(True), mlp_net(True)
    run(a, ENormSGD(a, c=1.2, **hyper), 4)
    sgd_b = torch.optim.SGD(b.parameters(), **hyper)
    ENorm(b, sgd_b, c=1.2).attach()
    run(b, sgd_b, 4)
    sgd_c = torch.optim.SGD(c.parameters(), **hyper)
    run(c, sgd_c, 4)  # no ENorm: must differ (so the equalities above can fail)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)
    assert max(rel_diff(p.detach(), r.detach()) for p, r in
               zip(a.parameters(), c.parameters(), strict=True)) > 1e-3
    assert ENorm(a, c=1.2).imbalance() < ENorm(c, c=1.2).imbalance()


def test_enormsgd_state_dict_round_trip_resumes_bit_for_bit():
    net = mlp_net(True)
    opt = ENormSGD(net, lr=0.05, momentum=0.9)
    run(net, opt, 3)
    net2 = copy.deepcopy(net)
    opt2 = ENormSGD(net2, lr=0.5, momentum=0.9)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    run(net, opt, 3, seed=9)
    run(net2, opt2, 3, seed=9)
    for p, q in zip(net.parameters(), net2.parameters(), strict=True):
        assert torch.equal(p, q)


OPTIMIZERS = {
    "pathsgd": lambda net: PathSGD(net, lr=0.01, momentum=0.9, weight_decay=1e-3),
    "gsgd": lambda net: GSGD(net, lr=0.01, momentum=0.9),
    "sgd": lambda net: torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9),
}


@pytest.mark.parametrize("kind", list(OPTIMIZERS))
def test_enorm_changes_only_the_representation_for_invariant_optimizers(kind):
    """PathSGD and GSGD commute with G, and ENorm transforms their momentum buffers the way
    they transform (PathSGD d^+1, GSGD d^0): with ENorm after every step the function trajectory
    is the one without ENorm (1e-9). For SGD it is not (the control)."""
    plain = mlp_net(True)
    if kind == "gsgd":
        skeleton_init(plain, discover(plain))
    balanced = copy.deepcopy(plain)
    opt_plain, opt_bal = OPTIMIZERS[kind](plain), OPTIMIZERS[kind](balanced)
    ENorm(balanced, opt_bal).attach()
    run(plain, opt_plain, 10)
    run(balanced, opt_bal, 10)
    x, _ = inputs("mlp-bias")
    with torch.no_grad():
        gap = rel_diff(balanced(x), plain(x))
    moved = max(rel_diff(p.detach(), q.detach()) for p, q in
                zip(balanced.parameters(), plain.parameters(), strict=True))
    assert moved > 1e-2, "ENorm did not change the representation"
    if kind == "sgd":
        assert gap > 1e-4
    else:
        assert gap < 1e-9
