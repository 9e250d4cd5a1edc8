"""The torch.compile path of GSGD (compile=True) takes the same step as the eager path."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gsgd import GSGD, discover, skeleton_init


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(),
                        nn.Linear(3 * 4 * 4, 5), nn.ReLU(), nn.Linear(5, 3)).double()
    skeleton_init(net, discover(net))
    return net


@pytest.mark.parametrize("hp", [dict(momentum=0.9, weight_decay=1e-3),
                                dict(momentum=0.9, nesterov=True),
                                dict(momentum=0.0)])
def test_compiled_dense_pass_takes_the_same_steps_as_the_eager_path(hp):
    eager_net = _net()
    compiled_net = copy.deepcopy(eager_net)
    eager = GSGD(eager_net, lr=0.05, **hp)
    fused = GSGD(compiled_net, lr=0.05, compile=True, **hp)
    gen = torch.Generator().manual_seed(1)
    for _ in range(4):
        x = torch.randn(8, 2, 4, 4, generator=gen, dtype=torch.float64)
        y = torch.randint(0, 3, (8,), generator=gen)
        for net, opt in ((eager_net, eager), (compiled_net, fused)):
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            opt.step()
    changed = False
    for (name, p), q in zip(eager_net.named_parameters(), compiled_net.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-10, atol=1e-12, msg=name)
        changed = changed or not torch.equal(p, _net().get_parameter(name))
    assert changed, "the steps must actually move the weights"
