"""Path-SGD (gsgd.optim.pathsgd): closed forms against brute force, and rescaling invariance.

gamma_e = sum over the paths through e of the product of the other edges' squared weights is
checked against explicit path enumeration (gsgd.bruteforce) in float64. The optimizer's step must
commute with the rescaling group G (with and without momentum / weight decay), while SGD's does not.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from gsgd import bruteforce as bf
from gsgd.discovery import discover
from gsgd.group import random_rescale, rescale_block
from gsgd.optim import PathSGD
from gsgd.optim.pathsgd import path_norm_squared, path_scales, path_sgd_direction
from gsgd.structure import layer_view

F64 = torch.float64



# (widths, taps, bias flags)
CHAINS = [
    ((3, 4, 2), None, False),
    ((3, 4, 5, 2), None, True),
    ((2, 3, 2, 2), (2, 3, 1), (True, False, True)),
    ((2, 3, 4, 3), (3, 1, 2), True),
]
CHAIN_IDS = [f"{'-'.join(map(str, w))}-t{t}-b{b}" for w, t, b in CHAINS]


def random_chain(widths, taps, has_bias, seed: int):
    g = bf.chain_graph(widths, taps, has_bias)
    gen = torch.Generator().manual_seed(seed)
    ws = [torch.randn(g.widths[l + 1], g.widths[l], g.taps[l], generator=gen, dtype=F64)
          for l in range(g.n)]
    bs = [torch.randn(g.widths[l + 1], generator=gen, dtype=F64) if g.has_bias[l] else None
          for l in range(g.n)]
    return ws, bs


def brute_gamma(ws, bs):
    """Sum over every path containing e of the product of the other edges' squared weights."""
    g = bf.graph_of(ws, bs)
    w2 = bf.flatten_edges(ws, bs).square()
    gamma = torch.zeros(g.m, dtype=F64)
    for path in bf.enumerate_paths(g.widths, g.taps, g.has_bias):
        for e in path:
            prod = torch.ones((), dtype=F64)
            for f in path:
                if f != e:
                    prod = prod * w2[f]
            gamma[e] += prod
    return bf.unflatten_edges(gamma, ws, bs)


@pytest.mark.parametrize("case", CHAINS, ids=CHAIN_IDS)
def test_gamma_equals_brute_force_sum_over_paths(case):
    ws, bs = random_chain(*case, seed=3)
    gw, gb = path_scales(ws, bs)
    ew, eb = brute_gamma(ws, bs)
    for got, want in zip(gw, ew, strict=True):
        torch.testing.assert_close(got.expand_as(want), want, rtol=1e-12, atol=0)
    for got, want in zip(gb, eb, strict=True):
        assert (got is None) == (want is None)
        if got is not None:
            torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


@pytest.mark.parametrize("case", CHAINS, ids=CHAIN_IDS)
def test_path_norm_is_sum_of_squared_path_values(case):
    ws, bs = random_chain(*case, seed=4)
    want = bf.path_values(ws, bs).square().sum()
    torch.testing.assert_close(path_norm_squared(ws, bs), want, rtol=1e-12, atol=0)


@pytest.mark.parametrize("case", CHAINS, ids=CHAIN_IDS)
def test_weight_decay_term_is_scaled_gradient_of_path_regulariser(case):
    """grad(lambda/2 * phi) / gamma = lambda * w: the weight_decay term of the direction."""
    ws, bs = random_chain(*case, seed=5)
    lw = [w.clone().requires_grad_() for w in ws]
    lb = [None if b is None else b.clone().requires_grad_() for b in bs]
    lam = 0.3
    (0.5 * lam * path_norm_squared(lw, lb)).backward()
    gw, gb = path_scales(ws, bs)
    zeros_w = [torch.zeros_like(w) for w in ws]
    zeros_b = [None if b is None else torch.zeros_like(b) for b in bs]
    dws, dbs = path_sgd_direction(ws, bs, zeros_w, zeros_b, weight_decay=lam)
    for leaf, gamma, d, w in zip(lw, gw, dws, ws, strict=True):
        torch.testing.assert_close(leaf.grad / gamma, lam * w, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(d, lam * w, rtol=0, atol=0)
    for leaf, gamma, d, b in zip(lb, gb, dbs, bs, strict=True):
        if b is not None:
            torch.testing.assert_close(leaf.grad / gamma, lam * b, rtol=1e-12, atol=1e-15)
            torch.testing.assert_close(d, lam * b, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------
# The optimizer on real models
# ------------------------------------------------------------------------------------------------

def mlp_net(bias: bool, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7, bias=bias), nn.ReLU(), nn.Linear(7, 6, bias=bias),
                         nn.ReLU(), nn.Linear(6, 3, bias=bias)).to(F64)


def conv_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 4, 3, padding=1),
                         nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16, 3)).to(F64)


NETS = {"mlp-bias": lambda: mlp_net(True), "mlp-nobias": lambda: mlp_net(False),
        "conv": conv_net}


def batches(net_name: str, n: int = 3, size: int = 12):
    gen = torch.Generator().manual_seed(11)
    shape = (2, 4, 4) if net_name == "conv" else (5,)
    return [(torch.randn(size, *shape, generator=gen, dtype=F64),
             torch.randn(size, 3, generator=gen, dtype=F64)) for _ in range(n)]


def train(net: nn.Module, opt: torch.optim.Optimizer, data, steps: int) -> None:
    for k in range(steps):
        x, y = data[k % len(data)]
        opt.zero_grad()
        nn.functional.mse_loss(net(x), y).backward()
        opt.step()


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def rescaled_pair(net_name: str):
    net = NETS[net_name]()
    structure = discover(net, strict=True)
    assert len(structure.blocks) == 1 and not structure.plain, structure.summary()
    other = copy.deepcopy(net)
    factors = random_rescale(other, structure, seed=7)
    return net, other, structure, factors


HYPER = [dict(lr=0.01), dict(lr=0.01, momentum=0.9),
         dict(lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-3),
         dict(lr=0.01, momentum=0.5, dampening=0.3)]
HYPER_IDS = ["plain", "momentum", "nesterov-wd", "dampening"]


@pytest.mark.parametrize("hyper", HYPER, ids=HYPER_IDS)
@pytest.mark.parametrize("net_name", list(NETS))
def test_pathsgd_trajectory_commutes_with_rescaling(net_name, hyper):
    """20 steps from a net and from its rescaled copy: same functions, and the rescaled copy's
    weights equal the rescaled weights of the first (float64, 1e-9 relative)."""
    net, other, structure, factors = rescaled_pair(net_name)
    data = batches(net_name)
    x_eval = data[0][0]
    with torch.no_grad():
        start = net(x_eval).clone()
    train(net, PathSGD(net, **hyper), data, 20)
    train(other, PathSGD(other, **hyper), data, 20)
    with torch.no_grad():
        out_a, out_b = net(x_eval), other(x_eval)
    assert rel_diff(out_a, start) > 1e-3, "the steps did not move the function"
    assert rel_diff(out_b, out_a) < 1e-9
    rescale_block(net, structure.blocks[0], factors[0])
    for (name, p), q in zip(net.named_parameters(), other.parameters(), strict=True):
        assert rel_diff(q.detach(), p.detach()) < 1e-9, name


@pytest.mark.parametrize("net_name", list(NETS))
def test_sgd_trajectory_does_not_commute_with_rescaling(net_name):
    """The control: the same comparison with torch.optim.SGD shows a clear difference."""
    net, other, _, _ = rescaled_pair(net_name)
    data = batches(net_name)
    train(net, torch.optim.SGD(net.parameters(), lr=0.01), data, 1)
    train(other, torch.optim.SGD(other.parameters(), lr=0.01), data, 1)
    with torch.no_grad():
        assert rel_diff(other(data[0][0]), net(data[0][0])) > 1e-4


def test_momentum_buffer_holds_the_scaled_gradient():
    """Momentum acts on g / gamma: after the first step the buffer is g / gamma (brute force)."""
    net = mlp_net(True)
    block = discover(net).blocks[0]
    x, y = batches("mlp-bias")[0]
    opt = PathSGD(net, lr=0.01, momentum=0.9)
    nn.functional.mse_loss(net(x), y).backward()
    named = dict(net.named_parameters())
    ws = [layer_view(named[layer.weight].detach().clone(), layer) for layer in block.layers]
    bs = [named[layer.bias].detach().clone() for layer in block.layers]
    grads = {n: p.grad.clone() for n, p in named.items()}
    opt.step()
    gw, gb = brute_gamma(ws, bs)
    for layer, gamma_w, gamma_b in zip(block.layers, gw, gb, strict=True):
        buf = opt.state[named[layer.weight]]["momentum_buffer"]
        want = layer_view(grads[layer.weight], layer) / gamma_w
        torch.testing.assert_close(layer_view(buf, layer), want, rtol=1e-12, atol=0)
        buf_b = opt.state[named[layer.bias]]["momentum_buffer"]
        torch.testing.assert_close(buf_b, grads[layer.bias] / gamma_b, rtol=1e-12, atol=0)
        assert buf.shape == named[layer.weight].shape


def test_parameters_outside_blocks_get_torch_sgd_updates():
    """A layer after a tanh is no G-block: PathSGD updates it exactly like torch.optim.SGD."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3), nn.Tanh(),
                        nn.Linear(3, 2)).to(F64)
    hyper = dict(lr=0.05, momentum=0.9, weight_decay=0.01, nesterov=True)
    opt = PathSGD(net, **hyper)
    assert opt.plain_parameters == ("4.weight", "4.bias")
    twin = copy.deepcopy(net[4])
    ref = torch.optim.SGD(twin.parameters(), **hyper)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        for p in net.parameters():
            p.grad = torch.randn(p.shape, generator=gen, dtype=F64)
        for p, q in zip(net[4].parameters(), twin.parameters(), strict=True):
            q.grad = p.grad.clone()
        opt.step()
        ref.step()
    for p, q in zip(net[4].parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_state_dict_round_trip_resumes_bit_for_bit():
    data = batches("mlp-bias")
    net = mlp_net(True)
    opt = PathSGD(net, lr=0.01, momentum=0.9)
    train(net, opt, data, 3)
    net2 = copy.deepcopy(net)
    opt2 = PathSGD(net2, lr=0.5)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert opt2.param_groups[0]["lr"] == 0.01
    train(net, opt, data, 3)
    train(net2, opt2, data, 3)
    for p, q in zip(net.parameters(), net2.parameters(), strict=True):
        assert torch.equal(p, q)


def test_dead_unit_gets_finite_update():
    """A unit with zero in-weights and bias has A = 0: its out-edges have gamma = 0 and g = 0."""
    net = mlp_net(True)
    with torch.no_grad():
        net[0].weight[2].zero_()
        net[0].bias[2] = 0.0
    x, y = batches("mlp-bias")[0]
    opt = PathSGD(net, lr=0.01)
    nn.functional.mse_loss(net(x), y).backward()
    opt.step()
    assert all(torch.isfinite(p).all() for p in net.parameters())
    assert torch.all(net[2].weight[:, 2] == mlp_net(True)[2].weight[:, 2])


def test_invalid_arguments_are_named():
    net = mlp_net(True)
    with pytest.raises(ValueError, match="PathSGD: invalid lr"):
        PathSGD(net, lr=-1.0)
    with pytest.raises(ValueError, match="PathSGD: invalid momentum"):
        PathSGD(net, momentum=1.0)
    with pytest.raises(ValueError, match="PathSGD: needs the model"):
        PathSGD(net.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="one param group"):
        PathSGD([{"params": [net[0].weight]},
                 {"params": [p for n, p in net.named_parameters() if n != "0.weight"]}],
                lr=0.1, model=net)


def reference_pathsgd_step(net: nn.Module, structure, group: dict, state: dict) -> dict:
    """What one Path-SGD step makes of every block parameter, written plainly: the direction
    (path_sgd_direction) and heavy-ball momentum in torch SGD's convention, fresh tensors;
    ``state`` maps names to buffers (updated). Parameters whose grad is None are unchanged."""
    named = dict(net.named_parameters())
    new = {}
    sign = -1.0 if group["maximize"] else 1.0
    for block in structure.blocks:
        ws = [layer_view(named[la.weight].detach(), la) for la in block.layers]
        bs = [named[la.bias].detach() if la.bias else None for la in block.layers]
        gs = [torch.zeros_like(w) if named[la.weight].grad is None
              else sign * layer_view(named[la.weight].grad, la)
              for w, la in zip(ws, block.layers, strict=True)]
        gbs = [None if not la.bias else (torch.zeros_like(named[la.bias])
                                         if named[la.bias].grad is None
                                         else sign * named[la.bias].grad)
               for la in block.layers]
        dws, dbs = path_sgd_direction(ws, bs, gs, gbs, group["weight_decay"])
        for la, dw, db in zip(block.layers, dws, dbs, strict=True):
            for name, d in ((la.weight, dw), (la.bias, db)):
                if not name or named[name].grad is None:
                    continue
                d = d.reshape(named[name].shape)
                if group["momentum"]:
                    buf = state.get(name)
                    buf = d.clone() if buf is None else \
                        group["momentum"] * buf + (1 - group["dampening"]) * d
                    state[name] = buf
                    d = d + group["momentum"] * buf if group["nesterov"] else buf
                new[name] = named[name].detach() - group["lr"] * d
    return new


@pytest.mark.parametrize("hyper", HYPER + [dict(lr=0.01, momentum=0.9, weight_decay=1e-2,
                                                maximize=True)],
                         ids=HYPER_IDS + ["maximize-wd"])
@pytest.mark.parametrize("net_name", list(NETS))
def test_the_in_place_step_takes_the_plain_path_sgd_step(net_name, hyper):
    """The optimizer's in-place step (no weight-sized temporaries) equals the plainly written
    step, 10 steps, weights, biases and buffers; a frozen layer (grad None) is not touched."""
    net = NETS[net_name]()
    structure = discover(net, strict=True)
    opt = PathSGD(net, **hyper)
    group = opt.param_groups[0]
    named = dict(net.named_parameters())
    frozen = structure.blocks[0].layers[1].weight
    state: dict = {}
    for k, (x, y) in enumerate(batches(net_name, n=10)):
        opt.zero_grad()
        nn.functional.mse_loss(net(x), y).backward()
        if k >= 5:
            named[frozen].grad = None  # frozen from step 5 on
        before = named[frozen].detach().clone()
        expected = reference_pathsgd_step(net, structure, group, state)
        opt.step()
        for name, want in expected.items():
            torch.testing.assert_close(named[name].detach(), want, rtol=1e-12, atol=1e-14,
                                       msg=lambda m, n=name, k=k: f"step {k}, {n}: {m}")
            if group["momentum"]:
                torch.testing.assert_close(opt.state[named[name]]["momentum_buffer"],
                                           state[name], rtol=1e-12, atol=1e-14)
        if k >= 5:
            assert torch.equal(named[frozen].detach(), before)
