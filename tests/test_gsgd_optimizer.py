"""GSGD as a torch optimizer: state round trips, schedulers, closures, argument checks, guards,
plain parameters, training runs in float64 and float32, and the shape of its state."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from conftest import F64, chain_net
from gsgd.data import iterate_batches, load_dataset
from gsgd.discovery import discover
from gsgd.group import skeleton_init
from gsgd.models import mlp
from gsgd.optim import GSGD, NonFiniteError
from gsgd.structure import StructureError

WIDTHS = (4, 6, 3, 5, 2)


def skeleton_net(widths=WIDTHS, bias=(True, False, True, True), acts=("relu", "leaky", "prelu"),
                 seed: int = 0, dtype: torch.dtype = F64) -> nn.Sequential:
    net = chain_net(widths, bias, acts, seed=seed, dtype=dtype)
    skeleton_init(net, discover(net))
    return net


def batches(widths=WIDTHS, n: int = 4, size: int = 16, seed: int = 0, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, widths[0], generator=gen, dtype=dtype),
             torch.randn(size, widths[-1], generator=gen, dtype=dtype)) for _ in range(n)]


def run(net: nn.Module, opt: torch.optim.Optimizer, data, steps: int, start: int = 0,
        scheduler=None) -> list[float]:
    losses = []
    for k in range(start, start + steps):
        x, y = data[k % len(data)]
        opt.zero_grad()
        loss = nn.functional.mse_loss(net(x), y)
        loss.backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()
        losses.append(float(loss.detach()))
    return losses


def same_parameters(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def same_value(a, b) -> bool:
    """Optimizer state entries (tensors or plain numbers) equal bit for bit, type included."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) \
            and a.dtype == b.dtype and torch.equal(a, b)
    return type(a) is type(b) and a == b


# ------------------------------------------------------------------------------------------------
# State round trip
# ------------------------------------------------------------------------------------------------

HYPER = dict(lr=0.01, momentum=0.9, weight_decay=1e-3, max_ratio=1.02)  # max_ratio: some clipping


def test_state_dict_round_trip_continues_bit_for_bit_with_clip_counters():
    data = batches()
    net = skeleton_net()
    opt = GSGD(net, **HYPER)
    run(net, opt, data, 20)
    saved_model = copy.deepcopy(net.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    clipped_at_20 = opt.clip_counts()
    run(net, opt, data, 20, start=20)

    fresh = skeleton_net(seed=99)  # different weights: everything must come from the save
    fresh.load_state_dict(saved_model)
    resumed = GSGD(fresh, lr=0.5)  # a different lr: the loaded param group must win
    resumed.load_state_dict(saved_opt)
    assert resumed.clip_counts() == clipped_at_20
    run(fresh, resumed, data, 20, start=20)

    assert same_parameters(net, fresh)
    assert resumed.param_groups[0]["lr"] == HYPER["lr"]
    assert resumed.clip_counts() == opt.clip_counts()
    assert 0 < clipped_at_20[0] < opt.clip_counts()[0]  # the counters were exercised
    state, rstate = opt.state_dict()["state"], resumed.state_dict()["state"]
    assert state.keys() == rstate.keys()
    for k in state:
        assert state[k].keys() == rstate[k].keys()
        for key in state[k]:
            assert same_value(state[k][key], rstate[k][key]), (k, key)


def test_clip_counter_stays_an_integer_after_load_state_dict():
    """load_state_dict casts tensor state to the parameter dtype: the counter must survive."""
    net = skeleton_net()
    opt = GSGD(net, **HYPER)
    run(net, opt, batches(), 3)
    resumed = GSGD(net, **HYPER)
    resumed.load_state_dict(opt.state_dict())
    run(net, resumed, batches(), 1)
    counter = resumed.state[net[0].weight]["clipped"]
    if isinstance(counter, torch.Tensor):
        assert not counter.is_floating_point()
    else:
        assert isinstance(counter, int)


# ------------------------------------------------------------------------------------------------
# LR schedulers, closures
# ------------------------------------------------------------------------------------------------

def test_step_after_steplr_decay_equals_a_step_with_the_new_lr():
    data = batches()
    net = skeleton_net()
    opt = GSGD(net, lr=0.02)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.1)
    run(net, opt, data, 3, scheduler=scheduler)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.002)
    twin = copy.deepcopy(net)
    old_lr_twin = copy.deepcopy(net)
    run(net, opt, data, 1, start=3, scheduler=scheduler)
    run(twin, GSGD(twin, lr=0.02 * 0.1), data, 1, start=3)
    run(old_lr_twin, GSGD(old_lr_twin, lr=0.02), data, 1, start=3)
    assert same_parameters(net, twin)
    assert not same_parameters(net, old_lr_twin)


def test_onecycle_schedule_of_lr_and_momentum_is_followed_step_by_step():
    """GSGD under OneCycleLR (which also cycles momentum) equals GSGD whose param group is set
    by hand to the schedule that OneCycleLR produces for torch.optim.SGD."""
    data = batches()
    steps = 12
    kwargs = dict(max_lr=0.02, total_steps=steps, base_momentum=0.8, max_momentum=0.9)
    dummy = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.02, momentum=0.9)
    dummy_sched = torch.optim.lr_scheduler.OneCycleLR(dummy, **kwargs)
    schedule = []
    for _ in range(steps):
        schedule.append((dummy.param_groups[0]["lr"], dummy.param_groups[0]["momentum"]))
        dummy.step()
        dummy_sched.step()
    assert len({lr for lr, _ in schedule}) == steps  # the lr really changes every step

    net, twin = skeleton_net(), skeleton_net()
    opt = GSGD(net, lr=0.02, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(opt, **kwargs)
    twin_opt = GSGD(twin, lr=0.02, momentum=0.9)
    for k, (lr, mu) in enumerate(schedule):
        assert opt.param_groups[0]["lr"] == pytest.approx(lr, rel=1e-12)
        twin_opt.param_groups[0]["lr"], twin_opt.param_groups[0]["momentum"] = lr, mu
        run(net, opt, data, 1, start=k, scheduler=scheduler)
        run(twin, twin_opt, data, 1, start=k)
        assert same_parameters(net, twin), k
    constant = skeleton_net()
    run(constant, GSGD(constant, lr=0.02, momentum=0.9), data, steps)
    assert not same_parameters(net, constant)


def test_closure_is_evaluated_with_grad_enabled_and_its_loss_returned():
    x, y = batches()[0]
    net, twin = skeleton_net(), skeleton_net()
    opt, twin_opt = GSGD(net, lr=0.01, momentum=0.5), GSGD(twin, lr=0.01, momentum=0.5)

    def closure():
        opt.zero_grad()
        loss = nn.functional.mse_loss(net(x), y)
        loss.backward()
        return loss

    for _ in range(3):
        with torch.no_grad():  # step() must enable grad for the closure itself
            loss = opt.step(closure)
        twin_opt.zero_grad()
        expected = nn.functional.mse_loss(twin(x), y)
        expected.backward()
        twin_opt.step()
        assert torch.equal(loss.detach(), expected.detach())
    assert same_parameters(net, twin)
    assert opt.step() is None


# ------------------------------------------------------------------------------------------------
# Construction errors
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    (dict(lr=-0.1), "lr"),
    (dict(momentum=1.0), "momentum"),
    (dict(momentum=1.5), "momentum"),
    (dict(momentum=-0.1), "momentum"),
    (dict(weight_decay=-1e-3), "weight_decay"),
    (dict(dampening=-0.5), "dampening"),
    (dict(nesterov=True), "nesterov"),
    (dict(nesterov=True, momentum=0.9, dampening=0.1), "nesterov"),
    (dict(max_ratio=1.0), "max_ratio"),
    (dict(max_ratio=0.5), "max_ratio"),
    (dict(max_ratio="big"), "max_ratio"),
    (dict(on_nonfinite="ignore"), "on_nonfinite"),
])
def test_bad_hyper_parameters_raise_value_error_naming_them(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GSGD(skeleton_net(), **kwargs)


def test_empty_parameter_list_raises():
    net = skeleton_net()
    with pytest.raises(ValueError, match="empty"):
        GSGD([], lr=0.1, model=net)


def test_parameters_without_model_raise():
    with pytest.raises(ValueError, match="model"):
        GSGD(skeleton_net().parameters(), lr=0.1)


def test_parameters_with_model_work_like_the_module_form():
    data = batches()
    a, b = skeleton_net(), skeleton_net()
    run(a, GSGD(a, lr=0.01), data, 3)
    run(b, GSGD(b.parameters(), lr=0.01, model=b), data, 3)
    assert same_parameters(a, b)


def test_a_g_block_split_over_parameters_or_groups_raises():
    net = skeleton_net()
    params = list(net.parameters())
    with pytest.raises(ValueError, match="G-block"):
        GSGD(params[1:], lr=0.1, model=net)
    with pytest.raises(ValueError, match="one param group"):
        GSGD([{"params": params[:1]}, {"params": params[1:]}], lr=0.1, model=net)


def test_param_groups_give_plain_and_block_parameters_their_own_lr():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 4), nn.Tanh(),
                          nn.Linear(4, 2)).to(F64)
    skeleton_init(model, discover(model))
    twin, initial = copy.deepcopy(model), copy.deepcopy(model)
    block_params = list(model[0].parameters()) + list(model[2].parameters())
    opt = GSGD([{"params": block_params}, {"params": model[4].parameters(), "lr": 0.0}],
               lr=0.05, model=model)
    assert opt.plain_parameters == ("4.weight", "4.bias")
    run(model, opt, batches((3, 4, 2)), 1)
    run(twin, GSGD(twin, lr=0.05), batches((3, 4, 2)), 1)
    for k in (0, 2):  # the block moved exactly as with one group
        assert torch.equal(model[k].weight, twin[k].weight)
        assert not torch.equal(model[k].weight, initial[k].weight)
    assert torch.equal(model[4].weight, initial[4].weight)  # lr 0 for the head
    assert not torch.equal(twin[4].weight, initial[4].weight)


@pytest.mark.parametrize("model", [
    nn.Linear(3, 2),
    nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)),
], ids=["linear", "tanh-mlp"])
def test_model_without_any_g_block_raises_a_clear_error(model):
    with pytest.raises(StructureError, match="no G-block") as info:
        GSGD(model, lr=0.1)
    assert isinstance(info.value, ValueError)
    for note in discover(model).notes:  # the reasons the chains ended are listed
        assert note in str(info.value)


def test_unsupported_module_between_linears_raises_under_strict_discovery():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 4), nn.GELU(),
                          nn.Linear(4, 2))
    with pytest.raises(StructureError, match=r"3 \(GELU\)"):
        discover(model, strict=True)


# ------------------------------------------------------------------------------------------------
# Numerical guards
# ------------------------------------------------------------------------------------------------

def backward_once(net: nn.Module, widths=WIDTHS) -> None:
    x, y = batches(widths)[0]
    net.zero_grad()
    nn.functional.mse_loss(net(x), y).backward()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("where", ["4.weight", "0.bias"])
def test_non_finite_gradient_raises_naming_the_parameter(bad, where):
    net = skeleton_net()
    backward_once(net)
    dict(net.named_parameters())[where].grad.view(-1)[0] = bad
    before = copy.deepcopy(net)
    with pytest.raises(NonFiniteError, match=where.replace(".", r"\.")):
        GSGD(net, lr=0.01).step()
    assert same_parameters(net, before)


def test_skip_mode_leaves_every_weight_and_buffer_untouched_and_counts_the_step():
    net = skeleton_net()
    opt = GSGD(net, lr=0.01, momentum=0.9, on_nonfinite="skip")
    run(net, opt, batches(), 2)  # some momentum state
    before_params = copy.deepcopy(net)
    before_state = copy.deepcopy(opt.state_dict()["state"])
    backward_once(net)
    net[2].weight.grad[0, 0] = float("nan")
    opt.step()
    assert opt.skipped_steps() == [1]  # counted on the device, read here
    assert opt.param_groups[0]["skipped_steps"] == 1  # brought up to date by the read
    assert same_parameters(net, before_params)  # plain parameters (the PReLU slope) too
    after_state = opt.state_dict()["state"]
    for k, entry in before_state.items():
        for key, value in entry.items():
            assert same_value(after_state[k][key], value), (k, key)
    run(net, opt, batches(), 1)  # and training goes on
    assert opt.skipped_steps() == [1]
    assert not same_parameters(net, before_params)


def test_non_finite_gradient_of_a_plain_parameter_raises():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 4), nn.Tanh(),
                          nn.Linear(4, 2)).to(F64)
    skeleton_init(model, discover(model))
    backward_once(model, (3, 4, 2))
    model[4].weight.grad[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"4\.weight"):
        GSGD(model, lr=0.01).step()


def test_zero_designated_weight_in_first_layer_raises():
    net = skeleton_net()
    with torch.no_grad():
        net[0].weight[1, 1] = 0.0  # pi of hidden unit (1, 1): W^0[1, 1 mod 4]
    backward_once(net)
    with pytest.raises(NonFiniteError, match=r"zero.*0\.weight"):
        GSGD(net, lr=0.01).step()


def test_zero_designated_child_weight_raises_naming_its_parameter():
    net = skeleton_net()
    with torch.no_grad():
        net[2].weight[1, 1] = 0.0  # kappa of hidden unit (1, 1): W^1[1 mod 3, 1]
    backward_once(net)
    with pytest.raises(NonFiniteError, match=r"2\.weight"):
        GSGD(net, lr=0.01).step()


def test_huge_lr_clips_carrier_ratios_counts_them_and_keeps_weights_finite():
    net = skeleton_net()
    opt = GSGD(net, lr=1e3, max_ratio=10.0)
    run(net, opt, batches(), 3)
    assert opt.clip_counts()[0] > 0
    assert all(torch.isfinite(p).all() for p in net.parameters())


def test_small_lr_clips_nothing():
    net = skeleton_net()
    opt = GSGD(net, lr=1e-4)
    run(net, opt, batches(), 5)
    assert opt.clip_counts() == [0]


def test_parameters_without_gradient_are_skipped():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2),
                          nn.Linear(5, 5)).to(F64)  # the last Linear is never called
    unused = copy.deepcopy(model[3])
    opt = GSGD(model, lr=0.1, momentum=0.9, weight_decay=0.1)
    data = [(x, y) for x, y in batches((3, 4, 2))]
    model_call = nn.Sequential(*list(model)[:3])
    for x, y in data:
        opt.zero_grad()
        nn.functional.mse_loss(model_call(x), y).backward()
        opt.step()
    assert torch.equal(model[3].weight, unused.weight)
    assert model[3].weight not in opt.state


def test_sparse_gradient_is_refused():
    class WithEmbedding(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(5, 3, sparse=True)
            self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

        def forward(self, idx):
            return self.b(torch.relu(self.a(self.emb(idx))))

    model = WithEmbedding()
    opt = GSGD(model, lr=0.1)
    model(torch.tensor([0, 1, 2])).sum().backward()
    with pytest.raises(ValueError, match="sparse"):
        opt.step()


# ------------------------------------------------------------------------------------------------
# Training runs
# ------------------------------------------------------------------------------------------------

def test_gsgd_and_sgd_both_reduce_the_loss_on_digits():
    splits = load_dataset("digits", val_size=0)
    x, y = splits.train.x.to(F64), splits.train.y
    losses = {}
    for name in ("gsgd", "sgd"):
        model = mlp((64, 32, 32, 10), seed=0).to(F64)
        skeleton_init(model, discover(model))
        opt = GSGD(model, lr=0.05, momentum=0.9) if name == "gsgd" else \
            torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        with torch.no_grad():
            start = float(nn.functional.cross_entropy(model(x), y))
        gen = torch.Generator().manual_seed(0)
        for xb, yb in iterate_batches(x, y, 64, shuffle=True, generator=gen):  # one epoch
            opt.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
        with torch.no_grad():
            losses[name] = (start, float(nn.functional.cross_entropy(model(x), y)))
            accuracy = float((model(x).argmax(1) == y).double().mean())
        assert accuracy > 0.8, (name, accuracy)
    for name, (start, end) in losses.items():
        assert end < 0.3 * start, (name, start, end)


def test_training_in_float32_reduces_the_loss_and_keeps_the_dtype():
    widths = (8, 16, 16, 3)
    teacher = chain_net(widths, True, "relu", seed=1, dtype=torch.float32)
    net = skeleton_net(widths, True, "relu", seed=2, dtype=torch.float32)
    gen = torch.Generator().manual_seed(3)
    xs = [torch.randn(32, 8, generator=gen) for _ in range(4)]
    with torch.no_grad():
        data = [(x, teacher(x)) for x in xs]
    opt = GSGD(net, lr=0.005, momentum=0.9, weight_decay=1e-4)
    losses = run(net, opt, data, 100)
    assert sum(losses[-4:]) < 0.5 * sum(losses[:4])
    for p in net.parameters():
        assert p.dtype == torch.float32 and torch.isfinite(p).all()
    for state in opt.state.values():
        if "momentum_buffer" in state:
            assert state["momentum_buffer"].dtype == torch.float32


# ------------------------------------------------------------------------------------------------
# The optimizer's state
# ------------------------------------------------------------------------------------------------

def test_state_holds_one_momentum_buffer_per_parameter_and_nothing_else_weight_sized():
    net = skeleton_net()
    opt = GSGD(net, lr=0.01, momentum=0.9, weight_decay=1e-3)
    run(net, opt, batches(), 5)
    structure = discover(net)
    named = dict(net.named_parameters())
    block_names = set(structure.blocks[0].param_names)
    assert set(named) == block_names | set(opt.plain_parameters)
    for name, p in named.items():
        tensors = {k: v for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)}
        buf = tensors.pop("momentum_buffer")
        assert buf.shape == p.shape and buf.dtype == p.dtype, name
        assert all(v.numel() == 1 for v in tensors.values()), (name, list(tensors))
    total = sum(v.numel() for s in opt.state.values() for v in s.values()
                if isinstance(v, torch.Tensor))
    n_params = sum(p.numel() for p in net.parameters())
    assert total <= n_params + len(structure.blocks)  # buffers plus one counter per block


# ------------------------------------------------------------------------------------------------
# The step's cached views follow the tensors behind them
# ------------------------------------------------------------------------------------------------

def test_fresh_gradient_tensors_each_step_give_the_same_steps_as_reused_ones():
    """zero_grad(set_to_none=True) makes backward allocate new gradients every step: the
    optimizer must read those, not views of the last step's gradients."""
    data = batches()
    nets = [skeleton_net(), skeleton_net()]
    opts = [GSGD(net, lr=0.01, momentum=0.9) for net in nets]
    for k in range(6):
        x, y = data[k % len(data)]
        for net, opt, to_none in zip(nets, opts, (True, False), strict=True):
            opt.zero_grad(set_to_none=to_none)
            nn.functional.mse_loss(net(x), y).backward()
            opt.step()
    assert same_parameters(*nets)
    assert not same_parameters(nets[0], skeleton_net())


def test_loading_a_state_into_a_live_optimizer_replaces_the_buffers_it_steps_with():
    data = batches()
    net = skeleton_net()
    opt = GSGD(net, lr=0.01, momentum=0.9)
    run(net, opt, data, 3)
    saved_params, saved_state = copy.deepcopy(net.state_dict()), copy.deepcopy(opt.state_dict())
    run(net, opt, data, 3, start=3)
    expected = copy.deepcopy(net)
    net.load_state_dict(saved_params)
    opt.load_state_dict(saved_state)  # new buffer tensors: the cached views must follow
    run(net, opt, data, 3, start=3)
    assert same_parameters(net, expected)


def test_mnist_steps_through_negative_carrier_ratios_and_trains_on(monkeypatch):
    """The paper's step where a carrier path value crosses zero (R < 0) is kept: bias-free
    784-64-128-32-10 from the skeleton init, lr 0.1, momentum 0.9, batch 64. With the former
    guard (every R clamped to [0.01, 100]) this run raised NonFiniteError at step 13."""
    from gsgd import fast
    from gsgd.data import DataUnavailableError

    try:
        mnist = load_dataset("mnist", val_size=0)
    except DataUnavailableError as exc:
        pytest.skip(f"MNIST not available: {exc}")
    lowest: list[float] = []
    guard = fast.guard_ratio

    def spy(raw, max_ratio):
        lowest.append(float(raw.min()))
        return guard(raw, max_ratio)

    monkeypatch.setattr(fast, "guard_ratio", spy)
    x, y = mnist.train.x[:64 * 200].reshape(-1, 784), mnist.train.y[:64 * 200]
    model = mlp([784, 64, 128, 32, 10], bias=False, seed=0)
    skeleton_init(model, discover(model))
    opt = GSGD(model, lr=0.1, momentum=0.9)
    losses = []
    for k in range(200):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x[64 * k:64 * k + 64]), y[64 * k:64 * k + 64])
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert min(lowest) < 0  # negative carrier ratios were taken
    assert sum(losses[-20:]) / 20 < losses[0] - 0.5
    assert opt.clip_counts()[0] < 20
