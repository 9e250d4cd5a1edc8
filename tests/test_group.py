"""The rescaling group G (gsgd.group): function preservation, canonical form, skeleton init."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from conftest import F64, block_tensors, chain_net, only_block, relative_difference
from gsgd import bruteforce as bf
from gsgd.discovery import discover
from gsgd.group import canonical_form, random_rescale, rescale_block, skeleton_init
from gsgd.structure import layer_view

NETS = [
    ((4, 6, 3, 5, 3, 5, 2), True, "relu"),
    ((5, 2, 7, 2, 6, 3), (True, False, True, False, True), ("leaky", "relu", "prelu", "identity")),
    ((3, 9, 2, 9, 4), False, "leaky"),
    ((3, 4, 2), True, "relu"),
]
IDS = [f"{'-'.join(map(str, w))}" for w, _, _ in NETS]


def conv_net() -> nn.Sequential:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
            nn.Conv2d(3, 4, 3, padding=1), nn.LeakyReLU(0.1), nn.Flatten(),
            nn.Linear(4 * 2 * 2, 3),
        ).to(F64)


def nets():
    gen = torch.Generator().manual_seed(0)
    for widths, bias, act in NETS:
        yield chain_net(widths, bias, act, seed=1), torch.randn(10, widths[0], generator=gen,
                                                                dtype=F64)
    yield conv_net(), torch.randn(10, 2, 4, 4, generator=gen, dtype=F64)


NET_IDS = IDS + ["conv"]


@pytest.mark.parametrize("k", range(len(NET_IDS)), ids=NET_IDS)
def test_random_rescale_preserves_the_function(k):
    net, x = list(nets())[k]
    structure = discover(net, strict=True)
    other = copy.deepcopy(net)
    factors = random_rescale(other, structure, seed=3)
    with torch.no_grad():
        assert relative_difference(other(x), net(x)) < 1e-12
        # the rescaling is not trivial: weights moved by factors up to e^2
        moved = max(relative_difference(p, q) for p, q in
                    zip(other.parameters(), net.parameters(), strict=True))
    assert moved > 0.5
    for block_factors in factors:
        for c in block_factors:
            assert bool(((c >= math.exp(-2)) & (c <= math.exp(2))).all())


def test_random_rescale_is_deterministic_from_its_seed():
    net = chain_net((3, 5, 4, 2), True, "relu")
    structure = discover(net)
    a, b, c = copy.deepcopy(net), copy.deepcopy(net), copy.deepcopy(net)
    random_rescale(a, structure, seed=7)
    random_rescale(b, structure, seed=7)
    random_rescale(c, structure, seed=8)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters(), strict=True))


def test_rescale_block_multiplies_incoming_and_divides_outgoing_weights():
    net = chain_net((2, 3, 2), True, "relu")
    block = only_block(discover(net))
    before = copy.deepcopy(net)
    c = torch.tensor([2.0, 0.5, 3.0], dtype=F64)
    rescale_block(net, block, [c])
    assert torch.allclose(net[0].weight, before[0].weight * c[:, None], rtol=0, atol=1e-15)
    assert torch.allclose(net[0].bias, before[0].bias * c, rtol=0, atol=1e-15)
    assert torch.allclose(net[2].weight, before[2].weight / c[None, :], rtol=0, atol=1e-15)
    assert torch.equal(net[2].bias, before[2].bias)


@pytest.mark.parametrize("factors, match", [
    ([], "factor vectors"),
    ([torch.ones(2, dtype=F64)], "shape"),
    ([torch.tensor([1.0, 0.0, 1.0], dtype=F64)], "> 0"),
    ([torch.tensor([1.0, -2.0, 1.0], dtype=F64)], "> 0"),
    ([torch.tensor([1.0, math.inf, 1.0], dtype=F64)], "finite"),
])
def test_rescale_block_rejects_bad_factors(factors, match):
    net = chain_net((2, 3, 2), True, "relu")
    with pytest.raises(ValueError, match=match):
        rescale_block(net, only_block(discover(net)), factors)


@pytest.mark.parametrize("case", NETS, ids=IDS)
def test_random_rescale_keeps_every_basis_path_value(case):
    net = chain_net(*case, seed=2)
    structure = discover(net)
    block = only_block(structure)
    ws, bs = block_tensors(net, block)
    other = copy.deepcopy(net)
    random_rescale(other, structure, seed=4)
    ows, obs = block_tensors(other, block)
    assert relative_difference(bf.basis_path_values(ows, obs), bf.basis_path_values(ws, bs)) \
        < 1e-12


def child_edges(net: nn.Module, block) -> list[torch.Tensor]:
    """kappa(u) = W^l[j mod h_{l+1}, j, centre] for every hidden unit (l, j), computed here."""
    named = dict(net.named_parameters())
    widths = block.widths
    out = []
    for l in range(1, len(widths) - 1):
        layer = block.layers[l]
        w = layer_view(named[layer.weight].detach(), layer)
        j = torch.arange(widths[l])
        out.append(w[j % widths[l + 1], j, layer.centre])
    return out


def parent_edges(net: nn.Module, block) -> list[torch.Tensor]:
    """pi(u) = W^{l-1}[j, j mod h_{l-1}, centre] for every hidden unit (l, j), computed here."""
    named = dict(net.named_parameters())
    widths = block.widths
    out = []
    for l in range(1, len(widths) - 1):
        layer = block.layers[l - 1]
        w = layer_view(named[layer.weight].detach(), layer)
        j = torch.arange(widths[l])
        out.append(w[j, j % widths[l - 1], layer.centre])
    return out


@pytest.mark.parametrize("k", range(len(NET_IDS)), ids=NET_IDS)
def test_canonical_form_preserves_function_and_makes_child_edges_unit_with_signs_kept(k):
    net, x = list(nets())[k]
    structure = discover(net, strict=True)
    block = only_block(structure)
    signs = [kappa.sign() for kappa in child_edges(net, block)]
    other = copy.deepcopy(net)
    canonical_form(other, structure)
    with torch.no_grad():
        assert relative_difference(other(x), net(x)) < 1e-12
    for kappa, sign in zip(child_edges(other, block), signs, strict=True):
        assert torch.allclose(kappa.abs(), torch.ones_like(kappa), rtol=0, atol=1e-14)
        assert torch.equal(kappa.sign(), sign)


@pytest.mark.parametrize("k", range(len(NET_IDS)), ids=NET_IDS)
def test_canonical_form_is_the_same_for_every_point_of_an_orbit(k):
    net, _ = list(nets())[k]
    structure = discover(net, strict=True)
    other = copy.deepcopy(net)
    random_rescale(other, structure, seed=5)
    canonical_form(net, structure)
    canonical_form(other, structure)
    for p, q in zip(net.parameters(), other.parameters(), strict=True):
        assert relative_difference(q.detach(), p.detach()) < 1e-12


def test_canonical_form_of_a_canonical_net_changes_nothing():
    net = chain_net((3, 5, 4, 2), True, "leaky", seed=3)
    structure = discover(net)
    canonical_form(net, structure)
    again = copy.deepcopy(net)
    factors = canonical_form(again, structure)
    for c in factors[0]:
        assert torch.allclose(c, torch.ones_like(c), rtol=0, atol=1e-14)
    for p, q in zip(net.parameters(), again.parameters(), strict=True):
        assert relative_difference(q.detach(), p.detach()) < 1e-14


def test_canonical_form_rejects_a_zero_child_edge():
    net = chain_net((2, 3, 2), True, "relu")
    with torch.no_grad():
        net[2].weight[1, 1] = 0.0  # kappa of hidden unit 1: W^1[1 mod 2, 1]
    with pytest.raises(ValueError, match="0"):
        canonical_form(net, discover(net))


@pytest.mark.parametrize("k", range(len(NET_IDS)), ids=NET_IDS)
@pytest.mark.parametrize("keep_sign", [False, True])
def test_skeleton_init_sets_designated_weights_to_one_and_nothing_else(k, keep_sign):
    net, _ = list(nets())[k]
    structure = discover(net, strict=True)
    block = only_block(structure)
    before = copy.deepcopy(net)
    with torch.no_grad():  # make some designated weights negative so keep_sign matters
        for p in net.parameters():
            p.neg_()
        for p in before.parameters():
            p.neg_()
    skeleton_init(net, structure, keep_sign=keep_sign)
    for new, old in [(child_edges(net, block), child_edges(before, block)),
                     (parent_edges(net, block), parent_edges(before, block))]:
        for n, o in zip(new, old, strict=True):
            expected = o.sign() if keep_sign else torch.ones_like(o)
            assert torch.equal(n, expected)
    if keep_sign:
        assert any(bool((e < 0).any()) for e in child_edges(net, block) + parent_edges(net, block))
    # every other weight and every bias is untouched
    named, old_named = dict(net.named_parameters()), dict(before.named_parameters())
    widths = block.widths
    for l, layer in enumerate(block.layers):
        w = layer_view(named[layer.weight].detach(), layer)
        old = layer_view(old_named[layer.weight].detach(), layer)
        keep = torch.ones_like(w, dtype=torch.bool)
        if l + 1 < len(widths) - 1:  # parent edges into hidden layer l + 1
            j = torch.arange(widths[l + 1])
            keep[j, j % widths[l], layer.centre] = False
        if l > 0:  # child edges out of hidden layer l
            j = torch.arange(widths[l])
            keep[j % widths[l + 1], j, layer.centre] = False
        assert torch.equal(w[keep], old[keep])
        if layer.bias:
            assert torch.equal(named[layer.bias], old_named[layer.bias])
