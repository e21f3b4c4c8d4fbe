"""signSGD / Signum with majority vote on real ranks."""

import h5py
import numpy as np
import pytest
from conftest import CONFIGS, launch, python_script
from test_run import read_summary, run, write_config

pytestmark = pytest.mark.mpi


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
def test_vote_transports_equal_the_oracle(n):
    res = launch(n, python_script("check_vote.py"), timeout=120)
    assert res.returncode == 0, res.stderr
    assert f"vote checks passed on {n} ranks" in res.stdout


def test_signum_digits_accuracy_and_traffic(tmp_path):
    res = run(5, str(CONFIGS / "signum-digits.yaml"), tmp_path / "s", "--quiet")
    assert res.returncode == 0, res.stderr
    s = read_summary(tmp_path / "s")
    assert s["final"]["accuracy"] >= 0.90
    allreduce_bytes = 2 * 4 / 5 * 4 * s["model_dim"]  # fp32 ring allreduce per rank per step
    assert s["bytes_sent_per_rank_per_step"] <= allreduce_bytes / 16


def test_vote_transports_give_identical_parameters(tmp_path):
    cfg = write_config(tmp_path, {"algorithm": {"name": "signum", "lr": 0.01, "momentum": None},
                                  "run": {"steps": 30, "eval_every": 0}})
    models = []
    for vote in ("sharded", "allgather", "server"):
        res = run(3, cfg, tmp_path / vote, "--set", f"algorithm.vote={vote}")
        assert res.returncode == 0, res.stderr
        with h5py.File(tmp_path / vote / "model.h5") as f:
            models.append(f["x"][()])
    assert np.array_equal(models[0], models[1]) and np.array_equal(models[0], models[2])


@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_nan_fault_under_each_policy(tmp_path, policy):
    cfg = write_config(tmp_path, {"algorithm": {"name": "signum", "lr": 0.01,
                                                "momentum": None, "nonfinite": policy}})
    res = run(3, cfg, tmp_path / policy, env={"MPIOPT_FAULT": "nan:rank=1:step=10"})
    if policy == "raise":
        assert res.returncode != 0
        assert "non-finite gradient on rank 1 at step 10" in res.stderr
        return
    assert res.returncode == 0, res.stderr
    with h5py.File(tmp_path / policy / "model.h5") as f:
        assert np.all(np.isfinite(f["x"][()]))
    assert read_summary(tmp_path / policy)["final"]["accuracy"] > 0.6
