"""The heart of G-SGD: training is invariant under the rescaling group G (docs/math.md s. 1, 6).

Two networks related by a random positive rescaling of their hidden units (factors e^U(-2, 2),
``gsgd.group.random_rescale``) compute the same function. Trained by GSGD (with G-space momentum
and weight decay) on the same batches they must keep computing the same function; trained by
``torch.optim.SGD`` they must drift apart (so the test can fail).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import NamedTuple

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from conftest import F64, chain_net, relative_difference
from gsgd.discovery import discover
from gsgd.group import random_rescale, skeleton_init
from gsgd.optim import GSGD

STEPS = 100


def pair(widths, bias, acts, seed: int) -> tuple[nn.Module, nn.Module]:
    """A skeleton-initialised chain net and a randomly rescaled copy (same function).

    The off-skeleton weights are halved so that the designated routes (weight 1) dominate: every
    hidden unit then follows its designated input and is active on part of the batch.
    """
    net = chain_net(widths, bias, acts, seed=seed)
    structure = discover(net, strict=True)
    assert len(structure.blocks) == 1
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(0.5)
    skeleton_init(net, structure)
    other = copy.deepcopy(net)
    random_rescale(other, structure, seed=seed + 1)
    return net, other


def data(net: nn.Module, seed: int, batches: int = 4, size: int = 16):
    """Fixed training batches labelled by a reachable teacher, and an evaluation batch.

    The teacher is the student with perturbed weights and the same skeleton (designated weights
    1), so its targets are reachable without flipping the sign of any basis path (G-SGD keeps
    those signs: the carrier ratios are clamped to be positive).
    """
    gen = torch.Generator().manual_seed(seed)
    teacher = copy.deepcopy(net)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    skeleton_init(teacher, discover(teacher))
    width = next(m for m in net if isinstance(m, nn.Linear)).in_features

    def inputs(n: int) -> torch.Tensor:
        return torch.randn(n, width, generator=gen, dtype=F64)

    with torch.no_grad():
        train = [(x, teacher(x)) for x in (inputs(size) for _ in range(batches))]
    return train, inputs(32)


def trajectory(net: nn.Module, opt: torch.optim.Optimizer, batches, x_eval: torch.Tensor,
               steps: int = STEPS, every: int = 10) -> list[torch.Tensor]:
    """Train ``steps`` steps on the cycled batches; outputs on ``x_eval`` every ``every`` steps."""
    outputs = []
    for k in range(steps):
        x, y = batches[k % len(batches)]
        opt.zero_grad()
        nn.functional.mse_loss(net(x), y).backward()
        opt.step()
        if (k + 1) % every == 0:
            with torch.no_grad():
                outputs.append(net(x_eval))
    return outputs


def eval_loss(net: nn.Module, batches) -> float:
    with torch.no_grad():
        return sum(float(nn.functional.mse_loss(net(x), y)) for x, y in batches)


def assert_alive(net: nn.Module, x_eval: torch.Tensor) -> None:
    """Outputs vary across the batch and are finite: the comparison is not vacuous."""
    with torch.no_grad():
        out = net(x_eval)
    assert torch.isfinite(out).all()
    spread = float(out.std(dim=0).max())
    assert spread > 1e-3 * max(float(out.abs().max()), 1e-12), "network output is constant"


def gap(run_a: list[torch.Tensor], run_b: list[torch.Tensor]) -> float:
    """Largest relative output difference of two runs over their checkpoints."""
    return max(relative_difference(b, a) for a, b in zip(run_a, run_b, strict=True))


class Start(NamedTuple):
    """A net, its randomly rescaled copy, the batches, the evaluation inputs, the loss before."""

    net: nn.Module
    other: nn.Module
    batches: list
    x_eval: torch.Tensor
    before: float


def rescaled_start(widths, bias, acts, seed: int) -> Start:
    """:func:`pair` and :func:`data`, checked: the two compute the same live function."""
    net, other = pair(widths, bias, acts, seed)
    batches, x_eval = data(net, seed + 2)
    with torch.no_grad():
        assert relative_difference(other(x_eval), net(x_eval)) < 1e-12
    assert_alive(net, x_eval)
    return Start(net, other, batches, x_eval, eval_loss(net, batches))


class Run(NamedTuple):
    """Copies of both nets trained alike: their largest relative output gap, the net's trained
    copy and both optimizers."""

    gap: float
    model: nn.Module
    opt: torch.optim.Optimizer
    twin_opt: torch.optim.Optimizer


def rescaled_run(start: Start, make_opt: Callable[[nn.Module], torch.optim.Optimizer],
                 steps: int = STEPS) -> Run:
    """Train a copy of the net and of its rescaled twin ``steps`` steps on the same batches."""
    a, b = copy.deepcopy(start.net), copy.deepcopy(start.other)
    opt_a, opt_b = make_opt(a), make_opt(b)
    run_a = trajectory(a, opt_a, start.batches, start.x_eval, steps)
    run_b = trajectory(b, opt_b, start.batches, start.x_eval, steps)
    return Run(gap(run_a, run_b), a, opt_a, opt_b)


def check_invariance(widths, bias, acts, seed: int, lr: float, **hyper) -> None:
    start = rescaled_start(widths, bias, acts, seed)

    # G-SGD: the rescaled copy stays functionally identical all along.
    ours = rescaled_run(start, lambda net: GSGD(net, lr=lr, **hyper))
    assert_alive(ours.model, start.x_eval)
    after = eval_loss(ours.model, start.batches)
    assert after < 0.98 * start.before, \
        f"G-SGD did not train: loss {start.before:.4g} -> {after:.4g}"
    assert ours.opt.clip_counts() == ours.twin_opt.clip_counts()
    assert ours.gap < 1e-8, f"G-SGD broke rescaling invariance: relative gap {ours.gap:.3e}"

    # SGD from the same pair: the two trajectories drift apart.
    sgd_hyper = {k: v for k, v in hyper.items()
                 if k in ("momentum", "weight_decay", "dampening", "nesterov")}
    sgd_gap = rescaled_run(start, lambda net: torch.optim.SGD(net.parameters(), lr=lr,
                                                              **sgd_hyper)).gap
    assert not (sgd_gap <= 1e-3), f"SGD stayed invariant (gap {sgd_gap:.3e}): test is vacuous"


ACTS = st.sampled_from(["relu", "leaky", "prelu", "identity"])


@st.composite
def architectures(draw):
    depth = draw(st.integers(2, 4))  # number of layers
    widths = [draw(st.integers(2, 5))] + [draw(st.integers(2, 6)) for _ in range(depth - 1)]
    widths.append(draw(st.integers(1, 3)))
    bias = tuple(draw(st.booleans()) for _ in range(depth))
    acts = tuple(draw(ACTS) for _ in range(depth - 1))
    return tuple(widths), bias, acts


@settings(max_examples=20, deadline=None)
@given(arch=architectures(), seed=st.integers(0, 2**16))
def test_gsgd_with_momentum_and_weight_decay_is_invariant_under_rescaling(arch, seed):
    widths, bias, acts = arch
    check_invariance(widths, bias, acts, seed, lr=0.002, momentum=0.9, weight_decay=1e-3)


@pytest.mark.parametrize("lr, hyper", [
    (0.002, dict(momentum=0.9, nesterov=True, weight_decay=1e-3)),
    (0.003, dict(momentum=0.8, dampening=0.3, weight_decay=1e-2)),
    (0.02, dict()),
    (0.002, dict(momentum=0.9, weight_decay=1e-3, bp_norm=(1e-2, 1e-2))),
], ids=["nesterov", "dampening", "plain", "bp-norm"])
def test_gsgd_variants_are_invariant_under_rescaling(lr, hyper):
    check_invariance((4, 6, 3, 5, 2), (True, False, True, True), ("relu", "leaky", "prelu"),
                     seed=3, lr=lr, **hyper)


def test_gsgd_is_invariant_under_rescaling_in_wide_relu_net():
    check_invariance((8, 16, 16, 16, 3), True, "relu", seed=5, lr=0.002, momentum=0.9,
                     weight_decay=1e-3)
