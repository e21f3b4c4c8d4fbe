"""Shared test helpers: launching ranks under mpiexec with a hard timeout; a local Slurm."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "tests" / "mpi" / "scripts"
CONFIGS = ROOT / "jobs" / "configs"
LOCAL_CLUSTER = ROOT / "jobs" / "slurm" / "local-cluster.sh"
SLURM_PACKAGES = "slurmctld slurmd slurm-client munge"
SLURM_COMMANDS = ("slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "scancel", "munged")


def _mpiexec() -> str:
    here = Path(sys.executable).parent / "mpiexec"
    return str(here) if here.exists() else "mpiexec"


def launch(n: int | None, args: list[str], timeout: float = 120, env: dict | None = None,
           cwd=None) -> subprocess.CompletedProcess:
    """Run ``args`` on ``n`` ranks (or as one plain process when ``n`` is None).

    The whole process group is killed at the timeout, so a deadlock fails the test instead
    of hanging the suite.
    """
    cmd = list(args) if n is None else [_mpiexec(), "-n", str(n), *args]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
                "NUMBA_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=full_env, cwd=cwd, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"timed out after {timeout}s: {' '.join(cmd)}\nstdout:\n{out}\n"
                    f"stderr:\n{err}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def mpiopt_cmd() -> list[str]:
    """Return the command that runs the ``mpiopt`` CLI with this interpreter."""
    return [sys.executable, "-m", "mpiopt"]


def python_script(name: str) -> list[str]:
    """Return the command that runs a test script under mpi4py's abort-on-error runner."""
    return [sys.executable, "-m", "mpi4py", str(SCRIPTS / name)]


def run_check_script(n: int, name: str, passed: str, args=(), env: dict | None = None,
                     timeout: float = 120) -> None:
    """Run the check script ``name`` on ``n`` ranks: it must exit 0 and print ``passed``.

    A failed assertion on any rank aborts the job (mpi4py's runner), so a non-zero status
    carries that rank's traceback in stderr.
    """
    res = launch(n, [*python_script(name), *args], timeout=timeout, env=env)
    assert res.returncode == 0, res.stderr
    assert passed in res.stdout, res.stdout


def shards_of(cfg, world_size: int, seed: int = 0) -> list:
    """Return the training shards every rank of ``world_size`` loads for a data config."""
    return [cfg.load(r, world_size, seed, with_test=False) for r in range(world_size)]


def assert_cover(shards, x_full, y_full) -> None:
    """Check that the ranks' shards hold every training sample exactly once, unchanged."""
    indices = np.concatenate([s.indices for s in shards])
    assert np.array_equal(np.sort(indices), np.arange(len(y_full)))
    for s in shards:
        assert s.n_train_total == len(y_full)
        assert np.array_equal(s.x_train, x_full[s.indices])
        assert np.array_equal(s.y_train, y_full[s.indices])


@pytest.fixture
def run_mpi():
    return launch


def _processes_using(path: str) -> list[str]:
    """Return 'PID command' of every process whose command line, open files or environment
    name ``path`` (a job inherits SLURM_CONF, so a rank left behind shows up too)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            environ = (proc / "environ").read_bytes()
            fds = [os.readlink(fd) for fd in (proc / "fd").iterdir()]
        except OSError:  # gone, or a kernel thread
            continue
        if path in cmdline or path.encode() in environ or any(f.startswith(path) for f in fds):
            found.append(f"{proc.name} {cmdline.strip()}")
    return found


class SlurmCluster:
    """The one-node Slurm of ``jobs/slurm/local-cluster.sh``, under its own directory."""

    def __init__(self, directory: str):
        self.dir = directory
        self.conf = os.path.join(directory, "etc", "slurm.conf")
        # Nothing of an outer Slurm job (the tests may run inside one) reaches this cluster.
        outer = ("SLURM_", "SBATCH_", "SALLOC_", "SRUN_")
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(outer)}
        self.env.update(MPIOPT_SLURM_DIR=directory, SLURM_CONF=self.conf)

    def run(self, *args, cwd=None, timeout: float = 30) -> subprocess.CompletedProcess:
        """Run a command (``sbatch``, ``scontrol``, ...) against this cluster."""
        return subprocess.run([str(a) for a in args], env=self.env, cwd=cwd, text=True,
                              capture_output=True, timeout=timeout)

    def script(self, command: str, timeout: float = 90) -> subprocess.CompletedProcess:
        """Run ``local-cluster.sh COMMAND`` for this cluster's directory."""
        return self.run(LOCAL_CLUSTER, command, timeout=timeout)


@pytest.fixture(scope="session")
def slurm():
    """Bring up a one-node Slurm for the tests that ask for it; take it down after them.

    Skipped where Slurm's Debian packages are not installed (``.ci/run`` installs them as
    root) or without root (slurmd runs as root). Teardown fails if a process of the cluster
    or of its jobs is left.
    """
    missing = [c for c in SLURM_COMMANDS if shutil.which(c) is None]
    if missing:
        pytest.skip(f"Slurm is not installed ({', '.join(missing)} not found): as root, "
                    f"apt-get install --no-install-recommends {SLURM_PACKAGES} (.ci/run does)")
    if os.geteuid() != 0:
        pytest.skip("a local Slurm needs root (slurmd runs as root)")
    directory = tempfile.mkdtemp(prefix="mpiopt-slurm-", dir="/tmp")
    os.chmod(directory, 0o755)  # munged refuses a socket below a directory others cannot search
    cluster = SlurmCluster(directory)
    up = cluster.script("up")
    if up.returncode != 0:
        cluster.script("down")
        pytest.fail(f"local-cluster.sh up failed (logs kept in {directory}/log):\n"
                    f"{up.stdout}{up.stderr}")
    try:
        yield cluster
    finally:
        down = cluster.script("down")
        left = _processes_using(directory)
        assert down.returncode == 0 and not left, (
            f"local-cluster.sh down: {down.stdout}{down.stderr}; left: {left}; logs kept in "
            f"{directory}/log")
        shutil.rmtree(directory, ignore_errors=True)
