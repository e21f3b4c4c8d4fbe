"""Local optimizers and schedules against closed forms."""

import math

import numpy as np
import pytest

from mpiopt.optim import SGD, make_schedule


def test_schedules():
    const = make_schedule("constant", 0.1, 100)
    assert const(0) == const(99) == 0.1
    step = make_schedule("step", 1.0, 100, decay_every=10, gamma=0.5)
    assert step(9) == 1.0 and step(10) == 0.5 and step(25) == 0.25
    cos = make_schedule("cosine", 1.0, 100, min_lr=0.1)
    assert cos(0) == 1.0 and cos(50) == pytest.approx(0.55) and cos(100) == pytest.approx(0.1)
    warm = make_schedule("cosine", 1.0, 110, warmup_steps=10)
    assert [warm(i) for i in range(3)] == pytest.approx([0.1, 0.2, 0.3])
    assert warm(10) == 1.0 and warm(60) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        make_schedule("exp", 1.0, 10)


def test_inverse_power_schedule_is_svi_step_size():
    rho = make_schedule("inverse_power", 1.0, 100, tau0=10.0, kappa=0.7)
    assert rho(0) == pytest.approx(10 ** -0.7) and rho(90) == pytest.approx(100 ** -0.7)
    assert make_schedule("inverse_power", 0.5, 0, tau0=1.0, kappa=1.0)(3) == 0.5 / 4
    for tau0, kappa in ((10.0, 0.5), (10.0, 1.01), (0.0, 0.7)):
        with pytest.raises(ValueError, match="tau0 > 0 and kappa in"):
            make_schedule("inverse_power", 1.0, 10, tau0=tau0, kappa=kappa)


def reference(x, grads, lr, mu, nesterov, wd):
    m = np.zeros_like(x)
    for g in grads:
        d = g + wd * x
        m = mu * m + d
        x = x - lr * ((d + mu * m) if nesterov else m)
    return x


@pytest.mark.parametrize("mu,nesterov,wd", [(0.0, False, 0.0), (0.9, False, 0.0),
                                            (0.9, True, 1e-2), (0.5, False, 0.1)])
def test_sgd_matches_reference(mu, nesterov, wd):
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal(50)
    grads = [rng.standard_normal(50) for _ in range(5)]
    opt = SGD(mu, nesterov, wd)
    x = x0.copy()
    state = opt.init(x)
    for g in grads:
        opt.apply(x, g.copy(), state, 0.1)
    np.testing.assert_allclose(x, reference(x0, grads, 0.1, mu, nesterov, wd), rtol=1e-12)


def test_sgd_allocates_its_buffers_once():
    x = np.ones(10, np.float32)
    opt = SGD(0.9)
    state = opt.init(x)
    buffers = (id(state.momentum), id(state.scratch))
    for _ in range(3):
        state = opt.apply(x, np.ones(10, np.float32), state, 0.1)
    assert (id(state.momentum), id(state.scratch)) == buffers
    assert x.dtype == np.float32 and math.isfinite(float(x[0]))
