"""LDA end to end: SVI through the allreduce engine lowers the held-out perplexity."""

import math
import os
import sys

import h5py
import numpy as np
import pytest
from conftest import CONFIGS, launch
from test_run import read_summary, run, write_config

from mpiopt.data.corpora import package_folder
from mpiopt.schema import load_config

pytestmark = pytest.mark.mpi
CONFIG = str(CONFIGS / "svi-reuters.yaml")


def initial_perplexity(config: str, world_size: int = 1) -> float:
    """Return the test perplexity of the initial model of ``config`` (as a run draws it)."""
    cfg = load_config(config)
    shard = cfg.data.load(0, world_size, cfg.run.seed, with_test=True)
    problem = cfg.problem.build(shard, cfg.data.batch_size, np)
    return problem.evaluate(problem.init(np.random.default_rng([cfg.run.seed, 0])))["perplexity"]


@pytest.mark.skipif(package_folder("lda", "tests") is None,
                    reason="the lda package (pip install lda; in the dev extra) ships Reuters")
def test_shipped_svi_reuters_config(tmp_path):
    out = tmp_path / "svi"
    res = run(1, CONFIG, out, "--quiet")
    assert res.returncode == 0, res.stderr
    summary = read_summary(out)
    final = summary["final"]
    assert summary["problem"] == "lda" and summary["dataset"] == "reuters"
    assert summary["model_dim"] == 10 * 4258 and "accuracy" not in final
    assert math.isfinite(final["perplexity"]) and final["loss"] == pytest.approx(
        math.log(final["perplexity"]))
    before = initial_perplexity(CONFIG)
    assert final["perplexity"] < 0.6 * before  # about 1,900 from about 4,200
    with h5py.File(out / "metrics.h5", "r") as f:
        assert f["eval/perplexity"].shape == (5,)  # every 20 steps, the last one final
    assert summary["stability"]["tail_std"] is None  # it measures accuracy: none here


def test_svi_on_two_ranks_of_synthetic_lda(tmp_path):
    data = {"name": "synthetic_lda", "n_docs": 600, "n_test": 60, "batch_size": 32,
            "partition": None}
    config = write_config(tmp_path, {
        "problem": {"name": "lda", "n_topics": 5, "hidden": None},
        "data": {**data, "n_samples": None, "n_features": None, "n_classes": None},
        "algorithm": {"name": "allreduce", "lr": 1.0, "momentum": None,
                      "schedule": "inverse_power", "tau0": 1.0, "kappa": 0.7},
        "run": {"steps": 40, "eval_every": 0}})
    out = tmp_path / "two"
    res = run(2, config, out)
    assert res.returncode == 0, res.stderr
    final = read_summary(out)["final"]
    assert final["perplexity"] < 0.5 * initial_perplexity(config, 2)


def test_missing_corpus_exits_2_with_one_line(tmp_path):
    code = ("import sys, mpiopt.data.corpora as c\n"
            "c.package_folder = lambda *a: None\n"
            "from mpiopt.cli import main\n"
            f"sys.exit(main(['run', {CONFIG!r}, '--out', 'o']))\n")
    res = launch(None, [sys.executable, "-c", code], timeout=60, cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    assert res.stderr == ("mpiopt: error: data.name: reuters reads the files the lda package "
                          "ships, which is not installed: pip install lda\n")
    assert res.stdout == "" and not os.path.exists(tmp_path / "o")
