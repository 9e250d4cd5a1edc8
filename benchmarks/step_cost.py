"""Cost of a G-SGD step against torch SGD's, measured side by side in ONE process.

For each model, the methods are interleaved (A B C D A B C D ...) after a warm-up, and for each
we time (1) the optimizer step alone and (2) a whole iteration (forward, backward, step). We
report medians, the interquartile spread, the ratio of medians to torch SGD (foreach, same
momentum), and the bytes of optimizer state. Absolute times on shared machines vary 20-50% run to
run: only the ratios measured here, in one process, mean anything.

    python benchmarks/step_cost.py                      # all models, console table + JSON
    python benchmarks/step_cost.py --models mlp-big --repeats 60 --json out.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from gsgd.discovery import discover
from gsgd.group import skeleton_init
from gsgd.models import mlp
from gsgd.optim import GSGD


@dataclass
class ModelCase:
    name: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    batch: int
    classes: int = 10
    lr: float = 1e-3  # small: the timed steps train on one batch over and over


def _cnn(kind: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from gsgd.models import cnn  # the CNN models (issue 3)

        if kind == "plainnet":
            return cnn.plainnet(depth=20, in_channels=1, num_classes=10, batchnorm=False, seed=0)
        return cnn.resnet(depth=20, in_channels=1, num_classes=10, batchnorm=False, seed=0)
    return build


CASES = {
    "mlp-big": ModelCase("MLP 784-1000-1000-1000-10, batch 128",
                         lambda: mlp([784, 1000, 1000, 1000, 10], seed=0), (1, 28, 28), 128),
    "mlp-small": ModelCase("MLP 784-64x4-10 (no bias), batch 64",
                           lambda: mlp([784, 64, 64, 64, 64, 10], bias=False, seed=0),
                           (1, 28, 28), 64),
    "plainnet": ModelCase("PlainNet-20 (no BN), 1x28x28, batch 128", _cnn("plainnet"),
                          (1, 28, 28), 128, lr=1e-5),
    "resnet20": ModelCase("ResNet-20 (no BN), 1x28x28, batch 128", _cnn("resnet"),
                          (1, 28, 28), 128, lr=1e-5),
}


def make_optimizer(method: str, model: nn.Module, lr: float, momentum: float
                   ) -> torch.optim.Optimizer | Callable:
    if method == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, foreach=True)
    if method == "gsgd":
        return GSGD(model, lr=lr, momentum=momentum)
    if method == "gsgd-compiled":
        return GSGD(model, lr=lr, momentum=momentum, compile=True)
    if method == "pathsgd":
        from gsgd.optim.pathsgd import PathSGD

        return PathSGD(model, lr=lr, momentum=momentum)
    if method == "enorm":
        from gsgd.optim.enorm import ENormSGD

        return ENormSGD(model, lr=lr, momentum=momentum)
    raise ValueError(f"unknown method {method!r}")


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes held in optimizer state tensors (momentum buffers, counters, ...)."""
    total = 0
    for st in opt.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor):
                total += v.numel() * v.element_size()
    return total


def summarise(times: list[float]) -> dict:
    q = statistics.quantiles(times, n=4)
    return {"median_ms": statistics.median(times) * 1e3, "q1_ms": q[0] * 1e3, "q3_ms": q[2] * 1e3,
            "n": len(times)}


def bench_case(case: ModelCase, methods: list[str], repeats: int, warmup: int,
               lr: float | None, momentum: float, device: str = "cpu") -> dict:
    torch.manual_seed(0)
    base = case.build()
    skeleton_init(base, discover(base))
    base = base.to(device)
    x = torch.randn(case.batch, *case.input_shape, device=device)
    y = torch.randint(0, case.classes, (case.batch,), device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    runs = {}
    for m in methods:
        model = copy.deepcopy(base)
        try:
            opt = make_optimizer(m, model, case.lr if lr is None else lr, momentum)
        except ImportError as exc:
            print(f"  skipping {m}: {exc}", file=sys.stderr)
            continue
        runs[m] = {"model": model, "opt": opt, "step": [], "iter": [], "fwdbwd": []}

    def iteration(r: dict, timed: str | None) -> None:
        model, opt = r["model"], r["opt"]
        sync()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=False)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        sync()
        t1 = time.perf_counter()
        opt.step()
        sync()
        t2 = time.perf_counter()
        if timed:
            r["step"].append(t2 - t1)
            r["iter"].append(t2 - t0)
            r["fwdbwd"].append(t1 - t0)

    for i in range(warmup + repeats):
        for r in runs.values():  # interleaved: A B C D A B C D ...
            iteration(r, "yes" if i >= warmup else None)
    ref = runs["sgd"]
    out = {"model": case.name, "methods": {}}
    for m, r in runs.items():
        step, it = summarise(r["step"]), summarise(r["iter"])
        out["methods"][m] = {
            "step": step, "iteration": it, "forward_backward": summarise(r["fwdbwd"]),
            "step_ratio": step["median_ms"] / summarise(ref["step"])["median_ms"],
            "iteration_ratio": it["median_ms"] / summarise(ref["iter"])["median_ms"],
            "state_bytes": state_bytes(r["opt"]),
            "weight_bytes": sum(p.numel() * p.element_size() for p in r["model"].parameters()),
        }
    return out


def print_table(result: dict) -> None:
    print(f"\n{result['model']}")
    print(f"  {'method':<15}{'step ms (IQR)':>22}{'x SGD':>8}{'iter ms (IQR)':>24}{'x SGD':>8}"
          f"{'state MB':>10}")
    for m, r in result["methods"].items():
        s, i = r["step"], r["iteration"]
        print(f"  {m:<15}{s['median_ms']:>9.3f} ({s['q1_ms']:.3f}-{s['q3_ms']:.3f})"
              f"{r['step_ratio']:>8.2f}{i['median_ms']:>10.2f} ({i['q1_ms']:.2f}-{i['q3_ms']:.2f})"
              f"{r['iteration_ratio']:>8.2f}{r['state_bytes'] / 2**20:>10.2f}")


def write_json_atomic(path: str, data: dict) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh, indent=2)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mlp-big,mlp-small,plainnet,resnet20",
                    help=f"comma list of {sorted(CASES)}")
    ap.add_argument("--methods", default="sgd,gsgd,gsgd-compiled,pathsgd,enorm")
    ap.add_argument("--repeats", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--lr", type=float, default=None, help="default: per model (1e-3 MLPs, "
                    "1e-5 CNNs)")
    ap.add_argument("--momentum", type=float, default=0.9)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (timings synchronise)")
    ap.add_argument("--json", default="benchmarks/results/step_cost.json")
    args = ap.parse_args(argv)
    methods = args.methods.split(",")
    if methods[0] != "sgd":
        methods = ["sgd"] + [m for m in methods if m != "sgd"]
    results = {"torch": torch.__version__, "threads": torch.get_num_threads(),
               "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
               "machine": platform.processor() or platform.machine(), "lr": args.lr,
               "momentum": args.momentum, "repeats": args.repeats, "cases": []}
    for key in args.models.split(","):
        if key not in CASES:
            ap.error(f"unknown model {key!r}; choose from {sorted(CASES)}")
        try:
            res = bench_case(CASES[key], methods, args.repeats, args.warmup, args.lr,
                             args.momentum, args.device)
        except ImportError as exc:
            print(f"skipping {key}: {exc}", file=sys.stderr)
            continue
        print_table(res)
        results["cases"].append(res)
    if args.json:
        write_json_atomic(args.json, results)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
