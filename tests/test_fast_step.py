"""The fast step takes the reference step, in every form, step by step; the optimizer shell
around it keeps no freed tensor alive, syncs with the host at most once per step (never in skip
mode), changes no process-wide torch setting and honours every option per param group."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.sgd import sgd as torch_sgd
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import bn_approx_net, chain_net, two_block_net
from gsgd import GSGD, NonFiniteError, discover, fast, skeleton_init
from gsgd.basis import block_routes
from gsgd.reference import BlockTensors, StepHyper, reference_step
from gsgd.structure import layer_view


def pool_net() -> nn.Module:
    """Conv -> ReLU -> max pool -> conv -> ReLU -> flatten -> Linear -> ReLU -> Linear, biases
    everywhere (input 2x4x4, 3 outputs), one G-block, skeleton init."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        net = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                            nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                            nn.Linear(4 * 2 * 2, 5), nn.ReLU(), nn.Linear(5, 3)).double()
    skeleton_init(net, discover(net))
    return net


def mlp_net(bias: bool) -> nn.Module:
    net = chain_net([5, 7, 4, 6, 3], bias=bias, seed=4)
    skeleton_init(net, discover(net))
    return net


#: name -> (builder, input shape, GSGD keyword arguments of the model)
NETS = {
    "mlp+bias": (lambda: mlp_net(True), (5,), {}),
    "mlp": (lambda: mlp_net(False), (5,), {}),
    "conv+pool+flatten": (pool_net, (2, 4, 4), {}),
    "bn-approximate": (bn_approx_net, (1, 5, 5), {"batchnorm": "approximate"}),
    "two blocks + plain": (two_block_net, (6,), {}),
}
HYPER = {
    "plain": {},
    "momentum": {"momentum": 0.9},
    "dampening": {"momentum": 0.8, "dampening": 0.3},
    "nesterov": {"momentum": 0.9, "nesterov": True},
    "weight decay": {"momentum": 0.9, "weight_decay": 1e-2},
    "guard": {"momentum": 0.9, "max_ratio": 1.01},  # the ratio guard changes some ratios
    "maximize": {"lr": 0.005, "momentum": 0.9, "weight_decay": 1e-2, "maximize": True},
    "bp-norm": {"momentum": 0.9, "weight_decay": 1e-3, "bp_norm": (2e-2, 5e-2)},
}


def reference_of(opt: GSGD, model: nn.Module) -> tuple[dict[str, torch.Tensor], list[int]]:
    """What one step should make of every parameter and buffer, from the current weights,
    gradients and buffers: the reference step for the G-blocks, torch SGD for the rest; and
    how many carrier ratios the reference's guard changed, per block."""
    group = opt.param_groups[0]
    hp = StepHyper(group["lr"], group["momentum"], group["dampening"], group["weight_decay"],
                   group["nesterov"], group["max_ratio"], group["maximize"], group["bp_norm"])
    named = dict(model.named_parameters())

    def clone(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.detach().clone()

    def buffer(p: torch.Tensor) -> torch.Tensor | None:
        return clone(opt.state[p].get("momentum_buffer"))

    expected: dict[str, torch.Tensor] = {}
    clipped: list[int] = []
    for block in opt.structure.blocks:
        layers = block.layers
        ws = [layer_view(clone(named[la.weight]), la) for la in layers]
        gs = [layer_view(clone(named[la.weight].grad), la) for la in layers]
        bs = [clone(named[la.bias]) if la.bias else None for la in layers]
        gbs = [clone(named[la.bias].grad) if la.bias else None for la in layers]
        bufs = bias_bufs = None
        if hp.momentum:
            bufs = [None if buffer(named[la.weight]) is None
                    else layer_view(buffer(named[la.weight]), la) for la in layers]
            bias_bufs = [buffer(named[la.bias]) if la.bias else None for la in layers]
        scales = [w.reshape(w.shape[0], -1).norm(dim=1) if la.approx_bn else None
                  for la, w in zip(layers, ws, strict=True)]
        up = reference_step(BlockTensors(block_routes(block), ws, gs, bs, gbs, bufs, bias_bufs,
                                         scales if any(la.approx_bn for la in layers) else None),
                            hp)
        clipped.append(int(up.clipped))
        for l, la in enumerate(layers):
            expected[la.weight] = up.weights[l].reshape(named[la.weight].shape)
            if la.bias:
                expected[la.bias] = up.biases[l]
            if hp.momentum:
                expected[la.weight + " buffer"] = up.buffers[l].reshape(named[la.weight].shape)
                if la.bias:
                    expected[la.bias + " buffer"] = up.bias_buffers[l]
    for name in opt.plain_parameters:
        p = named[name]
        new, bufs = [clone(p)], [buffer(p)]
        torch_sgd(new, [p.grad], bufs, weight_decay=hp.weight_decay, momentum=hp.momentum,
                  lr=hp.lr, dampening=hp.dampening, nesterov=hp.nesterov, maximize=hp.maximize)
        expected[name] = new[0]
        if hp.momentum:
            expected[name + " buffer"] = bufs[0]
    return expected, clipped


def steps_match_the_reference(net_name: str, hyper: str, dtype: torch.dtype, *,
                              compile: bool = False, on_nonfinite: str = "raise",
                              steps: int = 20) -> None:
    build, shape, options = NETS[net_name]
    model = build().to(dtype)
    opt = GSGD(model, compile=compile, on_nonfinite=on_nonfinite, **options,
               **{"lr": 0.05, **HYPER[hyper]})
    named = dict(model.named_parameters())
    tol = {"rtol": 1e-10, "atol": 1e-12} if dtype == torch.float64 else \
        {"rtol": 1e-4, "atol": 1e-6}
    gen = torch.Generator().manual_seed(5)
    moved = False
    clips = [0] * len(opt.structure.blocks)
    for k in range(steps):
        x = torch.randn(8, *shape, generator=gen, dtype=dtype)
        y = torch.randint(0, 3, (8,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        expected, clipped = reference_of(opt, model)
        clips = [a + b for a, b in zip(clips, clipped, strict=True)]
        before = {n: p.detach().clone() for n, p in named.items()}
        opt.step()
        for name, want in expected.items():
            if name.endswith(" buffer"):
                got = opt.state[named[name.removesuffix(" buffer")]]["momentum_buffer"]
            else:
                got = named[name].detach()
                moved = moved or not torch.equal(got, before[name])
            torch.testing.assert_close(got, want, **tol, msg=lambda m, n=name, k=k:
                                       f"step {k}, {n}: {m}")
    assert moved, "the steps must move the weights"
    assert opt.skipped_steps() == [0]
    assert opt.clip_counts() == clips
    assert sum(clips) > 0 or hyper != "guard"  # the guard cases exercise the guard
    assert opt.param_groups[0]["compile"] is compile  # a compiled case did not fall back


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("hyper", list(HYPER))
@pytest.mark.parametrize("net_name", list(NETS))
@pytest.mark.parametrize("on_nonfinite", ["raise", "skip"], ids=["in-place", "gated"])
def test_eager_fast_step_takes_the_reference_step(net_name, hyper, dtype, on_nonfinite):
    """Both eager forms: in place after one host check (raise mode), gated on the device
    (skip mode), over the whole grid, 20 steps each, weights and buffers."""
    steps_match_the_reference(net_name, hyper, dtype, on_nonfinite=on_nonfinite)


@pytest.fixture(params=["one graph", "plan + apply graphs"])
def graph_form(request, monkeypatch):
    """Both compiled forms: SMALL_LAYER decides which one a network takes."""
    monkeypatch.setattr(fast, "SMALL_LAYER", 1 << 30 if request.param == "one graph" else 0)
    return request.param


COMPILED_CASES = [
    ("conv+pool+flatten", "weight decay", torch.float64, "raise"),
    ("conv+pool+flatten", "nesterov", torch.float64, "raise"),
    ("mlp+bias", "dampening", torch.float64, "skip"),
    ("bn-approximate", "momentum", torch.float32, "raise"),
    ("two blocks + plain", "plain", torch.float32, "skip"),
    ("mlp", "guard", torch.float64, "skip"),
    ("mlp+bias", "bp-norm", torch.float64, "raise"),
]


@pytest.mark.parametrize("net_name, hyper, dtype, on_nonfinite", COMPILED_CASES)
def test_compiled_fast_step_takes_the_reference_step(graph_form, net_name, hyper, dtype,
                                                     on_nonfinite):
    steps_match_the_reference(net_name, hyper, dtype, compile=True, on_nonfinite=on_nonfinite)


# ------------------------------------------------------------------- the shell around it

def backward(model: nn.Module, shape: tuple[int, ...], seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(8, *shape, generator=gen, dtype=torch.float64)
    F.cross_entropy(model(x), torch.randint(0, 3, (8,), generator=gen)).backward()


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_a_gradient_freed_by_zero_grad_is_not_kept_alive(compile):
    model = two_block_net()
    opt = GSGD(model, lr=0.01, momentum=0.9, compile=compile)
    for seed in range(2):
        opt.zero_grad(set_to_none=True)
        backward(model, (6,), seed)
        opt.step()
    refs = [weakref.ref(p.grad) for p in model.parameters()]
    opt.zero_grad(set_to_none=True)
    gc.collect()
    assert all(r() is None for r in refs)


class HostSyncs(TorchDispatchMode):
    """Counts the calls that copy a tensor's value to the host (``.item()``, ``bool()``,
    ``int()``, ``float()`` of a tensor all dispatch to aten._local_scalar_dense)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("hyper", ["plain", "momentum", "weight decay", "nesterov"])
@pytest.mark.parametrize("on_nonfinite, most", [("raise", 1), ("skip", 0)])
def test_a_step_syncs_with_the_host_at_most_once_and_never_in_skip_mode(on_nonfinite, most,
                                                                        hyper):
    model = two_block_net()  # two G-blocks and plain parameters
    opt = GSGD(model, lr=0.01, on_nonfinite=on_nonfinite, **HYPER[hyper])
    for seed in range(3):  # the first step (new buffers) and later ones
        opt.zero_grad()
        backward(model, (6,), seed)
        with HostSyncs() as syncs:
            opt.step()
        assert syncs.count <= most, f"step {seed}: {syncs.count} host syncs"
    assert opt.clip_counts() == [0, 0] and opt.skipped_steps() == [0]  # read when asked


def test_a_refused_step_in_skip_mode_is_counted_without_a_host_sync():
    model = two_block_net()
    opt = GSGD(model, lr=0.01, momentum=0.9, on_nonfinite="skip")
    opt.zero_grad()
    backward(model, (6,))
    opt.step()
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    backward(model, (6,), 1)
    model.a1.weight.grad[0, 0] = float("nan")
    with HostSyncs() as syncs:
        opt.step()
    assert syncs.count == 0
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
    assert opt.skipped_steps() == [1] and opt.param_groups[0]["skipped_steps"] == 1


def test_compiled_steps_leave_the_dynamo_settings_as_they_were():
    import torch._dynamo
    import torch._inductor.config

    def settings() -> tuple[dict, dict]:
        return (dict(torch._dynamo.config.get_config_copy()),
                dict(torch._inductor.config.get_config_copy()))

    before = settings()
    for build, shape in ((two_block_net, (6,)), (pool_net, (2, 4, 4))):
        model = build()
        opt = GSGD(model, lr=0.01, momentum=0.9, compile=True)
        for seed in range(2):
            opt.zero_grad()
            backward(model, shape, seed)
            opt.step()
    assert settings() == before


def groups_of(model: nn.Module, **second) -> list[dict]:
    """Block a (a1, a2) in group 0; block b (b1, b2) and the plain stem in group 1."""
    first = [p for n, p in model.named_parameters() if n.startswith("a")]
    rest = [p for n, p in model.named_parameters() if not n.startswith("a")]
    return [{"params": first}, {"params": rest, **second}]


def test_on_nonfinite_is_honoured_per_param_group():
    model = two_block_net()
    opt = GSGD(groups_of(model, on_nonfinite="skip"), lr=0.01, model=model)
    opt.zero_grad()
    backward(model, (6,))
    model.b1.weight.grad[0, 0] = float("nan")  # in the skipping group: the step is skipped
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
    assert opt.skipped_steps() == [1, 1]
    model.a1.weight.grad[0, 0] = float("nan")  # in the raising group: it raises
    with pytest.raises(NonFiniteError, match=r"a1\.weight"):
        opt.step()


def test_hyper_parameters_are_honoured_per_param_group():
    """Each group's lr, momentum, dampening, weight decay and max_ratio reach its own blocks
    and plain parameters: given the same gradients, three steps equal those of an optimizer
    with the group's settings everywhere."""
    first = {"lr": 0.01, "momentum": 0.9}
    second = {"lr": 0.3, "momentum": 0.5, "dampening": 0.2, "max_ratio": 1.05,
              "weight_decay": 1e-3}
    model = two_block_net()
    nets = {"a": two_block_net(), "rest": two_block_net()}
    opts = {"model": GSGD(groups_of(model, **second), model=model, **first),
            "a": GSGD(nets["a"], **first), "rest": GSGD(nets["rest"], **second)}
    gen = torch.Generator().manual_seed(6)
    for _ in range(3):  # gradients that do not depend on the weights: the same for all three
        grads = {n: torch.randn(p.shape, generator=gen, dtype=p.dtype)
                 for n, p in model.named_parameters()}
        for net in (model, *nets.values()):
            for n, p in net.named_parameters():
                p.grad = grads[n].clone()
        for opt in opts.values():
            opt.step()
    assert opts["model"].clip_counts()[0] == 0 < opts["model"].clip_counts()[1]
    assert opts["model"].clip_counts() == [opts["a"].clip_counts()[0],
                                           opts["rest"].clip_counts()[1]]
    for name, p in model.named_parameters():
        twin = nets["a" if name.startswith("a") else "rest"]
        torch.testing.assert_close(p, twin.get_parameter(name), rtol=1e-12, atol=1e-14,
                                   msg=name)


def test_blocks_of_different_dtypes_each_take_their_reference_step():
    """Work matrices and index data follow each block's dtype (a float32 block beside a
    float64 one); gradients injected, since such a model has no common forward."""
    model = two_block_net()
    model.b1.float()
    model.b2.float()
    opt = GSGD(model, lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(7)
    for k in range(3):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype)
        expected, _ = reference_of(opt, model)
        opt.step()
        for name, want in expected.items():
            if name.endswith(" buffer"):
                continue
            got = model.get_parameter(name).detach()
            assert got.dtype == want.dtype, name
            tol = {"rtol": 1e-10, "atol": 1e-12} if got.dtype == torch.float64 else {}
            torch.testing.assert_close(got, want, **tol, msg=f"step {k}, {name}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_one_layer_block_plans_in_its_own_dtype(dtype):
    """A block of one layer (no hidden units, no designated weights: given by structure=)."""
    from gsgd.structure import Block, Structure, layer_from_module

    model = nn.Linear(4, 3).to(dtype)
    structure = Structure((Block((layer_from_module("", model),)),))
    opt = GSGD(model, lr=0.1, structure=structure)
    model(torch.randn(2, 4, dtype=dtype)).sum().backward()
    expected, _ = reference_of(opt, model)
    (block,) = structure.blocks
    named = dict(model.named_parameters())
    ws = [layer_view(named[la.weight].detach(), la) for la in block.layers]
    gs = [layer_view(named[la.weight].grad, la) for la in block.layers]
    t = BlockTensors(block_routes(block), ws, gs, [model.bias.detach()], [model.bias.grad])
    plan = fast.block_plan(t, fast.Numbers(0.1, 0.0, 0.0, 0.0, 100.0),
                           fast.StepFlags(False, False))
    assert {v.dtype for v in plan.inv_alphas + plan.inv_betas + plan.inv_rhos} == {dtype}
    opt.step()
    for name, want in expected.items():
        torch.testing.assert_close(model.get_parameter(name).detach(), want, msg=name)


def test_compiled_graphs_trace_the_index_vectors_instead_of_capturing_cached_ones(monkeypatch):
    """Index vectors cached by eager code (here: deliberately wrong ones) must not become
    constants of a compiled graph: the graph traces them from the widths."""
    from gsgd import graphs

    monkeypatch.setattr(fast, "compiled",
                        lambda fn, threads=-1: graphs.FlatCompiled(fn, threads))  # fresh graphs
    model, twin = mlp_net(True), mlp_net(True)
    opt = GSGD(model, lr=0.05, momentum=0.9, compile=True, on_nonfinite="skip")  # all compiled
    for r in opt._blocks[0].routes:  # poison the eager caches of this optimizer's routes
        for name in ("carriers", "passing"):
            r._vectors[(name, None)] = ~getattr(r, name)()
            r._vectors[(name, torch.device("cpu"))] = r._vectors[(name, None)]
    eager = GSGD(twin, lr=0.05, momentum=0.9)
    for seed in range(2):
        for net, o in ((model, opt), (twin, eager)):
            o.zero_grad()
            backward(net, (5,), seed)
            o.step()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------- writes that would not be finite

def block_tensors_of(opt: GSGD, model: nn.Module, block) -> BlockTensors:
    """The tensors one step of ``block`` reads (buffers as tensors: zeros before the first)."""
    named = dict(model.named_parameters())
    layers = block.layers
    momentum = opt.param_groups[0]["momentum"]

    def buffer(name: str) -> torch.Tensor:
        p = named[name]
        return opt.state[p].get("momentum_buffer", torch.zeros_like(p)).detach()

    return BlockTensors(
        block_routes(block), [layer_view(named[la.weight].detach(), la) for la in layers],
        [layer_view(named[la.weight].grad, la) for la in layers],
        [named[la.bias].detach() if la.bias else None for la in layers],
        [named[la.bias].grad if la.bias else None for la in layers],
        [layer_view(buffer(la.weight), la) for la in layers] if momentum else None,
        [buffer(la.bias) if la.bias else None for la in layers] if momentum else None)


@pytest.mark.parametrize("hyper", [h for h in HYPER if h != "maximize"])
@pytest.mark.parametrize("net_name", ["mlp+bias", "conv+pool+flatten", "two blocks + plain"])
def test_the_write_bound_bounds_every_value_the_dense_pass_computes(net_name, hyper):
    """With an lr at which lr * s / c dominates the new weights, every weight, buffer and bias
    the dense pass computes is within :func:`gsgd.fast.block_bound` of its block (on the
    device and, from the same magnitudes, on the host)."""
    build, shape, options = NETS[net_name]
    model = build()
    opt = GSGD(model, **options, **{"lr": 0.05, **HYPER[hyper]})
    for seed in range(3):  # a few ordinary steps, so that the buffers are not zero
        opt.zero_grad()
        backward(model, shape, seed)
        opt.step()
    group = opt.param_groups[0]
    hp = fast.Numbers(1e3, group["momentum"], group["dampening"], group["weight_decay"],
                      group["max_ratio"])
    flags = fast.StepFlags(group["nesterov"], bool(group["weight_decay"]))
    for block in opt.structure.blocks:
        t = block_tensors_of(opt, model, block)
        plan = fast.block_plan(t, hp, flags)
        bound = float(fast.block_bound(t, plan, hp, flags))
        on_host, carry = fast.magnitudes_bound(plan.magnitudes.tolist(), hp, flags,
                                               t.buffers is not None,
                                               any(b is not None for b in t.biases))
        assert on_host == pytest.approx(bound, rel=1e-12)  # the host reads the same bound
        values = [fast.layer_values(t, plan, hp, flags, l) for l in range(len(t.routes))]
        largest = max(float(x.abs().max()) for v in values for x in v if x is not None)
        assert largest <= bound, (largest, bound)
        assert largest > 1e-3 * bound  # and it is not a vacuous bound
        # what the next step may carry bounds what this one writes: w, buf, bias, bias buf
        for k, limit in enumerate(carry):
            written = [v[k] for v in values if v[k] is not None]
            if written:
                assert max(float(x.abs().max()) for x in written) <= limit ** 0.5, k


def overflowing_net() -> tuple[nn.Module, GSGD]:
    """A float32 two-block net with a plain stem, one momentum step taken (buffers exist)."""
    model = two_block_net().float()
    opt = GSGD(model, lr=0.01, momentum=0.9)
    gen = torch.Generator().manual_seed(8)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen)
    opt.step()
    return model, opt


def snapshot(model: nn.Module, opt: GSGD) -> list[torch.Tensor]:
    return [t.detach().clone() for p in model.parameters()
            for t in (p, opt.state[p]["momentum_buffer"])]


@pytest.mark.parametrize("mode", ["raise", "skip", "compiled raise"])
def test_a_step_that_would_write_non_finite_values_is_refused_whole(mode):
    """Finite weights and gradients, but lr * g / c^2 beyond float32's range: the step writes
    nothing (weights and buffers bitwise unchanged) and raises / is counted as skipped."""
    model, opt = overflowing_net()
    opt.param_groups[0].update(lr=1e38, on_nonfinite=mode.removeprefix("compiled "),
                               compile=mode.startswith("compiled"))
    gen = torch.Generator().manual_seed(9)
    for p in model.parameters():
        p.grad = 1e6 * torch.randn(p.shape, generator=gen)
    before = snapshot(model, opt)
    if mode.endswith("raise"):
        with pytest.raises(NonFiniteError, match="would write non-finite values"):
            opt.step()
    else:
        opt.step()
        assert opt.skipped_steps() == [1]
    assert all(torch.equal(a, b) for a, b in zip(snapshot(model, opt), before, strict=True))


def test_a_step_whose_bound_is_out_of_range_is_checked_and_then_taken(monkeypatch):
    """A weight of 1e25 in float32 (its square overflows the bound's norms): the step cannot be
    cleared by the bound, so it is computed out of place, found finite and written; it is the
    reference step."""
    calls = []
    checked = fast.checked_step
    monkeypatch.setattr(fast, "checked_step", lambda *a: calls.append(1) or checked(*a))
    model = mlp_net(True).float()
    opt = GSGD(model, lr=0.05, momentum=0.9)
    (block,) = opt.structure.blocks
    r = block_routes(block)[1]
    designated = set(r.parent_flat().tolist()) | set(r.child_flat().tolist())
    free = next(k for k in range(r.h_out * r.h_in) if k not in designated)
    with torch.no_grad():
        model.get_parameter(block.layers[1].weight).view(-1)[free] = 1e25
    gen = torch.Generator().manual_seed(10)
    for _ in range(2):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen)
        expected, _ = reference_of(opt, model)
        opt.step()
        for name, want in expected.items():
            if not name.endswith(" buffer"):
                torch.testing.assert_close(model.get_parameter(name).detach(), want, msg=name)
    assert len(calls) == 2 and opt.skipped_steps() == [0]


def carried_of(opt: GSGD) -> list:
    """The write bound each block's next step would take instead of measuring norms."""
    _, steps, _, _, _ = opt._gather_blocks()
    return [s.carried for s in steps]


def test_a_carried_write_bound_is_used_only_while_nothing_else_wrote_the_tensors():
    """After a step the next one may take the bound of what it wrote instead of norms -- not
    after an in-place edit of a weight or buffer, a load_state_dict, or CARRY_STEPS steps."""
    model = mlp_net(True).float()
    opt = GSGD(model, lr=0.01, momentum=0.9)
    gen = torch.Generator().manual_seed(11)

    def step(take: bool = True) -> None:
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen)
        if take:
            opt.step()

    step(take=False)
    assert carried_of(opt) == [None]  # nothing written yet: measure
    step()
    assert carried_of(opt)[0] is not None
    with torch.no_grad():
        model[0].weight.mul_(2)  # someone else wrote a weight
    assert carried_of(opt) == [None]
    step()
    assert carried_of(opt)[0] is not None
    with torch.no_grad():
        opt.state[model[2].weight]["momentum_buffer"].add_(1)  # ... or a buffer
    assert carried_of(opt) == [None]
    step()
    opt.load_state_dict(opt.state_dict())
    assert carried_of(opt) == [None]
    for _ in range(GSGD.CARRY_STEPS + 1):
        step()
    assert carried_of(opt) == [None]  # measured afresh after CARRY_STEPS steps


def test_a_carried_bound_that_cannot_clear_the_step_is_measured_again_first(monkeypatch):
    """A carried bound too loose to clear the step (here: made infinite) is replaced by the
    measured norms before the step is checked out of place: the step is taken in place and is
    the reference step."""
    checked = []
    monkeypatch.setattr(fast, "checked_step", lambda *a: checked.append(1))
    model = mlp_net(True).float()
    opt = GSGD(model, lr=0.01, momentum=0.9)
    gen = torch.Generator().manual_seed(12)
    for k in range(3):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen)
        if k:
            (key, (stamps, carry, age)), = opt._carried.items()
            opt._carried[key] = (stamps, torch.full_like(carry, float("inf")), age)
        expected, _ = reference_of(opt, model)
        opt.step()
        for name, want in expected.items():
            if not name.endswith(" buffer"):
                torch.testing.assert_close(model.get_parameter(name).detach(), want, msg=name)
    assert not checked and opt.skipped_steps() == [0]
