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


# Below thread level multiple the watchdog thread must not call MPI (the main thread is inside
# it): it exits its process and the launcher ends the others.
ENDINGS = {"multiple": "; aborting the job",
           "serialized": "; exiting (thread level below multiple: the launcher ends the other "
                         "ranks)"}


@pytest.mark.parametrize("n, level", [(2, "multiple"), (3, "multiple"), (2, "serialized"),
                                      (3, "serialized")])
def test_blocking_collective_deadline_aborts_job(n, level):
    t0 = time.monotonic()
    out = launch(n, python_script("check_watchdog.py"), timeout=60,
                 env={"MPI4PY_RC_THREAD_LEVEL": level})
    assert out.returncode != 0
    line = "barrier timed out after 1 s (peer all, tag CONTROL, step 7)" + ENDINGS[level]
    assert line in out.stderr, out.stderr
    if level != "multiple":  # (at multiple MPICH's own abort line is sometimes lost)
        assert "called MPI_Abort" not in out.stderr, out.stderr
    assert f"thread level {level}" in out.stdout, out.stdout
    assert "unreachable" not in out.stdout
    assert time.monotonic() - t0 < 25


@pytest.mark.parametrize("n", [2, 4])
def test_roles_share_the_data_among_workers(n):
    run_check_script(n, "check_roles.py", f"role checks passed on {n} ranks")
