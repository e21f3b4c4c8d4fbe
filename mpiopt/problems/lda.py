"""Latent Dirichlet allocation by stochastic variational inference (Hoffman et al., 2013).

The parameter vector is the global variational parameter ``lambda`` of the topics: ``K x V``
float32, row-major (topic ``k``'s pseudo-counts of every word are ``x[k*V:(k+1)*V]``),
initialised from Gamma(100, 1/100) as in Hoffman et al.'s code. ``gradient`` draws a minibatch
``B`` of the rank's documents, runs the E-step of every document with the topics fixed
(:func:`mpiopt.kernels.lda_estep`, ``exp(E[log beta])`` computed once per minibatch for its
words), forms

    lambda_hat = eta + (D / |B|) * sum_{d in B} sum_n phi_dn w_dn^T

with ``D`` the number of training documents of the whole corpus (all ranks), and writes the
direction ``lambda - lambda_hat``. A step ``x <- x - rho_t * direction`` is then exactly the SVI
update ``lambda <- (1 - rho_t) lambda + rho_t lambda_hat``; with ``schedule: inverse_power``
(``rho_t = lr (tau0 + t)^-kappa``, ``lr = 1``) any algorithm runs SVI, and ``allreduce``
averages the directions of its ranks, which is SVI on the union of their minibatches.

The minibatch ``loss`` is the per-word negative log-likelihood of the minibatch's words, each
document's mixture taken at its fitted ``E[theta_d]`` and the topics at ``E[beta]`` (``lambda``
with rows normalised): cheap, but optimistic, as the mixtures were fitted to the same words.
``evaluate`` gives the held-out document-completion perplexity (:func:`completion_perplexity`)
and its log as ``loss``.

Entries of ``lambda`` below :data:`FLOOR` (asynchronous updates applied to stale copies can
push a few below zero) are read as ``FLOOR`` in the E-step, and as 0 when evaluating.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from mpiopt import kernels
from mpiopt.config import param
from mpiopt.errors import ConfigError
from mpiopt.problems import PROBLEMS
from mpiopt.problems.base import EpochBatches, Problem, ProblemConfig

FLOOR = 1e-30
INIT_SHAPE = 100.0  # Gamma(shape, 1/shape) initial values: mean 1, a little noise
BOW_DATA = "bow, news, reuters or synthetic_lda"


def corpus_arrays(docs):
    """Return ``(indptr, ids, counts, n_words)`` of a bag-of-words corpus.

    Takes an :class:`mpiopt.data.bow.BowCorpus` (or anything with ``indptr``, ``ids``,
    ``counts`` and ``shape``), a scipy CSR matrix (``indptr``, ``indices``, ``data``) or a
    dense (documents, words) array of counts.
    """
    if hasattr(docs, "ids"):
        return docs.indptr, docs.ids, docs.counts, int(docs.shape[1])
    if hasattr(docs, "indices"):
        return docs.indptr, docs.indices, docs.data, int(docs.shape[1])
    dense = np.asarray(docs)
    if dense.ndim != 2:
        raise ValueError(f"docs must be a corpus or a (documents, words) matrix, got shape "
                         f"{dense.shape}")
    rows, ids = np.nonzero(dense)
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=len(dense)))])
    return indptr, ids, dense[rows, ids], dense.shape[1]


def gather_rows(indptr, ids, counts, rows):
    """Return the CSR arrays of the documents ``rows``, in that order."""
    starts, sizes = indptr[rows], indptr[rows + 1] - indptr[rows]
    out = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(sizes, out=out[1:])
    take = np.repeat(starts - out[:-1], sizes) + np.arange(out[-1])
    return out, ids[take], counts[take]


def _csr_of_tokens(doc_of, words, n_docs: int, n_words: int):
    """Return the CSR arrays counting the tokens ``words`` of the documents ``doc_of``."""
    pairs, counts = np.unique(doc_of * n_words + words, return_counts=True)
    indptr = np.zeros(n_docs + 1, dtype=np.int64)
    np.cumsum(np.bincount(pairs // n_words, minlength=n_docs), out=indptr[1:])
    return indptr, pairs % n_words, counts.astype(np.float64)


def split_halves(docs, seed: int = 0):
    """Split each document's words at random into a fitted and a scored half.

    Every token of a document (a word occurring ``c`` times is ``c`` tokens) gets a key from
    ``numpy.random.default_rng(seed).random``, in document order; a document's tokens sorted
    by key, the first ``floor(n/2)`` are fitted, the rest scored. Documents with fewer than two
    tokens are left out. The split depends only on the documents and the seed, never on the
    topics, so every model is scored on the same words.

    Returns:
        ``(fitted, scored)``: two CSR triples ``(indptr, ids, counts)`` over the same
        documents.
    """
    indptr, ids, counts, n_words = corpus_arrays(docs)
    counts = np.asarray(counts, dtype=np.int64)
    total = np.concatenate([[0], np.cumsum(counts)])
    lengths = total[np.asarray(indptr[1:])] - total[np.asarray(indptr[:-1])]
    tokens = np.repeat(np.asarray(ids, dtype=np.int64), counts)
    doc_of = np.repeat(np.arange(len(lengths)), lengths)
    key = np.random.default_rng(seed).random(tokens.size)
    order = np.lexsort((key, doc_of))
    tokens = tokens[order]  # still grouped by document, shuffled within each
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    fitted = (np.arange(tokens.size) - starts[doc_of]) < (lengths // 2)[doc_of]
    kept = lengths >= 2
    new_row = np.cumsum(kept) - 1
    n_kept = int(kept.sum())
    valid = kept[doc_of]
    return tuple(_csr_of_tokens(new_row[doc_of[m & valid]], tokens[m & valid], n_kept, n_words)
                 for m in (fitted, ~fitted))


def topic_matrix(topic_word) -> np.ndarray:
    """Return the topics as word-major probabilities: float64 ``(words, topics)``."""
    tw = np.asarray(topic_word, dtype=np.float64)
    if tw.ndim != 2 or not np.all(np.isfinite(tw)) or tw.min() < 0:
        raise ValueError("topic_word must be a finite, non-negative (topics, words) matrix")
    sums = tw.sum(axis=1, keepdims=True)
    if np.any(sums <= 0):
        raise ValueError("every topic of topic_word needs a positive total")
    return np.ascontiguousarray((tw / sums).T)


def halves_perplexity(beta, fitted, scored, alpha: float, max_iter: int = 100,
                      tol: float = 1e-3) -> float:
    """Return the perplexity of ``scored`` under mixtures fitted on ``fitted`` (see below)."""
    gamma = np.ones((len(fitted[0]) - 1, beta.shape[1]))
    kernels.lda_estep(*fitted, beta, alpha, gamma, max_iter, tol)
    theta = gamma / gamma.sum(axis=1, keepdims=True)
    n_scored = float(np.sum(scored[2]))
    return math.exp(-kernels.lda_loglik(*scored, theta, beta) / n_scored)


def completion_perplexity(topic_word, docs, alpha: float, seed: int = 0, max_iter: int = 100,
                          tol: float = 1e-3) -> float:
    """Return the held-out document-completion perplexity of topics on ``docs``.

    The topics are fixed at ``topic_word`` with every row normalised to sum to 1 (mpiopt's
    ``lambda``, or the ``components_`` of scikit-learn or gensim's topics, unnormalised or
    not). Each document's words are split in two (:func:`split_halves`, ``seed``); its topic
    mixture is fitted on the first half by the variational E-step (``gamma`` from 1, the
    Dirichlet prior ``alpha``, at most ``max_iter`` updates until the mean absolute change is
    below ``tol``) and taken at its mean ``theta = gamma / sum(gamma)``; each word ``w`` of the
    second half is scored by ``p(w) = sum_k theta_k beta_kw``. The perplexity is
    ``exp(-sum log p(w) / number of scored words)``: lower is better; topics that know nothing
    (uniform) score the vocabulary size.

    Args:
        topic_word: (topics, words) non-negative weights.
        docs: the held-out documents (see :func:`corpus_arrays`), over the same words.
        alpha: the symmetric Dirichlet prior of the topic mixtures (``1/K`` is common).
        seed: the seed of the split.
        max_iter, tol: the E-step's stopping rule.
    """
    beta = topic_matrix(topic_word)
    if corpus_arrays(docs)[3] != beta.shape[0]:
        raise ValueError(f"docs have {corpus_arrays(docs)[3]} words, topic_word "
                         f"{beta.shape[0]}")
    fitted, scored = split_halves(docs, seed)
    if len(fitted[0]) < 2:
        raise ValueError("no document has two words to split")
    return halves_perplexity(beta, fitted, scored, alpha, max_iter, tol)


class LdaProblem(EpochBatches, Problem):
    """SVI for LDA on one rank's documents (see the module docstring).

    Args:
        shard: the rank's shard of a bag-of-words data set (``x_train``, ``x_test``: corpora;
            ``n_train_total``: the corpus size ``D``).
        n_topics: ``K``.
        alpha, eta: the Dirichlet priors of the topic mixtures and of the topics.
        batch_size: documents per minibatch.
        max_iter, tol: the E-step's stopping rule.
        eval_seed: the seed of the held-out split of words.
    """

    WARM_CALLS = 2  # the kernels load on the first; a direction costs milliseconds

    def __init__(self, shard, n_topics: int, alpha: float, eta: float, batch_size: int,
                 max_iter: int = 100, tol: float = 1e-3, eval_seed: int = 0):
        self.train = corpus_arrays(shard.x_train)[:3]
        self.n_words = int(shard.x_train.shape[1])
        self.n_topics, self.alpha, self.eta = n_topics, alpha, eta
        self.dim = n_topics * self.n_words
        self.n_train = len(self.train[0]) - 1
        self.n_total = int(shard.n_train_total)
        self.batch_size, self.max_iter, self.tol = batch_size, max_iter, tol
        self.test, self.eval_seed = shard.x_test, eval_seed
        # The evaluation's split of the test documents' words, made once (where the test set is).
        self._halves = None if self.test is None else split_halves(self.test, eval_seed)
        if self._halves is not None and len(self._halves[0][0]) < 2:
            raise ConfigError("no test document has two words to split into a fitted and a "
                              "scored half", key="data.name")
        self._reset_batches()

    def init(self, rng):
        """Draw ``lambda`` from Gamma(100, 1/100) (mean 1), as Hoffman et al. do."""
        return rng.gamma(INIT_SHAPE, 1.0 / INIT_SHAPE, self.dim).astype(np.float32)

    def _batch(self, rng) -> np.ndarray:
        """Return the next minibatch of documents (:class:`EpochBatches`)."""
        return self._next_indices(rng)

    def expected_topics(self, x, words: np.ndarray):
        """Return ``exp(E[log beta])`` and ``E[beta]`` of ``words``, float64 ``(words, K)``."""
        lam = x.reshape(self.n_topics, self.n_words)
        totals = np.maximum(lam.sum(axis=1, dtype=np.float64), FLOOR)
        sub = np.maximum(np.ascontiguousarray(lam[:, words].T, dtype=np.float64), FLOOR)
        elog = kernels.digamma(sub)
        elog -= kernels.digamma(totals)
        return np.exp(elog), sub / totals

    def gradient(self, x, rng, out) -> dict:
        """Write ``lambda - lambda_hat`` of a minibatch into ``out``; return its loss."""
        indptr, ids, counts = gather_rows(*self.train, self._batch(rng))
        words, local = np.unique(ids, return_inverse=True)
        eb, beta = self.expected_topics(x, words)
        n_docs = len(indptr) - 1
        gamma = rng.gamma(INIT_SHAPE, 1.0 / INIT_SHAPE, (n_docs, self.n_topics))
        stats = np.empty_like(eb)
        updates = kernels.lda_estep(indptr, local, counts, eb, self.alpha, gamma,
                                    self.max_iter, self.tol, stats)
        np.subtract(x, np.float32(self.eta), out=out)
        stats *= eb
        stats *= self.n_total / n_docs
        out.reshape(self.n_topics, self.n_words)[:, words] -= stats.T
        theta = gamma / gamma.sum(axis=1, keepdims=True)
        loglik = kernels.lda_loglik(indptr, local, counts, theta, beta)
        return {"loss": -loglik / float(counts.sum()), "estep_updates": updates / n_docs}

    def evaluate(self, x) -> dict:
        """Return the completion ``perplexity`` of the test documents and its log (``loss``)."""
        if self._halves is None:
            raise RuntimeError("evaluate() needs the test set: load the shard with_test=True")
        lam = np.maximum(x.reshape(self.n_topics, self.n_words), 0.0)
        ppl = halves_perplexity(topic_matrix(lam), *self._halves, self.alpha, self.max_iter,
                                self.tol)
        return {"loss": math.log(ppl), "perplexity": ppl}


@PROBLEMS.register("lda")
@dataclass(frozen=True)
class LdaConfig(ProblemConfig):
    """Latent Dirichlet allocation by stochastic variational inference (topics: K x V)."""

    HOST_ONLY = True  # numpy and numba kernels only
    HEADLINE = "perplexity"

    n_topics: int = param(10, "Number of topics K (the parameters are K x vocabulary size).",
                          low=1)
    alpha: float | None = param(None, "Dirichlet prior of each document's topic mixture; "
                                "null: 1/n_topics.", low=0, low_open=True)
    eta: float | None = param(None, "Dirichlet prior of each topic's word distribution; "
                              "null: 1/n_topics.", low=0, low_open=True)
    iterations: int = param(100, "Most E-step updates of a document's topic mixture (in "
                            "training and in evaluation).", low=1)
    tolerance: float = param(1e-3, "The E-step of a document stops once the mean absolute "
                             "change of its variational Dirichlet parameters is below this.",
                             low=0)
    eval_seed: int = param(0, "Seed of the random split of each test document's words into "
                           "the half its mixture is fitted on and the half that is scored.",
                           low=0)

    def build(self, shard, batch_size: int, xp=np) -> LdaProblem:
        if xp is not np:
            raise ConfigError("problem lda runs on host memory; valid: cpu", key="run.device")
        if not hasattr(shard.x_train, "indptr"):
            raise ConfigError(f"problem lda needs a bag-of-words data set ({BOW_DATA})",
                              key="data.name")
        k = self.n_topics
        return LdaProblem(shard, k, self.alpha or 1.0 / k, self.eta or 1.0 / k, batch_size,
                          self.iterations, self.tolerance, self.eval_seed)
