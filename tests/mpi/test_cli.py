"""The command line: every invalid input exits 2 with one line, and the other subcommands."""

import json
import socket

import pytest
import yaml
from conftest import CONFIGS, launch, mpiopt_cmd

QUICK = str(CONFIGS / "quickstart.yaml")


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def cfg_with(tmp_path, **sections):
    cfg = yaml.safe_load(open(QUICK))
    for section, values in sections.items():
        cfg[section].update(values)
    return write(tmp_path, "c.yaml", yaml.safe_dump(cfg))


INVALID = [
    # (case id, config builder, extra args, expected line)
    ("missing file", lambda t: str(t / "nope.yaml"), [], "config file not found: {t}/nope.yaml"),
    ("unreadable", lambda t: str(t), [], "cannot read config file {t}: Is a directory"),
    ("bad yaml", lambda t: write(t, "b.yaml", "run: {steps: 3\n"), [],
     "invalid YAML in {t}/b.yaml at line 2, column 1: expected ',' or '}}', but got "
     "'<stream end>'"),
    ("unknown key", lambda t: QUICK, ["--set", "run.stepz=3"],
     "run.stepz: unknown key for run; valid keys: comm_timeout_s, cuda_aware, device, "
     "eval_every, metrics_chunk, out, overwrite, progress_every_s, quiet, seed, slowdown, "
     "steps, target_accuracy, time_limit_s, total_steps"),
    ("unknown algorithm", lambda t: QUICK, ["--set", "algorithm.name=adam"],
     "algorithm.name: unknown algorithm 'adam'; valid: ad_psgd, allreduce, asgd, d_psgd, "
     "dcasgd, dpsgd, ef_signsgd, gsgm, local_sgd, mll_sgd, signsgd, signum, swarm"),
    ("unknown problem", lambda t: QUICK, ["--set", "problem.name=cnn"],
     "problem.name: unknown problem 'cnn'; valid: a2c, lda, mlp, softmax"),
    ("unknown dataset", lambda t: QUICK, ["--set", "data.name=mnist"],
     "data.name: unknown data 'mnist'; valid: bow, digits, fashion_mnist, hdf5, news, none, "
     "reuters, synthetic, synthetic_lda"),
    ("host-only problem", lambda t: str(CONFIGS / "a2c-cartpole.yaml"),
     ["--set", "run.device=gpu"], "run.device: a2c runs on host memory; valid: cpu, auto"),
    ("wrong type", lambda t: QUICK, ["--set", "data.batch_size=big"],
     "data.batch_size: expected integer, got 'big'"),
    ("negative lr", lambda t: QUICK, ["--set", "algorithm.lr=-0.1"],
     "algorithm.lr: must be in (0, inf), got -0.1"),
    ("zero batch", lambda t: QUICK, ["--set", "data.batch_size=0"],
     "data.batch_size: must be in [1, inf), got 0"),
    ("probability", lambda t: QUICK, ["--set", "run.target_accuracy=2"],
     "run.target_accuracy: must be in [0, 1], got 2.0"),
    ("partition does not fit", lambda t: QUICK,
     ["--set", "data.partition=shards", "--set", "data.classes_per_rank=2000"],
     "data.classes_per_rank: 1 ranks x 2000 shards need at least 2000 training samples, "
     "there are 1438; use classes_per_rank <= 1438"),
    ("batch larger than shard", lambda t: QUICK, ["--set", "data.batch_size=5000"],
     "data.batch_size: 5000 is larger than the 1438 samples of rank 0's shard"),
    ("bad --set", lambda t: QUICK, ["--set", "steps=3"],
     "--set: 'steps' is not section.key with section one of: problem, data, algorithm, run"),
    ("bad flag value", lambda t: QUICK, ["--steps", "many"],
     "argument --steps: invalid int value: 'many' (see 'mpiopt run --help')"),
]


@pytest.mark.parametrize("case,build,extra,expected", INVALID, ids=[c[0] for c in INVALID])
def test_invalid_input_exits_2_with_one_line(tmp_path, case, build, extra, expected):
    out = tmp_path / "out"
    res = launch(None, [*mpiopt_cmd(), "run", build(tmp_path), "--out", str(out), *extra],
                 timeout=60, cwd=tmp_path)
    assert res.returncode == 2
    assert res.stderr == f"mpiopt: error: {expected.format(t=tmp_path)}\n"
    assert res.stdout == ""
    assert not out.exists() and not (tmp_path / "runs").exists()


def test_existing_output_directory(tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    res = launch(None, [*mpiopt_cmd(), "run", QUICK, "--out", str(out)], timeout=60)
    assert res.returncode == 2
    assert res.stderr == (f"mpiopt: error: run.out: {out} already exists; choose another or "
                          "pass --overwrite\n")
    assert (out / "keep.txt").exists()


@pytest.mark.mpi
def test_errors_print_once_and_every_rank_exits_2(tmp_path):
    res = launch(3, [*mpiopt_cmd(), "run", QUICK, "--set", "algorithm.momentum=1.5",
                     "--out", str(tmp_path / "o")], timeout=60)
    assert res.returncode == 2
    assert res.stderr == "mpiopt: error: algorithm.momentum: must be in [0, 1), got 1.5\n"


@pytest.mark.mpi
def test_partition_that_does_not_fit_the_world(tmp_path):
    cfg = cfg_with(tmp_path, data={"partition": "shards", "classes_per_rank": 600})
    res = launch(3, [*mpiopt_cmd(), "run", cfg, "--out", str(tmp_path / "o")], timeout=60)
    assert res.returncode == 2
    assert res.stderr.startswith("mpiopt: error: data.classes_per_rank: 3 ranks x 600 shards")
    assert res.stderr.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_info():
    res = launch(None, [*mpiopt_cmd(), "info"], timeout=60)
    assert res.returncode == 0, res.stderr
    for key in ("numpy", "numba", "h5py", "mpi4py", "cupy", "mpi_library", "mpi_thread_level",
                "mpi_world_size", "gpus", "cuda_aware_mpi"):
        assert key in res.stdout
    assert "MPICH" in res.stdout or "Open MPI" in res.stdout


def test_data_describe(tmp_path):
    res = launch(None, [*mpiopt_cmd(), "data", "describe", QUICK, "--ranks", "3", "--set",
                        "data.partition=shards"], timeout=60)
    assert res.returncode == 0, res.stderr
    rows = [line for line in res.stdout.splitlines() if line.strip().split(" ")[0].isdigit()]
    assert len(rows) == 3
    # A parameter server's data goes to its workers, ranks 1.. : rank 0 gets no row.
    res = launch(None, [*mpiopt_cmd(), "data", "describe", str(CONFIGS / "gsgm-digits.yaml"),
                        "--ranks", "4"], timeout=60)
    assert res.returncode == 0, res.stderr
    rows = [line.split() for line in res.stdout.splitlines() if line[:6].strip().isdigit()]
    assert [r[0] for r in rows] == ["1", "2", "3"]
    assert sum(int(r[1]) for r in rows) == 1438


@pytest.mark.mpi
def test_report_from_real_runs(tmp_path):
    runs = []
    for lr in ("0.05", "0.2"):
        out = tmp_path / f"lr{lr}"
        res = launch(2, [*mpiopt_cmd(), "run", QUICK, "--steps", "60", "--quiet", "--set",
                         f"algorithm.lr={lr}", "--set", "run.eval_every=20", "--out",
                         str(out)], timeout=90)
        assert res.returncode == 0, res.stderr
        runs.append(str(out))
    res = launch(None, [*mpiopt_cmd(), "report", *runs, "--out", str(tmp_path / "rep"),
                        "--target", "0.5"], timeout=90)
    assert res.returncode == 0, res.stderr
    report = (tmp_path / "rep" / "report.md").read_text()
    assert "algorithm.lr=0.05" in report and "algorithm.lr=0.2" in report
    for png in ("loss.png", "accuracy.png", "training_loss.png"):
        assert (tmp_path / "rep" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((tmp_path / "lr0.05" / "summary.json").read_text())
    assert f"{summary['final']['accuracy']:.4f}" in report


def test_report_of_a_non_run_is_a_user_error(tmp_path):
    res = launch(None, [*mpiopt_cmd(), "report", str(tmp_path), "--out", str(tmp_path / "r")],
                 timeout=60)
    assert res.returncode == 2 and res.stderr.count("\n") == 1
    assert res.stderr.startswith("mpiopt: error:")


def test_jobs(tmp_path):
    res = launch(None, [*mpiopt_cmd(), "jobs", "list"], timeout=60)
    assert "configs/quickstart.yaml" in res.stdout and "slurm/multinode.sbatch" in res.stdout
    res = launch(None, [*mpiopt_cmd(), "jobs", "slurm", QUICK, "--nodes", "3",
                        "--tasks-per-node", "8"], timeout=60)
    assert res.returncode == 0, res.stderr
    assert "#SBATCH --nodes=3" in res.stdout and "#SBATCH --ntasks-per-node=8" in res.stdout
    assert res.stdout.count("#SBATCH --nodes=") == 1  # the template's own default replaced
    assert f'CONFIG={QUICK}' in res.stdout
    res = launch(None, [*mpiopt_cmd(), "jobs", "slurm", QUICK, "--template", "sweep",
                        "--algorithms", "signum,adam"], timeout=60)
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.startswith("mpiopt: error: --algorithms: unknown algorithm 'adam'")


@pytest.mark.mpi
def test_hosts_script_runs_on_the_listed_hosts(tmp_path):
    """Two names of this machine: hydra starts both hosts' ranks here, without ssh."""
    cfg = cfg_with(tmp_path, run={"steps": 10, "eval_every": 5})
    res = launch(None, [*mpiopt_cmd(), "jobs", "hosts", cfg, "--tasks-per-node", "2",
                        "--hosts", f"localhost,{socket.gethostname()}"], timeout=60)
    assert res.returncode == 0, res.stderr
    script = write(tmp_path, "run.sh", res.stdout)
    res = launch(None, ["bash", script, "--steps", "6"], timeout=120, cwd=tmp_path,
                 env={"MPIOPT_OUT": "runs/hosts"})
    assert res.returncode == 0, res.stderr
    result = json.loads((tmp_path / "runs" / "hosts" / "summary.json").read_text())
    assert result["world_size"] == 4 and result["steps"] == 6


@pytest.mark.mpi
def test_bench_comm_and_train_smoke(tmp_path):
    res = launch(2, [*mpiopt_cmd(), "bench", "comm", "--max-mb", "1", "--repeats", "3",
                     "--json", str(tmp_path / "c.json")], timeout=120)
    assert res.returncode == 0, res.stderr
    rows = json.loads((tmp_path / "c.json").read_text())["allreduce"]
    assert [r["bytes"] for r in rows] == [1024, 4096, 16384, 65536, 262144, 1048576]
    assert all(r["ratio"] > 0 for r in rows)
    res = launch(2, [*mpiopt_cmd(), "bench", "train", "--steps", "50", "--repeats", "1",
                     "--json", str(tmp_path / "t.json")], timeout=120)
    assert res.returncode == 0, res.stderr
    result = json.loads((tmp_path / "t.json").read_text())
    assert result["ranks"] == 2 and result["ratio"] > 0
    assert "ratio:" in res.stdout


@pytest.mark.mpi
def test_bench_comm_algorithm_steps(tmp_path):
    res = launch(3, [*mpiopt_cmd(), "bench", "comm", "--algorithm", "signum", "--size", "4099",
                     "--repeats", "2", "--json", str(tmp_path / "v.json")], timeout=120)
    assert res.returncode == 0, res.stderr
    rows = json.loads((tmp_path / "v.json").read_text())["vote"]
    assert {r["transport"] for r in rows} >= {"sharded", "allgather", "server", "allreduce"}
    assert all(r["d"] == 4099 and r["time_s"] > 0 for r in rows)
    res = launch(3, [*mpiopt_cmd(), "bench", "comm", "--algorithm", "swarm", "--size", "65536",
                     "--repeats", "5", "--json", str(tmp_path / "s.json")], timeout=120)
    assert res.returncode == 0, res.stderr
    rows = json.loads((tmp_path / "s.json").read_text())["reads"]
    assert [r["path"] for r in rows] == ["raw Get, idle", "read, idle", "read, busy",
                                         "lattice16, busy"]  # one node: no thread row
    assert all(r["reads"] >= 1 and r["median_s"] > 0 for r in rows)
    assert rows[0]["ratio"] == 1.0 and not rows[0]["remote"] and rows[0]["fallbacks"] == 0
    res = launch(2, [*mpiopt_cmd(), "bench", "comm", "--algorithm", "swarmm"], timeout=60)
    assert res.returncode == 2 and "signum, swarm" in res.stderr


def test_bench_startup_smoke(tmp_path):
    # A plain process: it launches the ranks itself, a bare launch against each config.
    res = launch(None, [*mpiopt_cmd(), "bench", "startup", "--repeats", "1", "--ranks", "2",
                        "--steps", "20", "--json", str(tmp_path / "s.json")], timeout=120)
    assert res.returncode == 0, res.stderr
    rows = json.loads((tmp_path / "s.json").read_text())
    assert [(r["config"], r["ranks"], r["steps"]) for r in rows] == [
        ("quickstart", 2, 20), ("signum-digits", 2, 20)]
    for r in rows:
        assert 0 < r["run_s"] < r["wall_s"] and r["bare_s"] > 0
        assert r["ratio"] == pytest.approx((r["wall_s"] if r["compared"] == "wall"
                                            else r["overhead_s"]) / r["bare_s"])
    res = launch(2, [*mpiopt_cmd(), "bench", "startup"], timeout=60)
    assert res.returncode == 2 and "not under mpiexec" in res.stderr


@pytest.mark.mpi
def test_bench_ps_smoke(tmp_path):
    res = launch(3, [*mpiopt_cmd(), "bench", "ps", "--size", "1000", "--steps", "20",
                     "--repeats", "2", "--json", str(tmp_path / "p.json")], timeout=120)
    assert res.returncode == 0, res.stderr
    result = json.loads((tmp_path / "p.json").read_text())
    assert result["ranks"] == 3
    (row,) = result["ps"]
    assert (row["d"], row["ranks"], row["workers"], row["updates"], row["rounds"]) == (
        1000, 3, 2, 20, 2)
    assert row["reference_updates_per_s"] > 0 and row["mpiopt_updates_per_s"] > 0
    lo, hi = row["ratio_range"]
    assert 0 < lo <= row["ratio"] <= hi
    assert "ratio" in res.stdout and "1K" in res.stdout
    res = launch(None, [*mpiopt_cmd(), "bench", "ps"], timeout=60)
    assert res.returncode == 2 and "at least 2 ranks" in res.stderr
