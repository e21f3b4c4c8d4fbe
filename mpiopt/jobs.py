"""``mpiopt jobs``: the shipped configs and job scripts, filled in for one run.

A template in ``jobs/slurm`` is a working batch script by itself (``sbatch TEMPLATE CONFIG``),
and so is ``jobs/hosts/mpiexec.sh`` (``bash mpiexec.sh CONFIG``) for a list of hosts:
its ``#SBATCH`` lines are defaults, ``CONFIG`` is its first argument, and a few shell
variables (``LAUNCHER``, ``MPIOPT_VENV``, the sweep's lists) have defaults. Rendering replaces
those in place, so every option appears once and the script runs without arguments.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from pathlib import Path

from mpiopt.algorithms import ALGORITHMS
from mpiopt.errors import ConfigError

JOBS_DIR = Path(__file__).resolve().parents[1] / "jobs"
SLURM_TEMPLATES = {
    "multinode": "multinode.sbatch",
    "single-node": "single-node.sbatch",
    "gpu": "gpu.sbatch",
    "sweep": "sweep.sbatch",
    "preempt": "preempt.sbatch",
}
LAUNCHERS = ("srun", "mpiexec")


def list_jobs() -> str:
    """Return the configs and templates shipped in ``jobs/``."""
    lines = []
    for sub in ("configs", "slurm", "hosts"):
        for path in sorted((JOBS_DIR / sub).glob("*")):
            lines.append(f"{sub}/{path.name}")
    return "\n".join(lines) if lines else f"no jobs found in {JOBS_DIR}"


def active_venv() -> str | None:
    """Return the virtual environment this interpreter runs in, if any."""
    return sys.prefix if sys.prefix != sys.base_prefix else None


def set_sbatch(script: str, option: str, value) -> str:
    """Set ``#SBATCH --option=value``: replace the template's line, or add one after the last."""
    line = f"#SBATCH --{option}={value}"
    pattern = re.compile(rf"^#SBATCH --{re.escape(option)}=.*$", re.M)
    if pattern.search(script):
        return pattern.sub(lambda _: line, script)
    last = list(re.finditer(r"^#SBATCH .*$", script, re.M))[-1]
    return f"{script[:last.end()]}\n{line}{script[last.end():]}"


def set_default(script: str, variable: str, value: str) -> str:
    """Set the default of a ``VARIABLE=${ENV:-default}`` line (the environment still wins)."""
    pattern = re.compile(rf"^({re.escape(variable)}=\$\{{\w+:-)[^}}]*(\}})$", re.M)
    return pattern.sub(lambda m: m.group(1) + shlex.quote(value) + m.group(2), script)


def set_array(script: str, variable: str, values) -> str:
    """Set a bash array assignment ``VARIABLE=(...)``."""
    words = " ".join(shlex.quote(str(v)) for v in values)
    pattern = re.compile(rf"^{re.escape(variable)}=\(.*\)$", re.M)
    return pattern.sub(lambda _: f"{variable}=({words})", script)


def set_config(script: str, config: str) -> str:
    """Fill in the config, which the template takes as its first argument."""
    pattern = re.compile(r"^CONFIG=\$\{1:\?[^}]*\}\nshift\n", re.M)
    path = shlex.quote(os.path.abspath(config))
    return pattern.sub(lambda _: f"CONFIG={path}\n", script)


def _check(template: str, nodes, tasks_per_node, launcher, algorithms, seeds,
           signal_before) -> None:
    """Raise ConfigError for options that are invalid or do not apply to ``template``."""
    if template not in SLURM_TEMPLATES:
        raise ConfigError(f"unknown template {template!r}; valid: "
                          f"{', '.join(SLURM_TEMPLATES)}", key="--template")
    for key, value in (("--nodes", nodes), ("--tasks-per-node", tasks_per_node),
                       ("--signal-before", signal_before)):
        if value is not None and value < 1:
            raise ConfigError(f"must be at least 1, got {value}", key=key)
    if template == "single-node" and nodes not in (None, 1):
        raise ConfigError(f"the single-node template runs on 1 node, got {nodes}; use "
                          "--template multinode", key="--nodes")
    if launcher is not None and launcher not in LAUNCHERS:
        raise ConfigError(f"unknown launcher {launcher!r}; valid: {', '.join(LAUNCHERS)}",
                          key="--launcher")
    for key, value, owner in (("--algorithms", algorithms, "sweep"),
                              ("--seeds", seeds, "sweep"),
                              ("--signal-before", signal_before, "preempt")):
        if value is not None and template != owner:
            raise ConfigError(f"applies to --template {owner} only", key=key)
    for name in algorithms or ():
        if name not in ALGORITHMS.names():
            raise ConfigError(f"unknown algorithm {name!r}; valid: "
                              f"{', '.join(ALGORITHMS.names())}", key="--algorithms")


def parse_list(text: str | None, key: str, kind=str) -> tuple | None:
    """Split a comma-separated option (``a,b,c``) into a tuple of ``kind``."""
    if text is None:
        return None
    items = [item.strip() for item in text.split(",") if item.strip()]
    try:
        values = tuple(kind(item) for item in items)
    except ValueError:
        raise ConfigError(f"expected a comma-separated list of {kind.__name__}, got {text!r}",
                          key=key) from None
    if not values:
        raise ConfigError("expected at least one value", key=key)
    return values


def render_slurm(config: str, template: str = "multinode", *, nodes: int | None = None,
                 tasks_per_node: int | None = None, time: str | None = None,
                 partition: str | None = None, launcher: str | None = None,
                 algorithms: tuple[str, ...] | None = None, seeds: tuple[int, ...] | None = None,
                 signal_before: int | None = None, venv: str | None = None) -> str:
    """Return the batch script ``template`` filled in for ``config``.

    Options left as None keep the template's defaults. ``venv`` becomes the default of
    ``MPIOPT_VENV``, the environment the job activates.
    """
    _check(template, nodes, tasks_per_node, launcher, algorithms, seeds, signal_before)
    if not os.path.exists(config):
        raise ConfigError(f"config file not found: {config}")
    script = (JOBS_DIR / "slurm" / SLURM_TEMPLATES[template]).read_text()
    for option, value in (("nodes", nodes), ("ntasks-per-node", tasks_per_node),
                          ("time", time), ("partition", partition)):
        if value is not None:
            script = set_sbatch(script, option, value)
    if signal_before is not None:  # the ranks get half of the warning to save and exit
        script = set_sbatch(script, "signal", f"B:USR1@{signal_before}")
        script = set_default(script, "GRACE", str(max(1, signal_before // 2)))
    if template == "sweep" and (algorithms or seeds):
        algorithms = algorithms or _bash_array(script, "ALGORITHMS")
        seeds = seeds or _bash_array(script, "SEEDS")
        script = set_array(set_array(script, "ALGORITHMS", algorithms), "SEEDS", seeds)
        script = set_sbatch(script, "array", f"0-{len(algorithms) * len(seeds) - 1}")
    if launcher is not None:
        script = set_default(script, "LAUNCHER", launcher)
    return _finish(script, config, venv, f"mpiopt jobs slurm --template {template}",
                   "sbatch THIS_FILE")


def render_hosts(config: str, hosts: tuple[str, ...] | None = None,
                 tasks_per_node: int | None = None, venv: str | None = None) -> str:
    """Return ``jobs/hosts/mpiexec.sh`` filled in: ``tasks_per_node`` ranks on each host."""
    if tasks_per_node is not None and tasks_per_node < 1:
        raise ConfigError(f"must be at least 1, got {tasks_per_node}", key="--tasks-per-node")
    for host in hosts or ():
        if not re.fullmatch(r"[\w.-]+", host):
            raise ConfigError(f"{host!r} is not a host name", key="--hosts")
    if not os.path.exists(config):
        raise ConfigError(f"config file not found: {config}")
    script = (JOBS_DIR / "hosts" / "mpiexec.sh").read_text()
    if hosts:
        script = set_array(script, "HOSTS", hosts)
    if tasks_per_node is not None:
        script = re.sub(r"^TASKS_PER_NODE=\d+$", f"TASKS_PER_NODE={tasks_per_node}", script,
                        flags=re.M)
    return _finish(script, config, venv, "mpiopt jobs hosts", "bash THIS_FILE")


def _finish(script: str, config: str, venv: str | None, command: str, run: str) -> str:
    """Fill in the config and the environment; say where the script came from."""
    if venv:
        script = set_default(script, "MPIOPT_VENV", venv)
    shebang, _, rest = set_config(script, config).partition("\n")
    note = (f"# Filled in by `{command}` for {os.path.abspath(config)}:\n"
            f"#   {run} [mpiopt run options]\n")
    return f"{shebang}\n{note}{rest}"


def _bash_array(script: str, variable: str) -> tuple[str, ...]:
    """Return the words of the template's ``VARIABLE=(...)`` line."""
    match = re.search(rf"^{re.escape(variable)}=\((.*)\)$", script, re.M)
    return tuple(shlex.split(match.group(1)))
