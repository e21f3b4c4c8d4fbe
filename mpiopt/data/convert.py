"""Convert downloaded datasets into the mpiopt HDF5 format (see :mod:`mpiopt.data.hdf5`).

Formats:

- ``mnist`` (also Fashion-MNIST and other IDX datasets): ``train-images-idx3-ubyte``,
  ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte`` in the
  source directory, each optionally gzipped (``.gz``); ``.idx3-ubyte`` spellings are also
  found. Images are stored as uint8 (N, rows, cols).
- ``cifar10``: the binary version, ``data_batch_1.bin`` .. ``data_batch_5.bin`` (whichever
  exist, at least one) and ``test_batch.bin``, in the source directory or its
  ``cifar-10-batches-bin`` subdirectory. Each record is 1 label byte and 3072 pixel bytes;
  images are stored as uint8 (N, 3, 32, 32), channels first as in the files.

The output is written to a temporary file beside it and renamed into place, so an error never
leaves a partial file behind.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import uuid

import h5py
import numpy as np

from mpiopt.errors import ConfigError

FORMATS = ("mnist", "cifar10")

# IDX type codes (third byte of the header) and their big-endian numpy types.
_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

_CIFAR_RECORD = 1 + 3 * 32 * 32
_CIFAR_DIR = "cifar-10-batches-bin"

# Uncompressed bytes per HDF5 chunk of x: small enough that reading a few scattered rows
# decompresses little, large enough that compression works.
_CHUNK_BYTES = 1 << 18


def convert(fmt: str, src: str, out: str, overwrite: bool = False) -> dict:
    """Convert the dataset files of format ``fmt`` in directory ``src`` to the HDF5 file ``out``.

    Args:
        fmt: one of :data:`FORMATS`.
        src: directory holding the downloaded files.
        out: HDF5 file to write.
        overwrite: replace ``out`` if it exists.

    Returns:
        ``{"format", "out", "n_train", "n_test", "n_classes", "sample_shape"}``.

    Raises:
        ConfigError: on an unknown format, missing or malformed input, or an existing
            output without ``overwrite``.
    """
    readers = {"mnist": _read_mnist, "cifar10": _read_cifar10}
    if fmt not in readers:
        raise ConfigError(f"unknown format {fmt!r}; valid: {', '.join(FORMATS)}")
    if not os.path.isdir(src):
        raise ConfigError(f"source directory not found: {src}")
    if os.path.exists(out) and not overwrite:
        raise ConfigError(f"output exists: {out} (pass overwrite to replace it)")
    train, test = readers[fmt](src)
    n_classes = max(10, int(max(train[1].max(), test[1].max())) + 1)
    write_hdf5(out, train, test, n_classes, source=fmt)
    return {"format": fmt, "out": out, "n_train": len(train[1]), "n_test": len(test[1]),
            "n_classes": n_classes, "sample_shape": list(train[0].shape[1:])}


def write_hdf5(out: str, train: tuple, test: tuple, n_classes: int, source: str = "") -> None:
    """Write ``(x, y)`` train and test pairs to ``out`` atomically, in the mpiopt format."""
    folder = os.path.dirname(os.path.abspath(out))
    tmp = os.path.join(folder, f".{os.path.basename(out)}.{uuid.uuid4().hex}.tmp")
    try:
        os.makedirs(folder, exist_ok=True)
        with h5py.File(tmp, "x") as f:
            f.attrs["n_classes"] = n_classes
            f.attrs["source"] = source
            for name, (x, y) in (("train", train), ("test", test)):
                group = f.create_group(name)
                group.create_dataset("x", data=x, chunks=_chunks(x.shape, x.dtype.itemsize),
                                     compression="gzip", compression_opts=4)
                group.create_dataset("y", data=y)
        os.replace(tmp, out)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise ConfigError(f"cannot write {out}: {exc}") from None
        raise


def _chunks(shape: tuple, itemsize: int) -> tuple:
    """Return a chunk of whole samples of about ``_CHUNK_BYTES``."""
    per_row = max(1, int(np.prod(shape[1:], dtype=np.int64)) * itemsize)
    return (max(1, min(shape[0], _CHUNK_BYTES // per_row)), *shape[1:])


# --------------------------------------------------------------------------- MNIST (IDX)


def _read_mnist(src: str) -> tuple[tuple, tuple]:
    """Read the four IDX files of an MNIST-style dataset in ``src``."""
    pairs = []
    for prefix in ("train", "t10k"):
        x = parse_idx(find_idx(src, f"{prefix}-images-idx3-ubyte"))
        y = parse_idx(find_idx(src, f"{prefix}-labels-idx1-ubyte"))
        if x.ndim != 3 or y.ndim != 1 or x.dtype != np.uint8 or y.dtype != np.uint8:
            raise ConfigError(f"{prefix} files in {src}: expected uint8 images (N, rows, cols) "
                              f"and uint8 labels (N,), got {x.dtype} {x.shape} and "
                              f"{y.dtype} {y.shape}")
        if len(x) != len(y):
            raise ConfigError(f"{prefix} files in {src}: {len(x)} images but {len(y)} labels")
        pairs.append((x, y))
    if pairs[0][0].shape[1:] != pairs[1][0].shape[1:]:
        raise ConfigError(f"{src}: train images are {pairs[0][0].shape[1:]}, test images "
                          f"{pairs[1][0].shape[1:]}")
    return pairs[0], pairs[1]


def find_idx(src: str, name: str, key: str | None = None) -> str:
    """Return the path of IDX file ``name`` in ``src``, gzipped or not, in either spelling.

    Raises:
        ConfigError: naming ``key`` if no spelling of the file is in ``src``.
    """
    dotted = name.replace("-idx", ".idx")
    for candidate in (name, name + ".gz", dotted, dotted + ".gz"):
        path = os.path.join(src, candidate)
        if os.path.isfile(path):
            return path
    raise ConfigError(f"missing {name} (or {name}.gz) in {src}", key=key)


def parse_idx(path: str) -> np.ndarray:
    """Read an IDX file (optionally gzipped) into an array of its dtype and dimensions.

    The header is two zero bytes, a type code, the number of dimensions, then each
    dimension as a big-endian uint32; the data follow, big-endian, row-major.

    Raises:
        ConfigError: on a bad magic number or type code, or a size that does not match.
    """
    data = _read_bytes(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_TYPES:
        raise ConfigError(f"{path}: not an IDX file (bad magic number {data[:4].hex()})")
    ndim = data[3]
    if len(data) < 4 + 4 * ndim:
        raise ConfigError(f"{path}: truncated IDX header")
    dims = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_TYPES[data[2]])
    expected = 4 + 4 * ndim + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "has trailing bytes"
        raise ConfigError(f"{path}: {what}: header says {dims} -> {expected} bytes, "
                          f"file has {len(data)}")
    array = np.frombuffer(data, dtype, offset=4 + 4 * ndim).reshape(dims)
    return array.astype(dtype.newbyteorder("="))


def _read_bytes(path: str) -> bytes:
    """Return the contents of ``path``, decompressed if it ends in ``.gz``."""
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as fh:
                return fh.read()
        with open(path, "rb") as fh:
            return fh.read()
    except (OSError, EOFError) as exc:  # gzip.BadGzipFile is an OSError
        raise ConfigError(f"{path}: cannot read: {exc}") from None


# --------------------------------------------------------------------------- CIFAR-10


def _read_cifar10(src: str) -> tuple[tuple, tuple]:
    """Read the CIFAR-10 binary batches in ``src`` or its cifar-10-batches-bin folder."""
    nested = os.path.join(src, _CIFAR_DIR)
    folder = nested if os.path.isdir(nested) else src
    train_files = [os.path.join(folder, f"data_batch_{i}.bin") for i in range(1, 6)]
    train_files = [p for p in train_files if os.path.isfile(p)]
    test_file = os.path.join(folder, "test_batch.bin")
    if not train_files or not os.path.isfile(test_file):
        raise ConfigError(f"{folder}: need data_batch_1.bin .. data_batch_5.bin (at least "
                          f"one) and test_batch.bin")
    batches = [_read_cifar_batch(p) for p in train_files]
    train = (np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches]))
    return train, _read_cifar_batch(test_file)


def _read_cifar_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
    """Read one binary batch as uint8 images (N, 3, 32, 32) and uint8 labels (N,)."""
    data = _read_bytes(path)
    if not data or len(data) % _CIFAR_RECORD:
        raise ConfigError(f"{path}: size {len(data)} is not a positive multiple of the "
                          f"{_CIFAR_RECORD}-byte record (truncated or not a CIFAR-10 batch)")
    records = np.frombuffer(data, np.uint8).reshape(-1, _CIFAR_RECORD)
    labels = records[:, 0].copy()
    if labels.max() > 9:
        raise ConfigError(f"{path}: label {labels.max()} is not a CIFAR-10 class (0..9)")
    return records[:, 1:].reshape(-1, 3, 32, 32).copy(), labels
