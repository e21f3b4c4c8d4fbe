"""Datasets (synthetic, digits, hdf5): shapes, determinism, per-rank shards, errors, describe."""

import h5py
import numpy as np
import pytest
from conftest import assert_cover, shards_of

import mpiopt.data.hdf5 as hdf5_module
from mpiopt.config import build_section
from mpiopt.data import DATASETS
from mpiopt.data.datasets import DigitsData, SyntheticData
from mpiopt.data.describe import describe
from mpiopt.data.hdf5 import Hdf5Data, read_rows
from mpiopt.data.partition import partition
from mpiopt.errors import ConfigError
from mpiopt.schema import resolve_name


def _build(name, **raw):
    return build_section(DATASETS.get(name), raw, "data")


def test_every_dataset_is_registered():
    assert {"synthetic", "digits", "hdf5", "fashion_mnist"} <= set(DATASETS.names())


def test_every_key_is_documented():
    import dataclasses

    for _, cls in DATASETS.items():
        for f in dataclasses.fields(cls):
            assert f.metadata.get("doc", "").endswith("."), (cls.NAME, f.name)


# --------------------------------------------------------------------------- synthetic


def test_synthetic_shapes_dtypes_and_test_set():
    cfg = _build("synthetic", n_samples=300, n_test=50, n_features=7, n_classes=3)
    shard = cfg.load(0, 1, seed=0, with_test=True)
    assert shard.x_train.shape == (300, 7) and shard.x_train.dtype == np.float32
    assert shard.y_train.dtype == np.int64 and shard.n_classes == 3 and shard.n_features == 7
    assert shard.x_test.shape == (50, 7) and shard.x_test.dtype == np.float32
    assert np.array_equal(np.bincount(shard.y_train), [100, 100, 100])
    assert set(np.unique(shard.y_test)) == {0, 1, 2}


@pytest.mark.parametrize("world_size", (1, 2, 3, 4, 7))
@pytest.mark.parametrize("partition", ("iid", "dirichlet", "shards"))
def test_synthetic_shards_cover_the_training_set_once(world_size, partition):
    cfg = _build("synthetic", n_samples=200, n_features=3, partition=partition)
    full = cfg.load(0, 1, seed=4, with_test=False)
    assert_cover(shards_of(cfg, world_size, seed=4), full.x_train, full.y_train)


def test_synthetic_samples_do_not_depend_on_who_loads_them():
    # 40000 rows span three noise blocks: a rank draws only its blocks, values must agree.
    cfg = SyntheticData(n_samples=40000, n_features=2, n_test=10)
    full = cfg.load(0, 1, seed=1, with_test=False)
    assert_cover(shards_of(cfg, 3, seed=1), full.x_train, full.y_train)


def test_synthetic_is_deterministic_and_seed_sensitive():
    cfg = SyntheticData(n_samples=100, n_test=20)
    a, b, c = (cfg.load(0, 1, seed=s, with_test=True) for s in (3, 3, 4))
    assert np.array_equal(a.x_train, b.x_train) and np.array_equal(a.x_test, b.x_test)
    assert not np.array_equal(a.x_train, c.x_train)


def test_synthetic_difficulty_zero_puts_samples_on_the_class_means():
    shard = SyntheticData(n_samples=60, n_test=30, difficulty=0.0).load(0, 1, 0, True)
    for c in range(4):
        rows = np.concatenate([shard.x_train[shard.y_train == c], shard.x_test[shard.y_test == c]])
        assert np.all(rows == rows[0])


def test_synthetic_difficulty_scales_the_noise():
    def spread(difficulty):
        s = SyntheticData(n_samples=2000, difficulty=difficulty).load(0, 1, 0, False)
        return np.std(s.x_train[s.y_train == 0] - s.x_train[s.y_train == 0].mean(axis=0))

    assert spread(1.0) == pytest.approx(1.0, rel=0.05)
    assert spread(3.0) == pytest.approx(3.0, rel=0.05)


def test_synthetic_rejects_out_of_range_keys():
    with pytest.raises(ConfigError) as err:
        _build("synthetic", difficulty=-1)
    assert err.value.key == "data.difficulty"
    with pytest.raises(ConfigError) as err:
        _build("synthetic", n_classes=1)
    assert err.value.key == "data.n_classes"


def test_load_rejects_a_rank_outside_the_world():
    with pytest.raises(ValueError):
        SyntheticData(n_samples=10).load(2, 2, 0, False)


def test_check_world_rejects_too_many_ranks():
    SyntheticData(n_samples=8).check_world(8)
    with pytest.raises(ConfigError) as err:
        SyntheticData(n_samples=8).check_world(9)
    assert err.value.key == "data.partition"
    with pytest.raises(ConfigError) as err:
        SyntheticData(n_samples=8, partition="shards", classes_per_rank=3).check_world(4)
    assert err.value.key == "data.classes_per_rank"


# --------------------------------------------------------------------------- digits


def test_digits_shapes_scaling_and_stratified_split():
    shard = DigitsData().load(0, 1, seed=0, with_test=True)
    assert shard.x_train.shape[1] == 64 and shard.x_train.dtype == np.float32
    assert len(shard.y_train) + len(shard.y_test) == 1797
    assert len(shard.y_test) == round(0.2 * 1797)
    assert 0.0 <= shard.x_train.min() and shard.x_train.max() == 1.0
    assert shard.n_classes == 10
    test_share = np.bincount(shard.y_test) / np.bincount(np.concatenate(
        [shard.y_train, shard.y_test]))
    assert np.all(np.abs(test_share - 0.2) < 0.02)


def test_digits_file_equals_scikit_learns_loader():
    from sklearn.datasets import load_digits

    from mpiopt.data.datasets import read_digits

    x, y = read_digits()
    x_ref, y_ref = load_digits(return_X_y=True)
    assert np.array_equal(x, (x_ref / 16.0).astype(np.float32)) and x.dtype == np.float32
    assert np.array_equal(y, y_ref) and y.dtype == np.int64
    assert not x.flags.writeable  # cached per process: nobody may change it in place


def test_digits_split_is_fixed_by_the_seed():
    a, b, c = (DigitsData().load(0, 1, s, True) for s in (0, 0, 1))
    assert np.array_equal(a.x_test, b.x_test)
    assert not np.array_equal(a.x_test, c.x_test)


@pytest.mark.parametrize("world_size", (2, 7))
def test_digits_shards_cover_the_training_set_once(world_size):
    cfg = _build("digits", partition="dirichlet", alpha=0.3)
    full = cfg.load(0, 1, seed=2, with_test=False)
    assert_cover(shards_of(cfg, world_size, seed=2), full.x_train, full.y_train)


# --------------------------------------------------------------------------- hdf5


def _write(path, train, test=None, n_classes=None):
    with h5py.File(path, "w") as f:
        if n_classes is not None:
            f.attrs["n_classes"] = n_classes
        for name, pair in (("train", train), ("test", test)):
            if pair is not None:
                f.create_dataset(f"{name}/x", data=pair[0])
                f.create_dataset(f"{name}/y", data=pair[1])
    return str(path)


def _images(n, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 2, 3), dtype=np.uint8), rng.integers(0, 3, n)


@pytest.mark.parametrize("world_size", (1, 2, 3, 4, 7))
def test_hdf5_shards_cover_train_and_scale_uint8(tmp_path, world_size):
    x, y = _images(40)
    path = _write(tmp_path / "d.h5", (x, y), _images(9, seed=1), n_classes=5)
    cfg = _build("hdf5", path=path, partition="iid")
    shards = shards_of(cfg, world_size)
    assert_cover(shards, x.reshape(40, 6).astype(np.float32) / 255, y)
    assert shards[0].n_classes == 5 and shards[0].x_train.dtype == np.float32


def test_hdf5_reads_the_test_group_only_when_asked(tmp_path):
    xt, yt = _images(9, seed=1)
    path = _write(tmp_path / "d.h5", _images(40), (xt, yt))
    assert Hdf5Data(path=path).load(0, 2, 0, with_test=False).x_test is None
    shard = Hdf5Data(path=path).load(0, 2, 0, with_test=True)
    assert np.array_equal(shard.x_test, xt.reshape(9, 6).astype(np.float32) / 255)
    assert np.array_equal(shard.y_test, yt) and shard.y_test.dtype == np.int64
    assert shard.n_classes == 3


def test_hdf5_keeps_non_uint8_values(tmp_path):
    x = np.arange(24, dtype=np.float64).reshape(8, 3) * 10
    path = _write(tmp_path / "d.h5", (x, np.arange(8) % 2), (x[:2], np.array([0, 1])))
    shard = Hdf5Data(path=path).load(0, 1, 0, False)
    assert np.array_equal(shard.x_train, x.astype(np.float32))


def test_hdf5_without_test_group_holds_out_test_fraction(tmp_path):
    x, y = _images(50)
    path = _write(tmp_path / "d.h5", (x, y))
    cfg = Hdf5Data(path=path, test_fraction=0.2)
    shards = [cfg.load(r, 3, seed=1, with_test=True) for r in range(3)]
    assert shards[0].n_train_total == 40 and len(shards[0].y_test) == 10
    flat = x.reshape(50, 6).astype(np.float32) / 255
    train_rows = [bytes(r) for s in shards for r in s.x_train]
    test_rows = [bytes(r) for r in shards[0].x_test]
    assert sorted(train_rows + test_rows) == sorted(bytes(r) for r in flat)


def test_hdf5_rank_reads_only_its_own_rows(tmp_path, monkeypatch):
    path = _write(tmp_path / "d.h5", _images(30), _images(5, seed=1))
    requests = []

    def spy(dataset, rows, *args):
        requests.append((dataset.name, rows.copy()))
        return read_rows(dataset, rows, *args)

    monkeypatch.setattr(hdf5_module, "read_rows", spy)
    shard = Hdf5Data(path=path).load(1, 3, seed=0, with_test=False)
    assert [name for name, _ in requests] == ["/train/x"]
    assert np.array_equal(requests[0][1], shard.indices) and len(shard.indices) == 10


class _RecordingDataset:
    """A stand-in for an h5py dataset that records which rows each read asks for."""

    def __init__(self, array):
        self.array, self.shape, self.dtype, self.requests = array, array.shape, array.dtype, []

    def __getitem__(self, rows):
        if isinstance(rows, slice):
            self.requests.append(np.arange(rows.start, rows.stop))
        else:
            self.requests.append(np.asarray(rows).copy())
        return self.array[rows]


def test_read_rows_reads_dense_rows_as_covering_ranges_in_blocks():
    array = np.arange(100 * 4, dtype=np.uint8).reshape(100, 2, 2)
    dataset, rows = _RecordingDataset(array), np.array([1, 3, 6, 40, 41, 42, 43, 99])
    out = read_rows(dataset, rows, block_bytes=16)  # ranges of at most 4 rows of 4 bytes
    assert [list(r) for r in dataset.requests] == [[1, 2, 3], [6], [40, 41, 42, 43], [99]]
    assert np.array_equal(out, array[rows].reshape(8, 4).astype(np.float32) / 255)


def test_read_rows_reads_sparse_rows_as_a_selection():
    array = np.arange(1000 * 3, dtype=np.int16).reshape(1000, 3)
    dataset = _RecordingDataset(array)
    rows = np.arange(0, 1000, hdf5_module.SPARSE + 1)  # one row in 17: sparser than 1 in 16
    out = read_rows(dataset, rows)
    assert len(dataset.requests) == 1 and np.array_equal(dataset.requests[0], rows)
    assert np.array_equal(out, array[rows].astype(np.float32))
    dense = _RecordingDataset(array)
    read_rows(dense, np.arange(0, 1000, hdf5_module.SPARSE))  # one row in 16: one range
    assert len(dense.requests) == 1 and np.array_equal(dense.requests[0], np.arange(993))


@pytest.mark.parametrize("world_size", (1, 2, 3, 8, 40))
def test_read_rows_equals_fancy_indexing_of_a_real_file(tmp_path, world_size):
    x = np.random.default_rng(0).integers(0, 256, (2000, 5, 3), dtype=np.uint8)
    path = _write(tmp_path / "d.h5", (x, np.arange(2000) % 4))
    with h5py.File(path, "r") as f:
        for rows in partition(np.arange(2000) % 4, world_size, "iid", 0, 0.5, 2):
            expected = x[rows].reshape(len(rows), 15).astype(np.float32) / 255
            assert np.array_equal(read_rows(f["train/x"], rows, block_bytes=1000), expected)


def test_hdf5_shorthand_sets_path():
    raw = {"name": "hdf5:/data/mnist.h5"}
    assert resolve_name(DATASETS, raw, "data") is Hdf5Data
    assert build_section(Hdf5Data, raw, "data").path == "/data/mnist.h5"


def test_hdf5_path_is_required():
    with pytest.raises(ConfigError) as err:
        Hdf5Data()
    assert err.value.key == "data.path"


def _bad_files(tmp_path):
    x, y = _images(10)
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not hdf5 at all")
    return {
        "no such file": str(tmp_path / "missing.h5"),
        "as HDF5": str(junk),
        "no dataset train/y": _drop(_write(tmp_path / "a.h5", (x, y))),
        "one label per sample": _write(tmp_path / "b.h5", (x, y[:5])),
        "integer labels": _write(tmp_path / "c.h5", (x, y.astype(np.float32))),
        "negative label": _write(tmp_path / "d.h5", (x, y - 1)),
        "attribute n_classes=2": _write(tmp_path / "e.h5", (x, y * 0 + 2), n_classes=2),
        "must be a numeric": _write(tmp_path / "f.h5", (x.astype("S1"), y)),
    }


def _drop(path):
    with h5py.File(path, "a") as f:
        del f["train/y"]
    return str(path)


@pytest.mark.parametrize("message", ["no such file", "as HDF5", "no dataset train/y",
                                     "one label per sample", "integer labels", "negative label",
                                     "attribute n_classes=2", "must be a numeric"])
def test_hdf5_layout_errors_name_data_path(tmp_path, message):
    path = _bad_files(tmp_path)[message]
    with pytest.raises(ConfigError, match=message) as err:
        Hdf5Data(path=path).load(0, 1, 0, with_test=False)
    assert err.value.key == "data.path"
    assert "\n" not in str(err.value)


def test_hdf5_test_label_beyond_train_classes_is_an_error(tmp_path):
    path = _write(tmp_path / "d.h5", _images(10), (np.zeros((2, 2, 3), np.uint8), [0, 7]))
    Hdf5Data(path=path).load(0, 1, 0, with_test=False)
    with pytest.raises(ConfigError, match="set the root attribute n_classes") as err:
        Hdf5Data(path=path).load(0, 1, 0, with_test=True)
    assert err.value.key == "data.path"


def test_hdf5_check_world_opens_the_file(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        Hdf5Data(path=str(tmp_path / "nope.h5")).check_world(2)
    Hdf5Data(path=_write(tmp_path / "d.h5", _images(10), _images(2))).check_world(10)


# --------------------------------------------------------------------------- describe


def test_describe_tabulates_ranks_and_classes():
    cfg = SyntheticData(n_samples=90, n_classes=3, partition="shards", classes_per_rank=1)
    text = describe(cfg, 3, seed=0)
    lines = text.splitlines()
    assert "90 training samples, 3 classes" in lines[0] and "shards" in lines[0]
    assert lines[1].split() == ["rank", "samples", "classes", "0", "1", "2"]
    rows = [line.split() for line in lines[2:]]
    assert [r[0] for r in rows] == ["0", "1", "2", "total"]
    assert all(r[1:3] == ["30", "1"] for r in rows[:3])  # one pure class shard each
    assert rows[3] == ["total", "90", "3", "30", "30", "30"]
    shards = shards_of(cfg, 3)
    for r, shard in enumerate(shards):
        assert [int(v) for v in rows[r][3:]] == list(np.bincount(shard.y_train, minlength=3))


def test_describe_raises_when_the_partition_does_not_fit():
    with pytest.raises(ConfigError) as err:
        describe(SyntheticData(n_samples=3), 4, seed=0)
    assert err.value.key == "data.partition"
