"""Split training samples across ranks, and a held-out test set off a training set.

Every function here is a pure function of its arguments and the seed: all ranks compute the
same partition independently, so no communication is needed to agree on it, and a partition
that does not fit raises the same :class:`~mpiopt.errors.ConfigError` on every rank.

Partitions (``kind``):

- ``iid``: a seeded random permutation cut into ``world_size`` pieces whose sizes differ by at
  most one.
- ``dirichlet``: for each class, the proportions of its samples going to each rank are drawn
  from Dirichlet(``alpha``, ..., ``alpha``); small ``alpha`` concentrates each class on few
  ranks. Draws that leave some rank without samples are redrawn (up to ``DIRICHLET_TRIES``
  times), so the result is conditioned on every rank having at least one sample.
- ``shards``: samples sorted by label (in seeded random order within a class), cut into
  ``world_size * classes_per_rank`` contiguous shards of near-equal size; each rank receives
  ``classes_per_rank`` shards chosen at random. A shard covers a contiguous range of labels, so
  when every class has at least as many samples as the largest shard, a shard touches at most
  two classes and a rank sees at most ``2 * classes_per_rank`` classes; when moreover every
  class size is a multiple of a common shard size, every shard is one class and a rank sees at
  most ``classes_per_rank`` classes.
"""

from __future__ import annotations

import numpy as np

from mpiopt.errors import ConfigError

KINDS = ("iid", "dirichlet", "shards")
DIRICHLET_TRIES = 100

# Purposes of the seeded streams (see data_rng): distinct, so that changing one use of the
# seed never shifts the random numbers of another.
STREAM_PARTITION = 1
STREAM_SPLIT = 2

# Second word of every data stream, to keep them apart from the streams other modules derive
# from the same run seed (e.g. default_rng([seed, rank])).
_NAMESPACE = 0xDA7A


def data_rng(seed: int, *purpose: int) -> np.random.Generator:
    """Return the generator of one purpose of the data layer, derived from the run seed."""
    return np.random.default_rng([seed, _NAMESPACE, *purpose])


def check_fits(n_samples: int, world_size: int, kind: str, classes_per_rank: int) -> None:
    """Raise ConfigError if ``n_samples`` cannot give every rank a non-empty ``kind`` split."""
    if kind not in KINDS:
        raise ConfigError(f"{kind!r} is not one of: {', '.join(KINDS)}", key="data.partition")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if n_samples < world_size:
        raise ConfigError(f"{n_samples} training samples cannot give each of {world_size} "
                          f"ranks at least one; use at most {n_samples} ranks or more data",
                          key="data.partition")
    shards = world_size * classes_per_rank
    if kind == "shards" and n_samples < shards:
        raise ConfigError(f"{world_size} ranks x {classes_per_rank} shards need at least "
                          f"{shards} training samples, there are {n_samples}; use "
                          f"classes_per_rank <= {n_samples // world_size}",
                          key="data.classes_per_rank")


def partition(labels: np.ndarray, world_size: int, kind: str, seed: int, alpha: float,
              classes_per_rank: int) -> list[np.ndarray]:
    """Split sample positions across ranks.

    Args:
        labels: integer class labels (>= 0) of the whole training set.
        world_size: number of ranks.
        kind: ``iid``, ``dirichlet`` or ``shards`` (see the module docstring).
        seed: run seed; the same seed gives the same partition.
        alpha: Dirichlet concentration (``dirichlet`` only).
        classes_per_rank: shards per rank (``shards`` only).

    Returns:
        One sorted int64 array of sample positions per rank; every position is in exactly
        one of them and none is empty.

    Raises:
        ConfigError: naming ``data.partition``, ``data.alpha`` or ``data.classes_per_rank``
            when the partition cannot give every rank a sample.
    """
    labels = np.asarray(labels)
    check_fits(len(labels), world_size, kind, classes_per_rank)
    rng = data_rng(seed, STREAM_PARTITION)
    if kind == "iid":
        parts = np.array_split(rng.permutation(len(labels)), world_size)
    elif kind == "dirichlet":
        parts = _dirichlet(labels, world_size, rng, alpha)
    else:
        parts = _shards(labels, world_size, rng, classes_per_rank)
    return [np.sort(p).astype(np.int64) for p in parts]


def _by_class(labels: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    """Return the positions of each present class, in seeded random order within a class."""
    perm = rng.permutation(len(labels))
    # A stable sort of the shuffled positions keeps the shuffle within each class.
    order = perm[np.argsort(labels[perm], kind="stable")]
    _, counts = np.unique(labels, return_counts=True)
    return np.split(order, np.cumsum(counts)[:-1])


def _dirichlet(labels, world_size, rng, alpha) -> list[np.ndarray]:
    """Split each class by Dirichlet(alpha) proportions; redraw if a rank ends up empty."""
    classes = _by_class(labels, rng)
    for _ in range(DIRICHLET_TRIES):
        parts: list[list[np.ndarray]] = [[] for _ in range(world_size)]
        for idx in classes:
            p = rng.dirichlet(np.full(world_size, alpha))
            cuts = (np.cumsum(p)[:-1] * len(idx)).astype(np.int64)
            for rank, piece in enumerate(np.split(idx, np.minimum(cuts, len(idx)))):
                parts[rank].append(piece)
        if all(sum(len(x) for x in pieces) for pieces in parts):
            return [np.concatenate(pieces) for pieces in parts]
    raise ConfigError(f"dirichlet partition with alpha={alpha} left some of {world_size} "
                      f"ranks without samples in {DIRICHLET_TRIES} draws ({len(labels)} "
                      f"samples, {len(classes)} classes); use a larger alpha or fewer ranks",
                      key="data.alpha")


def _shards(labels, world_size, rng, classes_per_rank) -> list[np.ndarray]:
    """Cut the label-sorted samples into shards and deal ``classes_per_rank`` to each rank."""
    order = np.concatenate(_by_class(labels, rng))
    shards = np.array_split(order, world_size * classes_per_rank)
    dealt = rng.permutation(len(shards)).reshape(world_size, classes_per_rank)
    return [np.concatenate([shards[s] for s in row]) for row in dealt]


def holdout_count(n_samples: int, fraction: float) -> int:
    """Return how many of ``n_samples`` a held-out ``fraction`` takes (at least 1, not all)."""
    return min(max(round(fraction * n_samples), 1), n_samples - 1)


def split_holdout(labels: np.ndarray, fraction: float, seed: int,
               key: str = "data.test_fraction") -> tuple[np.ndarray, np.ndarray]:
    """Hold out a seeded, stratified ``fraction`` of samples as a test set.

    Args:
        labels: integer class labels (>= 0) of all samples.
        fraction: share of samples to hold out, in (0, 1).
        seed: run seed; the same seed gives the same split.
        key: configuration key named by the error.

    Returns:
        ``(train, test)``: sorted int64 positions, disjoint, covering every sample, with
        ``holdout_count(len(labels), fraction)`` in ``test`` and each class represented in
        ``test`` in proportion to its size (up to rounding).

    Raises:
        ConfigError: when there are fewer than two samples to split.
    """
    labels = np.asarray(labels)
    n = len(labels)
    if n < 2:
        raise ConfigError(f"cannot hold out a test set from {n} sample(s)", key=key)
    perm = data_rng(seed, STREAM_SPLIT).permutation(n)
    shuffled = labels[perm]
    counts = np.bincount(shuffled)
    order = np.argsort(shuffled, kind="stable")
    starts = np.repeat(np.cumsum(counts) - counts, counts)
    # Each sample's quantile within its class: sorting by it interleaves the classes, so any
    # prefix of that order holds every class in proportion to its size.
    quantile = np.empty(n)
    quantile[order] = (np.arange(n) - starts + 0.5) / counts[shuffled[order]]
    ranked = perm[np.argsort(quantile, kind="stable")]
    k = holdout_count(n, fraction)
    return np.sort(ranked[k:]).astype(np.int64), np.sort(ranked[:k]).astype(np.int64)
