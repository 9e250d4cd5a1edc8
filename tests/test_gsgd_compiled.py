"""The torch.compile path of GSGD (compile=True) takes the same steps as the eager path and the
brute-force oracle, in both of its forms (one graph per step for small blocks; a plan graph and
an apply graph per block for large ones), and refuses non-finite steps without writing."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import block_tensors, bn_approx_net, centres, conv_chain_net, two_block_net
from gsgd import GSGD, discover, fast, graphs
from gsgd.bruteforce import oracle_step
from gsgd.optim import NonFiniteError


def _train(net: nn.Module, opt: torch.optim.Optimizer, steps: int, shape: tuple[int, ...],
           classes: int) -> None:
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(8, *shape, generator=gen, dtype=torch.float64)
        y = torch.randint(0, classes, (8,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()


@pytest.fixture(params=["one graph", "plan + apply graphs"])
def graph_form(request, monkeypatch):
    """Both compiled forms: SMALL_LAYER decides which one a network takes."""
    monkeypatch.setattr(fast, "SMALL_LAYER", 1 << 30 if request.param == "one graph" else 0)
    return request.param


NET = (conv_chain_net, (2, 4, 4), 3)
CASES = [(*NET, dict(momentum=0.9, weight_decay=1e-3)),
         (*NET, dict(momentum=0.9, nesterov=True)),
         (*NET, dict(momentum=0.8, dampening=0.3)),
         (*NET, dict(momentum=0.0)),
         (two_block_net, (6,), 3, dict(momentum=0.9, weight_decay=1e-3)),
         (bn_approx_net, (1, 5, 5), 3, dict(momentum=0.9, batchnorm="approximate"))]


@pytest.mark.parametrize("make, shape, classes, hp", CASES)
def test_compiled_step_equals_the_eager_step(graph_form, make, shape, classes, hp):
    eager_net = make()
    compiled_net = copy.deepcopy(eager_net)
    eager = GSGD(eager_net, lr=0.05, **hp)
    fused_opt = GSGD(compiled_net, lr=0.05, compile=True, **hp)
    _train(eager_net, eager, 4, shape, classes)
    _train(compiled_net, fused_opt, 4, shape, classes)
    changed = False
    for (name, p), q in zip(eager_net.named_parameters(), compiled_net.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-10, atol=1e-12, msg=name)
        changed = changed or not torch.equal(p, make().get_parameter(name))
    assert changed, "the steps must actually move the weights"
    assert fused_opt.clip_counts() == eager.clip_counts()
    for p in eager_net.parameters():
        if "momentum_buffer" in eager.state[p]:
            q = dict(compiled_net.named_parameters())[
                next(n for n, r in eager_net.named_parameters() if r is p)]
            torch.testing.assert_close(fused_opt.state[q]["momentum_buffer"],
                                       eager.state[p]["momentum_buffer"], rtol=1e-10, atol=1e-12)


def test_compiled_step_equals_the_brute_force_oracle(graph_form):
    """One plain G-SGD step of the conv chain (float64) against the oracle's path-space step."""
    net = conv_chain_net()
    block = discover(net).blocks[0]
    x = torch.randn(8, 2, 4, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    y = torch.randint(0, 3, (8,), generator=torch.Generator().manual_seed(3))
    F.cross_entropy(net(x), y).backward()
    named = dict(net.named_parameters())
    ws, bs = block_tensors(net, block)
    gs, gbs = block_tensors(net, block, grads=True)
    expected_w, expected_b = oracle_step(ws, bs, gs, gbs, 1e-3, centres(block))
    # skip mode: every step compiled (raise mode takes a step that measures norms eagerly)
    GSGD(net, lr=1e-3, compile=True, on_nonfinite="skip").step()
    for layer, ew, eb in zip(block.layers, expected_w, expected_b, strict=True):
        torch.testing.assert_close(named[layer.weight].detach().view_as(ew), ew, rtol=1e-9,
                                   atol=1e-12)
        torch.testing.assert_close(named[layer.bias].detach(), eb, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("where", ["a2.weight", "stem.weight", "b2.bias"])
def test_compiled_step_with_a_non_finite_gradient_writes_nothing(graph_form, where):
    """A NaN anywhere (a G-block weight, a plain parameter, a bias) stops the whole step: every
    block is left exactly as it was, momentum buffers included; skip mode counts the step."""
    net = two_block_net()
    opt = GSGD(net, lr=0.05, momentum=0.9, compile=True, on_nonfinite="skip")
    _train(net, opt, 2, (6,), 3)
    before = copy.deepcopy(net)
    before_state = copy.deepcopy(opt.state_dict()["state"])
    x = torch.randn(8, 6, dtype=torch.float64)
    opt.zero_grad()
    F.cross_entropy(net(x), torch.zeros(8, dtype=torch.long)).backward()
    net.get_parameter(where).grad.view(-1)[0] = float("nan")
    opt.step()
    assert opt.skipped_steps() == [1]
    for (name, p), q in zip(net.named_parameters(), before.parameters(), strict=True):
        assert torch.equal(p, q), name
    for k, entry in before_state.items():
        for key, value in entry.items():
            after = opt.state_dict()["state"][k][key]
            assert torch.equal(after, value) if torch.is_tensor(value) else after == value
    opt.param_groups[0]["on_nonfinite"] = "raise"
    with pytest.raises(NonFiniteError, match=where.replace(".", r"\.")):
        opt.step()


def test_a_compiler_failure_falls_back_to_the_eager_step_with_a_warning(graph_form,
                                                                        monkeypatch):
    def no_compiler(fn, **kwargs):
        def fail(*args):
            raise RuntimeError("InductorError: no C++ compiler found")
        return fail

    # fresh graph caches, so that every graph is built (and fails) in this test
    monkeypatch.setattr(fast, "compiled", lambda fn, threads=-1: graphs.FlatCompiled(fn, threads))
    monkeypatch.setattr(torch, "compile", no_compiler)
    eager_net = conv_chain_net()
    compiled_net = copy.deepcopy(eager_net)
    eager = GSGD(eager_net, lr=0.05, momentum=0.9, dampening=0.2)
    fallback = GSGD(compiled_net, lr=0.05, momentum=0.9, dampening=0.2, compile=True)
    _train(eager_net, eager, 2, (2, 4, 4), 3)
    with pytest.warns(RuntimeWarning, match="no C.. compiler found.*eager step"):
        _train(compiled_net, fallback, 2, (2, 4, 4), 3)  # the 2nd step is the first compiled
    _train(eager_net, eager, 2, (2, 4, 4), 3)
    _train(compiled_net, fallback, 2, (2, 4, 4), 3)
    assert fallback.param_groups[0]["compile"] is False
    for p, q in zip(eager_net.parameters(), compiled_net.parameters(), strict=True):
        assert torch.equal(p, q)  # the same eager steps, first-step momentum rule included


def _lane_calls(monkeypatch) -> list[int]:
    """Counts the steps GSGD takes by its prepared call (the lane)."""
    import gsgd.optim.gsgd as gsgd_module

    calls: list[int] = []
    real = gsgd_module.run_prepared

    def counting(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(gsgd_module, "run_prepared", counting)
    return calls


def test_the_prepared_step_equals_the_whole_path(monkeypatch):
    """Repeated compiled steps go by the lane (one prepared graph call) and take exactly the
    steps of the whole path: across lr changes, carried-bound refreshes, an in-place edit of
    a weight, a step with a frozen layer (grad None), maximize, a load_state_dict and a move
    to float32."""
    monkeypatch.setattr(GSGD, "CARRY_STEPS", 4)
    calls = _lane_calls(monkeypatch)
    nets = [conv_chain_net(), conv_chain_net()]
    opts = [GSGD(net, lr=0.05, momentum=0.9, weight_decay=1e-3, compile=True) for net in nets]
    opts[1].LANE = False
    gen = torch.Generator().manual_seed(1)

    def both(steps: int, edit=None, dtype=torch.float64) -> None:
        for _ in range(steps):
            x = torch.randn(8, 2, 4, 4, generator=gen, dtype=dtype)
            y = torch.randint(0, 3, (8,), generator=gen)
            for net, opt in zip(nets, opts, strict=True):
                opt.zero_grad()
                F.cross_entropy(net(x), y).backward()
                if edit is not None:
                    edit(net, opt)
                opt.step()

    def same() -> None:
        for p, q in zip(nets[0].parameters(), nets[1].parameters(), strict=True):
            assert torch.equal(p, q)
            for key in ("momentum_buffer",):
                assert torch.equal(opts[0].state[p][key], opts[1].state[q][key])
        assert opts[0].clip_counts() == opts[1].clip_counts()

    both(6)
    assert calls, "repeated compiled steps must take the lane"
    same()
    for opt in opts:
        opt.param_groups[0]["lr"] = 0.02
    both(3)
    both(1, edit=lambda net, opt: net[0].weight.data.mul_(1.5))  # unseen by the stamps
    both(1, edit=lambda net, opt: net[0].weight.detach().mul_(1.1))
    both(2, edit=lambda net, opt: setattr(net[3].weight, "grad", None))
    same()
    both(3)
    for opt in opts:
        opt.param_groups[0]["maximize"] = True
    both(2)
    for opt in opts:
        opt.param_groups[0]["maximize"] = False
    state = copy.deepcopy(opts[0].state_dict())
    for opt in opts:
        opt.load_state_dict(copy.deepcopy(state))
    both(3)
    same()
    for net in nets:
        net.float()
    both(4, dtype=torch.float32)
    same()
    assert len(calls) >= 8
