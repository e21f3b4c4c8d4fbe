"""Partitions across ranks and held-out test splits: coverage, determinism, skew, errors."""

import numpy as np
import pytest

from mpiopt.data.partition import (
    check_fits,
    data_rng,
    holdout_count,
    partition,
    split_holdout,
)
from mpiopt.errors import ConfigError

KINDS = ("iid", "dirichlet", "shards")
WORLD_SIZES = (1, 2, 3, 4, 7)


def _labels(n=700, n_classes=10, seed=0):
    """Return labels with unequal class sizes, as real datasets have."""
    return np.random.default_rng(seed).integers(0, n_classes, n)


def _split(labels, world_size, kind, seed=0, alpha=0.5, classes_per_rank=2):
    return partition(labels, world_size, kind, seed, alpha, classes_per_rank)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_partition_is_disjoint_complete_sorted_and_non_empty(kind, world_size):
    parts = _split(_labels(), world_size, kind)
    assert len(parts) == world_size
    assert all(len(p) > 0 and p.dtype == np.int64 for p in parts)
    assert all(np.all(np.diff(p) > 0) for p in parts)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(700))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_partition_is_deterministic_for_a_seed(kind, world_size):
    a, b = _split(_labels(), world_size, kind, seed=5), _split(_labels(), world_size, kind, seed=5)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("world_size", WORLD_SIZES[1:])
def test_partition_depends_on_the_seed(kind, world_size):
    a, b = _split(_labels(), world_size, kind, seed=1), _split(_labels(), world_size, kind, seed=2)
    assert not all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_iid_sizes_differ_by_at_most_one(world_size):
    sizes = [len(p) for p in _split(_labels(), world_size, "iid")]
    assert max(sizes) - min(sizes) <= 1


def _label_skew(labels, parts):
    """Return the mean total-variation distance of ranks' class mixes from the global mix."""
    n_classes = labels.max() + 1
    overall = np.bincount(labels, minlength=n_classes) / len(labels)
    dists = [np.bincount(labels[p], minlength=n_classes) / len(p) for p in parts]
    return np.mean([0.5 * np.abs(d - overall).sum() for d in dists])


def test_dirichlet_skew_grows_as_alpha_shrinks():
    labels = _labels(4000)
    skew = {alpha: np.mean([_label_skew(labels, _split(labels, 4, "dirichlet", s, alpha))
                            for s in range(3)]) for alpha in (0.1, 1.0, 100.0)}
    assert skew[0.1] > skew[1.0] > skew[100.0]
    assert skew[100.0] < 0.1 < 0.4 < skew[0.1]


@pytest.mark.parametrize("world_size", (3, 4, 5))
def test_shards_bound_the_classes_of_a_rank(world_size):
    # With 5 ranks every class size (60) is a multiple of the shard size (30 = 300 / (5 * 2)),
    # so shards are pure: at most classes_per_rank classes. With 3 or 4 ranks each class still
    # holds at least one largest shard (50 or 38), so a shard touches at most two classes.
    labels = np.repeat(np.arange(5), 60)
    for seed in range(3):
        parts = _split(labels, world_size, "shards", seed=seed, classes_per_rank=2)
        largest_shard = -(-len(labels) // (world_size * 2))
        assert largest_shard <= 60
        bound = 2 if world_size == 5 else 4
        assert all(len(np.unique(labels[p])) <= bound for p in parts)


def test_shards_with_pure_shards_are_exactly_classes_per_rank_classes():
    labels = np.repeat(np.arange(6), 50)  # 3 ranks x 2 shards of 50: one class per shard
    parts = _split(labels, 3, "shards", classes_per_rank=2)
    assert all(len(np.unique(labels[p])) == 2 for p in parts)


def test_shards_touch_at_most_two_classes_per_shard_on_uneven_labels():
    labels = _labels(700)
    smallest_class, cpr = np.bincount(labels).min(), 2
    checked = 0
    for world_size in (7, 8, 10):
        if smallest_class < -(-len(labels) // (world_size * cpr)):
            continue  # the bound holds only when every class holds a largest shard
        checked += 1
        for seed in range(3):
            parts = _split(labels, world_size, "shards", seed=seed, classes_per_rank=cpr)
            assert all(len(np.unique(labels[p])) <= 2 * cpr for p in parts)
    assert checked >= 2


def test_iid_too_many_ranks_names_partition():
    with pytest.raises(ConfigError, match="3 training samples") as err:
        _split(np.array([0, 1, 0]), 4, "iid")
    assert err.value.key == "data.partition"


def test_shards_too_few_samples_names_classes_per_rank():
    with pytest.raises(ConfigError, match="classes_per_rank <= 4") as err:
        _split(_labels(20), 5, "shards", classes_per_rank=5)
    assert err.value.key == "data.classes_per_rank"


def test_dirichlet_that_leaves_ranks_empty_names_alpha():
    labels = np.repeat([0, 1], 10)  # 2 classes over 8 ranks at tiny alpha: ranks stay empty
    with pytest.raises(ConfigError, match="larger alpha") as err:
        _split(labels, 8, "dirichlet", alpha=0.001)
    assert err.value.key == "data.alpha"


def test_unknown_kind_names_partition():
    with pytest.raises(ConfigError) as err:
        _split(_labels(), 2, "random")
    assert err.value.key == "data.partition"


def test_check_fits_accepts_exact_fit():
    check_fits(8, 4, "shards", 2)
    check_fits(4, 4, "iid", 1)


def test_partition_handles_non_contiguous_labels():
    labels = np.array([3, 7, 7, 3, 9, 9, 3, 7])
    for kind in KINDS:
        parts = _split(labels, 2, kind, classes_per_rank=1)
        assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(8))


def test_data_streams_differ_by_purpose_and_seed():
    draws = {(s, p): data_rng(s, p).integers(1 << 30) for s in (0, 1) for p in (1, 2)}
    assert len(set(draws.values())) == 4


def test_split_holdout_is_disjoint_complete_deterministic_and_stratified():
    labels = np.repeat(np.arange(4), [100, 200, 300, 400])
    train, test = split_holdout(labels, 0.2, seed=3)
    assert len(test) == holdout_count(1000, 0.2) == 200
    assert np.array_equal(np.sort(np.concatenate([train, test])), np.arange(1000))
    assert np.array_equal(np.bincount(labels[test]), [20, 40, 60, 80])
    again = split_holdout(labels, 0.2, seed=3)
    assert np.array_equal(again[1], test)
    assert not np.array_equal(split_holdout(labels, 0.2, seed=4)[1], test)


def test_split_holdout_keeps_one_sample_on_each_side():
    assert holdout_count(2, 0.01) == 1 and holdout_count(2, 0.99) == 1
    with pytest.raises(ConfigError) as err:
        split_holdout(np.array([0]), 0.5, seed=0, key="data.x")
    assert err.value.key == "data.x"
