"""Cost of a G-SGD training epoch against an SGD epoch, on real MNIST, in ONE process.

For each model, epochs of torch SGD, GSGD (eager) and GSGD (``compile=True``) are alternated
(A B C A B C ...), each from the same skeleton-initialised weights, with the runner's training
loop (shuffled batches from a seeded generator, ``zero_grad(set_to_none=True)``, forward, cross
entropy, ``loss.item()``, backward, step; denormals flushed to zero). The one-off compile time
(:func:`gsgd.graphs.compile_seconds` over a few warm-up steps of a copy) is reported apart; it
is not in any epoch time. Reported: median epoch seconds per method, the ratio of medians to
SGD, and the spread of the per-round ratio (min / max). Only these in-process ratios mean
anything on a shared machine: absolute times move 20-50% run to run.

    python benchmarks/epoch_cost.py                          # both MLPs, 3 rounds, JSON
    python benchmarks/epoch_cost.py --models paper --rounds 5 --batches 300
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from gsgd import graphs
from gsgd.data import iterate_batches, load_dataset
from gsgd.discovery import discover
from gsgd.group import skeleton_init
from gsgd.models import mlp
from gsgd.optim import GSGD


@dataclass(frozen=True)
class EpochCase:
    """A model of the study and its batch size."""

    name: str
    widths: tuple[int, ...]
    batch: int


CASES = {
    "paper": EpochCase("MLP 784-64x4-10 (no bias), batch 64: the paper's MNIST MLP",
                       (784, 64, 64, 64, 64, 10), 64),
    "deep": EpochCase("MLP 784-(64x16)-10 (no bias), batch 64", (784, *[64] * 16, 10), 64),
}

METHODS = ("sgd", "gsgd", "gsgd-compiled")


def make_optimizer(method: str, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    if method == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr)
    return GSGD(model, lr=lr, compile=method == "gsgd-compiled")


def train_epoch(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                batch: int, seed: int, limit: int | None) -> float:
    """One epoch of the runner's loop; returns its wall-clock seconds."""
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for i, (xb, yb) in enumerate(iterate_batches(x, y, batch, shuffle=True, generator=gen)):
        if limit is not None and i >= limit:
            break
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(xb), yb)
        loss.detach().item()
        loss.backward()
        opt.step()
    return time.perf_counter() - start


def compile_seconds(model: nn.Module, lr: float, x: torch.Tensor, y: torch.Tensor,
                    batch: int) -> float:
    """The one-off cost of ``compile=True``: the seconds spent building graphs
    (:func:`gsgd.graphs.compile_seconds`) in a few steps of a copy (graphs are kept per
    process, so the timed epochs build none)."""
    net = copy.deepcopy(model)
    opt = make_optimizer("gsgd-compiled", net, lr)
    before = graphs.compile_seconds()
    for _ in range(3):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(net(x[:batch]), y[:batch]).backward()
        opt.step()
    return graphs.compile_seconds() - before


def measure(case: EpochCase, x: torch.Tensor, y: torch.Tensor, rounds: int, lr: float,
            limit: int | None, methods: tuple[str, ...]) -> dict:
    base = mlp(list(case.widths), bias=False, seed=0)
    skeleton_init(base, discover(base))  # the same init for every method (the runner's fair one)
    compile_s = compile_seconds(base, lr, x, y, case.batch) if "gsgd-compiled" in methods \
        else None
    runs: dict[str, tuple[nn.Module, torch.optim.Optimizer]] = {}
    for m in methods:
        net = copy.deepcopy(base)
        runs[m] = (net, make_optimizer(m, net, lr))
    for net, opt in runs.values():  # warm-up: a few batches each (and the compile)
        train_epoch(net, opt, x, y, case.batch, seed=1000, limit=20)
    times: dict[str, list[float]] = {m: [] for m in methods}
    for r in range(rounds):
        for m, (net, opt) in runs.items():
            times[m].append(train_epoch(net, opt, x, y, case.batch, seed=r, limit=limit))
            print(f"  round {r} {m:14s} {times[m][-1]:7.3f} s", flush=True)
    out = {"model": case.name, "batch": case.batch, "rounds": rounds,
           "batches_per_epoch": limit or -(-len(x) // case.batch),
           "compile_seconds": compile_s, "methods": {}}
    sgd = times["sgd"]
    for m in methods:
        ratios = [t / s for t, s in zip(times[m], sgd, strict=True)]
        out["methods"][m] = {
            "median_s": statistics.median(times[m]),
            "ratio_of_medians": statistics.median(times[m]) / statistics.median(sgd),
            "ratio_min": min(ratios), "ratio_max": max(ratios), "times_s": times[m]}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(CASES), help=f"comma list of {list(CASES)}")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {METHODS}")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batches", type=int, default=None,
                   help="batches per epoch (default: the whole MNIST training set)")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1, as the demo's runs: with 2 threads on 2 "
                        "shared cores the many small ops of a step oversubscribe them)")
    p.add_argument("--json", default="benchmarks/results/epoch_cost.json")
    args = p.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    methods = tuple(m for m in args.methods.split(",") if m)
    bad = [m for m in models if m not in CASES] + [m for m in methods if m not in METHODS]
    if bad or "sgd" not in methods or args.rounds < 1:
        p.error(f"unknown models/methods {bad} (models: {list(CASES)}, methods: {METHODS}; "
                "sgd is the baseline and must be included; --rounds >= 1)")
    # as the runner does: denormal floats (which deep G-SGD-trained nets produce in float32)
    # cost 10x and more per operation on x86 CPUs, for every method alike
    torch.set_flush_denormal(True)
    torch.set_num_threads(args.threads)
    data = load_dataset("mnist", val_size=0)
    x, y = data.train.x, data.train.y
    results = []
    for name in models:
        case = CASES[name]
        print(f"{case.name}", flush=True)
        res = measure(case, x, y, args.rounds, args.lr, args.batches, methods)
        results.append(res)
        comp = res["compile_seconds"]
        print(f"  compile (one-off, not in the epochs): "
              f"{'-' if comp is None else f'{comp:.1f} s'}")
        for m, r in res["methods"].items():
            print(f"  {m:14s} median {r['median_s']:7.3f} s   {r['ratio_of_medians']:5.2f}x SGD"
                  f"   (per round {r['ratio_min']:.2f}-{r['ratio_max']:.2f})")
    meta = {"torch": torch.__version__, "python": sys.version.split()[0],
            "machine": platform.machine(), "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(), "argv": sys.argv[1:]}
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    os.replace(tmp, path)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
