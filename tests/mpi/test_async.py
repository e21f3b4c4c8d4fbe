"""The asynchronous runtime on real ranks: slow ranks waited for, stuck ones named, budgets."""

import h5py
import numpy as np
import pytest
from test_run import read_summary, run, write_config

pytestmark = pytest.mark.mpi

SWARM = {"name": "swarm", "lr": 0.05, "momentum": 0.9, "mode": "pairwise",
         "topology": "complete"}
# Pull mode where one rank is far slower: in pairwise mode the partners' corrections, computed
# against its stale copy, pile up in its inbox and overshoot.
SWARM_PULL = {**SWARM, "mode": "pull"}


def _slowness(out, slow, fast):
    """Return the slow rank's mean compute per step over the fast rank's median (its norm)."""
    with h5py.File(out / "metrics.h5") as f:
        return (float(np.mean(f[f"ranks/{slow}/compute_s"][()]))
                / float(np.median(f[f"ranks/{fast}/compute_s"][()])))


def test_rank_twenty_times_slower_than_the_deadline_allows_completes(tmp_path):
    # Rank 1 computes 20x slower: the others finish early and then wait for it several times
    # run.comm_timeout_s. It keeps stepping, so it is waited for.
    cfg = write_config(tmp_path, {"algorithm": SWARM_PULL, "run": {
        "steps": 1500, "eval_every": 0, "comm_timeout_s": 0.3, "slowdown": {1: 20}}})
    res = run(4, cfg, tmp_path / "s", timeout=120)
    assert res.returncode == 0, res.stderr
    s = read_summary(tmp_path / "s")
    assert s["steps_per_rank"] == [1500] * 4
    with h5py.File(tmp_path / "s" / "metrics.h5") as f:
        slow_s, fast_s = (float(f[f"ranks/{r}/compute_s"][()].sum()) for r in (1, 0))
    assert slow_s - fast_s > 3 * 0.3, (slow_s, fast_s)  # waited for far past the deadline
    assert 10 < _slowness(tmp_path / "s", 1, 0) < 60  # the factor asked for, within 2-3x
    assert np.isfinite(s["final"]["loss"])


def test_a_rank_that_stops_stepping_is_named(tmp_path):
    # Rank 2 sleeps 4 s at step 10 (no step, no MPI): past the 1 s deadline the ranks that
    # wait for it at the stop name it, and the job ends instead of hanging.
    cfg = write_config(tmp_path, {"algorithm": SWARM, "run": {
        "steps": 200, "eval_every": 0, "comm_timeout_s": 1.0}})
    res = run(3, cfg, tmp_path / "x", env={"MPIOPT_FAULT": "stall:rank=2:step=10:seconds=4"},
              timeout=60)
    assert res.returncode != 0
    assert "rank 2 has taken no step for 1 s (stuck after 10 steps" in res.stderr, res.stderr


def test_total_steps_are_shared_by_speed(tmp_path):
    # 600 steps in all over 3 ranks, rank 2 four times slower: it takes fewer of them.
    cfg = write_config(tmp_path, {"algorithm": SWARM, "run": {
        "steps": 600, "total_steps": 600, "eval_every": 0, "slowdown": {2: 4}}})
    res = run(3, cfg, tmp_path / "t", timeout=120)
    assert res.returncode == 0, res.stderr
    steps = read_summary(tmp_path / "t")["steps_per_rank"]
    assert sum(steps) == 600, steps
    assert steps[2] < min(steps[0], steps[1]), steps


def test_slowdown_and_total_budget_in_synchronous_runs(tmp_path):
    cfg = write_config(tmp_path, {"run": {"slowdown": {1: 6}}})
    res = run(2, cfg, tmp_path / "a")
    assert res.returncode == 0, res.stderr
    assert 3 < _slowness(tmp_path / "a", 1, 0) < 18
    res = run(2, cfg, tmp_path / "b", "--set", "run.total_steps=100")
    assert res.returncode == 2 and not (tmp_path / "b").exists()
    assert res.stderr.startswith("mpiopt: error: run.total_steps: allreduce is synchronous")
    res = run(2, cfg, tmp_path / "c", "--set", "run.slowdown={2: 3}")
    assert res.returncode == 2
    assert res.stderr == ("mpiopt: error: run.slowdown: rank 2 does not exist: ranks are "
                          "0..1\n")
