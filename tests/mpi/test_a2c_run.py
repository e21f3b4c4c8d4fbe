"""``mpiopt run`` of the reinforcement-learning problem a2c: serial A2C and HSA2C (dpsgd)."""

import h5py
import pytest
from test_run import read_summary, run

pytestmark = pytest.mark.mpi

TINY = """
problem: {name: a2c, hidden: [16], n_envs: 4, n_steps: 5, eval_episodes: 10}
algorithm: {name: %s, lr: 0.01, momentum: 0.9%s}
run: {steps: 150, eval_every: 50, seed: 1, quiet: true}
"""


def check_run(out, ranks_with_episodes, world_size):
    summary = read_summary(out)
    assert summary["problem"] == "a2c" and summary["dataset"] == "none"
    final, info = summary["final"], summary["problem_info"]
    assert 8 <= final["return"] <= 500 and final["loss"] == -final["return"]
    assert "accuracy" not in final and summary["stability"]["tail_std"] is None
    steps = 150 * 4 * 5
    assert info["env_steps_per_rank"] == [steps if r in ranks_with_episodes else 0
                                          for r in range(world_size)]
    assert info["env_steps_per_s"] > 0 and info["mean_return_last_100"] > 0
    with h5py.File(out / "metrics.h5", "r") as f:
        assert [r for r in range(world_size)  # a server records staleness, no episodes
                if "episode_return" in f["series"].get(str(r), {})] == ranks_with_episodes
        lengths = [f[f"series/{r}/episode_length"][()] for r in ranks_with_episodes]
        assert sum(len(x) for x in lengths) == info["episodes"] > 0
        returns = f[f"series/{ranks_with_episodes[0]}/episode_return"]
        assert (returns[()] == lengths[0]).all() and "doc" in returns.attrs  # 1 per step
        # Serial: after 50 and 100 steps and at the end. dpsgd: rank 0 (the server) evaluates
        # after every 50 of its steps (pushes applied) below run.steps, and at the end; how
        # many pushes there are depends on how far the leader's other core lags behind it.
        reporter_steps = summary["steps_per_rank"][0]
        due = [k for k in (50, 100) if k <= reporter_steps]
        assert len(f["eval/return"]) == 1 + len(due)
        assert (3 if world_size == 1 else 1) <= 1 + len(due)


def test_serial_a2c_records_episodes_and_greedy_return(tmp_path):
    cfg = tmp_path / "a2c.yaml"
    cfg.write_text(TINY % ("allreduce", ""))
    res = run(1, str(cfg), tmp_path / "out")
    assert res.returncode == 0, res.stderr
    assert "problem a2c (d=" in res.stdout and "no data" in res.stdout
    check_run(tmp_path / "out", [0], 1)


def test_hsa2c_a_server_and_a_node_of_two_cores(tmp_path):
    cfg = tmp_path / "hsa2c.yaml"
    cfg.write_text(TINY % ("dpsgd", ", node_size: 2, local_steps: 4"))
    res = run(3, str(cfg), tmp_path / "out")
    assert res.returncode == 0, res.stderr
    check_run(tmp_path / "out", [1, 2], 3)
