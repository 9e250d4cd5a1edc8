"""GSGD inside DistributedDataParallel: 2 gloo processes on 127.0.0.1 train to bitwise identical
parameters, equal to one process on the concatenated batch; wrapped models are unwrapped."""

from __future__ import annotations

import os
import socket
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from conftest import two_block_net
from gsgd import GSGD, discover

WORLD, STEPS, BATCH = 2, 3, 16


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return [(torch.randn(BATCH, 6, generator=gen, dtype=torch.float64),
             torch.randint(0, 3, (BATCH,), generator=gen)) for _ in range(STEPS)]


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
    try:
        model = torch.nn.parallel.DistributedDataParallel(two_block_net())
        opt = GSGD(model, lr=0.05, momentum=0.9)  # the wrapper is unwrapped
        half = BATCH // WORLD
        for x, y in batches():
            opt.zero_grad()
            F.cross_entropy(model(x[rank * half:(rank + 1) * half]),
                            y[rank * half:(rank + 1) * half]).backward()
            opt.step()
        torch.save({n: p.detach() for n, p in model.module.named_parameters()},
                   Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_ranks_stay_bitwise_identical_and_equal_one_process_on_the_whole_batch(tmp_path):
    context = mp.start_processes(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD,
                                 join=False, start_method="spawn")
    deadline = time.monotonic() + 180
    try:
        while not context.join(timeout=2):
            assert time.monotonic() < deadline, "the DDP workers did not finish in 180 s"
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    single = two_block_net()
    opt = GSGD(single, lr=0.05, momentum=0.9)
    for x, y in batches():
        opt.zero_grad()
        F.cross_entropy(single(x), y).backward()
        opt.step()
    for name, p in single.named_parameters():
        assert torch.equal(ranks[0][name], ranks[1][name]), name
        torch.testing.assert_close(ranks[0][name], p.detach(), rtol=1e-10, atol=1e-12, msg=name)
    assert not torch.equal(ranks[0]["a1.weight"], two_block_net().a1.weight.detach())


def test_compiled_and_data_parallel_wrappers_are_unwrapped():
    model = two_block_net()
    expected = discover(model)
    for wrapped in (torch.compile(model), torch.nn.DataParallel(model),
                    torch.nn.DataParallel(torch.compile(model))):
        assert discover(wrapped) == expected
        opt = GSGD(wrapped, lr=0.05)
        assert opt.structure == expected and opt.plain_parameters == ("stem.weight",
                                                                      "stem.bias")
