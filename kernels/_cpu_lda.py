"""Numba kernels of LDA's variational E-step and of the word log-likelihood.

Documents are rows of a CSR matrix (``indptr``, word ``ids``, ``counts``). The work is cut
into one contiguous span of documents per thread, the spans holding near-equal numbers of
distinct words (:func:`_doc_spans`), so that the split, and with it the order of every sum,
depends only on the input and the thread count. Each thread accumulates its own sufficient
statistics; they are added in thread order after the parallel loop. Calls with less work than
:data:`PARALLEL_WORK` run on the calling thread alone.

The hot loop is one pass over a document's words per update of ``gamma_d``: for each word the
normaliser ``t . b_n`` and the accumulation of ``c_n b_n / (t . b_n)`` share the row ``b_n``
(``exp_elog_beta`` is word-major, ``(words, topics)``, so the row is contiguous, and the
document's rows are copied together once before its updates). The two inner loops over topics
vectorise; the dot product only because its additions may be reassociated (:data:`_DOT`).
"""

from __future__ import annotations

import math

import numba
import numpy as np
from numba import njit, prange

from ._cpu_base import _PAR, _SER
from .reference import ESTEP_FLOOR

__all__ = ["digamma", "lda_estep", "lda_loglik"]

# (Document, word) pairs x topics of a call below which one thread does it all. A parallel region
# costs tens of microseconds on idle cores but can cost milliseconds when the cores are shared
# (a thread that is not scheduled holds up the others), more than such a call computes.
PARALLEL_WORK = 1 << 18

# The dot products over topics may be reassociated (and multiply-adds fused), so that LLVM
# vectorises them; no other fast-math licence (NaN and infinities keep their meaning).
_DOT = dict(_SER, fastmath={"reassoc", "contract"})


@njit(**_SER)
def _digamma(x):
    """Return psi(x) for x > 0 (recurrence up to 6, then the asymptotic series)."""
    r = 0.0
    while x < 6.0:
        r -= 1.0 / x
        x += 1.0
    f = 1.0 / (x * x)
    tail = f * (-1.0 / 12 + f * (1.0 / 120 + f * (-1.0 / 252 + f * (1.0 / 240 + f * (-1.0 / 132)))))
    return r + math.log(x) - 0.5 / x + tail


@njit(**_SER)
def _exp_elog_theta(g, t):
    """Write ``exp(psi(g_k) - psi(sum g))`` into ``t``."""
    s = 0.0
    for k in range(g.size):
        s += g[k]
    ps = _digamma(s)
    for k in range(g.size):
        t[k] = math.exp(_digamma(g[k]) - ps)


@njit(**_DOT)
def _fit_doc(rows, c, alpha, g, max_iter, tol, t, acc):
    """Update one document's ``g`` in place until it settles; return the updates made.

    ``rows[n]`` is the row of ``exp_elog_beta`` of the document's word ``n``.
    """
    nk = g.size
    _exp_elog_theta(g, t)
    done = 0
    for _ in range(max_iter):
        for k in range(nk):
            acc[k] = 0.0
        for n in range(rows.shape[0]):
            row = rows[n]
            s = 0.0
            for k in range(nk):
                s += t[k] * row[k]
            r = c[n] / (s + ESTEP_FLOOR)
            for k in range(nk):
                acc[k] += r * row[k]
        change = 0.0
        for k in range(nk):
            v = alpha + t[k] * acc[k]
            change += abs(v - g[k])
            g[k] = v
        _exp_elog_theta(g, t)
        done += 1
        if change / nk < tol:
            break
    return done


@njit(**_DOT)
def _add_stats(rows, ids, c, t, stats):
    """Add ``c_n t / (t . b_n)`` to the rows ``ids`` of ``stats`` (``rows[n]`` is ``b_n``)."""
    nk = t.size
    for n in range(ids.size):
        row = rows[n]
        s = 0.0
        for k in range(nk):
            s += t[k] * row[k]
        r = c[n] / (s + ESTEP_FLOOR)
        out = stats[ids[n]]
        for k in range(nk):
            out[k] += r * t[k]


@njit(**_SER)
def _doc_spans(indptr, nt):
    """Return ``nt + 1`` document boundaries giving each task about the same words."""
    nd = indptr.size - 1
    cuts = np.empty(nt + 1, np.int64)
    cuts[0] = 0
    total = indptr[nd] - indptr[0]
    d = 0
    for t in range(1, nt):
        goal = indptr[0] + (total * t) // nt
        while d < nd and indptr[d] < goal:
            d += 1
        cuts[t] = d
    cuts[nt] = nd
    return cuts


@njit(**_SER)
def _estep_span(indptr, ids, counts, eb, alpha, gamma, max_iter, tol, stats, want, lo, hi):
    """Fit documents ``lo:hi``, adding their statistics to ``stats``; return the updates."""
    nk = gamma.shape[1]
    t = np.empty(nk)
    acc = np.empty(nk)
    longest = 0
    for d in range(lo, hi):
        longest = max(longest, indptr[d + 1] - indptr[d])
    # A document's rows of exp_elog_beta, gathered once: its many updates then read
    # contiguous memory instead of rows scattered over the whole vocabulary.
    buf = np.empty((longest, nk))
    done = 0
    for d in range(lo, hi):
        a, b = indptr[d], indptr[d + 1]
        g = gamma[d]
        if a == b:
            for k in range(nk):
                g[k] = alpha
            continue
        rows = buf[: b - a]
        for n in range(b - a):
            src, dst = eb[ids[a + n]], rows[n]
            for k in range(nk):
                dst[k] = src[k]
        done += _fit_doc(rows, counts[a:b], alpha, g, max_iter, tol, t, acc)
        if want:
            _add_stats(rows, ids[a:b], counts[a:b], t, stats)
    return done


@njit(**_PAR)
def _estep_parallel(indptr, ids, counts, eb, alpha, gamma, max_iter, tol, stats, want, nt):
    nk = gamma.shape[1]
    cuts = _doc_spans(indptr, nt)
    rows = stats.shape[0] if want else 0
    partial = np.zeros((nt, rows, nk))
    done = np.zeros(nt, np.int64)
    for task in prange(nt):
        done[task] = _estep_span(indptr, ids, counts, eb, alpha, gamma, max_iter, tol,
                                 partial[task], want, cuts[task], cuts[task + 1])
    for w in prange(rows):
        out = stats[w]
        for k in range(nk):
            out[k] = 0.0
        for task in range(nt):
            src = partial[task, w]
            for k in range(nk):
                out[k] += src[k]
    return done.sum()


def _tasks(indptr, gamma) -> int:
    """Return the threads worth using: one below PARALLEL_WORK, else up to one per document."""
    work = int(indptr[-1]) * gamma.shape[1]
    return 1 if work < PARALLEL_WORK else max(1, min(numba.get_num_threads(), gamma.shape[0]))


def lda_estep(indptr, ids, counts, exp_elog_beta, alpha, gamma, max_iter, tol, sstats):
    """Fit every document's ``gamma`` and write the sufficient statistics (see reference)."""
    want = sstats is not None
    stats = sstats if want else np.empty((0, gamma.shape[1]))
    args = (indptr, ids, counts, exp_elog_beta, float(alpha), gamma, int(max_iter), float(tol),
            stats, want)
    nt = _tasks(indptr, gamma)
    if nt == 1:
        if want:
            stats[...] = 0.0
        return int(_estep_span(*args, 0, gamma.shape[0]))
    return int(_estep_parallel(*args, nt))


@njit(**_DOT)
def _loglik_span(indptr, ids, counts, theta, beta, lo, hi):
    nk = theta.shape[1]
    s = 0.0
    for d in range(lo, hi):
        th = theta[d]
        for j in range(indptr[d], indptr[d + 1]):
            row = beta[ids[j]]
            p = 0.0
            for k in range(nk):
                p += th[k] * row[k]
            s += counts[j] * math.log(p)
    return s


@njit(**_PAR)
def _loglik_parallel(indptr, ids, counts, theta, beta, nt):
    cuts = _doc_spans(indptr, nt)
    part = np.zeros(nt)
    for task in prange(nt):
        part[task] = _loglik_span(indptr, ids, counts, theta, beta, cuts[task], cuts[task + 1])
    return part.sum()


def lda_loglik(indptr, ids, counts, theta, beta):
    """Return ``sum_d sum_n c_n log(theta_d . beta_n)`` (see reference)."""
    nt = _tasks(indptr, theta)
    if nt == 1:
        return float(_loglik_span(indptr, ids, counts, theta, beta, 0, theta.shape[0]))
    return float(_loglik_parallel(indptr, ids, counts, theta, beta, nt))


@njit(**_SER)
def _digamma_array(x, out):
    flat, res = x.ravel(), out.ravel()
    for i in range(flat.size):
        res[i] = _digamma(flat[i])


def digamma(x):
    """Return psi of the float64 array ``x`` (``x > 0``)."""
    x = np.ascontiguousarray(x, dtype=np.float64)
    out = np.empty_like(x)
    _digamma_array(x, out)
    return out
