"""LDA by SVI: the E-step kernels against their reference, the evaluator, the SVI direction."""

import math

import numpy as np
import pytest

from mpiopt import kernels as K
from mpiopt.data.base import Shard
from mpiopt.data.bow import BowCorpus
from mpiopt.errors import ConfigError
from mpiopt.optim import make_schedule
from mpiopt.problems.lda import (
    LdaProblem,
    completion_perplexity,
    split_halves,
)
from mpiopt.schema import config_from_dict


def random_corpus(docs, words, mean_len, seed=0):
    """Return a random CSR corpus: distinct sorted word ids per document, counts 1..4."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(0, 2 * mean_len, docs)
    sizes[0] = 0  # an empty document
    ids = np.concatenate([np.sort(rng.choice(words, s, replace=False)) for s in sizes])
    indptr = np.concatenate([[0], np.cumsum(sizes)])
    return indptr, ids, rng.integers(1, 5, ids.size)


def lda_config(data, **problem):
    return config_from_dict({"problem": {"name": "lda", **problem}, "data": data,
                             "algorithm": {"name": "allreduce"}})


SYNTHETIC = {"name": "synthetic_lda", "n_topics": 5, "vocab_size": 100, "n_docs": 1000,
             "n_test": 100, "batch_size": 64}


# --------------------------------------------------------------------------- kernels


def test_digamma_known_values():
    x = np.array([1.0, 0.5, 10.0, 1e-3, 123.4])
    euler = 0.5772156649015329
    want = [-euler, -euler - 2 * math.log(2), 2.251752589066721, -1000.5755719318103,
            4.8113737751162775]  # scipy.special.digamma's values
    for backend in ("numpy", "numba"):
        got = K.digamma(x, backend=backend)
        assert got == pytest.approx(want, rel=1e-11, abs=1e-11)
        assert K.digamma(x + 1, backend=backend) == pytest.approx(got + 1 / x, rel=1e-12)


@pytest.mark.parametrize("parallel", [False, True], ids=["one thread", "threads"])
@pytest.mark.parametrize("tol", [0.0, 1e-3])
def test_estep_and_loglik_match_the_reference(monkeypatch, parallel, tol):
    if parallel:  # split even this small call over the threads
        monkeypatch.setattr("mpiopt.kernels._cpu_lda.PARALLEL_WORK", 0)
    indptr, ids, counts = random_corpus(40, 300, 15)
    rng = np.random.default_rng(1)
    eb = rng.uniform(1e-3, 0.1, (300, 7))
    gamma0 = rng.gamma(100.0, 0.01, (40, 7))
    out = {}
    for backend in ("numpy", "numba"):
        gamma, stats = gamma0.copy(), np.full((300, 7), np.nan)
        updates = K.lda_estep(indptr, ids, counts, eb, 0.1, gamma, 20, tol, stats,
                              backend=backend)
        theta = gamma / gamma.sum(axis=1, keepdims=True)
        loglik = K.lda_loglik(indptr, ids, counts, theta, eb / eb.sum(axis=0), backend=backend)
        out[backend] = updates, gamma, stats, loglik
    (u0, g0, s0, l0), (u1, g1, s1, l1) = out["numpy"], out["numba"]
    busy = np.count_nonzero(np.diff(indptr))  # empty documents take no update
    assert u0 == u1 and (u0 < 20 * busy if tol else u0 == 20 * busy)
    np.testing.assert_allclose(g1, g0, rtol=1e-9)
    np.testing.assert_allclose(s1, s0, rtol=1e-9, atol=1e-300)
    assert l1 == pytest.approx(l0, rel=1e-12)
    assert np.all(g1[0] == 0.1)  # an empty document keeps the prior
    unused = np.setdiff1d(np.arange(300), ids)
    assert np.all(s1[unused] == 0) and np.all(s1[ids] > 0)


def test_estep_checks_its_input():
    indptr, ids, counts = np.array([0, 2]), np.array([0, 5]), np.array([1, 1])
    eb, gamma = np.ones((5, 3)), np.ones((1, 3))
    with pytest.raises(ValueError, match=r"word ids must be in \[0, 5\)"):
        K.lda_estep(indptr, ids, counts, eb, 0.1, gamma, 10, 0.0)
    with pytest.raises(ValueError, match="gamma must be a C-contiguous float64 matrix"):
        K.lda_estep(indptr, [0, 4], counts, eb, 0.1, gamma.astype(np.float32), 10, 0.0)
    with pytest.raises(ValueError, match="CSR"):
        K.lda_estep([0, 3], [0, 4], counts, eb, 0.1, gamma, 10, 0.0)


# --------------------------------------------------------------------------- evaluator


def test_split_halves_keeps_every_word_once():
    docs = BowCorpus.from_dense(np.array([[3, 0, 2, 0], [0, 1, 0, 0], [1, 1, 1, 1]]))
    fitted, scored = split_halves(docs, seed=5)
    assert len(fitted[0]) == len(scored[0]) == 3  # the one-word document is left out
    dense = np.zeros((2, 2, 4))
    for half, (indptr, ids, counts) in enumerate((fitted, scored)):
        for d in range(2):
            dense[half, d, ids[indptr[d]:indptr[d + 1]]] = counts[indptr[d]:indptr[d + 1]]
    assert np.array_equal(dense.sum(axis=0), [[3, 0, 2, 0], [1, 1, 1, 1]])
    assert dense[0].sum(axis=1).tolist() == [2, 2]  # floor(n / 2) fitted, the rest scored
    again = split_halves(docs, seed=5)
    assert all(np.array_equal(a, b) for a, b in zip(fitted + scored, again[0] + again[1]))


def test_perplexity_by_hand():
    # One topic: p(w) = beta_w whatever the fit. Document 0 is word 0 four times (2 scored),
    # document 1 word 1 twice (1 scored): exp(-(2 log 1/2 + log 1/4) / 3) = 2 ** (4/3).
    docs = np.array([[4, 0, 0], [0, 2, 0]])
    assert completion_perplexity([[2.0, 1.0, 1.0]], docs, alpha=0.3) == pytest.approx(
        2 ** (4 / 3), rel=1e-12)
    # Two topics on disjoint words: fitting 2 tokens of word 0 gives gamma = (alpha + 2,
    # alpha), so each scored word 0 has p = (alpha + 2) / (2 alpha + 2) = 2.5 / 3.
    two = completion_perplexity([[1.0, 0.0], [0.0, 1.0]], [[4, 0]], alpha=0.5)
    assert two == pytest.approx(3 / 2.5, rel=1e-9)


def test_true_topics_score_better_than_random_ones():
    cfg = lda_config(SYNTHETIC)
    source = cfg.data.open(0)
    test = source.test()[0]
    true = completion_perplexity(source.topics, test, alpha=0.2)
    rng = np.random.default_rng(0)
    random = completion_perplexity(rng.dirichlet(np.ones(100), 5), test, alpha=0.2)
    uniform = completion_perplexity(np.ones((5, 100)), test, alpha=0.2)
    assert true < 0.5 * min(random, uniform)
    assert uniform == pytest.approx(100.0, rel=1e-12)  # knowing nothing scores the vocabulary


# --------------------------------------------------------------------------- the problem


def test_direction_is_lambda_minus_lambda_hat():
    """A full-batch step with rho = 1 lands on lambda_hat = eta + (D/|B|) * expected counts."""
    cfg = lda_config({**SYNTHETIC, "n_docs": 200, "batch_size": 50}, n_topics=4)
    shard = cfg.data.load(0, 2, 0, with_test=False)  # rank 0 of 2: 100 documents, D = 200
    problem = cfg.problem.build(shard, 100, np)
    assert (problem.alpha, problem.eta, problem.n_total) == (0.25, 0.25, 200)
    x = problem.init(np.random.default_rng(0))
    g = np.empty_like(x)
    metrics = problem.gradient(x, np.random.default_rng(1), g)
    lam_hat = (x - g).astype(np.float64).reshape(4, 100)
    assert lam_hat.min() >= 0.25 * (1 - 1e-6)  # eta plus non-negative expected counts
    # Each word's expected topic counts add up to its count, scaled by D / |B| = 2.
    counts = shard.x_train.dense().sum(axis=0)
    np.testing.assert_allclose(lam_hat.sum(axis=0) - 4 * 0.25, 2 * counts, rtol=1e-4,
                               atol=1e-3)
    assert 0 < metrics["loss"] < math.log(100) + 1 and metrics["estep_updates"] >= 1


def test_svi_recovers_the_true_topics():
    cfg = lda_config(SYNTHETIC, n_topics=5)
    truth = cfg.data.open(0).topics
    problem = cfg.problem.build(cfg.data.load(0, 1, 0, with_test=True), 64, np)
    rng = np.random.default_rng(1)
    x = problem.init(rng)
    g = np.empty_like(x)
    rho = make_schedule("inverse_power", 1.0, 0, tau0=1.0, kappa=0.7)
    before = problem.evaluate(x)["perplexity"]
    for step in range(80):
        problem.gradient(x, rng, g)
        x -= rho(step) * g
    topics = x.reshape(5, 100) / x.reshape(5, 100).sum(axis=1, keepdims=True)
    hellinger = np.sqrt(0.5 * ((np.sqrt(truth)[:, None] - np.sqrt(topics)[None]) ** 2).sum(-1))
    assert hellinger.min(axis=1).max() < 0.2  # every true topic has a close learned one
    assert sorted(hellinger.argmin(axis=1)) == list(range(5))  # ... and a different one
    after = problem.evaluate(x)
    true_ppl = completion_perplexity(truth, problem.test, problem.alpha)
    assert after["perplexity"] < min(before / 3, 1.1 * true_ppl)
    assert after["loss"] == pytest.approx(math.log(after["perplexity"]))


def test_lda_needs_bag_of_words_and_host_memory():
    digits = lda_config({"name": "digits"})
    with pytest.raises(ConfigError, match=r"^data.name: problem lda needs a bag-of-words"):
        digits.problem.build(digits.data.load(0, 1, 0, False), 32, np)
    cfg = lda_config(SYNTHETIC)
    shard = cfg.data.load(0, 1, 0, False)
    with pytest.raises(ConfigError, match=r"^run.device: problem lda runs on host memory"):
        cfg.problem.build(shard, 32, xp=object())
    softmax = config_from_dict({"problem": {"name": "softmax"}, "data": SYNTHETIC,
                                "algorithm": {"name": "allreduce"}})
    with pytest.raises(ConfigError, match=r"^data.name: is a bag-of-words corpus"):
        softmax.problem.build(shard, 32, np)


def test_problem_keys_are_checked():
    with pytest.raises(ConfigError, match=r"^problem.alpha: must be in \(0, inf\)"):
        lda_config(SYNTHETIC, alpha=0)
    with pytest.raises(ConfigError, match=r"^algorithm.kappa: must be in \(0.5, 1\], got 0.5"):
        config_from_dict({"problem": {"name": "lda"}, "data": SYNTHETIC,
                          "algorithm": {"name": "allreduce", "kappa": 0.5}})


def test_a_problem_without_test_set_cannot_evaluate():
    cfg = lda_config(SYNTHETIC)
    shard = cfg.data.load(0, 1, 0, with_test=False)
    problem = LdaProblem(shard, 3, 0.1, 0.1, 16)
    assert isinstance(shard, Shard) and problem.dim == 300
    with pytest.raises(RuntimeError, match="needs the test set"):
        problem.evaluate(problem.init(np.random.default_rng(0)))


def test_test_documents_too_short_to_split_are_a_config_error():
    train = BowCorpus.from_dense(np.array([[1, 2], [2, 0]]))
    test = BowCorpus.from_dense(np.array([[1, 0], [0, 1]]))  # one word each
    shard = Shard(train, np.zeros(2, int), np.arange(2), 1, 2, test, np.zeros(2, int))
    with pytest.raises(ConfigError, match=r"^data.name: no test document has two words"):
        LdaProblem(shard, 2, 0.5, 0.5, 1)
