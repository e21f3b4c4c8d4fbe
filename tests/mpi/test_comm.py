"""The transport and windows on real ranks, at several world sizes."""

import time

import pytest
from conftest import launch, python_script, run_check_script

pytestmark = pytest.mark.mpi


# Peers on another node, emulated on one machine (as in test_swarm.py): no shared memory, RMA
# over TCP, so a one-sided operation completes only when its target enters MPI. There a
# fetch-and-add that returns before completion returns garbage, and the script adds a Get of
# a partner sleeping outside MPI, which must raise CommTimeout naming peer, window and step.
OTHER_NODES = {"MPIR_CVAR_NOLOCAL": "1", "UCX_TLS": "tcp,self"}


@pytest.mark.parametrize("n, remote", [(1, False), (2, True), (3, False), (4, True),
                                       (5, False)])
def test_transport_and_windows(n, remote):
    passed = f"comm checks passed on {n} ranks" + ("; RMA deadline checked" if remote else "")
    run_check_script(n, "check_comm.py", passed, env=OTHER_NODES if remote else None,
                     timeout=90)


@pytest.mark.parametrize("n", [2, 3])
def test_blocking_collective_deadline_aborts_job(n):
    t0 = time.monotonic()
    out = launch(n, python_script("check_watchdog.py"), timeout=60)
    assert out.returncode != 0
    assert "barrier timed out after 1 s (peer all, tag CONTROL, step 7)" in out.stderr
    assert "unreachable" not in out.stdout
    assert time.monotonic() - t0 < 25
