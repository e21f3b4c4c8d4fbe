"""The dataset interface: configuration base class, data source and the per-rank shard.

A dataset is a :class:`DataConfig` subclass that implements :meth:`DataConfig.open`, returning
a :class:`DataSource`: the training labels (cheap, read by every rank to agree on the
partition) and readers of the features of given samples and of the test set (read only where
needed). :meth:`DataConfig.load` composes them with :func:`~mpiopt.data.partition.partition`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mpiopt.config import Section, param
from mpiopt.data.partition import KINDS, check_fits, partition

PARTITIONS = KINDS


class DataSource:
    """One opened dataset: all training labels, and readers of features and the test set.

    Attributes:
        labels: int64 labels of the whole training set, in ``[0, n_classes)``.
        n_classes: number of classes.
    """

    def __init__(self, labels: np.ndarray, n_classes: int):
        self.labels = np.asarray(labels, dtype=np.int64)
        self.n_classes = int(n_classes)

    def features(self, indices: np.ndarray) -> np.ndarray:
        """Return float32 features, shape (len(indices), n_features), of training samples."""
        raise NotImplementedError

    def test(self) -> tuple[np.ndarray, np.ndarray]:
        """Return the test set as (float32 features, int64 labels)."""
        raise NotImplementedError

    def close(self) -> None:
        """Release files held open (nothing by default)."""

    def __enter__(self) -> DataSource:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ArraySource(DataSource):
    """A data source whose arrays are all in memory."""

    def __init__(self, x_train, y_train, x_test, y_test, n_classes: int):
        super().__init__(y_train, n_classes)
        self.x_train, self.x_test = x_train, x_test
        self.y_test = np.asarray(y_test, dtype=np.int64)

    def features(self, indices: np.ndarray) -> np.ndarray:
        """Return the rows ``indices`` of the training features."""
        return self.x_train[indices]

    def test(self) -> tuple[np.ndarray, np.ndarray]:
        """Return the in-memory test set."""
        return self.x_test, self.y_test


@dataclass(frozen=True)
class DataConfig(Section):
    """Keys common to every dataset: minibatch and partition across ranks."""

    batch_size: int = param(32, "Minibatch size per rank and step.", low=1)
    partition: str = param("iid", "How training samples are split across ranks: iid (uniform "
                           "random), dirichlet (label skew set by alpha), shards (each rank "
                           "gets classes_per_rank label-sorted shards).", choices=PARTITIONS)
    alpha: float = param(0.5, "Dirichlet concentration of label skew (partition: dirichlet); "
                         "small is more skewed.", low=0, low_open=True)
    classes_per_rank: int = param(2, "Label-sorted shards given to each rank (partition: "
                                  "shards), so roughly the number of classes a rank sees.",
                                  low=1)

    def open(self, seed: int) -> DataSource:
        """Open the dataset as generated or split for ``seed``; use as a context manager."""
        raise NotImplementedError

    def split(self, labels: np.ndarray, world_size: int, seed: int) -> list[np.ndarray]:
        """Return the sorted training positions of every rank under the configured partition."""
        return partition(labels, world_size, self.partition, seed, self.alpha,
                         self.classes_per_rank)

    def check_world(self, world_size: int) -> None:
        """Raise ConfigError if the training set is too small for the partition's ranks."""
        with self.open(0) as source:
            check_fits(len(source.labels), world_size, self.partition, self.classes_per_rank)

    def load(self, rank: int, world_size: int, seed: int, with_test: bool) -> Shard:
        """Return this rank's training shard (and the test set if ``with_test``)."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        with self.open(seed) as source:
            indices = self.split(source.labels, world_size, seed)[rank]
            x_test, y_test = source.test() if with_test else (None, None)
            return Shard(source.features(indices), source.labels[indices], indices,
                         source.n_classes, len(source.labels), x_test, y_test)


@dataclass
class Shard:
    """One rank's training data, and the held-out test set where it was asked for.

    ``x`` arrays are float32 of shape (samples, features); ``y`` arrays are int64 labels in
    ``[0, n_classes)``. ``indices`` are the positions of this rank's samples in the full
    training set (sorted), so that partitions can be checked and described.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    indices: np.ndarray
    n_classes: int
    n_train_total: int
    x_test: np.ndarray | None = None
    y_test: np.ndarray | None = None

    @property
    def n_features(self) -> int:
        return int(self.x_train.shape[1])
