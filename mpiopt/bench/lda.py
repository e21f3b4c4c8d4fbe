"""LDA's E-step per minibatch: the numba kernel against its numpy reference, on a real corpus.

``run(data, topics, batch, threads, repeats, json_path)`` loads the corpus (``news`` by
default, or any bag-of-words data set), draws one minibatch of ``batch`` training documents
and topics ``lambda`` as a run starts them (Gamma(100, 1/100)), computes ``exp(E[log beta])``
of the minibatch's words as :class:`~mpiopt.problems.lda.LdaProblem` does, and times the
E-step of the minibatch (:func:`mpiopt.kernels.lda_estep`, every document from the same
starting ``gamma``) with the numpy reference, the numba kernel on one thread and on
``threads`` threads, then a whole SVI direction (``LdaProblem.gradient``: the E-step plus
the expected topics, the scatter into ``lambda - lambda_hat`` and the loss). Timings are the
best of ``repeats`` runs after a warm-up call (the reference: of fewer, it is slow), so
compilation is never timed. The topics are the initial ones: the E-step then takes about as
many updates per document as in a run's first steps (more than later).
"""

from __future__ import annotations

import json
import platform
import time

import numpy as np

from mpiopt import kernels
from mpiopt.bench.kernels import best_time
from mpiopt.schema import config_from_dict


def _minibatch(data: str, topics: int, batch: int):
    """Return the problem, a minibatch's arguments of the E-step and the topics ``x``."""
    from mpiopt.problems.lda import gather_rows

    cfg = config_from_dict({"problem": {"name": "lda", "n_topics": topics},
                            "data": {"name": data, "batch_size": batch},
                            "algorithm": {"name": "allreduce"}})
    shard = cfg.data.load(0, 1, cfg.run.seed, with_test=False)
    problem = cfg.problem.build(shard, batch, np)
    rng = np.random.default_rng(0)
    x = problem.init(rng)
    rows = np.sort(rng.choice(problem.n_train, min(batch, problem.n_train), replace=False))
    indptr, ids, counts = gather_rows(*problem.train, rows)
    words, local = np.unique(ids, return_inverse=True)
    eb, _ = problem.expected_topics(x, words)
    gamma0 = rng.gamma(100.0, 0.01, (len(rows), topics))
    return problem, x, (indptr, local, counts, eb, problem.alpha, gamma0), len(rows)


def run(data: str = "news", topics: int = 20, batch: int = 256, threads: int | None = None,
        repeats: int | None = None, json_path: str | None = None) -> dict:
    """Time the E-step of one minibatch on each backend; print and return the figures."""
    problem, x, (indptr, ids, counts, eb, alpha, gamma0), n = _minibatch(data, topics, batch)
    repeats = repeats or 5
    stats = np.empty_like(eb)
    updates = {}

    def estep(backend):
        def call():
            gamma = gamma0.copy()
            updates[backend] = kernels.lda_estep(indptr, ids, counts, eb, alpha, gamma,
                                                 problem.max_iter, problem.tol, stats,
                                                 backend=backend)
        return call

    all_threads = threads or kernels.thread_limit()
    rows = [("numpy reference", best_time(estep("numpy"), repeat=max(1, repeats // 2)))]
    for nth in sorted({1, all_threads}):
        kernels.set_num_threads(nth)
        rows.append((f"numba, {nth} thread(s)", best_time(estep("numba"), repeat=repeats)))
    g = np.empty_like(x)
    rng = np.random.default_rng(1)
    rows.append((f"SVI direction, {all_threads} thread(s)",
                 best_time(lambda: problem.gradient(x, rng, g), repeat=repeats)))
    reference = rows[0][1]
    print(f"LDA E-step of one minibatch: data {data}, {n} documents, {len(eb)} distinct words, "
          f"{int(np.sum(counts))} words, K={topics}, {updates['numba'] / n:.1f} updates per "
          f"document (best of {repeats}; the reference of {max(1, repeats // 2)})")
    print(f"{'':>34} {'ms':>10} {'vs numpy':>9}")
    for name, seconds in rows:
        print(f"{name:>34} {seconds * 1e3:10.2f} {reference / seconds:9.1f}")
    result = {"data": data, "documents": n, "distinct_words": len(eb), "topics": topics,
              "updates_per_document": updates["numba"] / n,
              "seconds": dict(rows), "machine": platform.processor() or platform.machine(),
              "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    if json_path:
        with open(json_path, "w") as fh:
            json.dump(result, fh, indent=2)
    return result
