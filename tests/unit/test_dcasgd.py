"""DC-ASGD's server rule against a numpy oracle of the publication's formulas, and its keys."""

import sys
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import SCRIPTS

from mpiopt.config import build_section
from mpiopt.errors import ConfigError

sys.path.insert(0, str(SCRIPTS))
from oracles import dcasgd_step as oracle  # noqa: E402  (shared with check_dcasgd.py)

F32 = np.float32


def requests():
    """Stand in for a transport's set of persistent operations: the rule needs none."""
    return SimpleNamespace(recv=lambda *a: None, send=lambda *a: None, start_all=lambda: None)


def server(d=64, workers=2, seed=0, **keys):
    """Return DC-ASGD's server object (rank 0 of 1 + ``workers``), its model random."""
    from mpiopt.algorithms.dcasgd import DCASGDConfig

    x0 = np.random.default_rng(seed).standard_normal(d).astype(F32)
    cfg = build_section(DCASGDConfig, keys, "algorithm")
    ctx = SimpleNamespace(xp=np, rank=0, role="server", roles=("server",) + ("worker",) * workers,
                          init_rng=None, problem=SimpleNamespace(init=lambda rng: x0.copy()),
                          transport=SimpleNamespace(requests=requests))
    alg = cfg.build(ctx)
    alg.setup()
    return alg


def vectors(d, seed, n=3):
    """Random float32 vectors of mixed scales, with some exact zeros in every one."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        v = (rng.standard_normal(d) * 10.0 ** rng.integers(-3, 2, d)).astype(F32)
        v[rng.integers(0, d, d // 8)] = 0.0
        out.append(v)
    return out


def same_bits(a, b):
    return a.dtype == b.dtype == F32 and np.array_equal(a.view(np.uint32), b.view(np.uint32))


def test_every_worker_starts_from_the_initial_model():
    alg = server(workers=3)
    assert all(np.array_equal(b, alg.x) for b in alg.outbox)


@pytest.mark.parametrize("adaptive", [False, True])
def test_one_update_equals_the_oracle_bit_for_bit(adaptive):
    alg = server(adaptive=adaptive, lr=0.05)
    lam = 2.0 if adaptive else 0.04  # the publication's defaults
    assert alg.lam == lam
    w, g, b = vectors(alg.d, seed=1)
    ms0 = vectors(alg.d, seed=2, n=1)[0] ** 2 if adaptive else None
    if adaptive:
        alg.mean_square[...] = ms0
    alg.outbox[1][...] = b
    want, c, ms = oracle(w, g, b, 0.05, lam, ms0)
    got = w.copy()
    alg.apply(got, g.copy(), 1, 3, 0.05)
    assert same_bits(got, want)
    assert np.mean(c[g != 0] != g[g != 0]) > 0.5  # the compensation changed most of g
    if adaptive:
        assert same_bits(alg.mean_square, ms)
    # The float32 rule is the formula, not only the same operations: float64 agrees.
    w64, _, _ = oracle(*(v.astype(np.float64) for v in (w, g, b)), 0.05, lam,
                       None if ms0 is None else ms0.astype(np.float64))
    np.testing.assert_allclose(got, w64, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("adaptive, momentum", [(False, 0.0), (True, 0.0), (False, 0.9),
                                                (True, 0.9)])
def test_a_sequence_of_pushes_from_two_workers(adaptive, momentum):
    # Workers 0 and 1 alternate with staleness 1: each gradient was computed at the model the
    # server sent that worker, one update before the model it is applied to. The server keeps
    # one mean square over all pushes and one momentum buffer per worker.
    alg = server(d=200, adaptive=adaptive, momentum=momentum, lam=0.5, mean_square_decay=0.9)
    w = alg.x.copy()
    sent = [w.copy(), w.copy()]
    ms = np.zeros_like(w) if adaptive else None
    velocity = [np.zeros_like(w), np.zeros_like(w)]
    for t in range(8):
        k = t % 2
        g = vectors(alg.d, seed=10 + t, n=1)[0]
        w_new, c, ms = oracle(w, g, sent[k], 0.1, 0.5, ms, decay=0.9)
        if momentum:
            velocity[k] = momentum * velocity[k] + c
            w_new = w - 0.1 * velocity[k]
        alg.apply(alg.x, g, k, 1, 0.1)
        assert same_bits(alg.x, w_new), t
        w = w_new
        alg.outbox[k][...] = sent[k] = w.copy()  # the engine's answer to worker k


@pytest.mark.parametrize("adaptive", [False, True])
def test_out_of_place_into_the_backup_equals_in_place(adaptive):
    # With one server the engine has the rule write the new model into the worker's answer
    # buffer, which holds that worker's backup: it must be read before it is overwritten.
    alg = server(adaptive=adaptive, lr=0.05)
    w, g, b = vectors(alg.d, seed=4)
    in_place = w.copy()
    alg.outbox[1][...] = b
    alg.apply(in_place, g.copy(), 1, 2, 0.05)
    other = server(adaptive=adaptive, lr=0.05)
    other.outbox[1][...] = b
    got = w.copy()
    other.apply(got, g.copy(), 1, 2, 0.05, out=other.outbox[1])
    assert same_bits(other.outbox[1], in_place) and np.array_equal(got, w)


def test_lam_zero_is_asgd():
    alg = server(lam=0.0, adaptive=True)
    w, g, b = vectors(alg.d, seed=3)
    alg.outbox[0][...] = b
    got = w.copy()
    alg.apply(got, g.copy(), 0, 5, 0.05)
    assert np.array_equal(got, w - 0.05 * g)


@pytest.mark.parametrize("keys, key, message", [
    ({"lam": -0.1}, "lam", "must be in [0, inf), got -0.1"),
    ({"mean_square_decay": 1.0}, "mean_square_decay", "must be in [0, 1), got 1.0"),
    ({"mean_square_decay": -0.5}, "mean_square_decay", "must be in [0, 1), got -0.5"),
    ({"momentum": 0.9, "nesterov": True}, "nesterov",
     "dcasgd keeps heavy-ball momentum per worker; valid: false"),
])
def test_bad_keys_name_the_key(keys, key, message):
    from mpiopt.algorithms.dcasgd import DCASGDConfig

    with pytest.raises(ConfigError) as exc:
        build_section(DCASGDConfig, keys, "algorithm")
    assert str(exc.value) == f"algorithm.{key}: {message}"
