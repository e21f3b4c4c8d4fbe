"""``mpiopt run`` end to end on real ranks: the run contract, baselines, determinism, faults."""

import json
import subprocess
import time

import h5py
import numpy as np
import pytest
import yaml
from conftest import CONFIGS, launch, mpiopt_cmd, run_check_script

pytestmark = pytest.mark.mpi

SMALL = {
    "problem": {"name": "mlp", "hidden": [16]},
    "data": {"name": "synthetic", "n_samples": 600, "n_test": 200, "n_features": 10,
             "n_classes": 3, "batch_size": 16},
    "algorithm": {"name": "allreduce", "lr": 0.1, "momentum": 0.9},
    "run": {"steps": 60, "eval_every": 20, "seed": 3, "quiet": True},
}


def write_config(tmp_path, overrides=None, name="cfg.yaml"):
    cfg = {k: dict(v) for k, v in SMALL.items()}
    for section, values in (overrides or {}).items():  # a None value removes the key
        cfg[section].update(values)
        cfg[section] = {k: v for k, v in cfg[section].items() if v is not None}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def run(n, config, out, *extra, env=None, timeout=120):
    return launch(n, [*mpiopt_cmd(), "run", config, "--out", str(out), *extra], env=env,
                  timeout=timeout)


def read_summary(out):
    return json.loads((out / "summary.json").read_text())


def read_model(out):
    """Return the final parameters a run saved (model.h5)."""
    with h5py.File(out / "model.h5", "r") as f:
        return f["x"][()]


def test_quickstart_reaches_target_accuracy(tmp_path):
    out = tmp_path / "qs"
    res = run(4, str(CONFIGS / "quickstart.yaml"), out)
    assert res.returncode == 0, res.stderr
    summary = read_summary(out)
    assert summary["final"]["accuracy"] >= 0.93
    assert summary["world_size"] == 4 and summary["steps"] == 400
    d = summary["model_dim"]
    # Ring-allreduce volume of one fp32 gradient per step, nothing else.
    assert summary["bytes_sent_per_rank_per_step"] == pytest.approx(2 * 3 / 4 * 4 * d, rel=1e-6)
    assert "allreduce on 4 rank(s)" in res.stdout and "done in" in res.stdout


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_run_contract(tmp_path, n):
    out = tmp_path / "run"
    res = run(n, write_config(tmp_path), out)
    assert res.returncode == 0, res.stderr
    assert res.stderr.count("error") == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "metrics.h5", "model.h5",
                                                      "summary.json"]
    summary = read_summary(out)
    for key in ("algorithm", "world_size", "steps", "wall_time_s", "final",
                "bytes_sent_total", "bytes_sent_per_rank_per_step", "peak_rss_mb"):
        assert key in summary
    assert summary["world_size"] == n and summary["steps"] == 60
    assert len(summary["peak_rss_mb"]) == n
    effective = yaml.safe_load((out / "config.yaml").read_text())
    assert effective["run"]["out"] == str(out) and effective["algorithm"]["momentum"] == 0.9
    with h5py.File(out / "metrics.h5", "r") as f:
        assert f.attrs["world_size"] == n and f.attrs["algorithm"] == "allreduce"
        assert sorted(f["ranks"], key=int) == [str(r) for r in range(n)]
        for r in range(n):
            g = f["ranks"][str(r)]
            assert np.array_equal(g["step"][()], np.arange(60))
            assert np.all(np.diff(g["time"][()]) >= 0)
            assert np.all(g["compute_s"][()] >= 0) and np.all(g["comm_s"][()] >= 0)
            assert g["bytes_sent"][()].sum() == summary["bytes_sent_total"] // n
        assert list(f["eval"]["step"][()]) == [20, 40, 60]
        assert f["eval"]["accuracy"][-1] == pytest.approx(summary["final"]["accuracy"])
    assert summary["final"]["accuracy"] > 0.6


def test_allreduce_is_deterministic(tmp_path):
    cfg = write_config(tmp_path)
    models = []
    for name, seed in (("a", "3"), ("b", "3"), ("c", "4")):
        res = run(3, cfg, tmp_path / name, "--seed", seed)
        assert res.returncode == 0, res.stderr
        models.append(read_model(tmp_path / name))
    assert np.array_equal(models[0], models[1])
    assert not np.array_equal(models[0], models[2])


@pytest.mark.parametrize("n", [2, 3])
def test_local_sgd_traffic_and_consensus(tmp_path, n):
    cfg = write_config(tmp_path, {"algorithm": {"name": "local_sgd", "local_steps": 4}})
    res = run(n, cfg, tmp_path / "local")
    assert res.returncode == 0, res.stderr
    summary = read_summary(tmp_path / "local")
    d = summary["model_dim"]
    # One fp32 model average every 4 steps (60 steps = 15 averages), counted per call.
    assert summary["bytes_sent_total"] == n * 15 * int(2 * (n - 1) * 4 * d / n)
    with h5py.File(tmp_path / "local" / "metrics.h5", "r") as f:
        dist = f["eval"]["consensus_distance"][()]
    # Evaluations at steps 20 and 40 fall right after an average; the final model is averaged.
    assert np.all(dist < 1e-10)
    assert summary["final"]["accuracy"] > 0.6


def test_baseline_switch_warns_and_drops_keys(tmp_path):
    cfg = write_config(tmp_path, {"algorithm": {"name": "local_sgd", "local_steps": 4}})
    res = run(2, cfg, tmp_path / "x", "--set", "algorithm.name=allreduce", "--quiet")
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("algorithm.local_steps does not apply") == 1
    assert read_summary(tmp_path / "x")["algorithm"] == "allreduce"


def _leftover(marker: str) -> list[str]:
    ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [line for line in ps.splitlines() if marker in line and "ps -eo" not in line]


@pytest.mark.parametrize("kind", ["raise", "kill"])
def test_fault_on_one_rank_ends_the_job(tmp_path, kind):
    cfg = write_config(tmp_path, {"run": {"steps": 100000}})
    out = tmp_path / f"fault-{kind}"
    t0 = time.monotonic()
    res = run(4, cfg, out, env={"MPIOPT_FAULT": f"{kind}:rank=2:step=5"}, timeout=60)
    elapsed = time.monotonic() - t0
    assert res.returncode != 0
    assert elapsed < 30
    if kind == "raise":
        assert "injected fault on rank 2 at step 5" in res.stderr
        assert "mpiopt: rank 2: InjectedFault" in res.stderr
    else:
        assert "signal 9" in res.stdout + res.stderr or "Killed" in res.stdout + res.stderr
    time.sleep(0.5)
    assert _leftover(str(out)) == []


def test_nan_fault_stops_with_the_step(tmp_path):
    res = run(3, write_config(tmp_path), tmp_path / "nan",
              env={"MPIOPT_FAULT": "nan:rank=1:step=10"}, timeout=60)
    assert res.returncode != 0
    assert "non-finite loss" in res.stderr and "step 11" in res.stderr


def test_stalled_rank_delays_but_completes(tmp_path):
    res = run(3, write_config(tmp_path), tmp_path / "stall",
              env={"MPIOPT_FAULT": "stall:rank=1:step=10:seconds=1.5"}, timeout=90)
    assert res.returncode == 0, res.stderr
    summary = read_summary(tmp_path / "stall")
    assert summary["wall_time_s"] >= 1.5
    with h5py.File(tmp_path / "stall" / "metrics.h5", "r") as f:
        # The other ranks waited inside the allreduce of step 10: communication time.
        assert f["ranks"]["0"]["comm_s"][10] >= 1.0
        assert f["ranks"]["1"]["compute_s"][10] >= 1.4


def test_bad_fault_spec_is_a_user_error(tmp_path):
    res = run(2, write_config(tmp_path), tmp_path / "bad", env={"MPIOPT_FAULT": "boom:rank=0"})
    assert res.returncode == 2
    assert res.stderr.strip() == ("mpiopt: error: MPIOPT_FAULT: unknown fault 'boom'; valid: "
                                  "raise, kill, nan, stall")
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("n,topology", [(1, "ring"), (3, "ring"), (4, "torus"),
                                        (4, "hypercube"), (5, "random_regular:2")])
def test_d_psgd_gossips_with_neighbours(tmp_path, n, topology):
    cfg = write_config(tmp_path, {"algorithm": {"name": "d_psgd", "topology": topology}})
    res = run(n, cfg, tmp_path / "d")
    assert res.returncode == 0, res.stderr
    summary = read_summary(tmp_path / "d")
    from mpiopt.comm.topology import build_topology

    top = build_topology(topology, n)
    degree_sum = sum(top.degree(i) for i in range(n))
    # Each step every rank sends its fp32 model to each neighbour.
    assert summary["bytes_sent_total"] == 60 * degree_sum * 4 * summary["model_dim"]
    with h5py.File(tmp_path / "d" / "metrics.h5", "r") as f:
        dist = f["eval"]["consensus_distance"][()]
    assert np.all(np.isfinite(dist)) and summary["final"]["accuracy"] > 0.6


@pytest.mark.parametrize("n, topologies", [
    (3, ["ring", "[[0, 1], [1, 2]]"]),
    (4, ["torus", "hypercube", "[[0, 1], [0, 2], [0, 3], [1, 2]]"]),
    (5, ["random_regular:2", "complete", "[[0, 1], [1, 2], [1, 3], [3, 4]]"]),
])
def test_d_psgd_with_lr_zero_mixes_by_the_matrix(n, topologies):
    # Edge lists give irregular graphs, whose Metropolis-Hastings weights differ by edge.
    run_check_script(n, "check_d_psgd.py", f"d_psgd checks passed on {n} ranks",
                     args=topologies)


def test_topology_that_does_not_fit_the_world(tmp_path):
    cfg = write_config(tmp_path, {"algorithm": {"name": "d_psgd", "topology": "hypercube"}})
    res = run(3, cfg, tmp_path / "h")
    assert res.returncode == 2
    assert res.stderr.startswith("mpiopt: error: algorithm.topology:")
    assert res.stderr.count("\n") == 1 and "power-of-two number of ranks" in res.stderr
    assert not (tmp_path / "h").exists()
