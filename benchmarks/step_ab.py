"""Is this tree's GSGD step slower than a git revision's? Both measured in ONE process.

The package of revision REV is exported (``git archive``) into a temporary directory and
imported as ``gsgd_rev``; this tree's ``gsgd`` is imported as usual. For each model, torch SGD
(foreach) and GSGD of both trees, eager and ``compile=True``, step on the same gradients,
interleaved (A B C D E A B ...) after a warm-up; medians and ratios to SGD are printed per round,
and the spread of the ratio (this tree / REV) over rounds at the end.

    python benchmarks/step_ab.py --rev 9c4754d                  # both MLPs, 3 rounds
    python benchmarks/step_ab.py --rev HEAD~3 --models mlp-small --rounds 5
"""

from __future__ import annotations

import argparse
import copy
import importlib
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

import torch
import torch.nn.functional as F

from gsgd import GSGD, discover, skeleton_init
from gsgd.models import mlp

MODELS = {"mlp-big": ([784, 1000, 1000, 1000, 10], True, 128),
          "mlp-small": ([784, 64, 64, 64, 64, 10], False, 64),
          "resnet20": ("resnet", None, 128),
          "plainnet": ("plainnet", None, 128)}


def build(name: str) -> tuple[torch.nn.Module, tuple[int, ...], int]:
    """(model from the skeleton init, input shape, batch) of a benchmark case."""
    widths, bias, batch = MODELS[name]
    if isinstance(widths, str):
        from gsgd.models import cnn

        make = cnn.resnet if widths == "resnet" else cnn.plainnet
        model = make(depth=20, in_channels=1, num_classes=10, batchnorm=False, seed=0)
        shape = (1, 28, 28)
    else:
        model, shape = mlp(widths, bias=bias, seed=0), (widths[0],)
    skeleton_init(model, discover(model))
    return model, shape, batch


def import_revision(rev: str, into: Path):
    """The ``gsgd`` package of git revision ``rev``, importable as ``gsgd_rev``."""
    root = Path(__file__).resolve().parents[1]
    try:
        archive = subprocess.run(["git", "-C", str(root), "archive", rev, "src/gsgd"],
                                 check=True, capture_output=True).stdout
    except subprocess.CalledProcessError as exc:
        sys.exit(f"step_ab.py: --rev {rev}: {exc.stderr.decode().strip()}")
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    package = into / "gsgd_rev"
    (into / "src" / "gsgd").rename(package)
    for path in package.rglob("*.py"):
        text = path.read_text()
        path.write_text(re.sub(r"\b(from|import) gsgd\b", r"\1 gsgd_rev", text))
    sys.path.insert(0, str(into))
    return importlib.import_module("gsgd_rev.optim").GSGD


def measure(name: str, old_gsgd, repeats: int) -> dict[str, float]:
    """Median step time (ms) per method, interleaved, on one fixed gradient."""
    base, shape, batch = build(name)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(batch, *shape, generator=gen), torch.randint(0, 10, (batch,),
                                                                    generator=gen)
    lr = 1e-9  # tiny: the timed steps repeat one gradient over and over
    makers = {
        "sgd": lambda m: torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9, foreach=True),
        "rev eager": lambda m: old_gsgd(m, lr=lr, momentum=0.9),
        "this eager": lambda m: GSGD(m, lr=lr, momentum=0.9),
        "rev compiled": lambda m: old_gsgd(m, lr=lr, momentum=0.9, compile=True),
        "this compiled": lambda m: GSGD(m, lr=lr, momentum=0.9, compile=True),
    }
    methods = {}
    for key, make in makers.items():
        model = copy.deepcopy(base)
        opt = make(model)
        F.cross_entropy(model(x), y).backward()
        for _ in range(5):  # warm-up, compilation
            opt.step()
        methods[key] = opt
    times: dict[str, list[float]] = {key: [] for key in methods}
    for _ in range(repeats):
        for key, opt in methods.items():
            start = time.perf_counter()
            opt.step()
            times[key].append(time.perf_counter() - start)
    return {key: statistics.median(t) * 1e3 for key, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rev", required=True, help="the git revision to compare with")
    parser.add_argument("--models", default="mlp-big,mlp-small",
                        help=f"comma-separated, from {', '.join(MODELS)}")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=60)
    args = parser.parse_args()
    models = args.models.split(",")
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        sys.exit(f"step_ab.py: --models: unknown {unknown}; choose from {', '.join(MODELS)}")
    with tempfile.TemporaryDirectory() as tmp:
        old_gsgd = import_revision(args.rev, Path(tmp))
        ratios: dict[tuple[str, str], list[float]] = {}
        for r in range(args.rounds):
            for name in models:
                med = measure(name, old_gsgd, args.repeats)
                print(f"round {r} {name}: " + "  ".join(
                    f"{k} {v:.3f} ms ({v / med['sgd']:.2f}x)" for k, v in med.items()))
                for form in ("eager", "compiled"):
                    ratios.setdefault((name, form), []).append(
                        med[f"this {form}"] / med[f"rev {form}"])
        print(f"\nthis tree / {args.rev}, step time (min / median / max over rounds):")
        for (name, form), values in ratios.items():
            print(f"  {name:<10} {form:<9} {min(values):.2f} / {statistics.median(values):.2f}"
                  f" / {max(values):.2f}")


if __name__ == "__main__":
    main()
