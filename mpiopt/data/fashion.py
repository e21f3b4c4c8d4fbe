"""Fashion-MNIST, read from the IDX files that Debian's ``dataset-fashion-mnist`` installs.

Zalando's 70,000 grey 28x28 images of clothing in 10 classes (MIT licence): the official
split, 60,000 training and 10,000 test images, in the four IDX files of MNIST
(``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
``t10k-labels-idx1-ubyte``, gzipped or not). Every rank reads the training labels (to agree on
the partition); a rank that loads its shard reads the image file once into memory and keeps
its own rows; the test files are read only where the test set is asked for.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from mpiopt.config import param
from mpiopt.data import DATASETS
from mpiopt.data.base import DataConfig, DataSource
from mpiopt.data.convert import find_idx, parse_idx
from mpiopt.errors import ConfigError

KEY = "data.path"
PACKAGE = "dataset-fashion-mnist"
# Where Debian's package puts the files (`dpkg -L dataset-fashion-mnist`).
PACKAGE_DIR = "/usr/share/datasets/fashion-mnist"
N_CLASSES = 10  # T-shirt/top, trouser, pullover, dress, coat, sandal, shirt, sneaker, bag, boot


@DATASETS.register("fashion_mnist")
@dataclass(frozen=True)
class FashionMnistData(DataConfig):
    """Fashion-MNIST: 60,000 training and 10,000 test images of 28x28, 10 classes.

    Read from the folder Debian's ``dataset-fashion-mnist`` package installs (``apt-get
    install dataset-fashion-mnist``) or from ``path``. Pixels 0..255 are scaled to [0, 1]
    (784 float32 features); the official test split is the test set. Nothing is downloaded.
    """

    SHORTHAND = "path"

    path: str = param("", f"Folder holding the four IDX files (train-images-idx3-ubyte, "
                      f"train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
                      f"t10k-labels-idx1-ubyte, each optionally .gz); empty: {PACKAGE_DIR}, "
                      f"where Debian's {PACKAGE} package installs them.")

    def open(self, seed: int) -> DataSource:
        """Read the training labels; images are read by :meth:`IdxSource.features`."""
        return IdxSource(self.folder())

    def folder(self) -> str:
        """Return the folder of the IDX files, or raise a ConfigError saying how to get it."""
        if self.path:
            folder = os.path.expanduser(self.path)
            if not os.path.isdir(folder):
                raise ConfigError(f"no such folder: {folder}", key=KEY)
            return folder
        if not os.path.isfile(os.path.join(PACKAGE_DIR, "train-labels-idx1-ubyte.gz")):
            raise ConfigError(f"Fashion-MNIST is not installed in {PACKAGE_DIR}: run "
                              f"`apt-get install {PACKAGE}` (as root), or set data.path to a "
                              f"folder holding its four IDX files", key=KEY)
        return PACKAGE_DIR


class IdxSource(DataSource):
    """An MNIST-style folder of IDX files: training labels in memory, images read on demand."""

    def __init__(self, folder: str):
        self.folder = folder
        super().__init__(read_idx(folder, "train-labels-idx1-ubyte", 1), N_CLASSES)

    def features(self, indices: np.ndarray) -> np.ndarray:
        """Read the training images once and return the rows ``indices``, scaled to [0, 1]."""
        images = read_idx(self.folder, "train-images-idx3-ubyte", 3, len(self.labels))
        return scale(images[indices])

    def test(self) -> tuple[np.ndarray, np.ndarray]:
        """Read the official test split."""
        labels = read_idx(self.folder, "t10k-labels-idx1-ubyte", 1)
        images = read_idx(self.folder, "t10k-images-idx3-ubyte", 3, len(labels))
        return scale(images), labels.astype(np.int64)


def read_idx(folder: str, name: str, ndim: int, count: int | None = None) -> np.ndarray:
    """Read the uint8 IDX file ``name`` of ``folder``, checking its rank, length and labels.

    Args:
        folder: the folder of the four files.
        name: the file name without ``.gz``.
        ndim: 1 for labels, 3 for images (N, rows, cols).
        count: the number of samples expected (that of the labels), if known.

    Raises:
        ConfigError: on data.path, if the file is missing or not what is expected.
    """
    path = find_idx(folder, name, KEY)
    try:
        array = parse_idx(path)
    except ConfigError as exc:
        raise ConfigError(str(exc), key=KEY) from None
    if array.dtype != np.uint8 or array.ndim != ndim or len(array) == 0:
        raise ConfigError(f"{path}: expected {ndim}-d uint8 data, got {array.dtype} "
                          f"{array.shape}", key=KEY)
    if count is not None and len(array) != count:
        raise ConfigError(f"{path}: {len(array)} images but {count} labels", key=KEY)
    if ndim == 1 and array.max() >= N_CLASSES:
        raise ConfigError(f"{path}: label {array.max()} is not a class (0..{N_CLASSES - 1})",
                          key=KEY)
    return array


def scale(images: np.ndarray) -> np.ndarray:
    """Return uint8 images as float32 feature rows divided by 255, as the hdf5 reader does."""
    return np.divide(images.reshape(len(images), -1), np.float32(255.0), dtype=np.float32)
