"""Bag-of-words corpora: documents as sparse word counts, their HDF5 format, the ``bow`` data set.

A corpus is a CSR matrix of documents by words (:class:`BowCorpus`): document ``d`` holds the
distinct word ids ``ids[indptr[d]:indptr[d+1]]`` (increasing) and how often each occurs,
``counts[...]``. A bag-of-words data set is a :class:`~mpiopt.data.base.DataConfig` whose shard
holds such corpora instead of feature matrices: ``x_train`` and ``x_test`` are
:class:`BowCorpus` (``shape`` is (documents, vocabulary size)), the labels are all 0 (one
class), so the partitions work unchanged on documents: ``iid`` deals them out at random,
``dirichlet`` gives the ranks random, unequal shares and ``shards`` is ``iid`` again (there is
no label to sort by). ``Shard.n_train_total`` is the number of training documents of the
whole corpus, the ``D`` of stochastic variational inference.

The HDF5 format (written by ``mpiopt data convert --text``)::

    /                   attributes: kind = "bow", n_words (the vocabulary size V), source
    /vocab              (V,) UTF-8 strings: word i of the vocabulary (optional)
    /train/indptr       (D+1,) integers, non-decreasing from 0 to nnz
    /train/ids          (nnz,) integers in [0, V): the distinct words of each document
    /train/counts       (nnz,) positive integers: how often each occurs
    /test/...           the held-out documents, same layout (optional: without a ``test``
                        group a seeded ``test_fraction`` of the training documents is held out)

Every rank reads the whole file (two integers per distinct word of a document: a corpus of
two million words is about 8 MB) and keeps its own documents.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from dataclasses import dataclass

import h5py
import numpy as np

from mpiopt.config import param
from mpiopt.data import DATASETS
from mpiopt.data.base import DataConfig, DataSource
from mpiopt.data.partition import split_holdout
from mpiopt.errors import ConfigError

KEY = "data.path"
GROUPS = ("train", "test")


@dataclass(frozen=True, eq=False)
class BowCorpus:
    """Documents as a CSR matrix of word counts (int64 ``indptr``, int32 ``ids``, ``counts``).

    Attributes:
        indptr: ``(D + 1,)`` offsets of each document's words in ``ids`` and ``counts``.
        ids: the distinct word ids of each document, in ``[0, n_words)``.
        counts: how often each of them occurs (positive).
        n_words: the vocabulary size ``V``.
        vocab: the words, if known (``vocab[i]`` is word ``i``).
    """

    indptr: np.ndarray
    ids: np.ndarray
    counts: np.ndarray
    n_words: int
    vocab: tuple[str, ...] | None = None

    @property
    def shape(self) -> tuple[int, int]:
        """Return (documents, vocabulary size), as a documents x words matrix has."""
        return len(self.indptr) - 1, int(self.n_words)

    def __len__(self) -> int:
        return len(self.indptr) - 1

    @property
    def n_tokens(self) -> int:
        """Return the number of words in all documents (with repetitions)."""
        return int(self.counts.sum())

    def lengths(self) -> np.ndarray:
        """Return the number of words (with repetitions) of every document."""
        total = np.concatenate([[0], np.cumsum(self.counts, dtype=np.int64)])
        return total[self.indptr[1:]] - total[self.indptr[:-1]]

    def subset(self, rows: np.ndarray) -> BowCorpus:
        """Return the documents ``rows`` (in that order) as a new corpus."""
        rows = np.asarray(rows, dtype=np.int64)
        starts, sizes = self.indptr[rows], self.indptr[rows + 1] - self.indptr[rows]
        indptr = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(sizes, out=indptr[1:])
        take = np.repeat(starts - indptr[:-1], sizes) + np.arange(indptr[-1])
        return BowCorpus(indptr, self.ids[take], self.counts[take], self.n_words, self.vocab)

    def dense(self) -> np.ndarray:
        """Return the (documents, words) matrix of counts (for small corpora and tests)."""
        out = np.zeros(self.shape, dtype=np.int64)
        rows = np.repeat(np.arange(len(self)), np.diff(self.indptr))
        out[rows, self.ids] = self.counts
        return out

    @classmethod
    def from_dense(cls, counts: np.ndarray, vocab=None) -> BowCorpus:
        """Return the corpus of a (documents, words) matrix of non-negative counts."""
        counts = np.asarray(counts)
        rows, ids = np.nonzero(counts)
        indptr = np.zeros(counts.shape[0] + 1, dtype=np.int64)
        np.cumsum(np.bincount(rows, minlength=counts.shape[0]), out=indptr[1:])
        return cls(indptr, ids.astype(np.int32), counts[rows, ids].astype(np.int32),
                   counts.shape[1], None if vocab is None else tuple(vocab))


def check_corpus(corpus: BowCorpus, where: str, key: str | None = KEY) -> BowCorpus:
    """Raise a ConfigError naming ``key`` unless ``corpus`` is a well-formed CSR corpus."""
    p, ids, counts = corpus.indptr, corpus.ids, corpus.counts
    problem = None
    if p.ndim != 1 or len(p) < 1 or p[0] != 0 or np.any(np.diff(p) < 0):
        problem = "indptr must start at 0 and never decrease"
    elif p[-1] != len(ids) or len(ids) != len(counts):
        problem = f"indptr ends at {p[-1]} but ids has {len(ids)} and counts {len(counts)} entries"
    elif len(ids) and (ids.min() < 0 or ids.max() >= corpus.n_words):
        problem = f"word ids must be in [0, {corpus.n_words}), got [{ids.min()}, {ids.max()}]"
    elif len(counts) and counts.min() <= 0:
        problem = f"counts must be positive, got {counts.min()}"
    if problem:
        raise ConfigError(f"{where}: {problem}", key=key)
    return corpus


class BowSource(DataSource):
    """An opened bag-of-words data set: the training and test corpora, in memory."""

    def __init__(self, train: BowCorpus, test: BowCorpus):
        super().__init__(np.zeros(len(train), dtype=np.int64), 1)
        self.train, self.test_corpus = train, test

    def features(self, indices: np.ndarray) -> BowCorpus:
        """Return the training documents at ``indices``."""
        return self.train.subset(indices)

    def test(self) -> tuple[BowCorpus, np.ndarray]:
        """Return the held-out documents (and their labels, all 0)."""
        return self.test_corpus, np.zeros(len(self.test_corpus), dtype=np.int64)


def holdout_docs(n_docs: int, fraction: float, seed: int,
                 key: str = "data.test_fraction") -> tuple[np.ndarray, np.ndarray]:
    """Return (train, test) document positions: a seeded random ``fraction`` held out."""
    return split_holdout(np.zeros(n_docs, dtype=np.int64), fraction, seed, key)


@dataclass(frozen=True)
class HeldOutKeys(DataConfig):
    """Keys of the corpora whose held-out documents are drawn from one collection."""

    test_fraction: float = param(0.1, "Share of the documents held out as the test set.",
                                 low=0, high=1, low_open=True, high_open=True)
    split_seed: int = param(0, "Seed of the held-out split, fixed apart from run.seed so that "
                            "runs with different seeds (and other libraries given the same "
                            "split) are scored on the same documents.", low=0)


@DATASETS.register("bow")
@dataclass(frozen=True)
class BowData(HeldOutKeys):
    """A bag-of-words corpus in an HDF5 file (written by `mpiopt data convert --text`).

    The file's test group is the test set; a file without one has ``test_fraction`` of its
    documents held out (chosen by ``split_seed``).
    """

    SHORTHAND = "path"

    path: str = param("", "HDF5 file of the bag-of-words format: groups train (and "
                      "optionally test) holding indptr, ids and counts.", required=True)

    def open(self, seed: int) -> DataSource:
        """Read the file; hold out ``test_fraction`` of train when it has no test group."""
        train, test, _ = read_bow(os.path.expanduser(self.path))
        if test is None:
            keep, held = holdout_docs(len(train), self.test_fraction, self.split_seed)
            train, test = train.subset(keep), train.subset(held)
        return BowSource(train, test)


def read_bow(path: str) -> tuple[BowCorpus, BowCorpus | None, tuple[str, ...] | None]:
    """Read a bag-of-words HDF5 file; return (train, test or None, vocabulary or None).

    Raises:
        ConfigError: naming ``data.path`` when the file is missing, not HDF5, or not of the
            format (a missing array, ids out of range, a bad ``indptr``).
    """
    if not os.path.isfile(path):
        raise ConfigError(f"no such file: {path}", key=KEY)
    try:
        fh = h5py.File(path, "r")
    except OSError as exc:
        raise ConfigError(f"cannot read {path} as HDF5: {exc}", key=KEY) from None
    with fh:
        if fh.attrs.get("kind") != "bow":
            raise ConfigError(f"{path} is not a bag-of-words file (root attribute kind is "
                              f"{fh.attrs.get('kind')!r}, expected 'bow'; write one with "
                              f"`mpiopt data convert --text`)", key=KEY)
        vocab = tuple(w.decode() if isinstance(w, bytes) else str(w)
                      for w in fh["vocab"][()]) if "vocab" in fh else None
        n_words = int(fh.attrs.get("n_words", len(vocab) if vocab else 0))
        if vocab is not None and len(vocab) != n_words:
            raise ConfigError(f"{path}: vocab has {len(vocab)} words, attribute n_words is "
                              f"{n_words}", key=KEY)
        train, test = (_read_group(fh, g, n_words, vocab, path) for g in GROUPS)
    if train is None or len(train) == 0:
        raise ConfigError(f"{path} has no training documents (group train with indptr, ids "
                          f"and counts)", key=KEY)
    return train, test, vocab


def _read_group(fh: h5py.File, group: str, n_words: int, vocab, path: str):
    """Return the corpus of ``group``, or None if the file has no such group."""
    if group not in fh:
        return None
    arrays = []
    for name, dtype in (("indptr", np.int64), ("ids", np.int32), ("counts", np.int32)):
        data = fh.get(f"{group}/{name}")
        if not isinstance(data, h5py.Dataset) or data.dtype.kind not in "iu":
            raise ConfigError(f"{path}: {group}/{name} must be an integer array", key=KEY)
        arrays.append(np.asarray(data[()], dtype=dtype))
    return check_corpus(BowCorpus(*arrays, n_words, vocab), f"{path}: {group}")


def write_bow(out: str, train: BowCorpus, test: BowCorpus | None, source: str = "",
              key: str | None = None) -> None:
    """Write corpora to ``out`` atomically (a temporary file beside it, then a rename).

    Raises:
        ConfigError: naming ``key`` when the file cannot be written; nothing is left behind.
    """
    folder = os.path.dirname(os.path.abspath(out))
    tmp = os.path.join(folder, f".{os.path.basename(out)}.{uuid.uuid4().hex}.tmp")
    try:
        os.makedirs(folder, exist_ok=True)
        with h5py.File(tmp, "x") as fh:
            fh.attrs["kind"] = "bow"
            fh.attrs["n_words"] = train.n_words
            fh.attrs["source"] = source
            if train.vocab is not None:
                fh.create_dataset("vocab", data=list(train.vocab),
                                  dtype=h5py.string_dtype("utf-8"))
            for name, corpus in (("train", train), ("test", test)):
                if corpus is None:
                    continue
                group = fh.create_group(name)
                group.create_dataset("indptr", data=corpus.indptr.astype(np.int64))
                for field in ("ids", "counts"):
                    group.create_dataset(field, data=getattr(corpus, field).astype(np.int32),
                                         compression="gzip", compression_opts=4)
        os.replace(tmp, out)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise ConfigError(f"cannot write {out}: {exc}", key=key) from None
        raise
