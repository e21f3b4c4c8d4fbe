"""Built-in datasets that need no files: ``synthetic`` (generated), ``digits`` (bundled) and
``none`` (no data, for problems that make their own samples)."""

from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass

import numpy as np

from mpiopt.config import Section, param
from mpiopt.data import DATASETS
from mpiopt.data.base import ArraySource, DataConfig, DataSource
from mpiopt.data.partition import data_rng, split_holdout
from mpiopt.errors import ConfigError

# Purposes of the synthetic generator's seeded streams (partition.py uses 1 and 2).
_MEANS, _TRAIN_LABELS, _TEST_LABELS, _TRAIN_NOISE, _TEST_NOISE = 10, 11, 12, 13, 14

# Rows per independently seeded block of noise: a rank draws only the blocks holding its own
# samples, so memory per rank follows its shard rather than the whole training set.
_BLOCK = 1 << 14


@DATASETS.register("none")
@dataclass(frozen=True)
class NoData(Section):
    """No data set: for problems that make their own samples (reinforcement learning).

    The section a problem that needs no data gets when the configuration leaves ``data`` out
    (``ProblemConfig.NEEDS_DATA``); nothing is read or partitioned, and ``load`` is None.
    """

    def check_world(self, world_size: int) -> None:
        """Fit any number of ranks: there is nothing to partition."""

    def load(self, rank: int, world_size: int, seed: int, with_test: bool) -> None:
        """Return no shard."""
        return None


@DATASETS.register("synthetic")
@dataclass(frozen=True)
class SyntheticData(DataConfig):
    """Gaussian classes: seeded, any size, no files.

    Class means are drawn from N(0, 4/n_features) per feature, so two means lie about
    sqrt(8) ~ 2.8 apart whatever ``n_features``; a sample of class c is its mean plus
    ``difficulty`` times N(0, 1) noise per feature. Labels are balanced (class sizes differ by
    at most one). Train and test come from the same means with independent noise; everything
    is a function of the run seed.
    """

    n_samples: int = param(2000, "Training samples in total (all ranks together).", low=1)
    n_test: int = param(500, "Held-out test samples.", low=1)
    n_features: int = param(20, "Features per sample.", low=1)
    n_classes: int = param(4, "Number of classes.", low=2)
    difficulty: float = param(1.0, "Standard deviation of the per-feature Gaussian noise around "
                              "the class means, which lie about 2.8 apart: 0 is noiseless, 1 "
                              "confuses a typical pair of classes about 8% of the time (about "
                              "80% test accuracy with 4 classes), larger is harder.", low=0)

    def open(self, seed: int) -> DataSource:
        """Return the generator of the data set of ``seed`` (features are drawn lazily)."""
        return _SyntheticSource(self, seed)


class _SyntheticSource(DataSource):
    """Generate synthetic samples on demand, drawing only the noise blocks asked for."""

    def __init__(self, cfg: SyntheticData, seed: int):
        super().__init__(_balanced(cfg.n_samples, cfg.n_classes, data_rng(seed, _TRAIN_LABELS)),
                         cfg.n_classes)
        self.cfg, self.seed = cfg, seed
        scale = 2.0 / np.sqrt(cfg.n_features)
        self.means = (scale * data_rng(seed, _MEANS).standard_normal(
            (cfg.n_classes, cfg.n_features))).astype(np.float32)

    def features(self, indices: np.ndarray) -> np.ndarray:
        """Return the samples at the sorted positions ``indices`` of the training set."""
        return self._draw(self.labels, indices, _TRAIN_NOISE)

    def test(self) -> tuple[np.ndarray, np.ndarray]:
        """Return the test set, drawn from the same class means as the training set."""
        y = _balanced(self.cfg.n_test, self.cfg.n_classes, data_rng(self.seed, _TEST_LABELS))
        return self._draw(y, np.arange(len(y)), _TEST_NOISE), y

    def _draw(self, labels: np.ndarray, indices: np.ndarray, stream: int) -> np.ndarray:
        """Return mean + difficulty * noise for the samples at ``indices`` of ``labels``."""
        n, d = len(labels), self.cfg.n_features
        out = self.means[labels[indices]]
        blocks = indices // _BLOCK
        for block in np.unique(blocks):
            rows = min(_BLOCK, n - block * _BLOCK)
            noise = data_rng(self.seed, stream, int(block)).standard_normal(
                (rows, d), dtype=np.float32)
            mine = blocks == block
            out[mine] += np.float32(self.cfg.difficulty) * noise[indices[mine] - block * _BLOCK]
        return out


def _balanced(n: int, n_classes: int, rng: np.random.Generator) -> np.ndarray:
    """Return ``n`` labels in seeded random order, class sizes differing by at most one."""
    return rng.permutation(np.arange(n) % n_classes).astype(np.int64)


@DATASETS.register("digits")
@dataclass(frozen=True)
class DigitsData(DataConfig):
    """scikit-learn's bundled 8x8 handwritten digits: 1797 samples, 64 features, 10 classes.

    Pixel values 0..16 are scaled to [0, 1]; the train/test split is stratified and fixed by
    the run seed. Nothing is downloaded.
    """

    test_fraction: float = param(0.2, "Share of the samples held out as the test set "
                                 "(stratified, fixed by the seed).", low=0, high=1,
                                 low_open=True, high_open=True)

    def open(self, seed: int) -> DataSource:
        """Load the digits and split them for ``seed``."""
        x, y = read_digits()
        train, test = split_holdout(y, self.test_fraction, seed)
        return ArraySource(x[train], y[train], x[test], y[test], 10)


def digits_file() -> str:
    """Return the path of the digits file scikit-learn ships, without importing scikit-learn.

    Importing scikit-learn costs seconds per rank; the file alone is 0.26 MB of CSV.
    """
    spec = importlib.util.find_spec("sklearn")
    path = None
    if spec is not None and spec.submodule_search_locations:
        path = os.path.join(spec.submodule_search_locations[0], "datasets", "data",
                            "digits.csv.gz")
    if path is None or not os.path.exists(path):
        raise ConfigError("data: digits reads the file scikit-learn ships, which is not "
                          "installed: pip install scikit-learn", key="data.name")
    return path


@functools.lru_cache(maxsize=1)
def read_digits() -> tuple[np.ndarray, np.ndarray]:
    """Return the 1797 digits as float32 features scaled to [0, 1] and int64 labels.

    Read once per process (the arrays are read-only): checking the partition and loading
    the shard both open the data set.
    """
    table = np.loadtxt(digits_file(), delimiter=",", dtype=np.float32)
    x, y = table[:, :-1] / np.float32(16.0), table[:, -1].astype(np.int64)
    x.flags.writeable = y.flags.writeable = False
    return x, y
