"""Plain text into bag-of-words corpora: the tokenizer, the vocabulary, ``convert --text``.

One tokenizer serves every corpus made from text (the ``news`` data set and the converter):
text is lower-cased (the typographic apostrophe read as ``'``), a token is a run of letters
(any alphabet; digits and underscores split tokens) with inner apostrophes kept (``don't``)
except a possessive ``'s``, which is dropped (``trump's`` is ``trump``); tokens shorter than
:data:`MIN_LENGTH` letters and, by default, the English stop words of ``stopwords_en.txt``
(function words, number words, contractions) are left out.

The vocabulary is built on the training documents only: a word is kept if it occurs in at least
``min_df`` of them and in at most a ``max_df`` share of them; words are numbered in
alphabetical order. The held-out documents are chosen before (seeded, among the documents with
at least one token), and words of theirs outside the vocabulary are dropped. Documents left
without a word are dropped from either side.
"""

from __future__ import annotations

import csv
import functools
import importlib.resources
import io
import os
import re
from collections import Counter

import numpy as np

from mpiopt.data.bow import BowCorpus, holdout_docs, write_bow
from mpiopt.errors import ConfigError

MIN_LENGTH = 2
TOKEN = re.compile(r"[^\W\d_]+(?:'(?!s\b)[^\W\d_]+)*")
STOP_WORDS_FILE = "stopwords_en.txt"


@functools.lru_cache(maxsize=1)
def stop_words() -> frozenset[str]:
    """Return the English stop words (the package's ``stopwords_en.txt``)."""
    text = importlib.resources.files("mpiopt.data").joinpath(STOP_WORDS_FILE).read_text("utf-8")
    return frozenset(w.strip() for w in text.splitlines() if w.strip() and w[0] != "#")


def tokenize(text: str, stop: frozenset[str] = frozenset()) -> list[str]:
    """Return the tokens of ``text`` (see the module docstring), leaving out ``stop``."""
    text = text.lower().replace("\u2019", "'")
    return [t for t in TOKEN.findall(text) if len(t) >= MIN_LENGTH and t not in stop]


def corpus_from_texts(texts, min_df: int = 5, max_df: float = 0.5, stop: bool = True,
                      test_fraction: float = 0.1, seed: int = 0,
                      keys: dict | None = None) -> tuple[BowCorpus, BowCorpus]:
    """Tokenize documents, hold some out, build the vocabulary and count the words.

    Args:
        texts: the documents (strings).
        min_df: keep words in at least this many training documents.
        max_df: keep words in at most this share of the training documents.
        stop: leave out the English stop words.
        test_fraction: share of the documents (with a token) held out, seeded by ``seed``.
        seed: seed of the held-out split.
        keys: names of the settings in errors (``min_df``, ``max_df``, ``test_fraction``).

    Returns:
        (train, test) corpora sharing the vocabulary (``vocab`` set on both).

    Raises:
        ConfigError: fewer than two documents with a token, or no word left in the
            vocabulary.
    """
    keys = {"min_df": "min_df", "max_df": "max_df", "test_fraction": "test_fraction",
            **(keys or {})}
    words = stop_words() if stop else frozenset()
    docs = [d for d in (tokenize(t, words) for t in texts) if d]
    if len(docs) < 2:
        raise ConfigError(f"{len(docs)} document(s) have a token after tokenizing; need at "
                          f"least 2 to hold some out", key=keys["test_fraction"])
    train_rows, test_rows = holdout_docs(len(docs), test_fraction, seed, keys["test_fraction"])
    df: Counter = Counter()
    for row in train_rows:
        df.update(set(docs[row]))
    limit = max_df * len(train_rows)
    vocab = sorted(w for w, n in df.items() if min_df <= n <= limit)
    if not vocab:
        raise ConfigError(f"no word is in at least {min_df} and at most {max_df:g} of the "
                          f"{len(train_rows)} training documents (of {len(df)} distinct "
                          f"words); lower {keys['min_df']} or raise {keys['max_df']}",
                          key=keys["min_df"])
    index = {w: i for i, w in enumerate(vocab)}
    train, test = (_encode([docs[r] for r in rows], index, tuple(vocab))
                   for rows in (train_rows, test_rows))
    if len(test) == 0:
        raise ConfigError(f"none of the {len(test_rows)} held-out documents has a word of the "
                          f"vocabulary; hold out more", key=keys["test_fraction"])
    return train, test


def _encode(docs: list[list[str]], index: dict[str, int], vocab: tuple[str, ...]) -> BowCorpus:
    """Count the vocabulary words of each document; drop documents left without one."""
    lengths, all_ids = [], []
    for doc in docs:
        ids = [index[w] for w in doc if w in index]
        if ids:
            lengths.append(len(ids))
            all_ids.extend(ids)
    tokens = np.asarray(all_ids, dtype=np.int64)
    doc_of = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)
    # One sort of (document, word) keys gives every document's distinct words and counts.
    pairs, counts = np.unique(doc_of * len(vocab) + tokens, return_counts=True)
    indptr = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(np.bincount(pairs // len(vocab), minlength=len(lengths)), out=indptr[1:])
    return BowCorpus(indptr, (pairs % len(vocab)).astype(np.int32), counts.astype(np.int32),
                     len(vocab), vocab)


def read_texts(path: str, column: str | None = None) -> list[str]:
    """Return the documents of a text file: one per line, or a CSV column.

    Args:
        path: a UTF-8 text file.
        column: None: every non-empty line is a document. Otherwise the file is CSV with a
            header row and this names the column holding the text; several columns separated
            by commas (``title,text``) are joined with a newline.

    Raises:
        ConfigError: naming ``--text`` (missing or unreadable file) or ``--column`` (a column
            the header does not have).
    """
    try:
        with open(path, encoding="utf-8", newline="" if column else None) as fh:
            text = fh.read()
    except FileNotFoundError:
        raise ConfigError(f"no such file: {path}", key="--text") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {path} as UTF-8 text: {exc}", key="--text") from None
    if column is None:
        return [line for line in text.splitlines() if line.strip()]
    return csv_column(text, column, path)


def csv_column(text: str, column: str, where: str) -> list[str]:
    """Return the column(s) ``column`` (comma-separated names) of CSV ``text`` with a header."""
    limit = csv.field_size_limit()
    csv.field_size_limit(1 << 30)  # a document may be longer than csv's default 128 KiB
    try:
        reader = csv.DictReader(io.StringIO(text))
        header = reader.fieldnames or []
        names = [c.strip() for c in column.split(",")]
        missing = [c for c in names if c not in header]
        if missing:
            raise ConfigError(f"{where} has no column {missing[0]!r}; its columns: "
                              f"{', '.join(header) or '(none)'}", key="--column")
        return ["\n".join(row[c] or "" for c in names) for row in reader]
    except csv.Error as exc:
        raise ConfigError(f"{where}: not CSV: {exc}", key="--column") from None
    finally:
        csv.field_size_limit(limit)


def convert_text(src: str, out: str, column: str | None = None, min_df: int = 5,
                 max_df: float = 0.5, stop: bool = True, test_fraction: float = 0.1,
                 seed: int = 0, overwrite: bool = False) -> dict:
    """Convert a text file (one document per line, or a CSV column) to a bag-of-words file.

    The output (see :mod:`mpiopt.data.bow`) is written to a temporary file beside ``out`` and
    renamed into place, so an error leaves nothing half-written.

    Returns:
        ``{"out", "n_train", "n_test", "n_words", "train_tokens", "test_tokens"}``.

    Raises:
        ConfigError: naming the option (``--min-df``, ``--max-df``, ``--test-fraction``,
            ``--text``, ``--column``, ``--overwrite``) on bad input.
    """
    if not (isinstance(min_df, int) and min_df >= 1):
        raise ConfigError(f"must be an integer >= 1, got {min_df!r}", key="--min-df")
    if not 0 < max_df <= 1:
        raise ConfigError(f"must be in (0, 1], got {max_df}", key="--max-df")
    if not 0 < test_fraction < 1:
        raise ConfigError(f"must be in (0, 1), got {test_fraction}", key="--test-fraction")
    if os.path.exists(out) and not overwrite:
        raise ConfigError(f"output exists: {out} (pass --overwrite to replace it)",
                          key="--overwrite")
    train, test = corpus_from_texts(
        read_texts(src, column), min_df, max_df, stop, test_fraction, seed,
        keys={"min_df": "--min-df", "max_df": "--max-df", "test_fraction": "--test-fraction"})
    write_bow(out, train, test, source=f"text:{os.path.basename(src)}", key="out")
    return {"out": out, "n_train": len(train), "n_test": len(test), "n_words": train.n_words,
            "train_tokens": train.n_tokens, "test_tokens": test.n_tokens}
