"""SwarmSGD on real ranks: averaging invariants, progress past a busy partner, clean stops."""

import h5py
import numpy as np
import pytest
from conftest import CONFIGS, run_check_script
from test_run import read_summary, run, write_config

pytestmark = pytest.mark.mpi


def _check_averaging(n, cases, env=None):
    """Run check_swarm.py (the lr = 0 invariants) on ``n`` ranks; fail on any violation.

    ``cases`` are ``MODE,QUANTIZE,TOPOLOGY[,OPTION...]`` strings, checked in one launch.
    """
    passed = f"swarm checks passed on {n} ranks ({len(cases)} cases)"
    run_check_script(n, "check_swarm.py", passed, args=cases, env=env)


def _stalled_run(tmp_path, name, env=None, **keys):
    """Swarm on 3 ranks for 1.6 s while rank 2 sleeps 1 s at step 20; return the summary."""
    cfg = write_config(tmp_path, {"algorithm": {"name": "swarm", "lr": 0.05, "momentum": 0.9,
                                                "topology": "complete", **keys},
                                  "run": {"steps": 1_000_000, "time_limit_s": 1.6,
                                          "eval_every": 0}}, name=f"{name}.yaml")
    res = run(3, cfg, tmp_path / name,
              env={"MPIOPT_FAULT": "stall:rank=2:step=20:seconds=1", **(env or {})},
              timeout=120)
    assert res.returncode == 0, res.stderr
    return read_summary(tmp_path / name)


def _cases(mode, quantize, topologies, *options):
    return [",".join([mode, quantize, t, *options]) for t in topologies]


@pytest.mark.parametrize("n, cases", [
    (1, _cases("pull", "lattice16", ["complete"])),
    (2, _cases("pairwise", "none", ["complete", "ring"])),
    # Reads by MPI Get (the path of partners on other nodes) beside direct reads.
    (3, _cases("pull", "lattice16", ["complete", "ring"])
     + _cases("pairwise", "lattice16", ["ring", "complete"], "get")),
    # MPI Get; the authors' exclusive-publish/shared-read MPI locks.
    (4, _cases("pull", "lattice16", ["ring", "complete"], "get")
     + _cases("pull", "lattice16", ["ring", "complete"], "locks")),
    (5, _cases("pairwise", "lattice16", ["ring", "random_regular:2"])),
    # Eight ranks on two cores: many concurrent partners adding into one inbox.
    (8, _cases("pull", "lattice8", ["random_regular:3", "torus"])
     + _cases("pairwise", "fp16", ["torus", "complete"])
     + _cases("pairwise", "none", ["complete"], "get")),
])
def test_averaging_with_lr_zero(n, cases):
    _check_averaging(n, cases)


# Partners on another node, emulated on one machine: MPICH's shared-memory path is off
# (MPIR_CVAR_NOLOCAL) and UCX moves RMA over TCP, which has no hardware RMA, so a one-sided
# operation completes only when its target enters MPI, as across nodes without RDMA.
OTHER_NODES = {"MPIR_CVAR_NOLOCAL": "1", "UCX_TLS": "tcp,self"}


@pytest.mark.parametrize("n, mode, quantize, slots", [(3, "pairwise", "lattice16", 2),
                                                       (4, "pull", "fp16", 3)])
def test_averaging_across_emulated_nodes(n, mode, quantize, slots):
    _check_averaging(n, _cases(mode, quantize, ["ring", "complete"], f"slots={slots}"),
                     OTHER_NODES)


@pytest.mark.parametrize("n", [3, 8])
def test_ad_psgd_never_stalls_and_keeps_the_sum(tmp_path, n):
    # AD-PSGD on the same machinery, a 4x slower rank, up to 8 ranks on 2 cores.
    run_check_script(n, "check_swarm_stop.py", f"ad_psgd stop checks passed on {n} ranks",
                     args=[str(tmp_path), "ad_psgd", "100"])


@pytest.mark.parametrize("n, env", [(3, None), (4, OTHER_NODES)])
def test_the_stop_loses_no_correction(tmp_path, n, env):
    # Through the whole asynchronous loop (settle, serve, the stop, the last drain), with
    # lr = 0 and a slow rank: the sum of the models is preserved. Across emulated nodes a
    # correction completes at its target only when flushed.
    run_check_script(n, "check_swarm_stop.py", f"swarm stop checks passed on {n} ranks",
                     args=[str(tmp_path)], env=env)


def test_gpu_device_is_refused_before_anything_is_written(tmp_path):
    cfg = write_config(tmp_path, {"algorithm": {"name": "swarm"}, "run": {"device": "gpu"}})
    res = run(2, cfg, tmp_path / "s")
    assert res.returncode == 2
    assert res.stderr.count("run.device: swarm runs on host memory; valid: cpu, auto") == 1
    assert "Traceback" not in res.stderr and not (tmp_path / "s").exists()


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
    # Rank 2 sleeps 1 s without entering MPI; ranks 0 and 1 keep reading its window.
    s = _stalled_run(tmp_path, "s")
    info = s["algorithm_info"]
    # Stated bound: one interaction (a read and an average) finishes within 0.25 s even when
    # the partner computes; the median is tens of microseconds.
    assert max(info["longest_interaction_s_per_rank"][:2]) < 0.25, info
    # One node: every peer is read directly, so progress: auto starts no thread.
    assert info["remote_readers_per_rank"] == [0, 0, 0]
    assert info["progress_thread_per_rank"] == [False] * 3
    steps = s["steps_per_rank"]
    assert min(steps[0], steps[1]) > 1.5 * steps[2], steps
    with h5py.File(tmp_path / "s" / "metrics.h5") as f:
        for r in (0, 1):
            times = f[f"ranks/{r}/time"][()]
            assert np.diff(times).max() < 0.5, (r, np.diff(times).max())
    # Half of the fast ranks' partners were the stalled rank: they kept interacting.
    assert min(info["interactions_per_rank"][:2]) > 1.5 * info["interactions_per_rank"][2]


def test_get_reads_do_not_wait_for_a_stalled_partner(tmp_path):
    info = _stalled_run(tmp_path, "s", direct_reads=False)["algorithm_info"]
    assert max(info["longest_interaction_s_per_rank"][:2]) < 0.25, info


def test_ranks_of_different_speeds_stop_cleanly_twenty_times(tmp_path):
    cfg = write_config(tmp_path, {"algorithm": {
        "name": "swarm", "lr": 0.05, "momentum": 0.9, "local_steps": 2,
        "local_steps_dist": "geometric", "topology": "ring"},
        "run": {"steps": 40, "eval_every": 0}})
    run_check_script(3, "check_stops.py", "stop checks passed on 3 ranks (20 runs)",
                     args=[cfg, str(tmp_path)])


def test_progress_thread_serves_reads_from_other_nodes(tmp_path):
    # Without progress the emulation reproduces the problem: a read of the stalled rank
    # waits for its whole 1 s sleep.
    slow = _stalled_run(tmp_path, "none", OTHER_NODES, progress="none")["algorithm_info"]
    assert slow["remote_readers_per_rank"] == [2, 2, 2]
    assert slow["progress_thread_per_rank"] == [False] * 3
    assert max(slow["longest_interaction_s_per_rank"][:2]) > 0.6, slow
    # progress: auto starts the thread on ranks read from other nodes; the same reads then
    # finish within the bound of the node-local test.
    fast = _stalled_run(tmp_path, "auto", OTHER_NODES, progress="auto")["algorithm_info"]
    assert fast["progress_thread_per_rank"] == [True] * 3
    assert max(fast["longest_interaction_s_per_rank"][:2]) < 0.25, fast
    # No throughput comparison: with reads as polled requests (Rget) instead of Get + Flush,
    # the run without the thread interacts about 10x more than it did (measured here), and
    # the threads' own CPU use on two cores then decides which run interacts more (measured:
    # 0.6x to 2.2x, either way). The stall above is what the thread removes.


def test_mpi_locks_wait_for_a_stalled_partner(tmp_path):
    # Why rma_sync: epoch is the default: under the authors' locks, even within a node, a
    # read of a partner that sleeps 1 s waits for the lock grant, which needs its progress.
    info = _stalled_run(tmp_path, "locks", progress="none", rma_sync="locks")["algorithm_info"]
    assert max(info["longest_interaction_s_per_rank"][:2]) > 0.6, info
    # A progress thread on the sleeping rank grants the locks in time.
    info = _stalled_run(tmp_path, "locks_thread", progress="thread",
                        rma_sync="locks")["algorithm_info"]
    assert info["progress_thread_per_rank"] == [True] * 3
    assert max(info["longest_interaction_s_per_rank"][:2]) < 0.25, info


def test_without_thread_level_multiple(tmp_path):
    serialized = {**OTHER_NODES, "MPI4PY_RC_THREAD_LEVEL": "serialized"}
    cfg = write_config(tmp_path, {"algorithm": {"name": "swarm", "progress": "thread"}})
    res = run(2, cfg, tmp_path / "t", env=serialized)
    assert res.returncode == 2 and not (tmp_path / "t").exists()
    assert res.stderr.count("algorithm.progress: thread needs MPI thread level 'multiple'") == 1
    # auto runs on, one MPI entry per step, and says once that remote reads may wait.
    cfg = write_config(tmp_path, {"algorithm": {"name": "swarm"}}, name="auto.yaml")
    res = run(2, cfg, tmp_path / "a", env=serialized)
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("run no progress thread") == 1
    info = read_summary(tmp_path / "a")["algorithm_info"]
    assert info["progress_thread_per_rank"] == [False, False]
    assert info["remote_readers_per_rank"] == [1, 1]
