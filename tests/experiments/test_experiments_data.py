"""Data loaders: bundled digits, fake local IDX / npz files, clear errors for missing files."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from experiments.data import DataNotFoundError, load_dataset, read_idx, write_idx


def test_digits_split_is_disjoint_and_deterministic():
    a = load_dataset("digits", train_size=500, val_fraction=0.2)
    b = load_dataset("digits", train_size=500, val_fraction=0.2)
    assert a.sizes() == {"train": 400, "val": 100, "test": 359}
    assert a.input_shape == (8, 8, 1) and a.num_classes == 10
    assert a.x_train.dtype == np.float32 and a.y_train.dtype == np.int32
    np.testing.assert_array_equal(a.x_val, b.x_val)
    rows = {r.tobytes() for r in a.x_test.reshape(len(a.x_test), -1)}
    # digits has a few exact duplicates, so compare with a tolerance for those
    overlap = sum(r.tobytes() in rows for r in a.x_train.reshape(len(a.x_train), -1))
    assert overlap <= 5
    assert 0.0 <= a.x_train.min() and a.x_train.max() <= 1.0


def test_idx_roundtrip_and_bad_magic(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a.gz", arr)
    np.testing.assert_array_equal(read_idx(tmp_path / "a.gz"), arr)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01" + b"\x00" * 8)
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(bytes([0, 0, 8, 1]) + (10).to_bytes(4, "big") + b"\x00" * 3)
    with pytest.raises(ValueError, match="10 bytes"):
        read_idx(tmp_path / "short")


def _fake_mnist(folder, n_train=50, n_test=20, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    write_idx(folder / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (n_train, 28, 28)))
    write_idx(folder / "train-labels-idx1-ubyte.gz", np.arange(n_train) % 10)
    write_idx(folder / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (n_test, 28, 28)))
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", np.arange(n_test) % 10)


def test_mnist_from_fake_idx_files(tmp_path):
    _fake_mnist(tmp_path / "mnist")
    d = load_dataset("mnist", data_dir=tmp_path, val_fraction=0.2)
    assert d.sizes() == {"train": 40, "val": 10, "test": 20}
    assert d.input_shape == (28, 28, 1) and d.num_classes == 10
    assert 0.0 <= d.x_train.min() and d.x_train.max() <= 1.0


def test_fashion_mnist_and_cifar10_from_npz(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "fashion_mnist").mkdir()
    np.savez(tmp_path / "fashion_mnist" / "fashion_mnist.npz", x_train=rng.integers(0, 256, (30, 28, 28), np.uint8),
             y_train=np.arange(30) % 10, x_test=rng.integers(0, 256, (10, 28, 28), np.uint8), y_test=np.arange(10) % 10)
    d = load_dataset("fashion_mnist", data_dir=tmp_path, val_fraction=0.0)
    assert d.sizes() == {"train": 30, "val": 0, "test": 10}
    np.savez(tmp_path / "cifar10.npz", x_train=rng.integers(0, 256, (30, 32, 32, 3), np.uint8),
             y_train=(np.arange(30) % 10)[:, None], x_test=rng.integers(0, 256, (10, 32, 32, 3), np.uint8),
             y_test=(np.arange(10) % 10)[:, None])
    c = load_dataset("cifar10", data_dir=tmp_path, test_size=5)
    assert c.input_shape == (32, 32, 3) and c.sizes()["test"] == 5


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "cifar10"])
def test_missing_files_say_where_to_put_them(tmp_path, name):
    with pytest.raises(DataNotFoundError) as e:
        load_dataset(name, data_dir=tmp_path)
    msg = str(e.value)
    assert str(tmp_path) in msg and "never downloads" in msg
    assert ("t10k-images-idx3-ubyte.gz" in msg) if name != "cifar10" else ("cifar-10-batches-py" in msg)


def test_unknown_dataset_is_a_clear_error():
    with pytest.raises(ValueError, match="dataset='nope'"):
        load_dataset("nope")


@pytest.mark.skipif(importlib.util.find_spec("mnist1d") is None, reason="mnist1d not installed")
def test_mnist1d_is_generated_locally(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # get_dataset would write a pickle here; make_dataset must not
    state = np.random.get_state()[1].copy()
    d = load_dataset("mnist1d")
    assert d.input_shape == (40, 1) and d.sizes() == {"train": 3200, "val": 800, "test": 1000}
    assert list(tmp_path.iterdir()) == []
    np.testing.assert_array_equal(np.random.get_state()[1], state)  # global RNG left untouched
