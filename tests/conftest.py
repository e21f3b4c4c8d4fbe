"""Shared test helpers: launching ranks under mpiexec with a hard timeout."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "tests" / "mpi" / "scripts"
CONFIGS = ROOT / "jobs" / "configs"


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
