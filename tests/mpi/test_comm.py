"""The transport and windows on real ranks, at several world sizes."""

import time

import pytest
from conftest import launch, python_script, run_check_script

pytestmark = pytest.mark.mpi


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
def test_transport_and_windows(n):
    run_check_script(n, "check_comm.py", f"comm checks passed on {n} ranks", timeout=90)


@pytest.mark.parametrize("n", [2, 3])
def test_blocking_collective_deadline_aborts_job(n):
    t0 = time.monotonic()
    out = launch(n, python_script("check_watchdog.py"), timeout=60)
    assert out.returncode != 0
    assert "barrier timed out after 1 s (peer all, tag CONTROL, step 7)" in out.stderr
    assert "unreachable" not in out.stdout
    assert time.monotonic() - t0 < 25
