"""A bare mpi4py parameter server: the reference ``mpiopt bench ps`` measures the engine against.

Rank 0 serves: a blocking receive from any worker, ``w -= lr * g`` (numpy's axpy without
temporaries: a multiply into a scratch vector, a subtract), the model sent back to that worker.
Each worker sends its push (the gradient, then its loss) and receives the answer. No
deadlines, byte accounting, versions or nonblocking requests. The end is the engine's
(:mod:`mpiopt.algorithms.ps`): once ``updates`` are applied, every worker's next push is
applied too and answered with an empty message on the CONTROL tag.

It lives here, beside the transport, because only :mod:`mpiopt.comm` imports mpi4py.
"""

from __future__ import annotations

import time

import numpy as np
from mpi4py import MPI

from mpiopt.comm.transport import Channel, Transport


def raw_parameter_server(transport: Transport, push: np.ndarray, updates: int,
                         lr: float) -> tuple[int, float]:
    """Serve on rank 0, work on the others, until ``updates`` are applied.

    Args:
        transport: its communicator is used bare.
        push: a worker's message, the same every time (d gradient floats, then the loss);
            the server takes d from its length.
        updates: the updates after which the server answers each worker with the stop.
        lr: the server's learning rate.

    Returns:
        On rank 0 the updates applied and the seconds from a barrier to the last answer;
        on workers ``(0, seconds)`` to their stop.
    """
    comm, d = transport.comm, push.size - 1
    if transport.rank == 0:
        bufs = [np.ones(d, np.float32) for _ in range(2)] + [np.ones(d + 1, np.float32)]
    else:
        bufs = [np.ones(d, np.float32)]  # touched now: no page faults on the clock
    comm.Barrier()
    t0 = time.perf_counter()
    applied = _serve(comm, *bufs, updates, lr) if transport.rank == 0 else _work(comm, push,
                                                                                 bufs[0])
    return applied, time.perf_counter() - t0


def _serve(comm, w, scratch, inbox, updates: int, lr: float) -> int:
    d, status = w.size, MPI.Status()
    applied, working = 0, comm.Get_size() - 1
    while working:
        comm.Recv(inbox, source=MPI.ANY_SOURCE, tag=int(Channel.GRADIENT), status=status)
        np.multiply(inbox[:d], lr, out=scratch)
        w -= scratch
        applied += 1
        if applied < updates:
            comm.Send(w, dest=status.Get_source(), tag=int(Channel.MODEL))
        else:
            comm.Send(w[:0], dest=status.Get_source(), tag=int(Channel.CONTROL))
            working -= 1
    return applied


def _work(comm, push, model) -> int:
    status = MPI.Status()
    while True:
        comm.Send(push, dest=0, tag=int(Channel.GRADIENT))
        comm.Recv(model, source=0, tag=MPI.ANY_TAG, status=status)
        if status.Get_tag() == Channel.CONTROL:
            return 0
