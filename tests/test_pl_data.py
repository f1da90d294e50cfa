"""Dataset readers on tiny fake files in torchvision's on-disk formats, built-ins, and error messages."""
from __future__ import annotations

import gzip
import pickle
import struct
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from prunelimit import load_dataset
from prunelimit.data import BatchIterable, random_crop_flip, subset_indices
from prunelimit.errors import PruneLimitError




def _cifar_batch(rng, n, label_key, num_classes):
    return {b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
            label_key: [int(v) for v in rng.integers(0, num_classes, size=n)],
            b"batch_label": b"fake"}


def _write_pickle(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f)


@pytest.fixture
def fake_cifar10(tmp_path):
    rng = np.random.default_rng(0)
    batches = {f"data_batch_{i}": _cifar_batch(rng, 4, b"labels", 10) for i in range(1, 6)}
    batches["test_batch"] = _cifar_batch(rng, 3, b"labels", 10)
    for name, batch in batches.items():
        _write_pickle(tmp_path / "cifar-10-batches-py" / name, batch)
    return tmp_path, batches


def test_cifar10_reads_back_exact_pixels_and_labels(fake_cifar10):
    root, batches = fake_cifar10
    bundle = load_dataset("cifar10", data_root=root)
    assert (len(bundle.train), len(bundle.test)) == (20, 3)
    assert bundle.in_shape == (3, 32, 32) and bundle.num_classes == 10
    raw = np.concatenate([batches[f"data_batch_{i}"][b"data"] for i in range(1, 6)]).reshape(-1, 3, 32, 32) / 255.0
    mean = raw.mean(axis=(0, 2, 3), keepdims=True)
    std = raw.std(axis=(0, 2, 3), keepdims=True)
    x, y = bundle.train[7]
    np.testing.assert_allclose(x.numpy(), ((raw - mean) / std)[7], atol=1e-5)
    assert int(y) == batches["data_batch_2"][b"labels"][3]
    xt, yt = bundle.test[2]
    test_raw = batches["test_batch"][b"data"][2].reshape(3, 32, 32) / 255.0
    np.testing.assert_allclose(xt.numpy(), (test_raw - mean[0]) / std[0], atol=1e-5)  # train statistics
    assert int(yt) == batches["test_batch"][b"labels"][2]
    assert bundle.augment is not None


def test_cifar100_uses_fine_labels(tmp_path):
    rng = np.random.default_rng(1)
    train = _cifar_batch(rng, 5, b"fine_labels", 100)
    train[b"coarse_labels"] = [0] * 5
    test = _cifar_batch(rng, 2, b"fine_labels", 100)
    _write_pickle(tmp_path / "cifar-100-python" / "train", train)
    _write_pickle(tmp_path / "cifar-100-python" / "test", test)
    bundle = load_dataset("cifar100", data_root=tmp_path)
    assert bundle.num_classes == 100
    assert [int(bundle.train[i][1]) for i in range(5)] == train[b"fine_labels"]


def _write_idx(path, array, magic, compress):
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if compress:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


@pytest.mark.parametrize("compress", [False, True])
def test_mnist_idx_files(tmp_path, compress):
    rng = np.random.default_rng(2)
    raw = tmp_path / "MNIST" / "raw"
    train_x = rng.integers(0, 256, (6, 28, 28))
    train_y = rng.integers(0, 10, 6)
    test_x = rng.integers(0, 256, (4, 28, 28))
    test_y = rng.integers(0, 10, 4)
    _write_idx(raw / "train-images-idx3-ubyte", train_x, 2051, compress)
    _write_idx(raw / "train-labels-idx1-ubyte", train_y, 2049, compress)
    _write_idx(raw / "t10k-images-idx3-ubyte", test_x, 2051, compress)
    _write_idx(raw / "t10k-labels-idx1-ubyte", test_y, 2049, compress)
    bundle = load_dataset("mnist", data_root=tmp_path)
    assert bundle.in_shape == (1, 28, 28) and (len(bundle.train), len(bundle.test)) == (6, 4)
    x, y = bundle.test[3]
    np.testing.assert_allclose(x[0].numpy(), test_x[3] / 255.0, atol=1e-6)
    assert int(y) == test_y[3]


def test_mnist_truncated_and_wrong_magic_name_the_file(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    arr = np.zeros((2, 28, 28))
    _write_idx(raw / "train-images-idx3-ubyte", arr, 2051, False)
    _write_idx(raw / "train-labels-idx1-ubyte", np.zeros(2), 2049, False)
    _write_idx(raw / "t10k-images-idx3-ubyte", arr, 2049, False)  # labels magic on an images file
    _write_idx(raw / "t10k-labels-idx1-ubyte", np.zeros(2), 2049, False)
    with pytest.raises(PruneLimitError, match="t10k-images-idx3-ubyte: idx magic number 2049"):
        load_dataset("mnist", data_root=tmp_path)
    _write_idx(raw / "t10k-images-idx3-ubyte", arr, 2051, False)
    path = raw / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(PruneLimitError, match="train-images-idx3-ubyte.*truncated"):
        load_dataset("mnist", data_root=tmp_path)


def test_missing_data_root_and_files_say_where_to_put_them(tmp_path, fake_cifar10):
    with pytest.raises(PruneLimitError, match="pass --data-root DIR with cifar-10-batches-py/data_batch_1..5"):
        load_dataset("cifar10")
    with pytest.raises(PruneLimitError, match="is not a directory"):
        load_dataset("cifar10", data_root=tmp_path / "nope")
    root, _ = fake_cifar10
    (root / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(PruneLimitError, match=r"missing in .*cifar-10-batches-py: data_batch_3; put"):
        load_dataset("cifar10", data_root=root)
    with pytest.raises(PruneLimitError, match="MNIST files missing.*train-images-idx3-ubyte"):
        load_dataset("mnist", data_root=root)
    with pytest.raises(PruneLimitError, match="cifar-100-python/train and test"):
        load_dataset("cifar100", data_root=root)


def test_corrupt_cifar_pickle_names_the_file(fake_cifar10):
    root, _ = fake_cifar10
    (root / "cifar-10-batches-py" / "test_batch").write_bytes(b"not a pickle at all")
    with pytest.raises(PruneLimitError, match="test_batch is not a CIFAR python batch"):
        load_dataset("cifar10", data_root=root)
    _write_pickle(root / "cifar-10-batches-py" / "test_batch", {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]})
    with pytest.raises(PruneLimitError, match=r"test_batch: expected data of shape \(N, 3072\)"):
        load_dataset("cifar10", data_root=root)


def test_unknown_dataset():
    with pytest.raises(PruneLimitError, match="unknown dataset 'cifar11'; choose one of: digits"):
        load_dataset("cifar11")


def test_digits_standardised_with_train_statistics_and_seeded_split():
    from sklearn.datasets import load_digits

    bundle = load_dataset("digits", seed=0)
    assert bundle.in_shape == (1, 8, 8) and bundle.num_classes == 10
    train_idx, test_idx = bundle.split["train"], bundle.split["test"]
    assert len(test_idx) == 360 and len(train_idx) == 1437
    assert set(train_idx).isdisjoint(test_idx) and len(set(train_idx) | set(test_idx)) == 1797
    # Recompute the standardisation independently from the raw pixels of the train split only.
    raw = load_digits()
    mean = raw.data[train_idx].mean(0)
    std = np.maximum(raw.data[train_idx].std(0), 1.0)  # floor of one grey level
    np.testing.assert_allclose(bundle.test.tensors[0].reshape(360, 64).numpy(), (raw.data[test_idx] - mean) / std, atol=1e-5)
    varying = raw.data[train_idx].std(0) >= 1.0
    assert np.allclose(bundle.train.tensors[0].reshape(1437, 64).numpy()[:, varying].std(0), 1.0, atol=1e-4)
    np.testing.assert_array_equal(bundle.test.tensors[1].numpy(), raw.target[test_idx])
    np.testing.assert_allclose(bundle.train.tensors[0].reshape(1437, 64).numpy(), (raw.data[train_idx] - mean) / std, atol=1e-5)
    # seeded: same seed, same split; another seed, another split; stratified
    assert np.array_equal(load_dataset("digits", seed=0).split["test"], test_idx)
    assert not np.array_equal(load_dataset("digits", seed=1).split["test"], test_idx)
    assert np.bincount(raw.target[test_idx]).min() >= 30


def test_mnist5k_builtin():
    bundle = load_dataset("mnist5k", seed=0)
    assert bundle.in_shape == (1, 28, 28)
    assert (len(bundle.train), len(bundle.test)) == (4000, 1000)
    x = bundle.train.tensors[0]
    assert x.min() >= 0 and x.max() <= 1 and x.max() > 0.99
    assert set(bundle.test.tensors[1].tolist()) == set(range(10))


def test_user_dataset_factory(tmp_path, monkeypatch):
    (tmp_path / "my_user_data.py").write_text(textwrap.dedent("""
        import torch
        from torch.utils.data import TensorDataset
        def pair(seed):
            g = torch.Generator().manual_seed(seed)
            x = torch.randn(10, 5, generator=g)
            return TensorDataset(x, torch.arange(10) % 3), TensorDataset(x[:4], torch.tensor([0, 1, 2, 3]))
        def wrong():
            return "nope"
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        bundle = load_dataset("my_user_data:pair", seed=3)
        assert bundle.in_shape == (5,) and bundle.num_classes == 4
        with pytest.raises(PruneLimitError, match="must return a prunelimit.data.DatasetBundle"):
            load_dataset("my_user_data:wrong")
    finally:
        sys.modules.pop("my_user_data", None)


def test_batch_iterable_is_fixed_order_and_reiterable():
    ds = TensorDataset(torch.arange(10).float()[:, None], torch.arange(10))
    batches = BatchIterable(ds, 4, indices=subset_indices(10, 7, seed=0))
    first = [y.tolist() for _, y in batches]
    assert first == [y.tolist() for _, y in batches]
    flat = sum(first, [])
    assert len(flat) == 7 and flat == sorted(set(flat)) and [len(b) for b in first] == [4, 3]
    assert subset_indices(10, None, 0).tolist() == list(range(10))


def test_random_crop_flip_only_shifts_and_mirrors():
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).reshape(2, 3, 6, 6)
    g = torch.Generator().manual_seed(0)
    out = random_crop_flip(x, g, padding=0)
    for i in range(2):
        assert torch.equal(out[i], x[i]) or torch.equal(out[i], x[i].flip(-1))
    out = random_crop_flip(x, torch.Generator().manual_seed(1), padding=2)
    assert out.shape == x.shape
    # every output value is either padding (0) or a value of the same sample
    for i in range(2):
        assert set(out[i].unique().tolist()) <= set(x[i].unique().tolist()) | {0.0}
