"""Fashion-MNIST: Debian's IDX files, data.path, the missing-package error, per-rank shards."""

import functools
import gzip
import os
import struct

import numpy as np
import pytest
from conftest import assert_cover, shards_of

import mpiopt.data.fashion as fashion
from mpiopt.config import build_section
from mpiopt.data import DATASETS
from mpiopt.data.fashion import FashionMnistData
from mpiopt.errors import ConfigError
from mpiopt.schema import resolve_name

INSTALLED = os.path.isfile(os.path.join(fashion.PACKAGE_DIR, "train-images-idx3-ubyte.gz"))
SKIP = (f"Debian package dataset-fashion-mnist is not installed in {fashion.PACKAGE_DIR} "
        f"(apt-get install dataset-fashion-mnist; .ci/run installs it)")
NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
         "t10k-labels-idx1-ubyte")


def _idx(array: np.ndarray) -> bytes:
    """Encode a uint8 array as an IDX file: 0, 0, 0x08, ndim, big-endian dims, the bytes."""
    return bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + \
        array.tobytes()


def _folder(path, n_train=30, n_test=7, gz=False, seed=0, **replace):
    """Write four small IDX files of 3x4 images into ``path``; return the arrays by name."""
    rng = np.random.default_rng(seed)
    arrays = {NAMES[0]: rng.integers(0, 256, (n_train, 3, 4), dtype=np.uint8),
              NAMES[1]: (np.arange(n_train) % 10).astype(np.uint8),
              NAMES[2]: rng.integers(0, 256, (n_test, 3, 4), dtype=np.uint8),
              NAMES[3]: rng.integers(0, 10, n_test, dtype=np.uint8)}
    arrays.update(replace)
    path.mkdir(exist_ok=True)
    for name, array in arrays.items():
        opener = gzip.open if gz else open
        with opener(path / (name + ".gz" if gz else name), "wb") as fh:
            fh.write(_idx(array))
    return arrays


def test_registered_with_a_path_shorthand():
    assert "fashion_mnist" in DATASETS.names()
    raw = {"name": "fashion_mnist:/data/fashion"}
    assert resolve_name(DATASETS, raw, "data") is FashionMnistData
    assert build_section(FashionMnistData, raw, "data").path == "/data/fashion"
    assert FashionMnistData().path == ""  # the package's folder


# --------------------------------------------------------------------------- the package


def _raw(name: str, header: int) -> bytes:
    """Return the bytes after the header of one of the package's gzipped files."""
    with gzip.open(os.path.join(fashion.PACKAGE_DIR, name + ".gz"), "rb") as fh:
        return fh.read()[header:]


@pytest.fixture(scope="module")
def package():
    """Return the whole training set and the test set of the package, read once."""
    if not INSTALLED:
        pytest.skip(SKIP)
    return FashionMnistData().load(0, 1, seed=0, with_test=True)


def test_official_split_shapes_dtypes_and_scaling(package):
    assert package.x_train.shape == (60000, 784) and package.x_train.dtype == np.float32
    assert package.x_test.shape == (10000, 784) and package.x_test.dtype == np.float32
    assert package.y_train.dtype == np.int64 and package.y_test.dtype == np.int64
    assert package.n_classes == 10 and package.n_train_total == 60000
    assert np.array_equal(np.bincount(package.y_train), [6000] * 10)  # balanced classes
    assert np.array_equal(np.bincount(package.y_test), [1000] * 10)
    for x in (package.x_train, package.x_test):
        assert x.min() == 0.0 and x.max() == 1.0


def test_known_images_equal_the_raw_idx_bytes(package):
    """Read the package's files with gzip and struct only, and compare a few samples."""
    with gzip.open(os.path.join(fashion.PACKAGE_DIR, NAMES[0] + ".gz"), "rb") as fh:
        assert struct.unpack(">4I", fh.read(16)) == (0x803, 60000, 28, 28)
    pixels, labels = _raw(NAMES[0], 16), _raw(NAMES[1], 8)
    test_pixels, test_labels = _raw(NAMES[2], 16), _raw(NAMES[3], 8)
    assert (labels[0], labels[1], test_labels[0]) == (9, 0, 9)  # ankle boot, T-shirt, boot
    for i in (0, 1, 2, 31337, 59999):
        raw = np.frombuffer(pixels[784 * i: 784 * (i + 1)], np.uint8)
        assert np.array_equal(package.x_train[i], raw.astype(np.float32) / np.float32(255))
        assert package.y_train[i] == labels[i]
    for i in (0, 9999):
        raw = np.frombuffer(test_pixels[784 * i: 784 * (i + 1)], np.uint8)
        assert np.array_equal(package.x_test[i], raw.astype(np.float32) / np.float32(255))
        assert package.y_test[i] == test_labels[i]


@pytest.mark.parametrize("partition", ("iid", "dirichlet", "shards"))
def test_package_shards_cover_the_training_set_once(package, monkeypatch, partition):
    # Each load reads the files again (as a rank does); cache them to keep the test quick.
    monkeypatch.setattr(fashion, "read_idx", functools.lru_cache(fashion.read_idx))
    cfg = FashionMnistData(partition=partition, alpha=0.3)
    for world_size in (2, 3, 4, 5):
        assert_cover(shards_of(cfg, world_size, seed=2), package.x_train, package.y_train)


def test_missing_package_names_the_key_and_the_command(monkeypatch, tmp_path):
    monkeypatch.setattr(fashion, "PACKAGE_DIR", str(tmp_path / "absent"))
    for call in (lambda: FashionMnistData().check_world(2),
                 lambda: FashionMnistData().load(0, 1, 0, with_test=False)):
        with pytest.raises(ConfigError) as err:
            call()
        assert err.value.key == "data.path"
        assert "apt-get install dataset-fashion-mnist" in str(err.value)
        assert str(err.value).startswith("data.path: ") and "\n" not in str(err.value)


# --------------------------------------------------------------------------- data.path


@pytest.mark.parametrize("gz", (False, True))
def test_path_reads_a_folder_of_idx_files(tmp_path, gz):
    arrays = _folder(tmp_path / "f", gz=gz)
    shard = FashionMnistData(path=str(tmp_path / "f")).load(0, 1, seed=0, with_test=True)
    assert np.array_equal(shard.x_train, arrays[NAMES[0]].reshape(30, 12) / np.float32(255))
    assert np.array_equal(shard.y_train, arrays[NAMES[1]])
    assert np.array_equal(shard.x_test, arrays[NAMES[2]].reshape(7, 12) / np.float32(255))
    assert np.array_equal(shard.y_test, arrays[NAMES[3]])
    assert shard.x_train.dtype == shard.x_test.dtype == np.float32
    assert shard.y_train.dtype == shard.y_test.dtype == np.int64 and shard.n_classes == 10


@pytest.mark.parametrize("world_size", (1, 2, 3, 4, 5))
@pytest.mark.parametrize("partition", ("iid", "dirichlet", "shards"))
def test_path_shards_cover_the_training_set_once(tmp_path, world_size, partition):
    arrays = _folder(tmp_path / "f", n_train=100)
    cfg = FashionMnistData(path=str(tmp_path / "f"), partition=partition)
    x_full = arrays[NAMES[0]].reshape(100, 12) / np.float32(255)
    assert_cover(shards_of(cfg, world_size, seed=1), x_full, arrays[NAMES[1]].astype(np.int64))


def test_a_rank_reads_each_training_file_once(tmp_path, monkeypatch):
    _folder(tmp_path / "f")
    reads = []

    def spy(path):
        reads.append(os.path.basename(path))
        return parse_idx(path)

    parse_idx = fashion.parse_idx
    monkeypatch.setattr(fashion, "parse_idx", spy)
    shard = FashionMnistData(path=str(tmp_path / "f")).load(1, 3, seed=0, with_test=False)
    assert reads == [NAMES[1], NAMES[0]] and shard.x_test is None and len(shard.indices) == 10


def _bad_folders(tmp_path):
    """Write one faulty folder per expected error; return {error text: folder}."""
    _folder(tmp_path / "junk")
    (tmp_path / "junk" / NAMES[2]).write_bytes(b"\x01\x02junk")
    _folder(tmp_path / "partial")
    os.unlink(tmp_path / "partial" / NAMES[0])
    _folder(tmp_path / "count", **{NAMES[1]: np.zeros(29, np.uint8)})
    _folder(tmp_path / "label", **{NAMES[1]: np.full(30, 12, np.uint8)})
    _folder(tmp_path / "rank", **{NAMES[0]: np.zeros((30, 12), np.uint8)})
    return {"no such folder": "nowhere", f"missing {NAMES[0]}": "partial",
            "not an IDX file": "junk", "30 images but 29 labels": "count",
            "label 12 is not a class": "label", "expected 3-d uint8 data": "rank"}


@pytest.mark.parametrize("message", ["no such folder", f"missing {NAMES[0]}", "not an IDX file",
                                     "30 images but 29 labels", "label 12 is not a class",
                                     "expected 3-d uint8 data"])
def test_path_errors_name_data_path(tmp_path, message):
    path = tmp_path / _bad_folders(tmp_path)[message]
    with pytest.raises(ConfigError, match=message) as err:
        FashionMnistData(path=str(path)).load(0, 1, 0, with_test=True)
    assert err.value.key == "data.path" and "\n" not in str(err.value)
