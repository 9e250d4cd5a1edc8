"""torch.optim conventions of the G-block optimizers: copies and pickles step like the original,
add_param_group binds what it adds, maximize steps up the objective."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F

from conftest import two_block_net
from gsgd import GSGD, ENormSGD, GAdam, PathSGD

OPTIMIZERS = {
    "gsgd": lambda params, **kw: GSGD(params, lr=0.05, momentum=0.9, weight_decay=1e-3, **kw),
    "gsgd skip": lambda params, **kw: GSGD(params, lr=0.05, momentum=0.9, on_nonfinite="skip",
                                           **kw),
    "gsgd clipping": lambda params, **kw: GSGD(params, lr=0.5, momentum=0.9, max_ratio=1.05,
                                               **kw),
    "pathsgd": lambda params, **kw: PathSGD(params, lr=0.05, momentum=0.9, **kw),
    "enormsgd": lambda params, **kw: ENormSGD(params, lr=0.05, momentum=0.9, **kw),
    "gadam": lambda params, **kw: GAdam(params, lr=0.02, weight_decay=1e-2, **kw),
}


def train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int,
          sign: float = 1.0) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(8, 6, generator=gen, dtype=torch.float64)
        y = torch.randint(0, 3, (8,), generator=gen)
        opt.zero_grad()
        (sign * F.cross_entropy(model(x), y)).backward()
        opt.step()


def same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


@pytest.mark.parametrize("kind", list(OPTIMIZERS))
def test_copies_and_pickles_train_bitwise_like_the_original(kind):
    model = two_block_net()
    opt = OPTIMIZERS[kind](model)
    train(model, opt, 2, seed=0)
    copies = [copy.deepcopy((model, opt)), pickle.loads(pickle.dumps((model, opt)))]
    train(model, opt, 3, seed=1)
    for twin, twin_opt in copies:
        assert twin_opt is not opt and next(twin.parameters()) is not next(model.parameters())
        train(twin, twin_opt, 3, seed=1)
        assert same(twin, model)
        if isinstance(opt, GSGD):
            assert twin_opt.clip_counts() == opt.clip_counts()
            assert twin_opt.skipped_steps() == opt.skipped_steps()
    if kind == "gsgd clipping":
        assert sum(opt.clip_counts()) > 0  # the counters travelled with the copies


def test_a_copy_of_the_optimizer_alone_steps_its_own_parameters():
    """copy.deepcopy(opt) copies the parameters it holds, without their gradients (torch's
    convention); given the same gradients its step moves those copies exactly as the
    original's step moves the originals."""
    model = two_block_net()
    opt = GSGD(model, lr=0.05, momentum=0.9)
    train(model, opt, 1, seed=0)
    opt.zero_grad()
    F.cross_entropy(model(torch.ones(4, 6, dtype=torch.float64)),
                    torch.zeros(4, dtype=torch.long)).backward()
    twin = copy.deepcopy(opt)
    for group, twin_group in zip(opt.param_groups, twin.param_groups, strict=True):
        for p, q in zip(group["params"], twin_group["params"], strict=True):
            q.grad = p.grad.clone()
    opt.step()
    twin.step()
    for group, twin_group in zip(opt.param_groups, twin.param_groups, strict=True):
        for p, q in zip(group["params"], twin_group["params"], strict=True):
            assert q is not p and torch.equal(q, p)


def split(model: torch.nn.Module) -> tuple[list, list]:
    """Block a (a1, a2), then everything else (stem, block b)."""
    first = [p for n, p in model.named_parameters() if n.startswith("a")]
    return first, [p for n, p in model.named_parameters() if not n.startswith("a")]


@pytest.mark.parametrize("kind", ["gsgd", "pathsgd"])
def test_add_param_group_binds_the_new_parameters(kind):
    """Parameters added later are trained as if they had been there from the start: the new
    G-block by the G-block rule, the stem by plain SGD."""
    model, reference = two_block_net(), two_block_net()
    first, rest = split(model)
    opt = OPTIMIZERS[kind](first, model=model)
    before = copy.deepcopy(model)
    train(model, opt, 1, seed=0)
    assert all(torch.equal(p, q) for p, q in zip(rest, split(before)[1], strict=True))
    opt.add_param_group({"params": rest, "lr": 0.02})
    ref_first, ref_rest = split(reference)
    ref_opt = OPTIMIZERS[kind](ref_first, model=reference)
    train(reference, ref_opt, 1, seed=0)
    ref_opt.add_param_group({"params": ref_rest, "lr": 0.02})
    ref_from_start = OPTIMIZERS[kind]([{"params": ref_first}, {"params": ref_rest, "lr": 0.02}],
                                      model=reference)
    ref_from_start.load_state_dict(ref_opt.state_dict())
    train(model, opt, 3, seed=1)
    train(reference, ref_from_start, 3, seed=1)
    assert same(model, reference)
    assert "stem.weight" in opt.plain_parameters and "b1.weight" not in opt.plain_parameters


def test_add_param_group_refuses_a_split_g_block_and_changes_nothing():
    model = two_block_net()
    first, _ = split(model)
    opt = GSGD(first, lr=0.05, model=model)
    with pytest.raises(ValueError, match=r"b2\.weight.*G-block"):
        opt.add_param_group({"params": [model.b1.weight]})
    assert len(opt.param_groups) == 1 and len(opt.structure.blocks) == 2
    train(model, opt, 1, seed=0)  # and it still steps


@pytest.mark.parametrize("kind", ["gsgd", "gsgd skip", "pathsgd", "enormsgd"])
def test_maximize_steps_like_minimising_the_negated_loss(kind):
    up, down = two_block_net(), two_block_net()
    opt_up = OPTIMIZERS[kind](up, maximize=True)
    opt_down = OPTIMIZERS[kind](down)
    train(up, opt_up, 3, seed=0)
    train(down, opt_down, 3, seed=0, sign=-1.0)
    assert same(up, down) and not same(up, two_block_net())


def test_maximize_must_be_a_bool():
    with pytest.raises(ValueError, match="maximize"):
        GSGD(two_block_net(), maximize="yes")


def test_moving_the_model_to_float64_after_momentum_steps_carries_the_buffers_along():
    """model.to(torch.float64) after some steps: the buffers follow their parameters, and the
    next steps equal those of an optimizer loaded with the same (cast) state."""
    model = two_block_net().float()
    opt = GSGD(model, lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(8, 6, generator=gen), torch.randint(0, 3, (8,), generator=gen)
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.double()
    twin = copy.deepcopy(model)
    twin_opt = GSGD(twin, lr=0.05, momentum=0.9)
    twin_opt.load_state_dict(opt.state_dict())  # torch casts the state to the parameters
    train(model, opt, 2, seed=4)
    train(twin, twin_opt, 2, seed=4)
    assert same(model, twin)
    assert {opt.state[p]["momentum_buffer"].dtype for p in model.parameters()} == {torch.float64}


def test_low_precision_weights_get_the_hyper_parameters_at_full_precision():
    """A compiled step of bf16 weights reads lr and momentum in float32, not rounded to bf16
    (0.05 -> 0.050048828125, 0.9 -> 0.8984375)."""
    from gsgd import fast
    from gsgd.basis import chain_routes
    from gsgd.reference import BlockTensors, StepHyper

    w = torch.ones(3, 2, 1, dtype=torch.bfloat16)
    t = BlockTensors(chain_routes((2, 3)), [w], [w], [None], [None])
    hp, _ = fast._hyper(fast.BlockStep(t, StepHyper(0.05, 0.9), compile=True))
    assert hp.dtype == torch.float32
    assert hp.tolist()[:2] == [pytest.approx(0.05, rel=1e-7), pytest.approx(0.9, rel=1e-7)]


@pytest.mark.parametrize("bad", [{"lr": float("inf")}, {"lr": float("nan")},
                                 {"momentum": float("nan")}, {"weight_decay": float("inf")},
                                 {"max_ratio": float("inf")}])
def test_non_finite_hyper_parameters_are_refused(bad):
    (name,) = bad
    with pytest.raises(ValueError, match=f"invalid {name}="):
        GSGD(two_block_net(), **bad)


def test_parameters_of_another_model_are_refused_with_a_clear_message():
    with pytest.raises(ValueError, match="none of the given parameters belongs to the model"):
        GSGD(two_block_net().parameters(), model=two_block_net())


def test_a_meta_device_model_is_refused_at_construction():
    with torch.device("meta"):
        model = two_block_net()
    with pytest.raises(ValueError, match=r"stem\.weight is on the meta device"):
        GSGD(model)


def frozen_chain() -> torch.nn.Module:
    """Linear 5-6-7-4-3 with ReLUs, float64, skeleton init: one G-block of four layers."""
    from conftest import chain_net
    from gsgd import discover, skeleton_init

    net = chain_net([5, 6, 7, 4, 3], bias=True, seed=5)
    skeleton_init(net, discover(net))
    return net


def one_step(net: torch.nn.Module, opt: torch.optim.Optimizer, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    opt.zero_grad()
    F.mse_loss(net(torch.randn(8, 5, generator=gen, dtype=torch.float64)),
               torch.randn(8, 3, generator=gen, dtype=torch.float64)).backward()
    opt.step()


def test_a_frozen_layer_is_never_modified_and_cuts_its_block():
    """Layer 1 frozen before construction: the optimizer accepts the model, never changes the
    frozen layer, and steps layers 2-3 as a G-block of their own (the reference step of that
    chain) and layer 0 alone (a one-layer block: torch SGD's step)."""
    from gsgd.basis import block_routes
    from gsgd.reference import BlockTensors, StepHyper, reference_step
    from gsgd.structure import Block, layer_view

    net = frozen_chain()
    net[2].requires_grad_(False)
    opt = GSGD(net, lr=0.05)
    frozen = [p.detach().clone() for p in net[2].parameters()]
    for seed in range(3):
        gen = torch.Generator().manual_seed(seed)
        opt.zero_grad()
        F.mse_loss(net(torch.randn(8, 5, generator=gen, dtype=torch.float64)),
                   torch.randn(8, 3, generator=gen, dtype=torch.float64)).backward()
        (block,) = opt.structure.blocks
        tail = Block(block.layers[2:])
        mods = [net[4], net[6]]
        ws = [layer_view(m.weight.detach().clone(), la) for m, la in zip(mods, tail.layers,
                                                                          strict=True)]
        gs = [layer_view(m.weight.grad.clone(), la) for m, la in zip(mods, tail.layers,
                                                                     strict=True)]
        expected = reference_step(BlockTensors(block_routes(tail), ws, gs,
                                               [m.bias.detach().clone() for m in mods],
                                               [m.bias.grad.clone() for m in mods]),
                                  StepHyper(0.05))
        first = net[0].weight.detach() - 0.05 * net[0].weight.grad
        opt.step()
        assert all(torch.equal(p, q) for p, q in zip(net[2].parameters(), frozen, strict=True))
        for m, w in zip(mods, expected.weights, strict=True):
            torch.testing.assert_close(m.weight.detach(), w.view_as(m.weight), rtol=1e-12,
                                       atol=1e-14)
        torch.testing.assert_close(net[0].weight.detach(), first, rtol=1e-14, atol=1e-15)


def test_freezing_and_unfreezing_between_steps_works():
    net = frozen_chain()
    opt = GSGD(net, lr=0.05, momentum=0.9)
    one_step(net, opt, 0)
    net[4].requires_grad_(False)  # frozen after construction: its grad is None from now on
    frozen = [p.detach().clone() for p in net[4].parameters()]
    for seed in (1, 2):
        one_step(net, opt, seed)
        assert all(torch.equal(p, q) for p, q in zip(net[4].parameters(), frozen, strict=True))
    net[4].requires_grad_(True)
    one_step(net, opt, 3)
    assert not torch.equal(net[4].weight, frozen[0])
    assert all(torch.isfinite(p).all() for p in net.parameters())


def test_omitting_trainable_parameters_of_a_g_block_still_raises():
    net = frozen_chain()
    with pytest.raises(ValueError, match="belong to a G-block"):
        GSGD([p for n, p in net.named_parameters() if not n.startswith("2.")], model=net)


def test_channels_last_conv_weights_take_the_same_steps_as_contiguous_ones():
    from conftest import conv_chain_net

    plain = conv_chain_net()
    fast = copy.deepcopy(plain).to(memory_format=torch.channels_last)
    assert not fast[0].weight.is_contiguous()
    opts = [GSGD(net, lr=0.05, momentum=0.9) for net in (plain, fast)]
    gen = torch.Generator().manual_seed(8)
    for _ in range(3):
        x = torch.randn(8, 2, 4, 4, generator=gen, dtype=torch.float64)
        y = torch.randint(0, 3, (8,), generator=gen)
        for net, opt in zip((plain, fast), opts, strict=True):
            opt.zero_grad()
            F.cross_entropy(net(x.contiguous(memory_format=torch.channels_last)
                                if net is fast else x), y).backward()
            opt.step()
    assert fast[0].weight.is_contiguous(memory_format=torch.channels_last)  # layout kept
    for p, q in zip(plain.parameters(), fast.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-10, atol=1e-12)
    assert not torch.equal(plain[0].weight, conv_chain_net()[0].weight)


def test_parameters_left_to_plain_sgd_are_named_in_one_warning_with_the_reason():
    from torch import nn

    from gsgd import PlainParametersWarning

    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 5), nn.GELU(),
                          nn.Linear(5, 3))
    with pytest.warns(PlainParametersWarning, match=r"4\.weight, 4\.bias.*GELU.*not positively"):
        GSGD(model, lr=0.1)


def test_an_opaque_module_is_named_when_no_g_block_is_found():
    from torch import nn

    from gsgd import StructureError

    model = nn.Sequential(nn.Linear(8, 8), nn.TransformerEncoderLayer(
        8, 2, 16, activation="relu", batch_first=True))
    with pytest.raises(StructureError, match=r"1 \(TransformerEncoderLayer\) is opaque"):
        GSGD(model, lr=0.1)
