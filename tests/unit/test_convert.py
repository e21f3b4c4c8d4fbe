"""Converting MNIST-style IDX files and CIFAR-10 binary batches to the HDF5 format."""

import gzip
import os
import struct

import h5py
import numpy as np
import pytest

import mpiopt.data.convert as convert_module
from mpiopt.data.convert import FORMATS, convert, parse_idx
from mpiopt.data.hdf5 import Hdf5Data
from mpiopt.errors import ConfigError

_CODES = {np.dtype("u1"): 0x08, np.dtype("i1"): 0x09, np.dtype("i2"): 0x0B,
          np.dtype("i4"): 0x0C, np.dtype("f4"): 0x0D, np.dtype("f8"): 0x0E}


def _idx_bytes(array: np.ndarray) -> bytes:
    """Encode ``array`` as an IDX file: 0, 0, type code, ndim, big-endian dims, data."""
    header = bytes([0, 0, _CODES[array.dtype], array.ndim])
    dims = struct.pack(f">{array.ndim}I", *array.shape)
    return header + dims + array.astype(array.dtype.newbyteorder(">")).tobytes()


def _write_file(path, data: bytes, gz: bool = False):
    if gz:
        with gzip.open(f"{path}.gz", "wb") as fh:
            fh.write(data)
    else:
        with open(path, "wb") as fh:
            fh.write(data)


def _mnist(folder, gz=False, n_train=12, n_test=5, shape=(4, 5), seed=0):
    """Write tiny MNIST-style IDX files into ``folder``; return the arrays written."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, *shape), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, *shape), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    os.makedirs(folder, exist_ok=True)
    for name, array in arrays.items():
        _write_file(os.path.join(folder, name), _idx_bytes(array), gz)
    return arrays


def _cifar(folder, batches=(1, 2), n=(3, 4), n_test=2, seed=0):
    """Write tiny CIFAR-10 binary batches; return {file name: (images, labels)}."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    written = {}
    names = [f"data_batch_{b}.bin" for b in batches] + ["test_batch.bin"]
    for name, count in zip(names, [*n, n_test], strict=True):
        images = rng.integers(0, 256, (count, 3, 32, 32), dtype=np.uint8)
        labels = rng.integers(0, 10, count, dtype=np.uint8)
        records = np.concatenate([labels[:, None], images.reshape(count, -1)], axis=1)
        _write_file(os.path.join(folder, name), records.tobytes())
        written[name] = (images, labels)
    return written


def _read(path):
    with h5py.File(path, "r") as f:
        return ({k: f[k][:] for k in ("train/x", "train/y", "test/x", "test/y")},
                dict(f.attrs), f["train/x"].chunks)


def test_formats_are_listed():
    assert FORMATS == ("mnist", "cifar10")


@pytest.mark.parametrize("gz", (False, True))
def test_mnist_round_trip_is_exact(tmp_path, gz):
    arrays = _mnist(tmp_path / "src", gz=gz)
    out = tmp_path / "out" / "mnist.h5"  # the output folder is created
    info = convert("mnist", str(tmp_path / "src"), str(out))
    assert info == {"format": "mnist", "out": str(out), "n_train": 12, "n_test": 5,
                    "n_classes": 10, "sample_shape": [4, 5]}
    data, attrs, chunks = _read(out)
    assert np.array_equal(data["train/x"], arrays["train-images-idx3-ubyte"])
    assert np.array_equal(data["train/y"], arrays["train-labels-idx1-ubyte"])
    assert np.array_equal(data["test/x"], arrays["t10k-images-idx3-ubyte"])
    assert np.array_equal(data["test/y"], arrays["t10k-labels-idx1-ubyte"])
    assert data["train/x"].dtype == np.uint8 and attrs["n_classes"] == 10
    assert chunks[1:] == (4, 5)
    assert sorted(os.listdir(out.parent)) == ["mnist.h5"]  # no temporary left behind


def test_mnist_accepts_dotted_names(tmp_path):
    arrays = _mnist(tmp_path)
    for name in arrays:
        os.rename(tmp_path / name, tmp_path / name.replace("-idx", ".idx"))
    assert convert("mnist", str(tmp_path), str(tmp_path / "m.h5"))["n_train"] == 12


def test_converted_file_loads_as_hdf5_dataset(tmp_path):
    arrays = _mnist(tmp_path / "src")
    out = str(tmp_path / "m.h5")
    convert("mnist", str(tmp_path / "src"), out)
    shard = Hdf5Data(path=out).load(0, 1, 0, with_test=True)
    expected = arrays["train-images-idx3-ubyte"].reshape(12, 20).astype(np.float32) / 255
    assert np.array_equal(shard.x_train, expected) and shard.n_classes == 10
    assert shard.x_test.shape == (5, 20)


@pytest.mark.parametrize("dtype", ("u1", "i1", "i2", "i4", "f4", "f8"))
def test_parse_idx_reads_every_type_code(tmp_path, dtype):
    array = (np.arange(24).reshape(2, 3, 4) - 5).astype(dtype)
    if dtype == "u1":
        array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    _write_file(tmp_path / "a.idx", _idx_bytes(array))
    parsed = parse_idx(str(tmp_path / "a.idx"))
    assert parsed.dtype == np.dtype(dtype) and np.array_equal(parsed, array)


def test_cifar10_round_trip_is_exact(tmp_path):
    written = _cifar(tmp_path / "cifar-10-batches-bin", batches=(1, 3))  # batches may be missing
    info = convert("cifar10", str(tmp_path), str(tmp_path / "c.h5"))
    assert (info["n_train"], info["n_test"], info["sample_shape"]) == (7, 2, [3, 32, 32])
    data, attrs, _ = _read(tmp_path / "c.h5")
    b1, b3, test = (written[k] for k in ("data_batch_1.bin", "data_batch_3.bin",
                                         "test_batch.bin"))
    assert np.array_equal(data["train/x"], np.concatenate([b1[0], b3[0]]))
    assert np.array_equal(data["train/y"], np.concatenate([b1[1], b3[1]]))
    assert np.array_equal(data["test/x"], test[0]) and np.array_equal(data["test/y"], test[1])
    assert attrs["n_classes"] == 10 and attrs["source"] == "cifar10"


def test_cifar10_reads_batches_in_src_itself(tmp_path):
    _cifar(tmp_path, batches=(5,), n=(2,))
    assert convert("cifar10", str(tmp_path), str(tmp_path / "c.h5"))["n_train"] == 2


def test_existing_output_needs_overwrite(tmp_path):
    _mnist(tmp_path / "src")
    out = tmp_path / "m.h5"
    out.write_bytes(b"keep me")
    with pytest.raises(ConfigError, match="output exists"):
        convert("mnist", str(tmp_path / "src"), str(out))
    assert out.read_bytes() == b"keep me"
    convert("mnist", str(tmp_path / "src"), str(out), overwrite=True)
    assert _read(out)[0]["train/x"].shape == (12, 4, 5)


def test_failed_write_leaves_nothing_and_keeps_the_old_file(tmp_path, monkeypatch):
    _mnist(tmp_path / "src")
    out = tmp_path / "out"
    out.mkdir()
    (out / "m.h5").write_bytes(b"old")

    def explode(*args):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(convert_module, "_chunks", explode)
    with pytest.raises(RuntimeError, match="disk on fire"):
        convert("mnist", str(tmp_path / "src"), str(out / "m.h5"), overwrite=True)
    assert os.listdir(out) == ["m.h5"] and (out / "m.h5").read_bytes() == b"old"


def _corrupt(tmp_path, how):
    src = tmp_path / "src"
    _mnist(src)
    labels = src / "train-labels-idx1-ubyte"
    data = labels.read_bytes()
    if how == "bad magic":
        labels.write_bytes(b"\x01\x02" + data[2:])
    elif how == "bad type code":
        labels.write_bytes(data[:2] + b"\x07" + data[3:])
    elif how == "truncated":
        labels.write_bytes(data[:-3])
    elif how == "trailing":
        labels.write_bytes(data + b"\x00")
    elif how == "count mismatch":
        labels.write_bytes(_idx_bytes(np.zeros(11, np.uint8)))
    elif how == "missing":
        labels.unlink()
    elif how == "bad gzip":
        labels.unlink()
        (src / "train-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8b garbage")
    elif how == "wrong dims":
        labels.write_bytes(_idx_bytes(np.zeros((12, 2), np.uint8)))
    return src


@pytest.mark.parametrize("how, message", [
    ("bad magic", "not an IDX file"), ("bad type code", "not an IDX file"),
    ("truncated", "truncated"), ("trailing", "trailing bytes"),
    ("count mismatch", "12 images but 11 labels"), ("missing", "missing train-labels"),
    ("bad gzip", "cannot read"), ("wrong dims", "expected uint8 images"),
])
def test_bad_mnist_input_is_a_clear_error(tmp_path, how, message):
    src = _corrupt(tmp_path, how)
    with pytest.raises(ConfigError, match=message) as err:
        convert("mnist", str(src), str(tmp_path / "m.h5"))
    assert "\n" not in str(err.value)
    assert not os.path.exists(tmp_path / "m.h5")


def test_bad_cifar10_input_is_a_clear_error(tmp_path):
    _cifar(tmp_path / "a")
    os.remove(tmp_path / "a" / "test_batch.bin")
    with pytest.raises(ConfigError, match="test_batch.bin"):
        convert("cifar10", str(tmp_path / "a"), str(tmp_path / "a.h5"))
    _cifar(tmp_path / "b")
    batch = tmp_path / "b" / "data_batch_2.bin"
    batch.write_bytes(batch.read_bytes()[:-1])
    with pytest.raises(ConfigError, match="not a positive multiple"):
        convert("cifar10", str(tmp_path / "b"), str(tmp_path / "b.h5"))
    _cifar(tmp_path / "c")
    batch = tmp_path / "c" / "data_batch_1.bin"
    batch.write_bytes(b"\x0b" + batch.read_bytes()[1:])
    with pytest.raises(ConfigError, match="label 11"):
        convert("cifar10", str(tmp_path / "c"), str(tmp_path / "c.h5"))
    assert not any(p.suffix == ".h5" or p.name.endswith(".tmp") for p in tmp_path.iterdir())


def test_unknown_format_and_missing_source_are_errors(tmp_path):
    with pytest.raises(ConfigError, match="valid: mnist, cifar10"):
        convert("svhn", str(tmp_path), str(tmp_path / "x.h5"))
    with pytest.raises(ConfigError, match="source directory not found"):
        convert("mnist", str(tmp_path / "nowhere"), str(tmp_path / "x.h5"))
