"""Dense problems: shapes, float32, and gradients against finite differences."""

import numpy as np
import pytest

from mpiopt.data.base import Shard
from mpiopt.problems.dense import DenseNet


def make_shard(n=64, features=5, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, features)).astype(np.float32)
    y = rng.integers(0, classes, n)
    return Shard(x, y, np.arange(n), classes, n, x[:20], y[:20])


def full_batch_loss(problem, x):
    logits, _ = problem.forward(x, problem.x_train)
    loss, _ = problem._loss_and_delta(logits, problem.y_train)
    return float(loss)


@pytest.mark.parametrize("hidden", [(), (7,), (6, 4)])
def test_gradient_matches_finite_differences(hidden):
    shard = make_shard()
    problem = DenseNet(shard, hidden, batch_size=shard.x_train.shape[0], dtype=np.float64)
    rng = np.random.default_rng(1)
    x = problem.init(rng) + 0.01 * rng.standard_normal(problem.dim)
    g = np.empty_like(x)
    problem.gradient(x, rng, g)  # batch = whole shard: the full gradient
    eps = 1e-6
    for i in rng.choice(problem.dim, size=min(40, problem.dim), replace=False):
        e = np.zeros_like(x)
        e[i] = eps
        numeric = (full_batch_loss(problem, x + e) - full_batch_loss(problem, x - e)) / (2 * eps)
        assert g[i] == pytest.approx(numeric, rel=1e-5, abs=1e-8)


def test_float32_throughout_and_dim():
    shard = make_shard()
    problem = DenseNet(shard, (8,), batch_size=16)
    assert problem.dim == 5 * 8 + 8 + 8 * 3 + 3
    x = problem.init(np.random.default_rng(0))
    assert x.dtype == np.float32
    g = np.empty_like(x)
    metrics = problem.gradient(x, np.random.default_rng(0), g)
    assert g.dtype == np.float32 and np.isfinite(metrics["loss"])
    ev = problem.evaluate(x)
    assert 0.0 <= ev["accuracy"] <= 1.0 and ev["loss"] > 0


def test_minibatches_cover_an_epoch():
    shard = make_shard(n=40)
    problem = DenseNet(shard, (), batch_size=10)
    rng = np.random.default_rng(0)
    seen = np.concatenate([problem._batch(rng) for _ in range(4)])
    assert sorted(seen.tolist()) == list(range(40))


def test_training_lowers_the_loss():
    shard = make_shard(n=200)
    problem = DenseNet(shard, (16,), batch_size=200)
    rng = np.random.default_rng(0)
    x = problem.init(rng)
    g = np.empty_like(x)
    first = problem.gradient(x, rng, g)["loss"]
    for _ in range(100):
        problem.gradient(x, rng, g)
        x -= 0.5 * g
    assert problem.gradient(x, rng, g)["loss"] < 0.7 * first


def test_evaluate_needs_the_test_set():
    shard = make_shard()
    shard.x_test = shard.y_test = None
    problem = DenseNet(shard, (), batch_size=4)
    with pytest.raises(RuntimeError, match="with_test"):
        problem.evaluate(problem.init(np.random.default_rng(0)))
