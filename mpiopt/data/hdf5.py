"""The mpiopt HDF5 dataset format, and the ``hdf5`` dataset that reads it.

The format (written by ``mpiopt data convert``; any HDF5 tool can write it)::

    /                 attribute n_classes: number of classes (optional; default max label + 1)
    /train/x          shape (N, ...), any numeric dtype: sample i is train/x[i], flattened to
                      a feature vector; uint8 is scaled to [0, 1] (divided by 255), other
                      dtypes are cast to float32 unchanged
    /train/y          shape (N,), integer labels in [0, n_classes)
    /test/x, /test/y  the held-out test set, same layout (optional: without a ``test`` group, a
                      seeded, stratified ``test_fraction`` of train is held out instead)

Other groups, datasets and attributes are ignored (``convert`` adds a root attribute
``source``). Every rank reads all of ``train/y`` (to agree on the partition) but of ``train/x``
only blocks covering its own rows (see :func:`read_rows`); the test set is read only where it
is asked for.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import h5py
import numpy as np

from mpiopt.config import param
from mpiopt.data import DATASETS
from mpiopt.data.base import DataConfig, DataSource
from mpiopt.data.partition import split_holdout
from mpiopt.errors import ConfigError

KEY = "data.path"

# Bytes of raw rows covered by one read of train/x: bounds the temporary memory of a read and
# the size of the HDF5 selection built for it.
READ_BLOCK_BYTES = 1 << 26
# A block of rows is read as the contiguous range covering it when it holds at least one row in
# SPARSE of that range, as a selection of its rows otherwise.
SPARSE = 16


@DATASETS.register("hdf5")
@dataclass(frozen=True)
class Hdf5Data(DataConfig):
    """A dataset in an HDF5 file of the mpiopt format (see `mpiopt data convert`)."""

    SHORTHAND = "path"

    path: str = param("", "HDF5 file with groups train (and optionally test), each holding "
                      "datasets x and y.", required=True)
    test_fraction: float = param(0.1, "Share of train held out as the test set when the file "
                                 "has no test group (stratified, fixed by the seed).", low=0,
                                 high=1, low_open=True, high_open=True)

    def open(self, seed: int) -> DataSource:
        """Open the file and read its training labels; use as a context manager."""
        return Hdf5Source(self.path, self.test_fraction, seed)


class Hdf5Source(DataSource):
    """An open HDF5 dataset file: labels in memory, features read on demand."""

    def __init__(self, path: str, test_fraction: float, seed: int):
        self.path = os.path.expanduser(path)
        self.file = _open(self.path)
        try:
            self.x, y = _pair(self.file, "train", self.path)
            labels = _labels(y, "train/y", self.path)
            n_classes = _n_classes(self.file, labels, self.path)
            if "test" in self.file:
                self.rows, self.heldout = np.arange(len(labels)), None
            else:
                self.rows, self.heldout = split_holdout(labels, test_fraction, seed, KEY)
        except BaseException:
            self.file.close()
            raise
        self.all_labels = labels
        super().__init__(labels[self.rows], n_classes)

    def features(self, indices: np.ndarray) -> np.ndarray:
        """Read the rows of ``train/x`` of the training samples at ``indices`` (sorted)."""
        return read_rows(self.x, self.rows[indices])

    def test(self) -> tuple[np.ndarray, np.ndarray]:
        """Read the test group, or the held-out rows of train where there is none."""
        if self.heldout is not None:
            return read_rows(self.x, self.heldout), self.all_labels[self.heldout]
        x, y = _pair(self.file, "test", self.path)
        if x.shape[1:] != self.x.shape[1:]:
            raise ConfigError(f"{self.path}: test/x samples have shape {x.shape[1:]}, "
                              f"train/x samples {self.x.shape[1:]}", key=KEY)
        labels = _labels(y, "test/y", self.path)
        if labels.max() >= self.n_classes:
            raise ConfigError(f"{self.path}: test/y has label {labels.max()} but the data set has "
                              f"{self.n_classes} classes; set the root attribute n_classes",
                              key=KEY)
        return read_rows(x, np.arange(len(labels))), labels

    def close(self) -> None:
        """Close the file."""
        self.file.close()


def read_rows(dataset, rows: np.ndarray, block_bytes: int = READ_BLOCK_BYTES) -> np.ndarray:
    """Read the given sorted rows of ``dataset`` as flattened float32 feature vectors.

    The rows are read in blocks of at most ``block_bytes`` of the file. A block where the rows
    are dense (at least 1 in :data:`SPARSE` of its range) is one contiguous read of the range
    covering them, from which they are taken in memory; a sparser block is read as a
    selection of its rows only. h5py costs about 50 us per row of a selection, far more than
    reading (and decompressing) the rows in between.

    Args:
        dataset: an h5py dataset (or anything indexable the same way) of shape (N, ...).
        rows: strictly increasing row positions.
        block_bytes: raw bytes of the file covered by one request, at most (one row at least).

    Returns:
        Array of shape (len(rows), prod(shape[1:])): uint8 scaled to [0, 1], others cast.
    """
    n_features = int(np.prod(dataset.shape[1:], dtype=np.int64))
    out = np.empty((len(rows), n_features), dtype=np.float32)
    span = max(1, block_bytes // max(1, n_features * dataset.dtype.itemsize))
    lo = 0
    while lo < len(rows):
        hi = lo + int(np.searchsorted(rows[lo:], rows[lo] + span))
        block = rows[lo:hi]
        first, stop = int(block[0]), int(block[-1]) + 1
        if len(block) * SPARSE >= stop - first:
            raw = np.asarray(dataset[first:stop]).reshape(stop - first, n_features)
            raw = raw if len(block) == stop - first else raw[block - first]
        else:
            raw = np.asarray(dataset[block]).reshape(len(block), n_features)
        out[lo:hi] = raw
        if raw.dtype == np.uint8:
            out[lo:hi] /= 255.0
        lo = hi
    return out


def _open(path: str) -> h5py.File:
    """Open ``path`` read-only; every failure is a one-line ConfigError on data.path."""
    if not os.path.isfile(path):
        raise ConfigError(f"no such file: {path}", key=KEY)
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise ConfigError(f"cannot read {path} as HDF5: {exc}", key=KEY) from None


def _pair(file: h5py.File, group: str, path: str):
    """Return the datasets ``group/x`` and ``group/y`` after checking their shapes."""
    for name in ("x", "y"):
        if not isinstance(file.get(f"{group}/{name}"), h5py.Dataset):
            raise ConfigError(f"{path} has no dataset {group}/{name} (expected datasets x and "
                              f"y in groups train and test)", key=KEY)
    x, y = file[f"{group}/x"], file[f"{group}/y"]
    if x.dtype.kind not in "biuf" or x.ndim < 1:
        raise ConfigError(f"{path}: {group}/x must be a numeric array of samples, "
                          f"got dtype {x.dtype} shape {x.shape}", key=KEY)
    if y.ndim != 1 or len(y) != len(x) or len(y) == 0:
        raise ConfigError(f"{path}: {group}/y must have one label per sample of {group}/x "
                          f"({len(x)}), got shape {y.shape}", key=KEY)
    return x, y


def _labels(y, name: str, path: str) -> np.ndarray:
    """Read integer labels and check they are non-negative."""
    if y.dtype.kind not in "iu":
        raise ConfigError(f"{path}: {name} must hold integer labels, got {y.dtype}", key=KEY)
    labels = np.asarray(y[:], dtype=np.int64)
    if labels.min() < 0:
        raise ConfigError(f"{path}: {name} has negative label {labels.min()}", key=KEY)
    return labels


def _n_classes(file: h5py.File, labels: np.ndarray, path: str) -> int:
    """Return the root attribute n_classes (checked against the labels) or max label + 1."""
    needed = int(labels.max()) + 1
    if "n_classes" not in file.attrs:
        return needed
    try:
        n_classes = int(file.attrs["n_classes"])
    except (TypeError, ValueError):
        raise ConfigError(f"{path}: attribute n_classes must be an integer, got "
                          f"{file.attrs['n_classes']!r}", key=KEY) from None
    if n_classes < needed:
        raise ConfigError(f"{path}: attribute n_classes={n_classes} but train/y has label "
                          f"{needed - 1}", key=KEY)
    return n_classes
