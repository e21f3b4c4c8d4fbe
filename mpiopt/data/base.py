"""The dataset interface: configuration base class and the per-rank shard."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mpiopt.config import Section, param

PARTITIONS = ("iid", "dirichlet", "shards")


@dataclass(frozen=True)
class DataConfig(Section):
    """Keys common to every dataset: minibatch and partition across ranks."""

    batch_size: int = param(32, "Minibatch size per rank and step.", low=1)
    partition: str = param("iid", "How training samples are split across ranks.",
                           choices=PARTITIONS)
    alpha: float = param(0.5, "Dirichlet concentration of label skew (partition: dirichlet); "
                         "small is more skewed.", low=0, low_open=True)
    classes_per_rank: int = param(2, "Label shards per rank (partition: shards).", low=1)

    def load(self, rank: int, world_size: int, seed: int, with_test: bool) -> Shard:
        """Return this rank's training shard (and the test set if ``with_test``)."""
        raise NotImplementedError


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
