"""DPSVI against scikit-learn's and gensim's online LDA, perplexity against time, one run.

``mpiopt bench lda --peers`` (a plain process: it launches ``mpiexec`` itself) trains LDA on
one bag-of-words corpus (``news`` by default) with the same vocabulary, the same held-out
documents and K, and scores every model with the same evaluator, the held-out
document-completion perplexity (:func:`mpiopt.problems.lda.completion_perplexity`):

- scikit-learn's ``LatentDirichletAllocation(learning_method="online")`` with its online
  defaults (minibatches of 128, ``learning_offset`` 10, ``learning_decay`` 0.7) and the priors
  ``1/K``, fed pass after pass by ``partial_fit`` so that it is scored after every pass; the
  clock stops while it is scored;
- gensim's ``LdaMulticore`` with 1 and 2 workers and its defaults (priors ``1/K``), one fit
  per number of passes asked for (gensim cannot be scored between passes of one fit);
- mpiopt's ``dpsgd`` on ``jobs/configs/dpsvi-news.yaml`` (the same schedule as
  scikit-learn's: ``rho_t = (11 + t)^-0.7`` over the run's minibatches of 128), as one node of
  one core (2 ranks), one node of two cores (3 ranks) and two nodes of one core (3 ranks),
  each run for the same passes, evaluated on the server every few pushes; its time is the
  run's ``train_time`` (the clock from the first step, less the evaluations).

Printed: perplexity after each pass and the time it took, then the speed-ups the DPSVI issue
asks for: the time to scikit-learn's last perplexity (mpiopt against scikit-learn), the time to
a common target with 2 cores and with 2 nodes against 1 core, and the ratio to gensim at equal
perplexity. Needs the ``lda`` extra (scikit-learn, gensim) and the corpus.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

import h5py
import numpy as np

from mpiopt.errors import MissingDependency
from mpiopt.schema import config_from_dict

CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "jobs", "configs",
                      "dpsvi-news.yaml")
LAYOUTS = (("1 node x 1 core", 2, 1), ("1 node x 2 cores", 3, 2), ("2 nodes x 1 core", 3, 1))


def _corpus(data: str, topics: int):
    """Return the training and held-out documents of ``data`` as a run loads them."""
    cfg = config_from_dict({"problem": {"name": "lda", "n_topics": topics},
                            "data": {"name": data, "batch_size": 128},
                            "algorithm": {"name": "allreduce"}})
    shard = cfg.data.load(0, 1, cfg.run.seed, with_test=True)
    return shard.x_train, shard.x_test


def _csr(corpus):
    from scipy.sparse import csr_matrix

    return csr_matrix((corpus.counts.astype(np.float64), corpus.ids, corpus.indptr),
                      shape=corpus.shape)


def _sklearn(train, topics, passes, seed, score):
    try:
        from sklearn.decomposition import LatentDirichletAllocation
    except ImportError:
        raise MissingDependency("the peers need scikit-learn: pip install 'mpiopt[lda]'") \
            from None
    x = _csr(train)
    lda = LatentDirichletAllocation(n_components=topics, doc_topic_prior=1 / topics,
                                    topic_word_prior=1 / topics, learning_method="online",
                                    learning_offset=10.0, learning_decay=0.7, batch_size=128,
                                    total_samples=x.shape[0], random_state=seed)
    rng = np.random.default_rng(seed)
    rows, spent = [], 0.0
    for p in range(1, passes + 1):
        order = rng.permutation(x.shape[0])
        t0 = time.perf_counter()
        for lo in range(0, len(order), 128):
            lda.partial_fit(x[np.sort(order[lo:lo + 128])])
        spent += time.perf_counter() - t0
        rows.append((p, spent, score(lda.components_)))
    return rows


def _gensim(train, topics, passes, workers, seed, score):
    try:
        from gensim.models import LdaMulticore
    except ImportError:
        raise MissingDependency("the peers need gensim: pip install 'mpiopt[lda]'") from None
    docs = [list(zip(train.ids[a:b].tolist(), train.counts[a:b].tolist()))
            for a, b in zip(train.indptr[:-1], train.indptr[1:])]
    id2word = {i: str(i) for i in range(train.shape[1])}
    rows = []
    for p in sorted(set(passes)):
        t0 = time.perf_counter()
        model = LdaMulticore(docs, num_topics=topics, id2word=id2word, workers=workers,
                             passes=p, random_state=seed, alpha=1 / topics, eta=1 / topics)
        spent = time.perf_counter() - t0
        rows.append((p, spent, score(model.get_topics())))
    return rows


def _mpiopt(ranks: int, node_size: int, passes: int, n_train: int, seed: int,
            tmp: str) -> list[tuple[float, float]]:
    """Run DPSVI; return its (train_time, perplexity) evaluations."""
    cores = ranks - 1
    steps = -(-passes * n_train // (128 * cores))  # each core's minibatches
    out = os.path.join(tmp, f"r{ranks}-n{node_size}")
    here = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    cmd = [here if os.path.exists(here) else "mpiexec", "-n", str(ranks), sys.executable,
           "-m", "mpiopt", "run", CONFIG, "--out", out, "--quiet", "--seed", str(seed),
           "--set", f"run.steps={steps}", "--set", f"algorithm.node_size={node_size}",
           "--set", "run.eval_every=4"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if res.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stderr[-2000:]}")
    with h5py.File(os.path.join(out, "metrics.h5")) as f:
        return list(zip(f["eval/train_time"][()].tolist(), f["eval/perplexity"][()].tolist()))


def _time_to(curve, target: float) -> float | None:
    """First time at which the (time, perplexity) curve is at or below ``target``."""
    return next((t for t, p in curve if p <= target), None)


def run(data: str = "news", topics: int = 20, passes: int = 5, seed: int = 0,
        json_path: str | None = None) -> dict:
    from mpiopt.problems.lda import completion_perplexity

    train, test = _corpus(data, topics)

    def score(topic_word) -> float:
        return completion_perplexity(topic_word, test, 1 / topics)

    out = {"data": data, "topics": topics, "passes": passes, "documents": len(train),
           "words": int(train.shape[1]), "held_out": len(test)}
    print(f"{data}: {len(train)} training documents, {len(test)} held out, "
          f"{train.shape[1]} words, K = {topics}", flush=True)
    sk = _sklearn(train, topics, passes, seed, score)
    out["sklearn"] = sk
    for p, t, ppl in sk:
        print(f"  scikit-learn online   pass {p}: {ppl:8.1f} after {t:6.1f} s", flush=True)
    out["gensim"] = {}
    for workers in (1, 2):
        rows = _gensim(train, topics, (1, passes), workers, seed, score)
        out["gensim"][workers] = rows
        for p, t, ppl in rows:
            print(f"  gensim LdaMulticore({workers}) {p} passes: {ppl:8.1f} in {t:6.1f} s",
                  flush=True)
    out["mpiopt"] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, ranks, node_size in LAYOUTS:
            curve = _mpiopt(ranks, node_size, passes, len(train), seed, tmp)
            out["mpiopt"][name] = curve
            t, ppl = curve[-1]
            print(f"  mpiopt dpsgd, {name}: {ppl:8.1f} after {t:6.1f} s ({passes} passes)",
                  flush=True)
    final_sk = sk[-1][2]
    ours = out["mpiopt"]["1 node x 2 cores"]
    summary = {"perplexity_vs_sklearn": ours[-1][1] / final_sk}
    t_ours = _time_to(ours, final_sk)
    summary["time_to_sklearn_final_vs_sklearn"] = (None if t_ours is None
                                                   else t_ours / sk[-1][1])
    target = max(curve[-1][1] for curve in out["mpiopt"].values()) * 1.01
    one = _time_to(out["mpiopt"]["1 node x 1 core"], target)
    summary["target"] = target
    for name in ("1 node x 2 cores", "2 nodes x 1 core"):
        t = _time_to(out["mpiopt"][name], target)
        summary[f"speedup {name}"] = None if (t is None or one is None) else one / t
    g1 = out["gensim"][1][-1]
    t_g = _time_to(ours, g1[2])
    summary["time_to_gensim1_final_vs_gensim1"] = None if t_g is None else t_g / g1[1]
    out["summary"] = summary
    print("  " + json.dumps(summary), flush=True)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(out, f, indent=1)
    return out
