"""signSGD / Signum with majority vote on real ranks."""

import h5py
import numpy as np
import pytest
from conftest import CONFIGS, run_check_script
from test_run import read_model, read_summary, run, write_config

pytestmark = pytest.mark.mpi


@pytest.mark.parametrize("n", [1, 2, 3, 5])  # even counts (ties) by 2; odd by 3 and 5
def test_vote_transports_equal_the_oracle(n):
    run_check_script(n, "check_vote.py", f"vote checks passed on {n} ranks")


@pytest.mark.parametrize("n", [1, 2, 3])
def test_ef_exchange_equals_the_oracle(n):
    run_check_script(n, "check_ef.py", f"ef checks passed on {n} ranks")


def test_signum_digits_accuracy_and_traffic(tmp_path):
    res = run(5, str(CONFIGS / "signum-digits.yaml"), tmp_path / "s", "--quiet")
    assert res.returncode == 0, res.stderr
    s = read_summary(tmp_path / "s")
    assert s["final"]["accuracy"] >= 0.90
    allreduce_bytes = 2 * 4 / 5 * 4 * s["model_dim"]  # fp32 ring allreduce per rank per step
    assert s["bytes_sent_per_rank_per_step"] <= allreduce_bytes / 16
    # By phase: (n-1) chunks of ceil(d/8)/n bytes up (all-to-all) and down (allgather).
    packed = (s["model_dim"] + 7) // 8
    chunk = (packed + 4) // 5
    phases = s["bytes_per_rank_per_step_by_channel"]
    assert phases["vote"] == {"sent": 4 * chunk, "recv": 4 * chunk}
    assert phases["vote_result"] == {"sent": 4 * chunk, "recv": 4 * chunk}
    assert s["algorithm_info"] == {"adversaries": [], "adversary": None}
    with h5py.File(tmp_path / "s" / "metrics.h5") as f:
        margin = f["eval/vote_margin"][()]
    assert len(margin) == 10 and np.all((margin > 0) & (margin < 1))


def test_two_inverting_adversaries_of_five_are_outvoted(tmp_path):
    res = run(5, str(CONFIGS / "signum-adversaries.yaml"), tmp_path / "a", "--quiet")
    assert res.returncode == 0, res.stderr
    s = read_summary(tmp_path / "a")
    assert s["algorithm_info"] == {"adversaries": [3, 4], "adversary": "invert"}
    assert s["final"]["accuracy"] >= 0.85


def test_three_inverting_adversaries_of_five_flip_the_vote(tmp_path):
    res = run(5, str(CONFIGS / "signum-adversaries.yaml"), tmp_path / "a", "--quiet",
              "--set", "algorithm.adversaries=[0,2,4]")
    assert res.returncode == 0, res.stderr
    s = read_summary(tmp_path / "a")
    assert s["algorithm_info"] == {"adversaries": [0, 2, 4], "adversary": "invert"}
    assert s["final"]["accuracy"] < 0.3  # ten classes: no better than chance


def test_random_adversary_and_ef_signsgd_train(tmp_path):
    cfg = write_config(tmp_path, {"algorithm": {"name": "signum", "lr": 0.01, "momentum": None,
                                                "adversaries": 1, "adversary": "random"}})
    res = run(3, cfg, tmp_path / "r")
    assert res.returncode == 0, res.stderr
    s = read_summary(tmp_path / "r")
    assert s["algorithm_info"] == {"adversaries": [2], "adversary": "random"}
    assert s["final"]["accuracy"] > 0.6
    cfg = write_config(tmp_path, {"algorithm": {"name": "ef_signsgd", "lr": 0.1,
                                                "momentum": 0.9}})
    res = run(3, cfg, tmp_path / "ef")
    assert res.returncode == 0, res.stderr
    s = read_summary(tmp_path / "ef")
    assert s["final"]["accuracy"] > 0.6
    # (n-1) packed vectors and scales per rank per step: 1 bit per parameter plus 8 bytes.
    assert s["bytes_sent_per_rank_per_step"] == 2 * (-(-s["model_dim"] // 8) + 8)


def test_vote_transports_give_identical_parameters(tmp_path):
    cfg = write_config(tmp_path, {"algorithm": {"name": "signum", "lr": 0.01, "momentum": None},
                                  "run": {"steps": 30, "eval_every": 0}})
    models = []
    # Pipelined in 5-byte segments (the 227-parameter model has 6 of them) or in one piece.
    for vote, seg in (("sharded", 5), ("sharded", 0), ("allgather", 5), ("server", 5)):
        out = tmp_path / f"{vote}{seg}"
        res = run(3, cfg, out, "--set", f"algorithm.vote={vote}",
                  "--set", f"algorithm.segment_bytes={seg}")
        assert res.returncode == 0, res.stderr
        models.append(read_model(out))
    assert all(np.array_equal(models[0], m) for m in models[1:])


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
    assert np.all(np.isfinite(read_model(tmp_path / policy)))
    assert read_summary(tmp_path / policy)["final"]["accuracy"] > 0.6
