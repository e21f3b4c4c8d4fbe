"""The job templates on a real one-node Slurm (``jobs/slurm/local-cluster.sh``).

Every template is rendered by ``mpiopt jobs slurm`` and submitted with ``sbatch``; all jobs
are submitted at once and run side by side, and each test waits for its own to reach a final
state (``scontrol``: finished jobs stay listed for an hour). The tests read the communicator
size from summary.json, since an srun that does not wire MPI up runs singletons.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import CONFIGS

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(150)]

FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
         "BOOT_FAIL", "DEADLINE", "PREEMPTED"}
STEPS = 20


def jobs_now(cluster) -> dict[str, dict]:
    """Return every job the controller knows: job ID -> its fields."""
    res = cluster.run("scontrol", "-o", "show", "job")
    assert res.returncode == 0, res.stderr
    jobs = {}
    for line in res.stdout.splitlines():
        fields = dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
        if "JobId" in fields:
            jobs[fields["JobId"]] = fields
    return jobs


def wait(cluster, job_ids, timeout: float = 100) -> dict[str, dict]:
    """Wait until every job in ``job_ids`` is in a final state; return their fields."""
    deadline = time.monotonic() + timeout
    while True:
        jobs = jobs_now(cluster)
        done = {j: jobs[j] for j in job_ids if jobs.get(j, {}).get("JobState") in FINAL}
        if len(done) == len(job_ids):
            return done
        if time.monotonic() > deadline:
            pytest.fail(f"jobs not finished after {timeout}s: "
                        f"{ {j: jobs.get(j, {}).get('JobState') for j in job_ids} }")
        time.sleep(0.25)


def summary(work: Path, run_dir: str) -> dict:
    return json.loads((work / run_dir / "summary.json").read_text())


def log(work: Path, job_id: str) -> str:
    return (work / f"mpiopt-{job_id}.out").read_text()


def write_config(path: Path, steps: int) -> Path:
    cfg = yaml.safe_load((CONFIGS / "quickstart.yaml").read_text())
    cfg["run"].update(steps=steps, eval_every=10)
    path.write_text(yaml.safe_dump(cfg))
    return path


# name -> (options of `mpiopt jobs slurm`, options of sbatch)
JOBS = {
    "preempt": (["--template", "preempt", "--signal-before", "60"],
                ["--export=ALL,MPIOPT_STOP_GRACE=1"]),
    "srun": (["--nodes", "1", "--tasks-per-node", "4"], []),
    "mpiexec": (["--nodes", "1", "--tasks-per-node", "3", "--launcher", "mpiexec"], []),
    # --export=NONE: the job starts from a bare environment and activates the venv itself.
    "single": (["--template", "single-node", "--tasks-per-node", "2"],
               ["--export=NONE"] if sys.prefix != sys.base_prefix else []),
    "failing": (["--nodes", "1", "--tasks-per-node", "4"],
                ["--export=ALL,MPIOPT_FAULT=raise:rank=2:step=5"]),
    "sweep": (["--template", "sweep", "--tasks-per-node", "2",
               "--algorithms", "allreduce,local_sgd,signum", "--seeds", "0,1"], []),
}


@pytest.fixture(scope="module")
def submitted(slurm, tmp_path_factory):
    """Render every template with the CLI (in parallel) and submit them all at once."""
    work = tmp_path_factory.mktemp("slurm-jobs")
    tiny = write_config(work / "tiny.yaml", STEPS)
    # The preempted job's first run must outlast the signal; the test shortens it after.
    long = write_config(work / "preempt.yaml", 100_000)
    renders = {name: subprocess.Popen(
        [sys.executable, "-m", "mpiopt", "jobs", "slurm",
         str(long if name == "preempt" else tiny), *options],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for name, (options, _) in JOBS.items()}
    ids = {}
    for name, proc in renders.items():
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        (work / f"{name}.sbatch").write_text(out)
        res = slurm.run("sbatch", "--parsable", *JOBS[name][1], f"{name}.sbatch", cwd=work)
        assert res.returncode == 0, res.stderr
        ids[name] = res.stdout.strip().split(";")[0]
    singletons = slurm.run(
        "sbatch", "--parsable", "--ntasks=2", "--output=mpiopt-%j.out",
        f"--wrap=srun --mpi=none {sys.executable} -m mpiopt run {tiny} --out runs/alone",
        cwd=work)
    assert singletons.returncode == 0, singletons.stderr
    ids["singletons"] = singletons.stdout.strip()
    return slurm, work, ids


def test_preempted_job_requeues_and_completes(submitted):
    """USR1 to the batch script: the trap forwards it, requeues; the rerun completes."""
    cluster, work, ids = submitted
    job = ids["preempt"]
    deadline = time.monotonic() + 60
    while not (work / "runs" / job / "config.yaml").exists():  # the ranks are training
        assert time.monotonic() < deadline, jobs_now(cluster).get(job)
        time.sleep(0.1)
    write_config(work / "preempt.yaml", STEPS)  # what the rerun reads
    res = cluster.run("scancel", "--batch", "--signal=USR1", job)
    assert res.returncode == 0, res.stderr
    # Slurm holds a requeued job back for a while before it may start again; that wait is
    # Slurm's policy, not the template's, so the test lets it start at once.
    deadline = time.monotonic() + 60
    while True:
        fields = jobs_now(cluster).get(job, {})
        if fields.get("Restarts") == "1" and fields.get("JobState") == "PENDING":
            cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now")
            break
        if fields.get("JobState") in FINAL or time.monotonic() > deadline:
            break  # already rerun (or failed: the assertions below say so)
        time.sleep(0.1)
    state = wait(cluster, [job])[job]
    text = log(work, job)
    assert state["JobState"] == "COMPLETED" and state["Restarts"] == "1", (state, text)
    assert "forwarding it to the ranks" in text and "requeueing (restart 1)" in text
    result = summary(work, f"runs/{job}")
    assert result["world_size"] == 4 and result["steps"] == STEPS


def test_srun_pmi2_runs_four_ranks(submitted):
    cluster, work, ids = submitted
    state = wait(cluster, [ids["srun"]])[ids["srun"]]
    assert state["JobState"] == "COMPLETED", log(work, ids["srun"])
    result = summary(work, f"runs/{ids['srun']}")
    assert result["world_size"] == 4 and result["steps"] == STEPS


def test_mpiexec_inside_the_allocation(submitted):
    cluster, work, ids = submitted
    states = wait(cluster, [ids["mpiexec"], ids["single"]])
    for name, ranks in (("mpiexec", 3), ("single", 2)):
        assert states[ids[name]]["JobState"] == "COMPLETED", log(work, ids[name])
        assert summary(work, f"runs/{ids[name]}")["world_size"] == ranks


def test_a_failing_rank_fails_the_job(submitted):
    cluster, work, ids = submitted
    state = wait(cluster, [ids["failing"]])[ids["failing"]]
    text = log(work, ids["failing"])
    assert state["JobState"] == "FAILED" and state["ExitCode"] != "0:0", text
    assert "mpiopt: rank 2: InjectedFault: injected fault on rank 2 at step 5" in text
    assert not (work / "runs" / ids["failing"] / "summary.json").exists()


def test_srun_without_pmi_is_refused(submitted):
    cluster, work, ids = submitted
    state = wait(cluster, [ids["singletons"]])[ids["singletons"]]
    text = log(work, ids["singletons"])
    assert state["JobState"] == "FAILED" and state["ExitCode"] == "2:0", text
    assert text.count("mpiopt: error: srun started 2 tasks but MPI sees 1 rank in each") == 1
    assert not (work / "runs" / "alone").exists()


def test_sweep_array_then_report(submitted):
    cluster, work, ids = submitted
    array = ids["sweep"]
    tasks = [j for j, f in jobs_now(cluster).items() if f.get("ArrayJobId") == array]
    assert len(tasks) == 6
    sweep = work / "runs" / f"sweep-{array}"
    deadline = time.monotonic() + 60
    while not ((sweep / "report.jobid").exists() and (sweep / "report.jobid").read_text()):
        assert time.monotonic() < deadline, "no task submitted the report"
        time.sleep(0.1)
    report = (sweep / "report.jobid").read_text().strip().split(";")[0]
    states = wait(cluster, [*tasks, report])
    assert {states[t]["JobState"] for t in tasks} == {"COMPLETED"}
    assert states[report]["JobState"] == "COMPLETED", states[report]
    assert states[report]["StartTime"] >= max(states[t]["EndTime"] for t in tasks)  # afterok
    runs = sorted(p.name for p in sweep.iterdir() if p.is_dir() and p.name != "report")
    assert runs == [f"{a}-seed{s}" for a in ("allreduce", "local_sgd", "signum")
                    for s in (0, 1)]
    for run in runs:
        result = summary(sweep, run)
        assert result["world_size"] == 2 and result["algorithm"] == run.split("-seed")[0]
    table = (sweep / "report" / "report.md").read_text()
    assert all(f"`runs/sweep-{array}/{run}/`" in table for run in runs)


def test_gpu_template_passes_sbatch_test_only(submitted, tmp_path):
    """No GPU here: the node advertises stand-in GPUs, and sbatch checks the request."""
    cluster, _, _ = submitted
    res = subprocess.run([sys.executable, "-m", "mpiopt", "jobs", "slurm",
                          str(CONFIGS / "quickstart.yaml"), "--template", "gpu",
                          "--partition", "gpu"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    script = tmp_path / "gpu.sbatch"
    script.write_text(res.stdout)
    test = cluster.run("sbatch", "--test-only", script, cwd=tmp_path)
    assert test.returncode == 0 and "to start at" in test.stderr, test.stderr
    five = cluster.run("sbatch", "--test-only", "--ntasks-per-node=5", script, cwd=tmp_path)
    assert five.returncode != 0  # one GPU per task, and the node has 4


def test_cluster_script_is_idempotent(submitted):
    cluster, _, _ = submitted
    status = cluster.script("status")
    assert status.returncode == 0 and status.stdout.startswith("up ")
    again = cluster.script("up")
    assert again.returncode == 0 and "already up" in again.stdout
