"""The data of an experiment: a real dataset from :mod:`gsgd.data`, or labelled synthetic data.

Synthetic data (dataset = "synthetic", ``--data synthetic``, or a dry run whose dataset is not
available here, e.g. CIFAR) has the shape of the dataset it stands for: Gaussian clusters, one per
class (x = mu_y + noise), so a model can learn it. Its name always says "SYNTHETIC".

``[experiment] pool = k`` average-pools every split once, here at load time (:func:`pool_splits`),
real or synthetic; the splits' name then says so, e.g. "mnist, 4x4 average-pooled to 7x7".
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from gsgd.data import DatasetError, DatasetSplits, Normalization, Split, load_dataset
from gsgd.experiments.config import DATASET_SHAPES, ExperimentSection

__all__ = ["ExperimentData", "clear_cache", "load_experiment_data", "pool_splits",
           "synthetic_splits"]

_CACHE: dict[tuple, DatasetSplits] = {}


@dataclass(frozen=True)
class ExperimentData:
    """The splits to train on; ``synthetic`` with ``note`` saying why when not the real data."""

    splits: DatasetSplits
    synthetic: bool = False
    note: str = ""


def synthetic_splits(shape: tuple[int, int, int], num_classes: int, n_train: int = 1024,
                     n_val: int = 256, n_test: int = 256, seed: int = 0,
                     stands_for: str = "synthetic") -> DatasetSplits:
    """Gaussian clusters of the given image ``shape``: x = mu_y + 2 * noise, mu_y ~ N(0, I)."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn((num_classes, *shape), generator=g)

    def split(n: int) -> Split:
        y = torch.randint(0, num_classes, (n,), generator=g)
        x = means[y] + 2.0 * torch.randn((n, *shape), generator=g)
        return Split(x.float(), y.long())

    train, val, test = split(n_train), split(n_val), split(n_test)
    c = shape[0]
    return DatasetSplits(
        name=f"SYNTHETIC data shaped like {stands_for} ({'x'.join(map(str, shape))}, "
             f"{num_classes} classes)",
        train=train, val=val, test=test, num_classes=num_classes, input_shape=shape,
        normalization=Normalization((0.0,) * c, (1.0,) * c),
    )


def pool_splits(splits: DatasetSplits, k: int) -> DatasetSplits:
    """``splits`` with every split (train / val / test) average-pooled, window k x k, stride k:
    x'[n, c, i, j] = mean of x[n, c, k*i : k*i + k, k*j : k*j + k] (k = 1: ``splits`` itself).

    The name says so; the normalisation and the training augmentation are kept (the latter acts
    on the pooled images). ValueError when k does not divide both image sides."""
    if k == 1:
        return splits
    c, h, w = splits.input_shape
    if k < 1 or h % k or w % k:
        raise ValueError(f"pool = {k}: the window must be >= 1 and divide both sides of the "
                         f"{h}x{w} images")

    def pool(split: Split) -> Split:
        return Split(F.avg_pool2d(split.x, k), split.y)

    return replace(splits, name=f"{splits.name}, {k}x{k} average-pooled to {h // k}x{w // k}",
                   train=pool(splits.train), val=pool(splits.val), test=pool(splits.test),
                   input_shape=(c, h // k, w // k))


def clear_cache() -> None:
    """Forget the datasets loaded so far in this process."""
    _CACHE.clear()


def load_experiment_data(exp: ExperimentSection, synthetic: bool = False,
                         fallback_to_synthetic: bool = False) -> ExperimentData:
    """Load ``exp.dataset`` (cached per process), or synthetic data of its shape; every split
    average-pooled by ``exp.pool`` (:func:`pool_splits`, once: the pooled splits are cached).

    ``synthetic``: use synthetic data whatever the dataset. ``fallback_to_synthetic`` (dry runs):
    use it when the real data cannot be loaded, with a note naming the reason.
    """
    shape, classes = DATASET_SHAPES[exp.dataset]
    if synthetic or exp.dataset == "synthetic":
        return ExperimentData(
            pool_splits(synthetic_splits(shape, classes, stands_for=exp.dataset), exp.pool),
            True, f"SYNTHETIC data of {exp.dataset}'s shape (requested)")
    key = (exp.dataset, exp.data_root, exp.val_size, exp.split_seed, exp.pool)
    if key not in _CACHE:
        try:
            splits = load_dataset(exp.dataset, root=exp.data_root or None,
                                  val_size=exp.val_size, seed=exp.split_seed)
        except DatasetError as exc:
            if not fallback_to_synthetic:
                raise
            return ExperimentData(
                pool_splits(synthetic_splits(shape, classes, stands_for=exp.dataset), exp.pool),
                True, f"SYNTHETIC data of {exp.dataset}'s shape: {exp.dataset} is not available "
                f"here ({str(exc).splitlines()[0][:200]})")
        _CACHE[key] = pool_splits(splits, exp.pool)
    return ExperimentData(_CACHE[key])
