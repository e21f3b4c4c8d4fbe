"""SwarmSGD on real ranks: averaging invariants, progress past a busy partner, clean stops."""

import h5py
import numpy as np
import pytest
from conftest import CONFIGS, launch, python_script
from test_run import read_summary, run, write_config

pytestmark = pytest.mark.mpi


@pytest.mark.parametrize("n, mode, quantize, topologies", [
    (2, "pairwise", "none", ["complete", "ring"]),
    (3, "pull", "lattice16", ["complete", "ring"]),
    (5, "pairwise", "lattice16", ["ring", "random_regular:2"]),
    (6, "pull", "lattice8", ["random_regular:3", "torus"]),
    (6, "pairwise", "fp16", ["torus", "complete"]),
    (1, "pull", "lattice16", ["complete"]),
])
def test_averaging_with_lr_zero(n, mode, quantize, topologies):
    res = launch(n, [*python_script("check_swarm.py"), mode, quantize, *topologies],
                 timeout=120)
    assert res.returncode == 0, res.stderr
    assert f"swarm checks passed on {n} ranks ({mode}, {quantize})" in res.stdout


@pytest.mark.parametrize("n, mode", [(3, "pairwise"), (4, "pull")])
def test_averaging_through_mpi_get(n, mode):
    # The path of partners on other nodes: every read is a Get under the NOCHECK epoch.
    res = launch(n, [*python_script("check_swarm.py"), mode, "lattice16", "ring", "complete"],
                 env={"MPIOPT_TEST_GET": "1"}, timeout=120)
    assert res.returncode == 0, res.stderr
    assert f"swarm checks passed on {n} ranks ({mode}, lattice16)" in res.stdout


def test_swarm_digits_accuracy_and_bytes(tmp_path):
    res = run(6, str(CONFIGS / "swarm-digits.yaml"), tmp_path / "s", "--quiet")
    assert res.returncode == 0, res.stderr
    s = read_summary(tmp_path / "s")
    assert s["final"]["accuracy"] >= 0.90  # the average model
    info = s["algorithm_info"]
    assert info["bytes_per_interaction"] <= 0.55 * info["fp32_bytes_per_interaction"]
    assert info["interactions_per_rank"] == [300] * 6  # 600 steps, H = 2
    assert s["steps_per_rank"] == [600] * 6
    with h5py.File(tmp_path / "s" / "metrics.h5") as f:
        dist = f["eval/consensus_distance"][()]
        assert len(dist) == 6 and np.all(np.isfinite(dist))
        assert "rank0_accuracy" in f["eval"]


def test_reads_do_not_wait_for_a_stalled_partner(tmp_path):
    # Rank 2 sleeps 2 s without entering MPI; ranks 0 and 1 keep reading its window.
    cfg = write_config(tmp_path, {"algorithm": {"name": "swarm", "lr": 0.05, "momentum": 0.9,
                                                "topology": "complete"},
                                  "run": {"steps": 1_000_000, "time_limit_s": 3.0,
                                          "eval_every": 0}})
    res = run(3, cfg, tmp_path / "s", env={"MPIOPT_FAULT": "stall:rank=2:step=20:seconds=2"},
              timeout=120)
    assert res.returncode == 0, res.stderr
    s = read_summary(tmp_path / "s")
    info = s["algorithm_info"]
    # Stated bound: one interaction (a read and an average) finishes within 0.25 s even when
    # the partner computes; the median is tens of microseconds.
    assert max(info["longest_interaction_s_per_rank"][:2]) < 0.25, info
    steps = s["steps_per_rank"]
    assert min(steps[0], steps[1]) > 1.5 * steps[2], steps
    with h5py.File(tmp_path / "s" / "metrics.h5") as f:
        for r in (0, 1):
            times = f[f"ranks/{r}/time"][()]
            assert np.diff(times).max() < 0.5, (r, np.diff(times).max())
    # Half of the fast ranks' partners were the stalled rank: they kept interacting.
    assert min(info["interactions_per_rank"][:2]) > 1.5 * info["interactions_per_rank"][2]


def test_get_reads_do_not_wait_for_a_stalled_partner(tmp_path):
    cfg = write_config(tmp_path, {"algorithm": {"name": "swarm", "lr": 0.05, "momentum": 0.9,
                                                "topology": "complete", "direct_reads": False},
                                  "run": {"steps": 1_000_000, "time_limit_s": 3.0,
                                          "eval_every": 0}})
    res = run(3, cfg, tmp_path / "s", env={"MPIOPT_FAULT": "stall:rank=2:step=20:seconds=2"},
              timeout=120)
    assert res.returncode == 0, res.stderr
    info = read_summary(tmp_path / "s")["algorithm_info"]
    assert max(info["longest_interaction_s_per_rank"][:2]) < 0.25, info


def test_ranks_of_different_speeds_stop_cleanly_twenty_times(tmp_path):
    for i in range(20):
        mode = ("pull", "pairwise")[i % 2]
        cfg = write_config(tmp_path, {"algorithm": {
            "name": "swarm", "lr": 0.05, "momentum": 0.9, "mode": mode,
            "local_steps": 2, "local_steps_dist": "geometric", "topology": "ring",
            "slow_ranks": [i % 3], "slow_s": 0.003}, "run": {"steps": 40, "eval_every": 0,
                                                             "seed": i}})
        out = tmp_path / f"r{i}"
        res = run(3, cfg, out, timeout=60)
        assert res.returncode == 0, (i, res.stderr)
        s = read_summary(out)
        assert s["steps_per_rank"] == [40, 40, 40]
        assert np.isfinite(s["final"]["loss"])
