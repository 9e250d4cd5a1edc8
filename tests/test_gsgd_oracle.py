"""One G-SGD step against the brute-force oracle (gsgd.bruteforce), in float64.

The oracle solves the chain rule x = B^T y by dense least squares over the designated basis and
allocates weights by the integer inverse of the basis matrix; the code under test does both in
O(m) sweeps (docs/math.md sections 4-5). Both the pure functional core and the GSGD optimizer on
real ``nn.Module`` s with real loss gradients are checked, on non-unimodal width profiles, with and
without biases, and on a conv / pool / flatten chain.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from conftest import (
    F64,
    assert_rel_close,
    batch,
    block_tensors,
    centres,
    chain_net,
    mse_backward,
    only_block,
)
from gsgd import bruteforce as bf
from gsgd.basis import basis_values, block_routes, parents
from gsgd.discovery import discover
from gsgd.group import skeleton_init
from gsgd.optim import GSGD
from gsgd.reference import g_space_gradient, gsgd_step, guard_ratio

# (widths, bias per layer or for all, activation per hidden layer or for all)
CASES = [
    ((4, 6, 3, 5, 3, 5, 2), True, "relu"),
    ((4, 6, 3, 5, 3, 5, 2), False, "leaky"),
    ((5, 2, 7, 2, 6, 3), True, ("relu", "leaky", "identity", "relu")),
    ((3, 9, 2, 9, 4), False, "relu"),
    ((3, 3, 3, 3), (False, True, True), "leaky"),
    ((2, 5, 1, 4, 2), (True, False, True, False), "relu"),
    ((6, 2, 8, 3), True, ("prelu", "relu")),
    ((3, 7, 5), True, "relu"),
]
IDS = [f"{'-'.join(map(str, w))}-b{b}-{a}" for w, b, a in CASES]


def randomise(model: nn.Module, seed: int) -> None:
    """Weights with magnitudes in [0.5, 1.5] and random signs: route products of order one."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("weight") and p.dim() == 1:  # PReLU slope: keep it
                continue
            mag = torch.rand(p.shape, generator=gen, dtype=p.dtype) + 0.5
            sign = torch.randn(p.shape, generator=gen, dtype=p.dtype).sign()
            p.copy_(mag * sign)


def prepared(case, seed: int = 0):
    """A net of the case with randomised weights and the gradient of an MSE loss on a batch."""
    widths, bias, act = case
    net = chain_net(widths, bias, act, seed=seed)
    randomise(net, seed)
    x, y = batch(widths, seed=seed + 1)
    mse_backward(net, x, y)
    return net, discover(net, strict=True)


def safe_lr(sol: bf.ChainRuleSolution, fraction: float = 0.1) -> float:
    """A step that moves no basis-path value by more than ``fraction`` of itself (no clipping)."""
    d = sol.dL_dv.abs()
    ratio = sol.values.abs()[d > 0] / d[d > 0]
    return float(min(fraction * ratio.min(), 0.05))


def representative_entries(weights, biases, block) -> torch.Tensor:
    """Weight- and bias-shaped tensors flattened to the oracle's representative-edge order."""
    basis = bf.designated_basis(block.widths, [layer.taps for layer in block.layers],
                                centres(block), [layer.bias is not None for layer in block.layers])
    return bf.flatten_edges(weights, biases)[list(basis.representative)]


# ------------------------------------------------------------------------------------------------
# The pure reference step
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_g_space_gradient_equals_least_squares_chain_rule(case):
    net, structure = prepared(case)
    block = only_block(structure)
    ws, bs = block_tensors(net, block)
    gws, gbs = block_tensors(net, block, grads=True)
    dw, db = g_space_gradient(ws, gws, gbs, block_routes(block))
    sol = bf.chain_rule_lstsq(ws, bs, gws, gbs, centres(block))
    assert sol.residual <= 1e-10 * float(sol.x.abs().max())  # the chain rule is consistent
    assert_rel_close(representative_entries(dw, db, block), sol.dL_dv, 1e-9, "dL/dv")


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_g_space_gradient_is_zero_on_frozen_child_edges(case):
    net, structure = prepared(case)
    block = only_block(structure)
    ws, bs = block_tensors(net, block)
    gws, gbs = block_tensors(net, block, grads=True)
    dw, db = g_space_gradient(ws, gws, gbs, block_routes(block))
    basis = bf.designated_basis(block.widths, has_bias=[b is not None for b in bs])
    flat = bf.flatten_edges(dw, db)
    assert torch.equal(flat[list(basis.frozen)], torch.zeros(len(basis.frozen), dtype=F64))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_reference_gsgd_step_equals_bruteforce_oracle_step(case):
    net, structure = prepared(case)
    block = only_block(structure)
    ws, bs = block_tensors(net, block)
    gws, gbs = block_tensors(net, block, grads=True)
    lr = safe_lr(bf.chain_rule_lstsq(ws, bs, gws, gbs))
    result = gsgd_step(ws, bs, gws, gbs, lr, block_routes(block))
    expected_w, expected_b = bf.oracle_step(ws, bs, gws, gbs, lr)
    assert int(result.clipped) == 0
    for l, (w, e) in enumerate(zip(result.weights, expected_w, strict=True)):
        assert_rel_close(w, e, 1e-9, f"weight {l}")
    for l, (b, e) in enumerate(zip(result.biases, expected_b, strict=True)):
        assert (b is None) == (e is None)
        if b is not None:
            assert_rel_close(b, e, 1e-9, f"bias {l}")


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_reference_gsgd_step_does_not_modify_its_inputs(case):
    net, structure = prepared(case)
    block = only_block(structure)
    ws, bs = block_tensors(net, block)
    gws, gbs = block_tensors(net, block, grads=True)
    before = [t.clone() for t in ws + gws + [b for b in bs + gbs if b is not None]]
    gsgd_step(ws, bs, gws, gbs, 1e-3, block_routes(block))
    after = ws + gws + [b for b in bs + gbs if b is not None]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))


# ------------------------------------------------------------------------------------------------
# The optimizer on real modules
# ------------------------------------------------------------------------------------------------

def optimizer_vs_oracle(net: nn.Module, block, lr_fraction: float = 0.1, **hyper):
    """Take one GSGD step on ``net`` (grads already there); return (after, oracle, optimizer)."""
    ws, bs = block_tensors(net, block)
    gws, gbs = block_tensors(net, block, grads=True)
    cs = centres(block)
    lr = safe_lr(bf.chain_rule_lstsq(ws, bs, gws, gbs, cs), lr_fraction)
    expected = bf.oracle_step(ws, bs, gws, gbs, lr, cs)
    opt = GSGD(net, lr=lr, **hyper)
    opt.step()
    return block_tensors(net, block), expected, opt


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_optimizer_step_equals_bruteforce_oracle_step(case):
    net, structure = prepared(case, seed=7)
    block = only_block(structure)
    (ws, bs), (ew, eb), opt = optimizer_vs_oracle(net, block)
    assert opt.clip_counts() == [0]
    for l, (w, e) in enumerate(zip(ws, ew, strict=True)):
        assert_rel_close(w, e, 1e-9, f"weight {l}")
    for l, (b, e) in enumerate(zip(bs, eb, strict=True)):
        if b is not None:
            assert_rel_close(b, e, 1e-9, f"bias {l}")


def conv_chain() -> nn.Sequential:
    """conv 3x3 -> ReLU -> max-pool -> conv 1x3 -> LeakyReLU -> flatten -> Linear (taps 9, 3, 4)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(3, 2, (1, 3), padding=(0, 1)), nn.LeakyReLU(0.1), nn.Flatten(),
            nn.Linear(2 * 2 * 2, 3),
        ).to(F64)


def test_optimizer_step_on_conv_pool_flatten_chain_equals_oracle():
    net = conv_chain()
    randomise(net, 3)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(5, 2, 4, 4, generator=gen, dtype=F64)
    y = torch.randn(5, 3, generator=gen, dtype=F64)
    mse_backward(net, x, y)
    block = only_block(discover(net, strict=True))
    assert [layer.taps for layer in block.layers] == [9, 3, 4]
    assert centres(block) == (4, 1, 0)
    (ws, bs), (ew, eb), opt = optimizer_vs_oracle(net, block)
    assert opt.clip_counts() == [0]
    for l, (w, e) in enumerate(zip(ws, ew, strict=True)):
        assert_rel_close(w, e, 1e-9, f"weight {l}")
    for l, (b, e) in enumerate(zip(bs, eb, strict=True)):
        assert_rel_close(b, e, 1e-9, f"bias {l}")


def test_optimizer_weight_decay_and_momentum_act_on_basis_path_values():
    """Two steps: d_k = dL/dv + wd * v;  v1 = v0 - lr d_0;  v2 = v1 - lr (mu d_0 + d_1)."""
    case = CASES[2]
    net, structure = prepared(case, seed=5)
    block = only_block(structure)
    widths = case[0]
    x, y = batch(widths, seed=6)
    lr, mu, wd = 1e-3, 0.9, 0.1
    oracle_net = copy.deepcopy(net)
    opt = GSGD(net, lr=lr, momentum=mu, weight_decay=wd)
    bufs = None
    for _ in range(2):
        mse_backward(net, x, y)
        mse_backward(oracle_net, x, y)
        ws, bs = block_tensors(oracle_net, block)
        gws, gbs = block_tensors(oracle_net, block, grads=True)
        sol = bf.chain_rule_lstsq(ws, bs, gws, gbs)
        d = sol.dL_dv + wd * sol.values
        bufs = d if bufs is None else mu * bufs + d
        new_w, new_b = bf.allocate(ws, bs, sol.values - lr * bufs)
        with torch.no_grad():
            layers = [m for m in oracle_net if isinstance(m, nn.Linear)]
            for layer, w, b in zip(layers, new_w, new_b, strict=True):
                layer.weight.copy_(w.reshape(layer.weight.shape))
                if b is not None:
                    layer.bias.copy_(b)
        opt.step()
    assert opt.clip_counts() == [0]
    for p, q in zip(net.parameters(), oracle_net.parameters(), strict=True):
        assert_rel_close(p.detach(), q.detach(), 1e-9)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_basis_path_values_after_step_equal_v_minus_lr_grad(case):
    net, structure = prepared(case, seed=11)
    block = only_block(structure)
    ws, bs = block_tensors(net, block)
    gws, gbs = block_tensors(net, block, grads=True)
    sol = bf.chain_rule_lstsq(ws, bs, gws, gbs)
    lr = safe_lr(sol, 0.3)
    opt = GSGD(net, lr=lr)
    opt.step()
    assert opt.clip_counts() == [0]
    new_ws, new_bs = block_tensors(net, block)
    after = bf.basis_path_values(new_ws, new_bs)
    assert_rel_close(after, sol.values - lr * sol.dL_dv, 1e-10, "basis-path values")
    assert float((after - sol.values).abs().max()) > 1e-3 * float(sol.values.abs().max())


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_step_leaves_frozen_child_edges_unchanged(case):
    net, structure = prepared(case, seed=2)
    block = only_block(structure)
    ws, bs = block_tensors(net, block)
    GSGD(net, lr=1e-3).step()
    new_ws, new_bs = block_tensors(net, block)
    basis = bf.designated_basis(block.widths, has_bias=[b is not None for b in bs])
    frozen = list(basis.frozen)
    assert torch.equal(bf.flatten_edges(new_ws, new_bs)[frozen], bf.flatten_edges(ws, bs)[frozen])
    assert not torch.equal(bf.flatten_edges(new_ws, new_bs), bf.flatten_edges(ws, bs))


# ------------------------------------------------------------------------------------------------
# The frozen-edge equations
# ------------------------------------------------------------------------------------------------

def unit_balance(ws, bs, gws, gbs) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per hidden node layer: (sum of x = w g over incoming edges incl. bias, over outgoing)."""
    out = []
    for l in range(1, len(ws)):
        incoming = (ws[l - 1] * gws[l - 1]).sum(dim=(1, 2))
        if bs[l - 1] is not None:
            incoming = incoming + bs[l - 1] * gbs[l - 1]
        outgoing = (ws[l] * gws[l]).sum(dim=(0, 2))
        out.append((incoming, outgoing))
    return out


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_scale_invariance_identity_holds_at_every_hidden_unit(case):
    net, structure = prepared(case, seed=4)
    block = only_block(structure)
    ws, bs = block_tensors(net, block)
    gws, gbs = block_tensors(net, block, grads=True)
    scale = max(float((w * g).abs().max()) for w, g in zip(ws, gws, strict=True))
    for incoming, outgoing in unit_balance(ws, bs, gws, gbs):
        assert float((incoming - outgoing).abs().max()) <= 1e-10 * scale


def test_scale_invariance_identity_fails_for_tanh_so_the_check_can_fail():
    net = chain_net((3, 4, 2), True, "relu", seed=1)
    net[1] = nn.Tanh()
    randomise(net, 1)
    mse_backward(net, *batch((3, 4, 2)))
    ws = [net[0].weight.detach()[:, :, None], net[2].weight.detach()[:, :, None]]
    gws = [net[0].weight.grad[:, :, None], net[2].weight.grad[:, :, None]]
    bs, gbs = [net[0].bias.detach(), None], [net[0].bias.grad, None]
    (incoming, outgoing), = unit_balance(ws, bs, gws, gbs)
    assert float((incoming - outgoing).abs().max()) > 1e-3


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_inverse_chain_rule_satisfies_the_frozen_edge_equations(case):
    """x_e = sum of y_p over basis paths through e also for the H frozen edges (not solved for)."""
    net, structure = prepared(case, seed=9)
    block = only_block(structure)
    ws, bs = block_tensors(net, block)
    gws, gbs = block_tensors(net, block, grads=True)
    dw, db = g_space_gradient(ws, gws, gbs, block_routes(block))
    basis = bf.designated_basis(block.widths, has_bias=[b is not None for b in bs])
    v = bf.basis_path_values(ws, bs)
    y = representative_entries(dw, db, block) * v
    x = bf.flatten_edges(ws, bs) * bf.flatten_edges(gws, gbs)
    reconstructed = basis.matrix.T @ y
    frozen = list(basis.frozen)
    assert float(x[frozen].abs().max()) > 0  # the equations are not trivially 0 = 0
    assert_rel_close(reconstructed[frozen], x[frozen], 1e-10, "frozen-edge equations")
    assert_rel_close(reconstructed, x, 1e-10, "all chain-rule equations")


# ------------------------------------------------------------------------------------------------
# The carrier-ratio guard keeps the paper's step wherever |R| is within bounds
# ------------------------------------------------------------------------------------------------

def carrier_ratios(before: list[torch.Tensor], after: list[torch.Tensor], block) -> torch.Tensor:
    """R = v'/v of every carrier (basis-path values of the parent edges that are carriers)."""
    routes = block_routes(block)
    v0, _ = basis_values(before, [None] * len(before), routes)
    v1, _ = basis_values(after, [None] * len(after), routes)
    return torch.cat([(parents(a, r) / parents(b, r))[r.carriers()]
                      for a, b, r in zip(v1, v0, routes, strict=True) if r.head_hidden])


def test_a_step_with_a_negative_carrier_ratio_equals_the_oracle():
    """A large step takes a carrier path value across zero (R < 0, |R| within bounds): the
    guard changes nothing and the reference and the optimizer take the oracle's step."""
    net = chain_net([3, 4, 5, 2], bias=True, seed=4)
    structure = discover(net, strict=True)
    skeleton_init(net, structure)
    x, y = batch([3, 4, 5, 2], seed=4)
    mse_backward(net, x, y)
    block = only_block(structure)
    ws, bs = block_tensors(net, block)
    gws, gbs = block_tensors(net, block, grads=True)
    lr = next(lr for lr in (0.1 * 1.25 ** k for k in range(20))
              if int(gsgd_step(ws, bs, gws, gbs, lr, block_routes(block)).clipped) == 0
              and float(carrier_ratios(ws, gsgd_step(ws, bs, gws, gbs, lr,
                                                     block_routes(block)).weights,
                                       block).min()) < -0.5)
    result = gsgd_step(ws, bs, gws, gbs, lr, block_routes(block))
    expected_w, expected_b = bf.oracle_step(ws, bs, gws, gbs, lr)
    ratios = carrier_ratios(ws, result.weights, block)
    assert float(ratios.min()) < -0.5 and float(ratios.abs().min()) > 1e-2  # within bounds
    opt = GSGD(net, lr=lr)
    opt.step()
    after_w, after_b = block_tensors(net, block)
    assert opt.clip_counts() == [0]
    for l, (w, o, e) in enumerate(zip(result.weights, after_w, expected_w, strict=True)):
        assert_rel_close(w, e, 1e-9, f"reference weight {l}")
        assert_rel_close(o, e, 1e-9, f"optimizer weight {l}")
    for l, (b, o, e) in enumerate(zip(result.biases, after_b, expected_b, strict=True)):
        assert_rel_close(b, e, 1e-9, f"reference bias {l}")
        assert_rel_close(o, e, 1e-9, f"optimizer bias {l}")


@pytest.mark.parametrize("raw, want", [(-0.37, -0.37), (-1e-3, -1e-2), (1e-3, 1e-2),
                                       (0.0, 1e-2), (-500.0, -100.0), (250.0, 100.0),
                                       (1.7, 1.7)])
def test_guard_bounds_the_ratio_magnitude_keeping_its_sign(raw, want):
    ratio, changed = guard_ratio(torch.tensor([raw], dtype=F64), 100.0)
    assert float(ratio) == pytest.approx(want, rel=1e-12)
    assert bool(changed) == (raw != want)
