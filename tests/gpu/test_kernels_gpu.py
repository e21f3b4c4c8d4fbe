"""The CuPy kernels equal the numpy reference bit for bit (skipped without CuPy or a device)."""

import numpy as np
import pytest

from mpiopt import kernels as K

cupy = pytest.importorskip("cupy")


def _has_device() -> bool:
    try:
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # CuPy without a driver or a device
        return False


pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not _has_device(), reason="no CUDA device")]

LENGTHS = [0, 1, 7, 8, 9, 1000003]


def vec(d, seed=0):
    x = np.random.default_rng(seed).standard_normal(d).astype(np.float32)
    x[:4] = np.array([0.0, -0.0, 1e-45, -1e-45], np.float32)[: min(d, 4)]
    return x


def same(dev, host):
    got = cupy.asnumpy(dev)
    assert got.dtype == host.dtype and got.shape == host.shape
    assert got.tobytes() == host.tobytes()


@pytest.mark.parametrize("d", LENGTHS)
def test_signs(d):
    x = vec(d)
    packed = K.pack_signs(cupy.asarray(x))
    same(packed, K.pack_signs(x, backend="numpy"))
    same(K.unpack_signs(packed, d, 0.5), K.unpack_signs(cupy.asnumpy(packed), d, 0.5,
                                                         backend="numpy"))


@pytest.mark.parametrize("d", LENGTHS)
@pytest.mark.parametrize("n", [1, 2, 3, 8])
def test_majority_vote(d, n):
    stack = np.stack([np.packbits(vec(d, seed=s) >= 0) for s in range(n)])
    same(K.majority_vote(cupy.asarray(stack)), K.majority_vote(stack, backend="numpy"))


@pytest.mark.parametrize("d", LENGTHS)
@pytest.mark.parametrize("levels,bucket,packed", [
    (1, 512, False), (4, 512, True), (7, 3, True), (127, 7, False), (3, 9000, True),
    (2, 5000, False), (5, 10**9, False),
])
def test_qsgd(d, levels, bucket, packed):
    x = vec(d, seed=2)
    codes, norms = K.qsgd_quantize(cupy.asarray(x), levels, bucket, 99, packed=packed)
    ref_codes, ref_norms = K.qsgd_quantize(x, levels, bucket, 99, packed=packed,
                                           backend="numpy")
    same(norms, ref_norms)
    same(codes, ref_codes)
    same(K.qsgd_dequantize(codes, norms, levels, bucket, d),
         K.qsgd_dequantize(ref_codes, ref_norms, levels, bucket, d, backend="numpy"))


@pytest.mark.parametrize("d", LENGTHS)
@pytest.mark.parametrize("q", [256, 1 << 16])
def test_lattice(d, q):
    x = vec(d, seed=5)
    ref = x + np.random.default_rng(1).uniform(-0.2, 0.2, d).astype(np.float32)
    ref[: d // 3] += np.float32(q * 1e-3)
    z, cs = K.lattice_encode(cupy.asarray(x), 1e-3, q)
    zr, csr = K.lattice_encode(x, 1e-3, q, backend="numpy")
    same(z, zr)
    assert cs == csr
    got = K.lattice_decode(z, cupy.asarray(ref), 1e-3, q)
    want = K.lattice_decode(zr, ref, 1e-3, q, backend="numpy")
    same(got[0], want[0])
    assert got[1:] == want[1:]


@pytest.mark.parametrize("d", LENGTHS)
def test_ef_sign_compress(d):
    g, e = vec(d, seed=9), vec(d, seed=10) * np.float32(0.1)
    ge, pe = cupy.asarray(e), cupy.empty((d + 7) // 8, np.uint8)
    ph = np.empty((d + 7) // 8, np.uint8)
    scale = K.ef_sign_compress(cupy.asarray(g), ge, pe)
    assert scale == K.ef_sign_compress(g, e, ph, backend="numpy")
    same(ge, e)
    same(pe, ph)
    assert K.ef_sign_compress(cupy.asarray(g), None, pe) == K.ef_sign_compress(
        g, None, ph, backend="numpy")


def test_all_finite_and_dispatch():
    x = cupy.asarray(vec(1000))
    assert K.all_finite(x)
    x[500] = cupy.nan
    assert not K.all_finite(x)
    with pytest.raises(TypeError):
        K.pack_signs(x, backend="numba")
    assert K.array_module(x) is cupy


def test_modules_are_memoised_per_device():
    from mpiopt.kernels import gpu

    K.pack_signs(cupy.asarray(vec(100)))
    dev = cupy.cuda.Device().id
    mod = gpu._MODULES[dev]
    K.pack_signs(cupy.asarray(vec(100)))
    assert gpu._MODULES[dev] is mod


def test_compressors_run_on_the_device():
    from mpiopt.compressors import make_compressor

    x = vec(10007)
    for name, params in [("sign", {"scaled": True, "error_feedback": True}),
                         ("qsgd", {"levels": 4}), ("lattice", {"eps": 1e-3}),
                         ("topk", {"ratio": 0.01}), ("fp16", {})]:
        c = make_compressor(name, **params)
        host, _ = c.compress(x, c.init(x))
        dev, _ = c.compress(cupy.asarray(x), c.init(cupy.asarray(x)))
        for a, b in zip(dev.buffers, host.buffers):
            np.testing.assert_array_equal(cupy.asnumpy(a), b)
