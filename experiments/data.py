"""Datasets for the comparison experiments, all read or generated locally (no network).

Every loader returns a :class:`Dataset` with float32 inputs and int32 labels split into
train / validation / test.  The validation split is carved out of the training data; the test
split is only ever *reported*, never used to pick a run, a hyper-parameter or an epoch.

Inputs keep their natural layout so that both model families can use them:

==============  ==================  =================================================
name            ``input_shape``     source
==============  ==================  =================================================
digits          (8, 8, 1)           scikit-learn ``load_digits`` (bundled, the default)
mnist1d         (40, 1)             ``mnist1d.data.make_dataset(get_dataset_args())``
mnist           (28, 28, 1)         IDX (.gz or raw) or ``mnist.npz`` in ``--data-dir``
fashion_mnist   (28, 28, 1)         same file names as mnist, under ``fashion_mnist/``
cifar10         (32, 32, 3)         ``cifar10.npz`` or ``cifar-10-batches-py/``
==============  ==================  =================================================

An MLP flattens the trailing axes; a CNN convolves over all axes but the last (channels).
"""
from __future__ import annotations

import dataclasses
import gzip
import pickle
import struct
from pathlib import Path

import numpy as np

DATASETS = ("digits", "mnist1d", "mnist", "fashion_mnist", "cifar10")

_IDX_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}


class DataNotFoundError(FileNotFoundError):
    """A dataset that must be supplied locally was not found; the message says where to put it."""


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Arrays of one dataset, split three ways.

    Attributes:
      name: dataset name.
      x_train, x_val, x_test: float32 arrays of shape ``(n_split, *input_shape)``.
      y_train, y_val, y_test: int32 arrays of shape ``(n_split,)`` with values in ``[0, num_classes)``.
      num_classes: number of classes.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.y_train), "val": len(self.y_val), "test": len(self.y_test)}


# --------------------------------------------------------------------------------------------
# File readers
# --------------------------------------------------------------------------------------------

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzip-compressed when its name ends in ``.gz``.

    Layout: two zero bytes, a dtype code, the number of dimensions ``d``, then ``d`` big-endian
    uint32 sizes, then the data in C order.

    Raises:
      ValueError: the file is not a valid IDX file (bad magic, unknown dtype or wrong length).
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an IDX file (magic bytes {raw[:4]!r}, expected 0x00 0x00 <type> <ndim>)")
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        raise ValueError(f"{path}: unknown IDX dtype code {code:#x}; expected one of {sorted(_IDX_DTYPES)}")
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[code])
    expected = int(np.prod(shape)) * dtype.itemsize
    body = raw[4 + 4 * ndim :]
    if len(body) != expected:
        raise ValueError(f"{path}: IDX header says shape {shape} ({expected} bytes) but {len(body)} bytes follow")
    return np.frombuffer(body, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


def write_idx(path: str | Path, array: np.ndarray) -> None:
    """Write a uint8 array as an IDX file (gzip when the name ends in ``.gz``); used by tests."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(header + array.tobytes())


def _missing(name: str, data_dir: Path | None, details: str) -> DataNotFoundError:
    where = f"--data-dir {data_dir}" if data_dir else "no --data-dir given"
    return DataNotFoundError(
        f"dataset {name!r} is not bundled and must be supplied as local files ({where}).\n{details}\n"
        "normzoo never downloads data at run time; copy the files there and run again."
    )


def _find_dir(data_dir: Path | None, name: str) -> list[Path]:
    if data_dir is None:
        return []
    return [data_dir / name, data_dir]


def load_mnist_like(name: str, data_dir: str | Path | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Load MNIST or Fashion-MNIST as uint8 ``(x_train, y_train, x_test, y_test)``.

    Looks in ``DATA_DIR/NAME/`` then ``DATA_DIR/`` for either ``NAME.npz`` (keys ``x_train``,
    ``y_train``, ``x_test``, ``y_test``, the Keras layout) or the four IDX files
    ``train-images-idx3-ubyte[.gz]``, ``train-labels-idx1-ubyte[.gz]``,
    ``t10k-images-idx3-ubyte[.gz]``, ``t10k-labels-idx1-ubyte[.gz]``.

    Raises:
      DataNotFoundError: none of these layouts is present; the message lists them.
    """
    data_dir = Path(data_dir) if data_dir is not None else None
    for d in _find_dir(data_dir, name):
        npz = d / f"{name}.npz"
        if npz.is_file():
            with np.load(npz) as z:
                return z["x_train"], z["y_train"], z["x_test"], z["y_test"]
        found = {}
        for key, stem in _IDX_FILES.items():
            for candidate in (d / f"{stem}.gz", d / stem):
                if candidate.is_file():
                    found[key] = candidate
                    break
        if len(found) == 4:
            return tuple(read_idx(found[k]) for k in ("x_train", "y_train", "x_test", "y_test"))  # type: ignore[return-value]
    files = ", ".join(f"{stem}.gz" for stem in _IDX_FILES.values())
    raise _missing(
        name,
        data_dir,
        f"Put either DATA_DIR/{name}/{name}.npz (arrays x_train, y_train, x_test, y_test) or the four IDX "
        f"files {files} into DATA_DIR/{name}/ (or DATA_DIR/).",
    )


def load_cifar10(data_dir: str | Path | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Load CIFAR-10 as uint8 NHWC ``(x_train, y_train, x_test, y_test)``.

    Accepts ``DATA_DIR/cifar10/cifar10.npz`` (or ``DATA_DIR/cifar10.npz``) with arrays ``x_train``
    ``(50000, 32, 32, 3)``, ``y_train``, ``x_test``, ``y_test``; or the extracted official python
    archive ``cifar-10-batches-py/`` (``data_batch_1`` .. ``data_batch_5``, ``test_batch``).
    """
    data_dir = Path(data_dir) if data_dir is not None else None
    for d in _find_dir(data_dir, "cifar10"):
        npz = d / "cifar10.npz"
        if npz.is_file():
            with np.load(npz) as z:
                return z["x_train"], z["y_train"].reshape(-1), z["x_test"], z["y_test"].reshape(-1)
        batches = d / "cifar-10-batches-py"
        if (batches / "test_batch").is_file():

            def _read(p: Path) -> tuple[np.ndarray, np.ndarray]:
                with open(p, "rb") as f:
                    entry = pickle.load(f, encoding="bytes")
                x = np.asarray(entry[b"data"], np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
                return x, np.asarray(entry[b"labels"])

            parts = [_read(batches / f"data_batch_{i}") for i in range(1, 6)]
            xt, yt = _read(batches / "test_batch")
            return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), xt, yt
    raise _missing(
        "cifar10",
        data_dir,
        "Put either DATA_DIR/cifar10/cifar10.npz (arrays x_train (N,32,32,3) uint8, y_train, x_test, y_test) "
        "or the extracted python archive DATA_DIR/cifar10/cifar-10-batches-py/ (data_batch_1..5, test_batch).",
    )


def load_mnist1d_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Generate MNIST-1D locally (4000 train + 1000 test, length 40, seed 42), ~2-3 s.

    Uses ``mnist1d.data.make_dataset(get_dataset_args())`` only; ``get_dataset`` would download.
    """
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "dataset 'mnist1d' needs the optional package mnist1d: pip install 'mnist1d>=0.0.2'"
        ) from e
    state = np.random.get_state()  # make_dataset reseeds numpy's global RNG; leave it as it was
    try:
        d = make_dataset(get_dataset_args())
    finally:
        np.random.set_state(state)
    return d["x"], d["y"], d["x_test"], d["y_test"]


# --------------------------------------------------------------------------------------------
# Splitting
# --------------------------------------------------------------------------------------------


def _take(rng: np.random.Generator, n: int, k: int | None) -> np.ndarray:
    idx = rng.permutation(n)
    return idx if k is None or k >= n else idx[:k]


def load_dataset(
    name: str = "digits",
    *,
    data_dir: str | Path | None = None,
    val_fraction: float = 0.2,
    train_size: int | None = None,
    test_size: int | None = None,
    split_seed: int = 0,
) -> Dataset:
    """Load ``name`` and split it into train / validation / test.

    Args:
      name: one of :data:`DATASETS`.
      data_dir: directory holding the files of mnist, fashion_mnist and cifar10.
      val_fraction: fraction of the (sub-sampled) training pool held out for validation.
      train_size: if given, size of the training pool (train + val) drawn at random before the
        validation split; the published experiments use small pools (e.g. 300 or 1000 samples).
      test_size: if given, evaluate on a random subset of this many test samples.
      split_seed: seed of the split permutation; independent of the run seeds, so every run of a
        suite sees the same split.

    Datasets without an official test split (digits) hold out 20% as test first.
    Pixel inputs are scaled to [0, 1]; mnist1d is already standardized.
    """
    if name not in DATASETS:
        raise ValueError(f"dataset={name!r} is unknown; expected one of {list(DATASETS)}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} must be in [0, 1)")
    rng = np.random.default_rng(split_seed)
    if name == "digits":
        from sklearn.datasets import load_digits

        bunch = load_digits()
        x = (bunch.data / 16.0).reshape(-1, 8, 8, 1)
        y = bunch.target
        perm = rng.permutation(len(y))
        n_test = int(round(0.2 * len(y)))
        x_pool, y_pool = x[perm[n_test:]], y[perm[n_test:]]
        x_test, y_test = x[perm[:n_test]], y[perm[:n_test]]
    elif name == "mnist1d":
        x_pool, y_pool, x_test, y_test = load_mnist1d_arrays()
        x_pool, x_test = x_pool[..., None], x_test[..., None]
    elif name in ("mnist", "fashion_mnist"):
        x_pool, y_pool, x_test, y_test = load_mnist_like(name, data_dir)
        x_pool = x_pool.reshape(-1, 28, 28, 1) / 255.0
        x_test = x_test.reshape(-1, 28, 28, 1) / 255.0
    else:
        x_pool, y_pool, x_test, y_test = load_cifar10(data_dir)
        x_pool, x_test = x_pool / 255.0, x_test / 255.0

    pool = _take(rng, len(y_pool), train_size)
    n_val = int(round(val_fraction * len(pool)))
    val_idx, train_idx = pool[:n_val], pool[n_val:]
    test_idx = _take(rng, len(y_test), test_size)
    y_all = np.concatenate([np.asarray(y_pool).reshape(-1), np.asarray(y_test).reshape(-1)])
    f32, i32 = np.float32, np.int32
    return Dataset(
        name=name,
        x_train=np.asarray(x_pool[train_idx], f32),
        y_train=np.asarray(y_pool[train_idx], i32).reshape(-1),
        x_val=np.asarray(x_pool[val_idx], f32),
        y_val=np.asarray(y_pool[val_idx], i32).reshape(-1),
        x_test=np.asarray(x_test[test_idx], f32),
        y_test=np.asarray(y_test[test_idx], i32).reshape(-1),
        num_classes=int(y_all.max()) + 1,
    )
