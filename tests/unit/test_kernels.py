"""The kernels: numba equals the numpy reference bit for bit; the semantics of each kernel."""

import os
import subprocess
import sys

import numpy as np
import pytest
from mpiopt.kernels import reference

from mpiopt import kernels as K
from mpiopt.errors import ConfigError

LENGTHS = [0, 1, 7, 8, 9, 1000003]
RNG = np.random.default_rng(20240601)


def vec(d, seed=0):
    """Return a float32 test vector with zeros, signed zeros and a denormal at the front."""
    x = np.random.default_rng(seed).standard_normal(d).astype(np.float32)
    x[:4] = np.array([0.0, -0.0, 1e-45, -1e-45], np.float32)[: min(d, 4)]
    return x


def same(a, b):
    """Assert two arrays are equal bit for bit (dtype, shape and bytes)."""
    assert a.dtype == b.dtype and a.shape == b.shape
    assert a.tobytes() == b.tobytes()


def test_import_is_lazy():
    code = ("import sys, mpiopt.kernels; "
            "print('cupy' in sys.modules, 'numba' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["False", "False"]


@pytest.mark.parametrize("d", LENGTHS)
def test_pack_signs_matches_reference_and_packbits(d):
    x = vec(d)
    got = K.pack_signs(x, backend="numba")
    same(got, K.pack_signs(x, backend="numpy"))
    same(got, np.packbits(x >= 0))
    assert got.size == (d + 7) // 8


def test_pack_signs_conventions():
    x = np.array([0.0, -0.0, 1e-45, -1e-45, np.inf, -np.inf, 2.0, -2.0, 3.0], np.float32)
    for backend in ("numpy", "numba"):
        got = K.pack_signs(x, backend=backend)
        # sign(0) = sign(-0) = +1; first element is the top bit; the tail is zero-padded
        assert got.tolist() == [0b11101010, 0b10000000]


@pytest.mark.parametrize("d", LENGTHS)
def test_unpack_signs_round_trip(d):
    x = vec(d, seed=1)
    packed = K.pack_signs(x)
    for backend in ("numpy", "numba"):
        out = K.unpack_signs(packed, d, 0.25, backend=backend)
        same(out, np.where(x >= 0, np.float32(0.25), np.float32(-0.25)))
    same(K.pack_signs(K.unpack_signs(packed, d)), packed)


@pytest.mark.parametrize("d", LENGTHS)
@pytest.mark.parametrize("n", [1, 2, 3, 5, 8])
def test_majority_vote_matches_reference(d, n):
    if d > 1000 and n not in (3, 8):
        pytest.skip("the long vector runs with one odd and one even stack")
    stack = np.stack([K.pack_signs(vec(d, seed=s)) for s in range(n)])
    got = K.majority_vote(stack, backend="numba")
    same(got, K.majority_vote(stack, backend="numpy"))
    signs = np.stack([np.where(vec(d, seed=s) >= 0, 1, -1) for s in range(n)])
    same(got, np.packbits(signs.sum(axis=0) >= 0))  # sign(sum), ties to +1


def test_majority_vote_ties_and_odd_sizes():
    a = K.pack_signs(np.array([1, -1, 1, -1, 5, -5, 0, -3, 2], np.float32))
    b = K.pack_signs(np.array([-1, 1, 1, -1, -5, 5, 0, 3, -2], np.float32))
    for backend in ("numpy", "numba"):
        tie = K.majority_vote(np.stack([a, b]), backend=backend)
        assert np.unpackbits(tie, count=9).tolist() == [1, 1, 1, 0, 1, 1, 1, 1, 1]
        three = K.majority_vote(np.stack([a, b, b]), backend=backend)
        same(three, b)
    big = np.stack([RNG.integers(0, 256, 40000, dtype=np.uint8) for _ in range(255)])
    same(K.majority_vote(big, backend="numba"), K.majority_vote(big, backend="numpy"))


QSGD_CASES = [  # (levels, bucket, packed): small and large buckets, odd buckets, nibbles
    (1, 512, False), (4, 512, True), (7, 3, True), (127, 7, False), (3, 9000, True),
    (2, 5000, False), (5, 10**9, False),
]


@pytest.mark.parametrize("d", LENGTHS)
def test_qsgd_matches_reference(d):
    x = vec(d, seed=2)
    cases = QSGD_CASES if d < 10**6 else [(4, 512, True), (15, 100000, False)]
    for levels, bucket, packed in cases:
        codes, norms = K.qsgd_quantize(x, levels, bucket, 99, packed=packed, backend="numba")
        ref_codes, ref_norms = K.qsgd_quantize(x, levels, bucket, 99, packed=packed,
                                               backend="numpy")
        same(norms, ref_norms)
        same(codes, ref_codes)
        y = K.qsgd_dequantize(codes, norms, levels, bucket, d, backend="numba")
        same(y, K.qsgd_dequantize(codes, norms, levels, bucket, d, backend="numpy"))


def test_qsgd_does_not_depend_on_thread_count():
    x = vec(300000, seed=3)
    before = K.get_num_threads()
    try:
        K.set_num_threads(1)
        one = K.qsgd_quantize(x, 4, 512, 5)[0]
    finally:
        K.set_num_threads(before)
    same(one, K.qsgd_quantize(x, 4, 512, 5)[0])


def test_qsgd_codes_layout_and_seeds():
    x = np.array([3.0, -4.0, 0.0], np.float32)  # norm 5, one bucket
    codes, norms = K.qsgd_quantize(x, 5, 8, 0)
    assert norms.tolist() == [5.0]
    assert codes.dtype == np.int8 and codes[1] == -4 and codes[0] == 3 and codes[2] == 0
    packed, _ = K.qsgd_quantize(x, 5, 8, 0, packed=True)
    assert packed.tolist() == [(3 << 4) | (-4 & 15), 0]
    y = vec(5000, seed=4)
    a, b = K.qsgd_quantize(y, 2, 64, 1)[0], K.qsgd_quantize(y, 2, 64, 2)[0]
    assert not np.array_equal(a, b)
    same(a, K.qsgd_quantize(y, 2, 64, 1)[0])
    gen = np.random.default_rng(0)
    assert not np.array_equal(K.qsgd_quantize(y, 2, 64, gen)[0],
                              K.qsgd_quantize(y, 2, 64, gen)[0])


@pytest.mark.parametrize("levels,bucket", [(1, 64), (4, 64), (7, 100), (16, 256)])
def test_qsgd_is_unbiased_with_bounded_variance(levels, bucket):
    # T independent quantizations in one call: T copies of x, one bucket each (the counter
    # hash gives every copy its own draws). Fixed seed, so the test is deterministic.
    trials = 4000
    x = np.random.default_rng(7).standard_normal(bucket).astype(np.float32)
    x[::5] *= 20  # mixed magnitudes
    codes, norms = K.qsgd_quantize(np.tile(x, trials), levels, bucket, 12345)
    q = K.qsgd_dequantize(codes, norms, levels, bucket).reshape(trials, bucket)
    step = float(np.linalg.norm(x.astype(np.float64))) / levels
    # Unbiased: each coordinate's mean has standard deviation <= step/2/sqrt(T). A 5-sigma
    # band per coordinate: two-sided 5.7e-7, below 2e-4 over all coordinates (Bonferroni).
    assert np.all(np.abs(q.mean(axis=0) - x) <= 5 * 0.5 * step / np.sqrt(trials))
    # Variance: the mean squared error over T trials estimates E|Q(x) - x|^2 (5 sigma, CLT);
    # the exact expectation is sum step^2 p(1-p); both stay within the QSGD bound.
    err = ((q.astype(np.float64) - x) ** 2).sum(axis=1)
    r = np.abs(x.astype(np.float64)) / step
    exact = float((step**2 * (r - np.floor(r)) * (1 - r + np.floor(r))).sum())
    assert abs(err.mean() - exact) <= 5 * err.std() / np.sqrt(trials) + 1e-9
    bound = min(bucket / levels**2, np.sqrt(bucket) / levels) * float((x.astype(float) ** 2).sum())
    assert exact <= bound and err.mean() <= bound


@pytest.mark.parametrize("d", LENGTHS)
@pytest.mark.parametrize("q", [256, 1 << 16])
def test_lattice_matches_reference(d, q):
    x = vec(d, seed=5)
    eps = 1e-3
    z, cs = K.lattice_encode(x, eps, q, backend="numba")
    zr, csr = K.lattice_encode(x, eps, q, backend="numpy")
    same(z, zr)
    assert cs == csr and z.dtype == (np.uint8 if q == 256 else np.uint16)
    ref = x + RNG.uniform(-0.2, 0.2, d).astype(np.float32)
    ref[: d // 3] += np.float32(q * eps)  # some outside the bound
    got = K.lattice_decode(z, ref, eps, q, backend="numba")
    want = K.lattice_decode(z, ref, eps, q, backend="numpy")
    same(got[0], want[0])
    assert got[1:] == want[1:]


def test_lattice_exact_inside_the_bound():
    q, eps = 256, 0.01  # q*eps/2 = 1.28
    x = vec(100003, seed=6) * 10
    z, cs = K.lattice_encode(x, eps, q)
    ref = x + RNG.uniform(-1.2, 1.2, x.size).astype(np.float32)  # inside bound minus band
    xh, suspects, cs_hat = K.lattice_decode(z, ref, eps, q)
    tol = eps / 2 * (1 + 1e-9) + np.spacing(np.abs(x))  # plus the float32 rounding of x_hat
    assert np.all(np.abs(xh.astype(np.float64) - x) <= tol)
    assert suspects == 0 and cs_hat == cs


def test_lattice_violation_is_detected():
    q, eps = 256, 0.01
    x = vec(5000, seed=8)
    z, cs = K.lattice_encode(x, eps, q)
    for backend in ("numpy", "numba"):
        near = x.copy()
        near[17] += np.float32(q * eps / 2 + eps / 4)  # just across: the guard band sees it
        _, suspects, cs_hat = K.lattice_decode(z, near, eps, q, backend=backend)
        assert suspects >= 1 and cs_hat != cs
        far = x.copy()
        far[4000] -= np.float32(0.75 * q * eps)  # jumps past the band: the checksum sees it
        xh, suspects, cs_hat = K.lattice_decode(z, far, eps, q, backend=backend)
        assert abs(xh[4000] - x[4000]) > q * eps / 2 and cs_hat != cs


@pytest.mark.parametrize("d", LENGTHS)
def test_ef_sign_compress(d):
    g, e0 = vec(d, seed=9), vec(d, seed=10) * np.float32(0.1)
    outs = {}
    for backend in ("numpy", "numba"):
        e = e0.copy()
        packed = np.empty((d + 7) // 8, np.uint8)
        scale = K.ef_sign_compress(g, e, packed, backend=backend)
        outs[backend] = (scale, e, packed)
        p = g + e0
        same(packed, np.packbits(p >= 0))
        if d:
            assert scale == pytest.approx(np.abs(p.astype(np.float64)).sum() / d, rel=1e-6)
        back = e + K.unpack_signs(packed, d, scale)  # residual + decompressed = p
        tol = 2 * np.spacing(np.float32(np.abs(p).max(initial=0) + scale))
        np.testing.assert_allclose(back, p, rtol=0, atol=tol)
    assert outs["numpy"][0] == outs["numba"][0]
    same(outs["numpy"][1], outs["numba"][1])
    same(outs["numpy"][2], outs["numba"][2])
    packed = np.empty((d + 7) // 8, np.uint8)
    plain = K.ef_sign_compress(g, None, packed, backend="numba")
    assert plain == K.ef_sign_compress(g, None, packed.copy(), backend="numpy")


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_all_finite(backend):
    x = vec(1000003, seed=11)
    assert K.all_finite(x, backend=backend)
    for pos in (0, 500000, x.size - 1):
        for bad in (np.nan, np.inf, -np.inf):
            y = x.copy()
            y[pos] = bad
            assert not K.all_finite(y, backend=backend)
    assert not K.all_finite(np.array([1.0, np.nan]), backend=backend)  # float64
    assert K.all_finite(np.arange(5), backend=backend)
    assert K.all_finite(np.zeros(0, np.float32), backend=backend)


def test_dispatch_and_validation():
    x = vec(100)
    assert K.pack_signs(x).tobytes() == np.packbits(x >= 0).tobytes()  # small: numpy path
    with pytest.raises(ValueError, match="backend"):
        K.pack_signs(x, backend="fortran")
    with pytest.raises(TypeError):
        K.pack_signs(x, backend="cupy")
    with pytest.raises(TypeError, match="float32"):
        K.pack_signs(x.astype(np.float64))
    with pytest.raises(ValueError, match="out"):
        K.pack_signs(x, out=np.empty(3, np.uint8))
    with pytest.raises(ValueError):
        K.unpack_signs(np.zeros(2, np.uint8), 100)
    with pytest.raises(ValueError):
        K.qsgd_quantize(x, 128, 512, 0)
    with pytest.raises(ValueError):
        K.qsgd_quantize(x, 8, 512, 0, packed=True)
    with pytest.raises(ValueError):
        K.lattice_encode(x, 1e-3, 1000)
    with pytest.raises(ValueError):
        K.majority_vote(np.zeros((0, 4), np.uint8))
    out = np.empty(13, np.uint8)
    assert K.pack_signs(x, out=out) is out


def test_set_num_threads_validates():
    with pytest.raises(ConfigError, match="threads"):
        K.set_num_threads(0)
    with pytest.raises(ConfigError, match="threads"):
        K.set_num_threads(10**6)
    K.set_num_threads(K.get_num_threads())


def test_canonical_sum_is_order_defined():
    # The reference's lane sum equals an explicit per-lane loop plus the fixed tree.
    v = RNG.standard_normal((3, 100))
    lanes = np.zeros((3, 32))
    for i in range(100):
        lanes[:, i % 32] += v[:, i]
    for off in (16, 8, 4, 2, 1):
        lanes[:, :off] += lanes[:, off : 2 * off]
    same(reference.lanesum(v), lanes[:, 0])


def test_bench_kernels_smoke(tmp_path):
    import json

    from mpiopt.bench import kernels as bench

    lines = []
    result = bench.run(size=40000, json_path=str(tmp_path / "k.json"), out=lines.append)
    assert "| pack_signs | numba |" in lines[1]
    saved = json.loads((tmp_path / "k.json").read_text())
    rows = {(r["kernel"], r["backend"]) for r in saved["rows"]}
    assert ("copy", "numpy") in rows and ("qsgd_quantize(s=4)", "numba") in rows
    assert all(r["gbps"] > 0 for r in result["rows"])


def test_dispatch_thresholds():
    x = np.zeros(1, np.float32)
    for small in (K.SMALL, K.SMALL_SIGNS, K.SMALL_STREAMING):
        assert K._impl(x, small - 1, None, small) is K.reference
        assert K._impl(x, small, None, small).__name__ == "mpiopt.kernels.cpu"


def test_thread_count_set_before_numba_loads_is_applied_when_it_loads():
    code = (
        "import sys\n"
        "import numpy as np\n"
        "from mpiopt import kernels as K\n"
        "print(K.thread_limit())\n"
        "K.set_num_threads(1)\n"
        "K.majority_vote(np.zeros((4, K.SMALL_SIGNS // 8), np.uint8))  # below: numpy\n"
        "print('numba' in sys.modules)\n"
        "K.majority_vote(np.zeros((4, K.SMALL_SIGNS), np.uint8))  # numba\n"
        "print('numba' in sys.modules, K.get_num_threads())\n"
    )
    env = {**os.environ, "NUMBA_NUM_THREADS": "2"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, env=env)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split("\n")[:3] == ["2", "False", "True 1"]
