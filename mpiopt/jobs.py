"""``mpiopt jobs``: the shipped configs and Slurm job scripts."""

from __future__ import annotations

import os
from pathlib import Path

from mpiopt.errors import ConfigError

JOBS_DIR = Path(__file__).resolve().parents[1] / "jobs"


def list_jobs() -> str:
    """Return the configs and templates shipped in ``jobs/``."""
    lines = []
    for sub in ("configs", "slurm"):
        for path in sorted((JOBS_DIR / sub).glob("*")):
            lines.append(f"{sub}/{path.name}")
    return "\n".join(lines) if lines else f"no jobs found in {JOBS_DIR}"


def render_slurm(config: str, nodes: int, tasks_per_node: int, time: str,
                 partition: str | None = None) -> str:
    """Return a Slurm batch script that runs ``config`` on ``nodes`` x ``tasks_per_node``."""
    if nodes < 1 or tasks_per_node < 1:
        raise ConfigError("must be at least 1", key="--nodes/--tasks-per-node")
    if not os.path.exists(config):
        raise ConfigError(f"config file not found: {config}")
    template = (JOBS_DIR / "slurm" / "multinode.sbatch").read_text()
    header = [f"#SBATCH --nodes={nodes}", f"#SBATCH --ntasks-per-node={tasks_per_node}",
              f"#SBATCH --time={time}"]
    if partition:
        header.append(f"#SBATCH --partition={partition}")
    body = template.replace("#MPIOPT_RESOURCES", "\n".join(header))
    return body.replace("${1:?usage: sbatch multinode.sbatch CONFIG [mpiopt run options]}",
                        config)
