"""The compressors: protocol, sizes, error feedback, lattice fallback, registry errors."""

import numpy as np
import pytest

from mpiopt.compressors import (
    LatticeBoundError,
    NonFiniteError,
    compressor_names,
    lattice,
    make_compressor,
    qsgd,
    sign,
    with_error_feedback,
)
from mpiopt.errors import ConfigError

D = 10007
X = np.random.default_rng(3).standard_normal(D).astype(np.float32)

SPECS = [  # (name, params, expected bytes on the wire for D elements)
    ("identity", {}, 4 * D),
    ("fp16", {}, 2 * D),
    ("sign", {}, (D + 7) // 8),
    ("sign", {"scaled": True}, (D + 7) // 8 + 4),
    ("qsgd", {"levels": 4, "bucket": 512}, (D + 1) // 2 + 4 * 20),
    ("qsgd", {"levels": 16, "bucket": 1000}, D + 4 * 11),
    ("lattice", {"eps": 1e-3}, 2 * D + 8),
    ("lattice", {"eps": 1e-2, "q": 256}, D + 8),
    ("topk", {"ratio": 0.01}, 101 * 8),
]


def decompress(c, payload, ref=None):
    out = np.empty(payload.d, np.float32)
    if c.name == "lattice":
        return c.decompress(payload, out, reference=ref)
    return c.decompress(payload, out)


def is_plain_state(state):
    """Return whether ``state`` is a NamedTuple whose leaves are arrays (or nested ones)."""
    if not isinstance(state, tuple) or not hasattr(state, "_fields"):
        return False
    return all(is_plain_state(v) if isinstance(v, tuple) else isinstance(v, np.ndarray)
               for v in state)


@pytest.mark.parametrize("name,params,nbytes", SPECS)
def test_round_trip_and_size(name, params, nbytes):
    c = make_compressor(name, **params)
    state = c.init(X)
    assert is_plain_state(state)
    payload, state = c.compress(X, state)
    assert payload.nbytes == nbytes == sum(b.nbytes for b in payload.buffers)
    y = decompress(c, payload, ref=X + np.float32(0.01))
    assert y.dtype == np.float32 and y.shape == X.shape
    if name in ("identity", "lattice"):
        np.testing.assert_allclose(y, X, rtol=0, atol=params.get("eps", 0) / 2 + 1e-6)
    if name == "fp16":
        np.testing.assert_allclose(y, X, rtol=1e-3, atol=1e-7)
    if name == "sign":
        signs = np.where(X >= 0, 1.0, -1.0)
        scale = np.abs(X).mean() if params.get("scaled") else 1.0
        np.testing.assert_allclose(y, scale * signs, rtol=1e-6)
    if name == "topk":
        kept = np.argsort(-np.abs(X))[:101]
        np.testing.assert_array_equal(y[kept], X[kept])
        assert np.count_nonzero(y) == 101
    if name == "qsgd":
        assert_on_qsgd_grid(X, y, params["levels"], params["bucket"], payload.norms)


@pytest.mark.parametrize("name,params,nbytes", SPECS)
def test_payload_buffers_are_reused(name, params, nbytes):
    c = make_compressor(name, **params)
    fresh, _ = c.compress(X, c.init(X))
    out = c.empty_payload(D)
    again, _ = c.compress(X, c.init(X), out)
    assert again is out
    for a, b in zip(fresh.buffers, again.buffers):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name,params,nbytes", SPECS)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_input_raises(name, params, nbytes, bad):
    c = make_compressor(name, **params)
    x = X.copy()
    x[D // 2] = bad
    with pytest.raises(NonFiniteError):
        c.compress(x, c.init(x))


def test_fp16_overflow_raises():
    c = make_compressor("fp16")
    with pytest.raises(NonFiniteError, match="overflow"):
        c.compress(np.array([1e5], np.float32), c.init(None))


# --------------------------------------------------------------------------- QSGD oracles

QSGD_CASES = [(4, 512), (16, 1000), (1, 64)]  # (levels, bucket): 4-bit packed, int8, binary


def qsgd_input():
    """A vector with a zero bucket (norm 0) and scattered exact zeros, 5000 elements."""
    x = np.random.default_rng(11).standard_normal(5000).astype(np.float32)
    x[1000:1064] = 0.0
    x[::97] = 0.0
    return x


def qsgd_levels(x, levels, bucket, norms):
    """Return each element's grid step ``norm / levels`` and ``r = |x| levels / norm``."""
    step = np.repeat(norms.astype(np.float64) / levels, bucket)[: x.size]
    r = np.divide(np.abs(x.astype(np.float64)), step, out=np.zeros(x.size), where=step > 0)
    return step, r


def assert_on_qsgd_grid(x, y, levels, bucket, norms):
    """Assert ``y`` is QSGD's decode of ``x``: ``sign(x) k norm / levels``, k a neighbour of r.

    Each bucket's norm is the float32 l2 norm of its elements; each element decodes to
    ``k * norm / levels`` (rounded to float32) with ``|k| <= levels``, ``k`` of the sign of x
    (or 0) and ``|k|`` one of the two grid points around ``r = |x| levels / norm``.
    """
    bucket_norms = [np.linalg.norm(x[i:i + bucket].astype(np.float64))
                    for i in range(0, x.size, bucket)]
    np.testing.assert_allclose(norms, bucket_norms, rtol=2e-7)
    step, r = qsgd_levels(x, levels, bucket, norms)
    k = np.rint(np.divide(y, step, out=np.zeros(x.size), where=step > 0)).astype(np.int64)
    np.testing.assert_array_equal(y, (k * step).astype(np.float32))
    assert np.abs(k).max() <= levels
    assert np.all((k == 0) | (np.sign(k) == np.sign(x)))
    lower = np.minimum(np.floor(r), levels)
    assert np.all((np.abs(k) == lower) | (np.abs(k) == lower + 1))
    assert np.all(y[step == 0] == 0)


@pytest.mark.parametrize("levels,bucket", QSGD_CASES)
def test_qsgd_decodes_are_on_the_grid_unbiased_with_the_stated_variance(levels, bucket):
    x = qsgd_input()
    samples = 400
    decodes = np.empty((samples, x.size), np.float64)
    for seed in range(samples):
        c = qsgd(levels=levels, bucket=bucket, seed=seed)
        payload, _ = c.compress(x, c.init(x))
        y = decompress(c, payload)
        assert_on_qsgd_grid(x, y, levels, bucket, payload.norms)
        decodes[seed] = y
    step, r = qsgd_levels(x, levels, bucket, payload.norms)
    p = r - np.floor(r)  # the probability of rounding up
    # Unbiased: each decode lies in an interval of width `step` around x, so by Hoeffding and
    # a union bound over the elements, |mean - x| > t has probability below 1e-6 in all.
    t = step * np.sqrt(np.log(2 * x.size / 1e-6) / (2 * samples))
    # Decodes are float32 roundings of k * step: at most 2^-24 levels * step off.
    bias = np.abs(decodes.mean(axis=0) - x)
    assert np.all(bias <= t + 2.0**-24 * levels * step), np.max(bias - t)
    # The variance: per element step^2 p (1 - p); its sum is within QSGD's bound
    # min(b/s^2, sqrt(b)/s) |x|^2, and the measured squared error matches it to 6 sigma of
    # its spread (a sum of samples * d independent terms).
    err2 = ((decodes - x) ** 2).sum(axis=1)
    var = float((step**2 * p * (1 - p)).sum())
    spread = np.sqrt((step**4 * p * (1 - p) * (1 - 2 * p) ** 2).sum() / samples)
    assert abs(err2.mean() - var) <= 6 * spread, (err2.mean(), var, spread)
    sq = np.add.reduceat(x.astype(np.float64) ** 2, np.arange(0, x.size, bucket))
    bound = float((np.minimum(bucket / levels**2, np.sqrt(bucket) / levels) * sq).sum())
    assert var <= bound and err2.mean() <= bound, (var, err2.mean(), bound)


def test_qsgd_state_advances_the_stream():
    c = qsgd(levels=2, bucket=128, seed=7)
    s0 = c.init(X)
    p1, s1 = c.compress(X, s0)
    p2, s2 = c.compress(X, s1)
    assert int(s0.step) == 0 and int(s2.step) == 2
    assert not np.array_equal(p1.codes, p2.codes)
    again, _ = c.compress(X, s0)  # same seed, same step: same codes
    np.testing.assert_array_equal(again.codes, p1.codes)
    other, _ = qsgd(levels=2, bucket=128, seed=8).compress(X, s0)
    assert not np.array_equal(other.codes, p1.codes)


@pytest.mark.parametrize("inner", [
    sign(scaled=True), sign(), qsgd(levels=4, bucket=256, seed=1),
    make_compressor("topk", ratio=0.05), make_compressor("fp16"),
])
def test_error_feedback_residual_plus_decompressed_is_the_input(inner):
    c = with_error_feedback(inner)
    state = c.init(X)
    rng = np.random.default_rng(0)
    for _ in range(3):
        g = rng.standard_normal(D).astype(np.float32)
        p = g + state.error  # the compensated input
        payload, state = c.compress(g, state)
        back = state.error + decompress(c, payload)
        tol = 2 * np.spacing(np.float32(np.abs(p).max() + np.abs(back - state.error).max()))
        np.testing.assert_allclose(back, p, rtol=0, atol=tol)


def test_fused_ef_sign_equals_its_definition():
    c = make_compressor("sign", scaled=True, error_feedback=True)
    state = c.init(X)
    e0 = np.random.default_rng(1).standard_normal(D).astype(np.float32)
    state.error[:] = e0
    payload, state = c.compress(X, state)
    p = X + e0
    assert float(payload.scale[0]) == pytest.approx(np.abs(p.astype(np.float64)).mean(),
                                                    rel=1e-6)
    np.testing.assert_array_equal(payload.packed, np.packbits(p >= 0))
    s = payload.scale[0]
    np.testing.assert_array_equal(state.error, p - np.where(p >= 0, s, -s))


def test_lattice_falls_back_on_a_violated_bound():
    eps, q = 1e-2, 256  # bound q*eps/2 = 1.28
    c = lattice(eps, q)
    payload, _ = c.compress(X, c.init(X))
    ok = decompress(c, payload, ref=X + np.float32(1.0))
    assert np.abs(ok - X).max() <= eps / 2 + 1e-5
    for shift, counted in ((1.2825, True), (1.92, False)):  # into the band; past it
        ref = X.copy()
        ref[123] += np.float32(shift)
        with pytest.raises(LatticeBoundError) as err:
            decompress(c, payload, ref=ref)
        assert (err.value.count >= 1) == counted and not err.value.checksum_ok


def test_sizes_relative_to_fp32():
    fp32 = make_compressor("identity").compress(X, None)[0].nbytes
    signs = make_compressor("sign").compress(X, None)[0].nbytes
    assert fp32 / signs == pytest.approx(32, rel=0.01)


def test_registry_errors():
    assert compressor_names() == ["fp16", "identity", "lattice", "qsgd", "sign", "topk"]
    with pytest.raises(ConfigError, match="valid: fp16, identity, lattice, qsgd, sign, topk"):
        make_compressor("gzip")
    cases = [
        ({"levels": 0}, "levels"), ({"levels": 200}, r"levels.*\[1, 127\]"),
        ({"levels": 2.5}, "levels"), ({"bucket": 0}, "bucket"), ({"levels": True}, "levels"),
        ({"levels": 9, "packed": True}, "packed"), ({"lvls": 2}, "lvls.*valid: levels"),
    ]
    for params, match in cases:
        with pytest.raises(ConfigError, match=match):
            make_compressor("qsgd", **params)
    for name, params, match in [("lattice", {"eps": 0}, "eps"), ("lattice", {}, "eps"),
                                ("lattice", {"eps": 1e-3, "q": 1000}, "q"),
                                ("topk", {"ratio": 0}, r"ratio.*\(0.0, 1.0\]"),
                                ("sign", {"scaled": "yes"}, "scaled"),
                                ("sign", {"error_feedback": 1}, "error_feedback"),
                                ("lattice", {"eps": 1e-3, "error_feedback": True},
                                 "error_feedback")]:
        with pytest.raises(ConfigError, match=match):
            make_compressor(name, **params)


def test_registry_builds_wrapped_compressors():
    c = make_compressor("qsgd", levels=4, bucket=512, error_feedback=True)
    assert c.name == "ef_qsgd" and c.params["levels"] == 4
    state = c.init(X)
    assert hasattr(state, "_fields") and int(state.inner.step) == 0
    assert state.error.dtype == np.float32 and state.error.shape == X.shape


def test_float64_input_is_rejected():
    with pytest.raises(TypeError, match="float32"):
        make_compressor("sign").compress(X.astype(np.float64), None)
