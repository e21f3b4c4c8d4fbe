"""The asynchronous parameter server on real ranks: pushes applied once, no hang, equivalence."""

import h5py
import numpy as np
import pytest
from conftest import run_check_script
from test_run import read_model, read_summary, run, write_config

from mpiopt.io.stability import stability

pytestmark = pytest.mark.mpi

ASGD = {"name": "asgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4}
GSGM = {"name": "gsgm", "lr": 0.05, "momentum": None, "beta": 0.9, "weight_decay": 1e-4,
        "max_wait": 0.05}


@pytest.mark.parametrize("n, runs, algorithm", [
    (3, 3, ASGD), (5, 2, ASGD), (8, 2, {**ASGD, "servers": 3}),
    (3, 2, GSGM), (5, 2, {**GSGM, "servers": 2}), (8, 1, GSGM)])
def test_slow_worker_every_push_applied_once(tmp_path, n, runs, algorithm):
    # Several servers: each applies every push once, and they stop together (goodbyes).
    cfg = write_config(tmp_path, {"algorithm": algorithm,
                                  "run": {"steps": 150, "eval_every": 50}})
    run_check_script(n, "check_ps.py", f"ps checks passed on {n} ranks ({runs} runs)",
                     args=[cfg, str(tmp_path), str(runs)])


def _assert_equals_sequential(tmp_path, cfg, name, *sets, servers=1):
    """Run ``cfg`` as ``servers`` servers and one worker, and the allreduce baseline on one
    rank (with ``sets``); assert the two final models are equal bit for bit."""
    res = run(servers + 1, cfg, tmp_path / name)
    assert res.returncode == 0, res.stderr
    res = run(1, cfg, tmp_path / "seq", "--set", "algorithm.name=allreduce", *sets)
    assert res.returncode == 0, res.stderr
    assert np.array_equal(read_model(tmp_path / name), read_model(tmp_path / "seq"))


def test_one_worker_is_sequential_momentum_sgd_bit_for_bit(tmp_path):
    # A server and one worker apply each gradient at once at the model it was computed at:
    # exactly the allreduce baseline on one rank (momentum, weight decay, schedule, batches).
    cfg = write_config(tmp_path, {"algorithm": {**ASGD, "schedule": "cosine",
                                                "warmup_steps": 5}})
    _assert_equals_sequential(tmp_path, cfg, "ps")
    s = read_summary(tmp_path / "ps")
    assert s["steps_per_rank"] == [60, 60]
    assert s["algorithm_info"]["staleness"]["max"] == 0


def test_gsgm_with_one_worker_and_k_1_is_momentum_sgd_bit_for_bit(tmp_path):
    # Two servers, each applying the rule to its half: the same bits as one sequential run,
    # with the model that rank 0 saves assembled from both halves.
    cfg = write_config(tmp_path, {"algorithm": {**GSGM, "partial": 1, "servers": 2}})
    _assert_equals_sequential(tmp_path, cfg, "g", "--set", "algorithm.momentum=0.9",
                              servers=2)
    info = read_summary(tmp_path / "g")["algorithm_info"]
    assert info["servers"] == 2 and len(info["per_server"]) == 2
    for facts in info["per_server"]:
        assert facts["rounds"] == 61 and facts["most_contributions_per_worker_per_round"] == 1


def test_a_server_needs_a_worker(tmp_path):
    res = run(1, write_config(tmp_path, {"algorithm": ASGD}), tmp_path / "x")
    assert res.returncode == 2 and not (tmp_path / "x").exists()
    assert res.stderr == ("mpiopt: error: algorithm.name: asgd needs at least 2 ranks (a server "
                          "and a worker), got 1\n")


def test_partial_beyond_the_workers_is_refused(tmp_path):
    res = run(3, write_config(tmp_path, {"algorithm": {**GSGM, "partial": 3}}), tmp_path / "x")
    assert res.returncode == 2 and not (tmp_path / "x").exists()
    assert res.stderr == ("mpiopt: error: algorithm.partial: 3 is more than the 2 workers "
                          "(ranks 1..2); valid: 1..2\n")


def test_metrics_record_every_applied_gradient(tmp_path):
    cfg = write_config(tmp_path, {"algorithm": ASGD, "run": {"steps": 300, "eval_every": 25}})
    res = run(3, cfg, tmp_path / "ps")
    assert res.returncode == 0, res.stderr
    s = read_summary(tmp_path / "ps")
    info = s["algorithm_info"]
    with h5py.File(tmp_path / "ps" / "metrics.h5") as f:
        assert list(f["series"]) == ["0"]  # the server's; workers record none
        staleness, worker = f["series/0/staleness"][()], f["series/0/worker"][()]
        server_rows = len(f["ranks/0/step"])
        accuracy, eval_steps = f["eval/accuracy"][()], f["eval/step"][()]
    # One row per applied update (the server's step rows are the pushes it applied).
    assert len(staleness) == len(worker) == info["updates_applied"] == server_rows
    assert np.bincount(worker, minlength=2).tolist() == info["updates_per_worker"]
    assert info["updates_per_worker"] == s["steps_per_rank"][1:]
    stats = info["staleness"]
    assert (stats["mean"], stats["max"]) == (staleness.mean(), staleness.max())
    assert (stats["p50"], stats["p99"]) == tuple(np.percentile(staleness, [50, 99]))
    # asgd answers a push as soon as it applies it, so a worker's next gradient was computed
    # at the model that followed its previous one: its staleness is the count of updates
    # applied in between, which the order of the worker series gives.
    last = {}
    for j, k in enumerate(worker.tolist()):
        assert staleness[j] == j - last.get(k, -1) - 1, j
        last[k] = j
    assert staleness.max() > 0  # two workers overlap
    # Stability: from the evaluations (every 25 applied updates, then the final model).
    assert len(accuracy) >= 12
    assert s["stability"] == stability(accuracy, eval_steps)
    assert s["stability"]["mean_abs_change"] is not None


def test_staleness_bound_drops_what_is_older(tmp_path):
    # Four workers against one server: gradients 2 or more updates old are common. With a
    # bound of 1 they are dropped, not applied; every push is either applied or dropped.
    cfg = write_config(tmp_path, {"algorithm": {**ASGD, "staleness_bound": 1},
                                  "run": {"steps": 200, "eval_every": 0}})
    res = run(5, cfg, tmp_path / "b")
    assert res.returncode == 0, res.stderr
    s = read_summary(tmp_path / "b")
    info = s["algorithm_info"]
    with h5py.File(tmp_path / "b" / "metrics.h5") as f:
        staleness = f["series/0/staleness"][()]
    assert staleness.max() <= 1 and info["staleness"]["max"] <= 1
    pushed = s["steps_per_rank"][1:]
    assert [a + d for a, d in zip(info["updates_per_worker"],
                                  info["dropped_stale_per_worker"])] == pushed
    assert sum(info["dropped_stale_per_worker"]) > 0  # the case at hand
