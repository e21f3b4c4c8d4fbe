"""The stop of an asynchronous run: every rank ends, slow ranks are waited for, stuck ones not.

Ranks of an asynchronous algorithm step at their own pace and meet only at the end. A rank that
has spent its budget (:meth:`Termination.go` says no more) calls :meth:`Termination.wait`: it
enters a nonblocking barrier and, until every rank has, keeps doing what the algorithm still
owes the others (``serve``: draining an inbox, republishing a model), polls with growing sleeps
so that it does not take cores from ranks still computing, and watches the others' heartbeats.

A heartbeat is a rank's count of steps taken, kept in a small window that others read without
its help (within a node: plain loads from its memory). A rank that keeps stepping, however
slowly, is waited for as long as it takes; only a rank whose count has not moved for the
deadline (``run.comm_timeout_s``) while it has not finished is stuck, and the waiting ranks
raise a :class:`~mpiopt.comm.transport.CommTimeout` that names it and its last step. A peer on
another node is read by ``Get``, which completes when that peer next enters MPI: one that
computes a single step longer than the deadline without entering MPI looks stuck, unless a
progress thread serves it (``algorithm.progress``).

Budgets: ``steps`` per rank, a ``time_limit`` on the run's clock (started together on every
rank), and ``total_steps`` over all ranks, counted by an atomic counter on rank 0 so that the
ranks together take exactly that many steps, each as many as its speed allows.
"""

from __future__ import annotations

import time

import numpy as np

from mpiopt.comm.transport import Channel, CommTimeout, Transport
from mpiopt.comm.windows import Window

_STEPS, _DONE, _TOTAL = 0, 1, 2  # heartbeat words: steps taken, finished, rank 0's counter
CHECK_S = 0.05  # seconds between two looks at the others' heartbeats while waiting


class Termination:
    """The budget and the stop of one asynchronous run, on one rank (collective to create).

    Args:
        transport: the transport of the run.
        steps: the most steps this rank takes (None: no limit of its own).
        time_limit: seconds of the run's clock after which no rank starts a step (None: none).
        total_steps: steps of all ranks together after which none starts another (None: no
            such budget; ``steps`` per rank alone).
        clock: ``() -> seconds`` since the run started (the context's, started together).
    """

    def __init__(self, transport: Transport, steps: int | None, time_limit: float | None = None,
                 total_steps: int | None = None, clock=None):
        self.t = transport
        self.steps, self.time_limit, self.total_steps = steps, time_limit, total_steps
        self.clock = clock or _since(time.perf_counter())
        self.win = Window(transport, 3, np.int64, Channel.CONTROL, name="heartbeat")
        self.beats = self.win.local
        self._seen = np.zeros(3, np.int64)
        self._one = np.ones(1, np.int64)
        self._ticket = None  # the pending request for the next step's ticket
        self.step = 0
        # No budget at all (a parameter server's ranks, whose end comes from the server): every
        # step may be taken, and the loop need not ask.
        self.unbounded = steps is None and time_limit is None and total_steps is None
        self._sync = self.win.sync

    def go(self, step: int) -> bool:
        """Return True if this rank takes step ``step`` (counts it against a total budget).

        Under a total budget each step takes a ticket from rank 0's counter. The ticket of the
        next step is asked for as soon as this one is known, so that it arrives while the step
        computes: across nodes the counter answers only when rank 0 enters MPI.
        """
        if self.steps is not None and step >= self.steps:
            return False
        if self.time_limit is not None and self.clock() >= self.time_limit:
            return False
        if self.total_steps is None:
            return True
        if self._ticket is None:
            self._ticket = self._ask()
        self._ticket.wait()
        taken = int(self._taken[0])
        self._ticket = self._ask() if taken < self.total_steps else None
        return taken < self.total_steps

    def _ask(self):
        """Start taking a ticket: add one to rank 0's counter, fetching its old value."""
        self._taken = np.zeros(1, np.int64)
        return self.win.iget_accumulate(self._one, self._taken, 0, _TOTAL, "sum")

    def beat(self, steps_done: int) -> None:
        """Show the others that this rank has now taken ``steps_done`` steps."""
        self.beats[_STEPS] = self.step = steps_done
        self._sync()

    def wait(self, serve=None) -> None:
        """Finish: wait until every rank has, serving meanwhile; raise if one is stuck.

        Args:
            serve: called between polls while other ranks still step (the algorithm's duties
                towards them), or None.
        """
        self.beats[_DONE] = 1
        self.win.sync()
        done = self.t.ibarrier(Channel.CONTROL)
        others = [r for r in range(self.t.size) if r != self.t.rank]
        last = {r: (-1, time.monotonic()) for r in others}
        check, sleep = time.monotonic() + CHECK_S, 1e-4
        while not done.test():
            if serve is not None:
                serve()
            now = time.monotonic()
            if now >= check:
                self._check(last, now, done)
                check = now + CHECK_S
            time.sleep(sleep)
            sleep = min(2 * sleep, 2e-3)

    def _check(self, last: dict, now: float, done) -> None:
        """Raise if a rank that has not finished has not stepped for the deadline."""
        for r, (seen, since) in last.items():
            steps, finished = self._read(r)
            if finished or steps != seen:
                last[r] = (steps, now)
            elif now - since > self.t.timeout:
                raise CommTimeout(done.describe(
                    f"cannot end: rank {r} has taken no step for {self.t.timeout:g} s (stuck "
                    f"after {steps} steps; this rank finished after {self.step})"))

    def _read(self, rank: int) -> tuple[int, bool]:
        """Return ``rank``'s steps taken and whether it has finished."""
        view = self.win.shared_view(rank)
        if view is not None:
            self.win.sync()
            return int(view[_STEPS]), bool(view[_DONE])
        self.win.get(self._seen, rank, channel=Channel.EVAL)  # the runtime's, not the method's
        return int(self._seen[_STEPS]), bool(self._seen[_DONE])

    def free(self) -> None:
        """Release the heartbeat window (collective; after :meth:`wait`)."""
        if self._ticket is not None:  # a ticket asked for a step never taken (time ran out)
            self._ticket.wait()
        self.win.free()


def _since(start: float):
    return lambda: time.perf_counter() - start
