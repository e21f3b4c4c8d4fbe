"""DPSGD on real ranks: lock-free nodes behind a parameter server; nothing lost, no hang."""

import numpy as np
import pytest
from conftest import run_check_script
from test_run import read_model, read_summary, run, write_config

pytestmark = pytest.mark.mpi


@pytest.mark.parametrize("n", [3, 5, 7])
def test_every_core_step_reaches_the_server_exactly(tmp_path, n):
    # Node sizes 1, 2 and 3 and B of 1-3 in one job, a 4x slower core in each run.
    cfg = write_config(tmp_path, {"problem": {"name": "disjoint", "hidden": None},
                                  "algorithm": {"name": "dpsgd", "lr": 1.0, "momentum": None},
                                  "run": {"steps": 40, "eval_every": 0}})
    run_check_script(n, "check_dpsgd.py", f"dpsgd checks passed on {n} ranks",
                     args=[cfg, str(tmp_path)])


def test_one_core_with_b_1_is_sequential_sgd(tmp_path):
    # One node of one core pushing every step: the server's model follows sequential momentum
    # SGD (the change goes through v - base and back: equal to float rounding, not bitwise).
    cfg = write_config(tmp_path, {"algorithm": {"name": "dpsgd", "lr": 0.05, "momentum": 0.9,
                                                "local_steps": 1}})
    res = run(2, cfg, tmp_path / "dp")
    assert res.returncode == 0, res.stderr
    res = run(1, cfg, tmp_path / "seq", "--set", "algorithm.name=allreduce")
    assert res.returncode == 0, res.stderr
    got, want = read_model(tmp_path / "dp"), read_model(tmp_path / "seq")
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    info = read_summary(tmp_path / "dp")["algorithm_info"]
    assert info["updates_applied"] == info["core_steps"] == 60
    assert info["overlapping_updates"] == 0 and info["staleness"]["max"] == 0
