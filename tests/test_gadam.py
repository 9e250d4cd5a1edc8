"""G-space Adam / AdamW (docs/math.md section 11), in float64.

(a) GAdam against a dense brute-force Adam run directly on the basis-path values: the oracle
    (gsgd.bruteforce) gives dL/dv by least squares, torch.optim.Adam / AdamW steps the vector of
    basis-path values, the integer-inverse allocation turns it back into weights; one step and
    several steps (so the moments matter), non-unimodal widths, biases, a conv chain.
(b) rescaling invariance: a net and its randomly rescaled copy stay the same function, while
    torch.optim.Adam drifts apart in the same test.
(c) state_dict round trip (copies and pickles: tests/test_optimizer_conventions.py);
(d) torch.optim conventions; (e) AdamW's decoupled decay on basis paths; the basis-path
    regulariser (our design) against autograd.
"""

from __future__ import annotations

import copy
import pickle
from typing import NamedTuple

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
    two_block_net,
)
from gsgd import GAdam, GAdamW, NonFiniteError
from gsgd import bruteforce as bf
from gsgd.basis import block_routes
from gsgd.discovery import discover
from gsgd.reference import basis_path_norm, basis_path_norm_gradient, g_space_gradient
from gsgd.structure import Block
from test_gsgd_invariance import assert_alive, eval_loss, rescaled_run, rescaled_start
from test_gsgd_oracle import CASES, IDS, conv_chain, randomise, representative_entries
from test_optimizer_conventions import same, train

# ------------------------------------------------------------------------------------------------
# (a) the brute-force oracle: Adam on the vector of basis-path values
# ------------------------------------------------------------------------------------------------


def load_block(net: nn.Module, block, ws, bs) -> None:
    """Write ``(out, in, taps)`` weights and biases into the block's parameters."""
    named = dict(net.named_parameters())
    with torch.no_grad():
        for layer, w, b in zip(block.layers, ws, bs, strict=True):
            named[layer.weight].copy_(w.reshape(named[layer.weight].shape))
            if b is not None:
                named[layer.bias].copy_(b)


def carrier_rows(basis: bf.DesignatedBasis) -> torch.Tensor:
    """Per basis path (representative-edge order): is it a carrier's, i.e. is the edge the
    designated parent edge W^l[j, j mod h_l, centre] of a hidden head (written from the
    oracle's graph, not from gsgd.basis)."""
    g = basis.graph
    rows = []
    for e in basis.representative:
        edge = g.edges[e]
        rows.append(not edge.is_bias and g.is_hidden(edge.head)
                    and edge.inp == edge.out % g.widths[edge.layer]
                    and edge.tap == basis.centres[edge.layer])
    return torch.tensor(rows)


def live(d: torch.Tensor) -> torch.Tensor:
    """dL/dv of the least-squares oracle with its rounding residue on dead paths (about 1e-15
    of the largest entry, where the inverse chain rule gives exact zeros) set to 0: Adam
    normalises, so a residue r would move its path by lr * r / (|r| + eps)."""
    return torch.where(d.abs() > 1e-10 * d.abs().max(), d, 0.0)


def regulariser(v: torch.Tensor, car: torch.Tensor, lam_pos: float, lam_neg: float
                ) -> torch.Tensor:
    """The basis-path regulariser on the dense vector of basis-path values (written here from
    basis-path-norm.md section 4.1): lam_pos/2 sum_{P+} v^2 + lam_neg/2 sum_c log(|v_c|)^2."""
    return (lam_pos / 2 * v[~car].square().sum()
            + lam_neg / 2 * v[car].abs().log().square().sum())


def oracle_adam(net: nn.Module, block, batches, make_input, lr: float, weight_decay: float,
                decoupled: bool, decay_carriers: bool, amsgrad: bool = False,
                betas=(0.9, 0.999), eps: float = 1e-8, bp_norm=(0.0, 0.0)) -> None:
    """Train ``net`` by torch's Adam / AdamW on the basis-path values v (a dense vector, split
    into carriers and positive paths so that the decay can skip the carriers), with dL/dv from
    the least-squares chain rule (plus autograd of :func:`regulariser`) and weights from v by
    the integer-inverse allocation."""
    ws, bs = block_tensors(net, block)
    cs = centres(block)
    basis = bf.designated_basis(block.widths, [la.taps for la in block.layers], cs,
                                [b is not None for b in bs])
    car = carrier_rows(basis)
    v = bf.basis_path_values(ws, bs, cs)
    v_car, v_pos = nn.Parameter(v[car].clone()), nn.Parameter(v[~car].clone())
    cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    opt = cls([{"params": [v_pos], "weight_decay": weight_decay},
               {"params": [v_car], "weight_decay": weight_decay if decay_carriers else 0.0}],
              lr=lr, betas=betas, eps=eps, amsgrad=amsgrad)
    for x, y in batches:
        mse_backward(net, make_input(x), y)
        ws, bs = block_tensors(net, block)
        gws, gbs = block_tensors(net, block, grads=True)
        d = live(bf.chain_rule_lstsq(ws, bs, gws, gbs, cs).dL_dv)
        if any(bp_norm):
            values = torch.empty_like(v)
            values[car], values[~car] = v_car.detach(), v_pos.detach()
            values.requires_grad_()
            regulariser(values, car, *bp_norm).backward()
            d = d + values.grad
        v_car.grad, v_pos.grad = d[car].clone(), d[~car].clone()
        opt.step()
        new = torch.empty_like(v)
        new[car], new[~car] = v_car.detach(), v_pos.detach()
        load_block(net, block, *bf.allocate(ws, bs, new, cs))


def prepared_net(case, seed: int) -> nn.Module:
    widths, bias, act = case
    net = chain_net(widths, bias, act, seed=seed)
    randomise(net, seed)  # |w| in [0.5, 1.5]: route products of order one
    for m in net:
        if isinstance(m, nn.PReLU):  # a plain parameter: the oracle does not train it
            m.weight.requires_grad_(False)
    return net


class FirstStep(NamedTuple):
    """A prepared net after one backward pass, and what the oracle says of its only block."""

    net: nn.Module
    block: Block
    sol: bf.ChainRuleSolution  # basis-path values and dL/dv
    d: torch.Tensor  # dL/dv on live paths
    carriers: torch.Tensor  # which basis paths are carriers


def first_step(case, seed: int = 8) -> FirstStep:
    net = prepared_net(case, seed=seed)
    mse_backward(net, *batch(case[0], seed=seed + 1))
    block = only_block(discover(net, strict=True))
    ws, bs = block_tensors(net, block)
    gws, gbs = block_tensors(net, block, grads=True)
    sol = bf.chain_rule_lstsq(ws, bs, gws, gbs)
    basis = bf.designated_basis(block.widths, has_bias=[b is not None for b in bs])
    return FirstStep(net, block, sol, live(sol.dL_dv), carrier_rows(basis))


def batches_for(widths, steps: int, seed: int):
    return [batch(widths, size=12, seed=seed + k) for k in range(steps)]


def gadam_vs_oracle(net: nn.Module, batches, make_input=lambda x: x, lr: float = 1e-2,
                    **hyper) -> GAdam:
    """Train a copy of ``net`` by GAdam and ``net`` itself by the oracle; compare weights."""
    block = only_block(discover(net, strict=True))
    ours = copy.deepcopy(net)
    opt = GAdam(ours, lr=lr, **hyper)
    oracle_adam(net, block, batches, make_input, lr, hyper.get("weight_decay", 0.0),
                hyper.get("decoupled_weight_decay", False), hyper.get("decay_carriers", False),
                hyper.get("amsgrad", False), hyper.get("betas", (0.9, 0.999)),
                bp_norm=hyper.get("bp_norm", (0.0, 0.0)))
    for x, y in batches:
        mse_backward(ours, make_input(x), y)
        opt.step()
    assert opt.clip_counts() == [0]
    for (name, p), q in zip(ours.named_parameters(), net.parameters(), strict=True):
        assert_rel_close(p.detach(), q.detach(), 1e-9, name)
    return opt


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_one_step_equals_bruteforce_adam_on_basis_path_values(case):
    net = prepared_net(case, seed=3)
    gadam_vs_oracle(net, batches_for(case[0], 1, seed=4))


VARIANTS = {
    "adam": dict(),
    "adam-l2": dict(weight_decay=0.1),
    "adam-l2-carriers-amsgrad": dict(weight_decay=0.1, decay_carriers=True, amsgrad=True),
    "adamw": dict(weight_decay=0.5, decoupled_weight_decay=True, betas=(0.8, 0.99)),
    "adamw-carriers": dict(weight_decay=0.5, decoupled_weight_decay=True, decay_carriers=True),
    "adam-bpnorm": dict(bp_norm=(0.3, 0.5)),
}
SEVERAL = [CASES[0], CASES[2], CASES[3]]  # 4-6-3-5-3-5-2, 5-2-7-2-6-3, 3-9-2-9-4


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("case", SEVERAL, ids=[IDS[CASES.index(c)] for c in SEVERAL])
def test_several_steps_equal_bruteforce_adam_on_basis_path_values(case, variant):
    net = prepared_net(case, seed=5)
    gadam_vs_oracle(net, batches_for(case[0], 6, seed=6), **VARIANTS[variant])


def test_several_steps_on_a_conv_pool_flatten_chain_equal_bruteforce_adam():
    net = conv_chain()
    randomise(net, 3)
    gen = torch.Generator().manual_seed(4)
    batches = [(torch.randn(5, 2, 4, 4, generator=gen, dtype=F64),
                torch.randn(5, 3, generator=gen, dtype=F64)) for _ in range(4)]
    gadam_vs_oracle(net, batches, weight_decay=0.1, decoupled_weight_decay=True)


# ------------------------------------------------------------------------------------------------
# (b) invariance under the rescaling group
# ------------------------------------------------------------------------------------------------

STEPS = 50


def invariance_gaps(widths, bias, acts, seed: int, lr: float, **hyper) -> tuple[float, float]:
    """(G-Adam gap, torch Adam gap): largest relative output difference between a net and its
    randomly rescaled copy trained STEPS steps on the same batches."""
    start = rescaled_start(widths, bias, acts, seed)
    ours = rescaled_run(start, lambda net: GAdam(net, lr=lr, **hyper), STEPS)
    assert_alive(ours.model, start.x_eval)
    assert eval_loss(ours.model, start.batches) < 0.9 * start.before, "G-Adam did not train"
    assert ours.opt.clip_counts() == ours.twin_opt.clip_counts()
    decay = hyper.get("weight_decay", 0.0)
    cls = torch.optim.AdamW if hyper.get("decoupled_weight_decay") else torch.optim.Adam
    theirs = rescaled_run(start, lambda net: cls(net.parameters(), lr=lr, weight_decay=decay),
                          STEPS)
    return ours.gap, theirs.gap


@pytest.mark.filterwarnings("ignore::gsgd.PlainParametersWarning")  # the PReLU slope
@pytest.mark.parametrize("widths, bias, acts, hyper", [
    ((4, 6, 3, 5, 2), (True, False, True, True), ("relu", "leaky", "prelu"), dict()),
    ((3, 9, 2, 9, 4), True, "relu", dict(weight_decay=1e-2, decoupled_weight_decay=True)),
    ((5, 2, 7, 2, 6, 3), True, "relu",
     dict(weight_decay=1e-2, decoupled_weight_decay=True, decay_carriers=True, amsgrad=True)),
    ((4, 6, 3, 5, 3, 5, 2), True, "relu", dict(weight_decay=1e-2, bp_norm=(1e-2, 1e-2))),
], ids=["adam", "adamw", "adamw-carriers-amsgrad", "adam-l2-bpnorm"])
def test_gadam_is_invariant_under_rescaling_while_torch_adam_is_not(widths, bias, acts, hyper):
    ours, theirs = invariance_gaps(widths, bias, acts, seed=3, lr=1e-2, **hyper)
    assert ours < 1e-8, f"G-Adam broke rescaling invariance: gap {ours:.3e}"
    assert theirs > 1e-3, f"torch Adam stayed invariant (gap {theirs:.3e}): test is vacuous"


# ------------------------------------------------------------------------------------------------
# (c) state_dict round trip
# ------------------------------------------------------------------------------------------------

def test_state_dict_round_trip_continues_bit_for_bit():
    model = two_block_net()
    opt = GAdamW(model, lr=0.05, amsgrad=True, max_ratio=1.02)  # so that R is bounded
    train(model, opt, 4, seed=0)
    saved = pickle.loads(pickle.dumps((copy.deepcopy(model.state_dict()), opt.state_dict())))
    twin = two_block_net()
    twin.load_state_dict(saved[0])
    twin_opt = GAdamW(twin, lr=1.0, weight_decay=0.0)  # hyper-parameters come from the state
    twin_opt.load_state_dict(saved[1])
    assert twin_opt.param_groups[0]["lr"] == 0.05 and twin_opt.param_groups[0]["amsgrad"]
    train(model, opt, 3, seed=1)
    train(twin, twin_opt, 3, seed=1)
    assert same(twin, model)
    assert twin_opt.clip_counts() == opt.clip_counts() and sum(opt.clip_counts()) > 0
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        for key, value in opt.state[p].items():
            other = twin_opt.state[q][key]
            assert (torch.equal(value, other) if isinstance(value, torch.Tensor)
                    else value == other), key


# ------------------------------------------------------------------------------------------------
# (d) torch.optim conventions
# ------------------------------------------------------------------------------------------------

def test_maximize_steps_like_minimising_the_negated_loss():
    a, b = two_block_net(), two_block_net()
    train(a, GAdam(a, lr=0.02, maximize=True), 3, seed=0, sign=-1.0)
    train(b, GAdam(b, lr=0.02), 3, seed=0)
    assert same(a, b)
    c = two_block_net()
    train(c, GAdam(c, lr=0.02), 3, seed=0, sign=-1.0)
    assert not same(c, b)


def test_a_parameter_whose_grad_is_none_is_not_touched():
    net = chain_net((3, 5, 4, 2), True, seed=1)
    x, y = batch((3, 5, 4, 2))
    opt = GAdam(net, lr=0.05)
    mse_backward(net, x, y)
    net[2].weight.grad = None  # the middle layer sits out (its bias too, as in GSGD): the
    # block is cut into two one-layer runs, each stepped as a G-block of its own
    before = [p.detach().clone() for p in net.parameters()]
    opt.step()
    after = list(net.parameters())
    assert net[2].weight not in opt.state and net[2].bias not in opt.state
    changed = [not torch.equal(p, q) for p, q in zip(after, before, strict=True)]
    assert changed == [True, True, False, False, True, True]


def backward_once(model: nn.Module, twins: list[nn.Module], gen: torch.Generator) -> None:
    """Gradients of one MSE batch on ``model``, copied into every twin (same parameter order):
    the twins then step on the same gradients whatever their weights."""
    x = torch.randn(8, 6, generator=gen, dtype=F64)
    y = torch.randn(8, 3, generator=gen, dtype=F64)
    mse_backward(model, x, y)
    for twin in twins:
        for p, q in zip(model.parameters(), twin.parameters(), strict=True):
            q.grad = p.grad.clone()


def test_param_groups_give_each_block_and_the_plain_parameters_their_own_lr():
    model = two_block_net()
    a_names = {"a1.weight", "a1.bias", "a2.weight", "a2.bias"}
    named = dict(model.named_parameters())
    groups = [{"params": [named[n] for n in sorted(a_names)], "lr": 0.05},
              {"params": [p for n, p in named.items() if n not in a_names], "lr": 0.01}]
    twin_a, twin_b = copy.deepcopy(model), copy.deepcopy(model)
    opts = [GAdam(groups, model=model), GAdam(twin_a, lr=0.05), GAdam(twin_b, lr=0.01)]
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        backward_once(model, [twin_a, twin_b], gen)
        for opt in opts:
            opt.step()
    for (name, p), qa, qb in zip(model.named_parameters(), twin_a.parameters(),
                                 twin_b.parameters(), strict=True):
        assert torch.equal(p, qa if name in a_names else qb), name
    assert not torch.equal(twin_a.a1.weight, twin_b.a1.weight)


def test_a_scheduler_sets_the_lr_of_every_step():
    model = two_block_net()
    opt = GAdam(model, lr=0.02)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: [1.0, 0.5, 0.0][min(epoch, 2)])
    twin = copy.deepcopy(model)
    twin_opt = GAdam(twin, lr=0.02)
    for k, factor in enumerate([1.0, 0.5]):
        twin_opt.param_groups[0]["lr"] = 0.02 * factor
        train(model, opt, 1, seed=k)
        train(twin, twin_opt, 1, seed=k)
        sched.step()
        assert same(model, twin)
    frozen = [p.detach().clone() for p in model.parameters()]
    train(model, opt, 1, seed=5)  # lr 0: nothing moves, the moments do
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), frozen, strict=True))
    assert float(opt.state[model.a1.weight]["step"]) == 3


@pytest.mark.parametrize("cls, torch_cls, hyper", [
    (GAdam, torch.optim.Adam, dict(weight_decay=0.1, amsgrad=True, maximize=True)),
    (GAdamW, torch.optim.AdamW, dict(weight_decay=0.3, betas=(0.8, 0.95), eps=1e-6)),
], ids=["adam", "adamw"])
def test_plain_parameters_get_torch_adam_exactly(cls, torch_cls, hyper):
    model = two_block_net()
    opt = cls(model, lr=0.03, **hyper)
    plain = [dict(model.named_parameters())[n] for n in opt.plain_parameters]
    assert set(opt.plain_parameters) == {"stem.weight", "stem.bias"}
    twin = copy.deepcopy(model)
    twin_plain = [dict(twin.named_parameters())[n] for n in opt.plain_parameters]
    reference = torch_cls(twin_plain, lr=0.03, **hyper)
    gen = torch.Generator().manual_seed(0)
    for _ in range(4):
        backward_once(model, [twin], gen)
        opt.step()
        reference.step()
        for p, q in zip(plain, twin_plain, strict=True):
            assert torch.equal(p, q)
            for key, value in reference.state[q].items():
                assert torch.equal(opt.state[p][key], value), key


def test_a_closure_is_evaluated_with_grad_enabled_and_its_loss_returned():
    model, twin = two_block_net(), two_block_net()
    opt, twin_opt = GAdam(model, lr=0.02), GAdam(twin, lr=0.02)
    x, y = batch((6, 3), size=8)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        return mse_backward(model, x, y)

    loss = opt.step(closure)
    expected = mse_backward(twin, x, y)
    twin_opt.step()
    assert torch.equal(loss, expected) and same(model, twin)


@pytest.mark.parametrize("kwargs, match", [
    (dict(betas=(0.9, 1.0)), "betas"), (dict(betas=(0.9,)), "betas"), (dict(eps=-1.0), "eps"),
    (dict(amsgrad=1), "amsgrad"), (dict(decay_carriers="no"), "decay_carriers"),
    (dict(bp_norm=(0.1, -0.1)), "bp_norm"), (dict(max_ratio=1.0), "max_ratio"),
    (dict(on_nonfinite="ignore"), "on_nonfinite"), (dict(lr=float("nan")), "lr"),
])
def test_bad_hyper_parameters_raise_value_error_naming_them(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GAdam(two_block_net(), **kwargs)
    opt = GAdam(two_block_net())
    head = nn.Linear(3, 2).double()
    with pytest.raises(ValueError, match=match):
        opt.add_param_group({"params": list(head.parameters()), **kwargs})


def test_defaults_follow_torch_adam_and_adamw():
    for ours, theirs in ((GAdam, torch.optim.Adam), (GAdamW, torch.optim.AdamW)):
        model = two_block_net()
        mine = ours(model).param_groups[0]
        reference = theirs(model.parameters()).param_groups[0]
        for key in ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize",
                    "decoupled_weight_decay"):
            assert mine[key] == reference[key], (ours.__name__, key)
        assert mine["max_ratio"] == 100.0 and mine["decay_carriers"] is False
        assert f"plain {theirs.__name__}: stem.weight" in ours(model).summary()


@pytest.mark.parametrize("where", ["a2.weight", "b1.weight", "stem.bias"])
def test_a_non_finite_gradient_is_refused_naming_it_and_nothing_is_written(where):
    model = two_block_net()
    opt = GAdam(model, lr=0.02)
    train(model, opt, 1, seed=0)
    before = copy.deepcopy((model.state_dict(), opt.state_dict()))
    x, y = batch((6, 3), size=8)
    opt.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    dict(model.named_parameters())[where].grad.view(-1)[1] = float("nan")
    with pytest.raises(NonFiniteError, match=where.replace(".", r"\.")):
        opt.step()
    assert all(torch.equal(p, before[0][n]) for n, p in model.state_dict().items())
    state = opt.state_dict()["state"]
    assert state.keys() == before[1]["state"].keys()
    for k, entry in state.items():
        assert all(torch.equal(v, before[1]["state"][k][key]) if isinstance(v, torch.Tensor)
                   else v == before[1]["state"][k][key] for key, v in entry.items())
    opt.param_groups[0]["on_nonfinite"] = "skip"
    opt.step()
    assert opt.skipped_steps() == [1]
    assert all(torch.equal(p, before[0][n]) for n, p in model.state_dict().items())


# ------------------------------------------------------------------------------------------------
# (e) AdamW's decoupled decay on basis paths
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("decay_carriers", [False, True])
def test_adamw_step_is_v_times_one_minus_lr_lam_minus_lr_u_on_basis_paths(decay_carriers):
    """First step from fresh moments: m_hat = d, s_hat = d^2, so u = d / (|d| + eps)."""
    net, block, sol, d, car = first_step(CASES[2])  # 5-2-7-2-6-3 with biases
    decayed = torch.ones_like(sol.values) if decay_carriers else (~car).to(F64)
    lr, lam, eps = 1e-2, 0.5, 1e-8
    opt = GAdamW(net, lr=lr, weight_decay=lam, eps=eps, decay_carriers=decay_carriers)
    opt.step()
    assert opt.clip_counts() == [0]
    u = d / (d.abs() + eps)
    expected = sol.values * (1 - lr * lam * decayed) - lr * u
    after = bf.basis_path_values(*block_tensors(net, block))
    assert_rel_close(after, expected, 1e-10, "basis-path values")
    assert float((after - sol.values).abs().max()) > 1e-3  # the step is not trivially small


def test_the_carrier_ratio_guard_bounds_r_keeping_its_sign_and_counts_what_it_changed():
    """A step too large for max_ratio: every positive basis path still ends at v - lr u (the
    allocation divides by the guarded rho), each carrier at v * R with |R| bounded, sign kept."""
    net, block, sol, d, car = first_step(CASES[0])  # 4-6-3-5-3-5-2 with biases
    lr, bound, eps = 0.05, 1.05, 1e-8
    u = d / (d.abs() + eps)
    raw = 1 - lr * u[car] / sol.values[car]
    ratio = torch.copysign(raw.abs().clamp(1 / bound, bound), raw)
    opt = GAdam(net, lr=lr, max_ratio=bound)
    opt.step()
    assert opt.clip_counts() == [int((ratio != raw).sum())] and opt.clip_counts()[0] > 0
    expected = sol.values - lr * u
    expected[car] = sol.values[car] * ratio
    assert_rel_close(bf.basis_path_values(*block_tensors(net, block)), expected, 1e-10)


# ------------------------------------------------------------------------------------------------
# The basis-path regulariser (our design, basis-path-norm.md section 4)
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[3]],
                         ids=[IDS[0], IDS[2], IDS[3]])
def test_basis_path_norm_gradient_equals_autograd_on_basis_path_values(case):
    net = prepared_net(case, seed=2)
    block = only_block(discover(net, strict=True))
    routes = block_routes(block)
    ws, bs = block_tensors(net, block)
    basis = bf.designated_basis(block.widths, has_bias=[b is not None for b in bs])
    car = carrier_rows(basis)
    lam_pos, lam_neg = 0.3, 0.7

    v = bf.basis_path_values(ws, bs).requires_grad_()
    value = regulariser(v, car, lam_pos, lam_neg)
    value.backward()
    dw, db = basis_path_norm_gradient(ws, bs, routes, lam_pos, lam_neg)
    assert_rel_close(representative_entries(dw, db, block), v.grad, 1e-12, "dR/dv")
    assert float(basis_path_norm(ws, bs, routes, lam_pos, lam_neg)) == pytest.approx(
        float(value.detach()), rel=1e-12)
    # the same through the weights: the inverse chain rule of autograd's dR/dw is dR/dv
    leaves = [w.clone().requires_grad_() for w in ws]
    bias_leaves = [None if b is None else b.clone().requires_grad_() for b in bs]
    regulariser(bf.basis_path_values(leaves, bias_leaves), car, lam_pos, lam_neg).backward()
    via_w, via_b = g_space_gradient(ws, [w.grad for w in leaves],
                                    [None if b is None else b.grad for b in bias_leaves], routes)
    assert_rel_close(representative_entries(via_w, via_b, block), v.grad, 1e-10, "ICR of dR/dw")
