"""`mpiopt jobs slurm`: templates filled in, every option once, valid bash (no Slurm needed)."""

import re
import subprocess

import pytest
from conftest import CONFIGS

from mpiopt import jobs
from mpiopt.errors import ConfigError

QUICK = str(CONFIGS / "quickstart.yaml")


def sbatch_options(script: str) -> dict[str, str]:
    """Return the #SBATCH options of a script; fail if one is given twice."""
    pairs = re.findall(r"^#SBATCH --([\w-]+)=(.*)$", script, re.M)
    names = [name for name, _ in pairs]
    assert len(names) == len(set(names)), f"an option repeats: {names}"
    return dict(pairs)


@pytest.mark.parametrize("template", list(jobs.SLURM_TEMPLATES))
def test_every_template_renders_to_valid_bash(template, tmp_path):
    script = jobs.render_slurm(QUICK, template, venv="/opt/venv")
    sbatch_options(script)
    assert f"CONFIG={QUICK}\n" in script and "\nshift\n" not in script
    assert "MPIOPT_VENV=${MPIOPT_VENV:-/opt/venv}" in script
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    res = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_resources_replace_the_template_defaults():
    # The bug: filled-in lines came first and the template's own --nodes=2 after them.
    options = sbatch_options(jobs.render_slurm(QUICK, nodes=1, tasks_per_node=4,
                                               time="00:05:00", partition="debug"))
    assert options["nodes"] == "1" and options["ntasks-per-node"] == "4"
    assert options["time"] == "00:05:00" and options["partition"] == "debug"
    untouched = sbatch_options(jobs.render_slurm(QUICK))
    assert untouched["nodes"] == "2" and "partition" not in untouched


def test_launcher_and_template_specific_options():
    assert "LAUNCHER=${MPIOPT_LAUNCHER:-mpiexec}" in jobs.render_slurm(QUICK, launcher="mpiexec")
    assert "LAUNCHER=${MPIOPT_LAUNCHER:-srun}" in jobs.render_slurm(QUICK, "gpu")
    gpu = sbatch_options(jobs.render_slurm(QUICK, "gpu", tasks_per_node=8))
    assert gpu["gpus-per-task"] == "1" and gpu["ntasks-per-node"] == "8"
    preempt = jobs.render_slurm(QUICK, "preempt", signal_before=300)
    assert sbatch_options(preempt)["signal"] == "B:USR1@300"
    assert "GRACE=${MPIOPT_STOP_GRACE:-150}" in preempt


def test_sweep_lists_and_array():
    script = jobs.render_slurm(QUICK, "sweep", algorithms=("signum", "allreduce"),
                               seeds=(0, 1, 2))
    assert "ALGORITHMS=(signum allreduce)\n" in script and "SEEDS=(0 1 2)\n" in script
    assert sbatch_options(script)["array"] == "0-5"
    seeds_only = jobs.render_slurm(QUICK, "sweep", seeds=(7,))
    assert "ALGORITHMS=(allreduce local_sgd signum)" in seeds_only
    assert sbatch_options(seeds_only)["array"] == "0-2"


@pytest.mark.parametrize("kwargs,message", [
    ({"template": "bash"}, "--template: unknown template 'bash'; valid: multinode, single-node"),
    ({"nodes": 0}, "--nodes: must be at least 1, got 0"),
    ({"template": "single-node", "nodes": 2}, "--nodes: the single-node template runs on 1"),
    ({"launcher": "aprun"}, "--launcher: unknown launcher 'aprun'; valid: srun, mpiexec"),
    ({"algorithms": ("signum",)}, "--algorithms: applies to --template sweep only"),
    ({"signal_before": 60}, "--signal-before: applies to --template preempt only"),
    ({"template": "sweep", "algorithms": ("adam",)},
     "--algorithms: unknown algorithm 'adam'; valid: ad_psgd, allreduce"),
])
def test_invalid_options_name_the_option(kwargs, message):
    with pytest.raises(ConfigError) as err:
        jobs.render_slurm(QUICK, **kwargs)
    assert str(err.value).startswith(message)


def test_parse_list():
    assert jobs.parse_list("0, 1,2", "--seeds", int) == (0, 1, 2)
    assert jobs.parse_list(None, "--seeds") is None
    with pytest.raises(ConfigError, match="--seeds: expected a comma-separated list of int"):
        jobs.parse_list("1,x", "--seeds", int)
    with pytest.raises(ConfigError, match="--algorithms: expected at least one value"):
        jobs.parse_list(",", "--algorithms")


def test_hosts_script(tmp_path):
    script = jobs.render_hosts(QUICK, ("node1", "node2.example.org"), 8, venv="/opt/venv")
    assert "HOSTS=(node1 node2.example.org)\n" in script and "TASKS_PER_NODE=8\n" in script
    assert f"CONFIG={QUICK}\n" in script and "MPIOPT_VENV=${MPIOPT_VENV:-/opt/venv}" in script
    path = tmp_path / "run.sh"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    assert "HOSTS=(localhost)\n" in jobs.render_hosts(QUICK)
    with pytest.raises(ConfigError, match="--hosts: 'a b' is not a host name"):
        jobs.render_hosts(QUICK, ("a b",))
    with pytest.raises(ConfigError, match="--tasks-per-node: must be at least 1"):
        jobs.render_hosts(QUICK, tasks_per_node=0)
