"""DPSGD on real ranks: lock-free nodes behind a parameter server; nothing lost, no hang."""

import numpy as np
import pytest
from conftest import CONFIGS, run_check_script
from test_lda_run import initial_perplexity
from test_run import read_model, read_summary, run, write_config

from mpiopt.data.corpora import package_folder

pytestmark = pytest.mark.mpi


@pytest.mark.parametrize("n", [3, 5, 7])
def test_every_core_step_reaches_the_server_exactly(tmp_path, n):
    # Node sizes 1, 2 and 3 and B of 1-3 in one job, a 4x slower core in each run.
    cfg = write_config(tmp_path, {"problem": {"name": "disjoint", "hidden": None},
                                  "algorithm": {"name": "dpsgd", "lr": 1.0, "momentum": None},
                                  "run": {"steps": 40, "eval_every": 0}})
    run_check_script(n, "check_dpsgd.py", f"dpsgd checks passed on {n} ranks",
                     args=[cfg, str(tmp_path)])


@pytest.mark.skipif(package_folder("lda", "tests") is None,
                    reason="the lda package (pip install lda; in the dev extra) ships Reuters")
def test_one_core_with_b_1_is_serial_svi(tmp_path):
    # One node of one core pushing every step: the server's topics follow serial SVI (the
    # change goes through v - base and back: equal to float rounding, not bitwise).
    svi = str(CONFIGS / "svi-reuters.yaml")
    short = ["--set", "run.steps=20", "--set", "run.eval_every=0"]
    res = run(2, svi, tmp_path / "dp", *short, "--set", "algorithm.name=dpsgd",
              "--set", "algorithm.local_steps=1", "--set", "algorithm.node_size=1")
    assert res.returncode == 0, res.stderr
    res = run(1, svi, tmp_path / "seq", *short)
    assert res.returncode == 0, res.stderr
    got, want = read_model(tmp_path / "dp"), read_model(tmp_path / "seq")
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    info = read_summary(tmp_path / "dp")["algorithm_info"]
    assert info["updates_applied"] == info["core_steps"] == 20
    assert info["overlapping_updates"] == 0 and info["staleness"]["max"] == 0


@pytest.mark.skipif(package_folder("lda", "tests") is None,
                    reason="the lda package (pip install lda; in the dev extra) ships Reuters")
def test_shipped_dpsvi_reuters_config(tmp_path):
    config = str(CONFIGS / "dpsvi-reuters.yaml")
    res = run(3, config, tmp_path / "dpsvi", "--quiet")
    assert res.returncode == 0, res.stderr
    s = read_summary(tmp_path / "dpsvi")
    assert s["final"]["perplexity"] < 0.6 * initial_perplexity(config)  # about 4,200 at first
    info = s["algorithm_info"]
    assert info["nodes"] == 1 and info["cores_per_node"] == [2]
    assert info["core_steps"] == 2 * s["config"]["run"]["steps"]
    assert 0 <= info["overlapping_updates"] <= info["core_steps"]
