"""The sign methods' adversaries: what an inverting or random worker packs, serially."""

import numpy as np
import pytest

from mpiopt import kernels
from mpiopt.algorithms.signum import adversary_stream, make_tamper

D = 100_003


def honest(v):
    """Return the honest packed signs of ``v`` (what the tamper rewrites)."""
    return np.packbits(v >= 0)


def tampered(tamper, v, segment=None):
    """Return the packed signs of ``v`` after ``tamper``, applied in byte-aligned segments."""
    packed, scratch = honest(v), np.empty_like(v)
    step = 8 * (segment or kernels.nbytes_signs(v.size))
    for lo in range(0, v.size, step):
        hi = min(v.size, lo + step)
        tamper(packed[lo // 8: -(-hi // 8)], v[lo:hi], scratch[lo:hi])
    return packed


def test_invert_negates_every_sign():
    v = np.random.default_rng(0).standard_normal(D).astype(np.float32)
    got = np.unpackbits(tampered(make_tamper("invert", np), v))[:D]
    np.testing.assert_array_equal(got, (v < 0).astype(np.uint8))


def test_random_signs_are_the_streams_next_normals_whatever_the_segments():
    v = np.random.default_rng(0).standard_normal(D).astype(np.float32)
    oracle = adversary_stream(3, 2).standard_normal((2, D), dtype=np.float32)
    for segment in (None, 1000, 3):
        tamper = make_tamper("random", np, adversary_stream(3, 2))
        for call in range(2):  # consecutive votes take consecutive blocks of the stream
            got = tampered(tamper, v, segment)
            np.testing.assert_array_equal(got, np.packbits(oracle[call] >= 0), err_msg=(
                f"segment {segment}, vote {call}"))


def test_random_signs_ignore_the_honest_vector_and_are_fair_coins():
    v = np.random.default_rng(1).standard_normal(D).astype(np.float32)
    first = tampered(make_tamper("random", np, adversary_stream(3, 2)), v)
    second = tampered(make_tamper("random", np, adversary_stream(3, 2)), -v)
    np.testing.assert_array_equal(first, second)
    plus = np.unpackbits(first)[:D].astype(np.float64)
    # Fair coins: the share of +1 is within 5 standard deviations (0.5/sqrt(D)) of 1/2, and
    # agrees with the honest signs about half the time (the noise ignores the gradient).
    assert abs(plus.mean() - 0.5) < 5 * 0.5 / np.sqrt(D)
    agree = (plus == (v >= 0)).mean()
    assert abs(agree - 0.5) < 5 * 0.5 / np.sqrt(D)


@pytest.mark.parametrize("other", [(4, 2), (3, 1)])
def test_each_seed_and_rank_has_its_own_stream(other):
    v = np.zeros(D, np.float32)
    mine = tampered(make_tamper("random", np, adversary_stream(3, 2)), v)
    theirs = tampered(make_tamper("random", np, adversary_stream(*other)), v)
    agree = (np.unpackbits(mine)[:D] == np.unpackbits(theirs)[:D]).mean()
    assert abs(agree - 0.5) < 5 * 0.5 / np.sqrt(D)


def test_sign_methods_draw_the_noise_from_the_adversary_stream():
    from types import SimpleNamespace

    from mpiopt.algorithms.signum import _SignBase

    cfg = SimpleNamespace(adversary="random")
    ctx = SimpleNamespace(rank=2, xp=np, cfg=SimpleNamespace(run=SimpleNamespace(seed=3)),
                          rng=np.random.default_rng(0))
    v = np.zeros(D, np.float32)
    tamper = _SignBase._tamper(SimpleNamespace(ctx=ctx, cfg=cfg, adversaries=(0, 2)))
    want = np.packbits(adversary_stream(3, 2).standard_normal(D, dtype=np.float32) >= 0)
    np.testing.assert_array_equal(tampered(tamper, v), want)
    honest_rank = SimpleNamespace(ctx=ctx, cfg=cfg, adversaries=(0, 1))
    assert _SignBase._tamper(honest_rank) is None
