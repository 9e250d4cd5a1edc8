"""Shared helpers for the G-SGD core tests: tiny chain nets, data, block tensors, tolerances."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import pytest
import torch
from torch import nn

from gsgd.structure import Block, Structure, layer_view

F64 = torch.float64

# The tests use tiny tensors: one intra-op thread is as fast as two on an idle machine and ~25x
# faster when another process shares the two cores (thread oversubscription made the whole
# suite take 9+ minutes instead of under 2).
torch.set_num_threads(1)

# Experiment runs in the tests take the eager G-SGD step: compile = "auto" (the runner's
# default) would compile every tiny model the suite trains (subprocesses inherit this too).
# test_runner.py checks what "auto" chooses with the compiler probe replaced.
os.environ["GSGD_COMPILE"] = "0"

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "leaky": lambda: nn.LeakyReLU(0.2),
    "prelu": lambda: nn.PReLU(init=0.15),
    "identity": nn.Identity,
}


def chain_net(widths: Sequence[int], bias: bool | Sequence[bool] = True,
              activation: str | Sequence[str] = "relu", seed: int = 0,
              dtype: torch.dtype = F64) -> nn.Sequential:
    """Linear / activation / ... / Linear with the given node widths (deterministic from seed).

    ``bias`` and ``activation`` may be given per layer / per hidden layer.
    """
    n = len(widths) - 1
    biases = [bias] * n if isinstance(bias, bool) else list(bias)
    acts = [activation] * (n - 1) if isinstance(activation, str) else list(activation)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mods: list[nn.Module] = []
        for l in range(n):
            mods.append(nn.Linear(widths[l], widths[l + 1], bias=biases[l]))
            if l < n - 1:
                mods.append(ACTIVATIONS[acts[l]]())
        net = nn.Sequential(*mods).to(dtype)
    return net


def skeleton_chain(widths: Sequence[int], seed: int = 0,
                   dtype: torch.dtype = torch.float32) -> nn.Sequential:
    """:func:`chain_net` (ReLU, biases) from the paper's skeleton init, float32 by default (the
    framework-integration tests train it as users would)."""
    from gsgd import discover, skeleton_init

    net = chain_net(widths, seed=seed, dtype=dtype)
    skeleton_init(net, discover(net))
    return net


def conv_chain_net() -> nn.Module:
    """A tiny conv -> flatten -> Linear chain (one G-block, biases everywhere), float64, from
    the skeleton init."""
    from gsgd import discover, skeleton_init

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(),
                            nn.Linear(3 * 4 * 4, 5), nn.ReLU(), nn.Linear(5, 3)).to(F64)
    skeleton_init(net, discover(net))
    return net


class TwoBlocks(nn.Module):
    """A residual add ends a chain: two G-blocks, plus plain parameters (stem and head bias)."""

    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1)
            self.stem = nn.Linear(6, 5)
            self.a1, self.a2 = nn.Linear(5, 7), nn.Linear(7, 5)
            self.b1, self.b2 = nn.Linear(5, 4, bias=False), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        h = h + self.a2(nn.functional.relu(self.a1(nn.functional.relu(h))))
        return self.b2(nn.functional.relu(self.b1(h)))


def two_block_net() -> nn.Module:
    """:class:`TwoBlocks` in float64 from the skeleton init (input 6, 3 outputs)."""
    from gsgd import discover, skeleton_init

    net = TwoBlocks().double()
    skeleton_init(net, discover(net))
    return net


def bn_approx_net() -> nn.Module:
    """Conv-BN-ReLU twice, then a Linear (input 1x5x5, 3 outputs), float64, skeleton init of
    the batchnorm="approximate" structure (its BN parameters get plain SGD)."""
    from gsgd import discover, skeleton_init

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)
        net = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(),
                            nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                            nn.Flatten(), nn.Linear(4 * 5 * 5, 3)).double()
    skeleton_init(net, discover(net, batchnorm="approximate"))
    return net


def batch(widths: Sequence[int], size: int = 16, seed: int = 1,
          dtype: torch.dtype = F64) -> tuple[torch.Tensor, torch.Tensor]:
    """Random inputs and regression targets for a net with these node widths."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(size, widths[0], generator=gen, dtype=dtype)
    y = torch.randn(size, widths[-1], generator=gen, dtype=dtype)
    return x, y


def mse_backward(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Zero the gradients, compute the MSE loss and backpropagate; returns the loss."""
    model.zero_grad(set_to_none=True)
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    return loss.detach()


def block_tensors(model: nn.Module, block: Block, grads: bool = False
                  ) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    """Detached copies of a block's ``(out, in, taps)`` weight views and its biases.

    With ``grads=True`` the gradients of those parameters instead (zeros where grad is None).
    """
    named = dict(model.named_parameters())

    def get(p: torch.Tensor) -> torch.Tensor:
        t = p.grad if grads else p
        return (torch.zeros_like(p) if t is None else t).detach().clone()

    ws = [layer_view(get(named[layer.weight]), layer) for layer in block.layers]
    bs = [get(named[layer.bias]) if layer.bias else None for layer in block.layers]
    return ws, bs


def centres(block: Block) -> tuple[int, ...]:
    return tuple(layer.centre for layer in block.layers)


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, rel: float,
                     what: str = "") -> None:
    """max |actual - expected| <= rel * max(|expected|, tiny): a scale-free comparison."""
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    err = float((actual - expected).abs().max()) if expected.numel() else 0.0
    assert err <= rel * max(scale, 1e-300), f"{what}: max error {err:.3e} vs scale {scale:.3e}"


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    return float((a - b).abs().max() / b.abs().max())


def only_block(structure: Structure) -> Block:
    assert len(structure.blocks) == 1, structure.summary()
    return structure.blocks[0]


@pytest.fixture
def f64_default():
    """Run a test with float64 as the default dtype (restored afterwards)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(F64)
    yield
    torch.set_default_dtype(old)


def config_with(base: dict, optimizers: list | None = None, init: dict | None = None,
                model: dict | None = None, **experiment):
    """``base`` (a config as a dict) with its optimizers, [init] or [model] replaced and
    [experiment] keys updated, validated by ``config_from_dict``."""
    import copy

    from gsgd.experiments.config import config_from_dict

    data = copy.deepcopy(base)
    for key, value in (("optimizers", optimizers), ("init", init), ("model", model)):
        if value is not None:
            data[key] = value
    data["experiment"].update(experiment)
    return config_from_dict(data)


def config_error(base: dict, **kw) -> str:
    """The message of the ConfigError that :func:`config_with` raises for ``kw``."""
    from gsgd.experiments.config import ConfigError

    with pytest.raises(ConfigError) as info:
        config_with(base, **kw)
    return str(info.value)
