"""GSGD on a CUDA device takes the same steps as on the CPU (eager and compiled). Skipped where
no GPU is present (CI); run on a GPU machine with ``pytest tests/test_gsgd_cuda.py``."""

import copy

import pytest
import torch
import torch.nn.functional as F

from conftest import conv_chain_net
from gsgd import GSGD

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")




@pytest.mark.parametrize("compile", [False, True])
def test_cuda_steps_equal_cpu_steps(compile):
    cpu_net = conv_chain_net()
    gpu_net = copy.deepcopy(cpu_net).cuda()
    hp = dict(lr=0.05, momentum=0.9, weight_decay=1e-3)
    cpu_opt = GSGD(cpu_net, **hp)
    gpu_opt = GSGD(gpu_net, compile=compile, **hp)
    gen = torch.Generator().manual_seed(1)
    for _ in range(4):
        x = torch.randn(8, 2, 4, 4, generator=gen, dtype=torch.float64)
        y = torch.randint(0, 3, (8,), generator=gen)
        for net, opt, dev in ((cpu_net, cpu_opt, "cpu"), (gpu_net, gpu_opt, "cuda")):
            opt.zero_grad()
            F.cross_entropy(net(x.to(dev)), y.to(dev)).backward()
            opt.step()
    for (name, p), q in zip(cpu_net.named_parameters(), gpu_net.parameters(), strict=True):
        torch.testing.assert_close(q.cpu(), p, rtol=1e-10, atol=1e-12, msg=name)
    assert gpu_opt.clip_counts() == cpu_opt.clip_counts()
