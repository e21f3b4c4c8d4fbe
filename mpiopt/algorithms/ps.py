"""The asynchronous parameter server: rank 0 serves, the other ranks are workers.

A worker computes a gradient at the model it last received, pushes it (with its minibatch
loss) and waits for the server's answer; the server takes pushes in whatever order they
arrive, applies each through the method's update rule (:meth:`ParameterServer.apply`) and
answers the pushing worker with the new model. There is no barrier while training. Each worker
has one push in flight at most; the server keeps a receive posted for every worker and takes
the first to complete (:func:`~mpiopt.comm.transport.wait_any`, under the run's deadline).

Versions. The server counts the updates it has applied; it remembers the version it last sent
to each worker, so the staleness of every gradient it applies (updates applied since the model
the gradient was computed at) is known exactly, without the workers sending it.

The end. ``run.steps`` (or ``run.time_limit_s`` on the server's clock) counts the updates the
server applies. Once spent, the server answers each worker's next push, which is already on its
way or will be, with the stop (an empty message on the CONTROL channel) instead of a model, and
applies that push too: every pushed gradient is applied exactly once, and the server applies
``run.steps`` plus at most one more per other worker. Every rank then leaves its loop with
nothing in flight and meets the others at the shared stop of the asynchronous runtime.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mpiopt.algorithms.base import SERVER, WORKER, AsynchronousAlgorithm, SGDConfig
from mpiopt.comm.transport import Channel, wait_any
from mpiopt.errors import ConfigError


class ParameterServer(AsynchronousAlgorithm):
    """The engine of every parameter-server method, on one rank (server or worker).

    A method overrides :meth:`apply` (the server's update rule) and, if its workers transform
    their gradient before pushing it (local momentum), :meth:`prepare`.
    """

    def setup(self) -> None:
        super().setup()
        ctx = self.ctx
        self.d = int(self.x.size)
        self.workers = [r for r, role in enumerate(ctx.roles) if role == WORKER]
        if ctx.role == SERVER:
            self._setup_server()
        else:
            self.push = np.zeros(self.d + 1, np.float32)  # the gradient, then the loss

    def _setup_server(self) -> None:
        t, d, n = self.ctx.transport, self.d, len(self.workers)
        self.inbox = [np.zeros(d + 1, np.float32) for _ in self.workers]
        self.outbox = [np.empty(d, np.float32) for _ in self.workers]
        self.replies = [None] * n
        self.sent_version = np.zeros(n, np.int64)
        self.applied = np.zeros(n, np.int64)
        self.version = 0
        self.staleness: list[int] = []
        self.ending = False  # the budget is spent: every next push is answered with the stop
        self.open = n  # workers not yet told to stop
        self.recvs = [t.irecv(self.inbox[k], w, Channel.GRADIENT)
                      for k, w in enumerate(self.workers)]

    def budget(self):
        return None, None, None  # the server ends the run: see _server_step

    # ------------------------------------------------------------------ the rule

    def prepare(self, g, step: int) -> None:
        """Transform this worker's gradient ``g`` in place before it is pushed (default: none)."""

    def apply(self, w, g, worker: int, staleness: int, lr: float) -> None:
        """Apply the gradient ``g`` of worker index ``worker`` to the server's model ``w``."""
        raise NotImplementedError

    # ------------------------------------------------------------------ steps

    def step(self, step: int, lr: float) -> float:
        if self.ctx.role == SERVER:
            return self._server_step(step, lr)
        return self._worker_step(step)

    def _worker_step(self, step: int) -> float:
        """Push a gradient at our model; receive the next model (or the stop) into it."""
        t, server = self.ctx.transport, 0
        loss = self.local_gradient(step)
        self.prepare(self.g, step)
        self.push[: self.d] = self.g
        self.push[self.d] = loss
        answer = t.irecv(self.x, server, None)  # the model, or the stop (empty, CONTROL)
        sent = t.isend(self.push, server, Channel.GRADIENT)
        answer.wait()
        sent.wait()
        self.stopped = answer.channel == Channel.CONTROL
        return loss

    def _server_step(self, step: int, lr: float) -> float:
        """Apply the next push to arrive and answer its worker with the model or the stop."""
        ctx = self.ctx
        k = wait_any(self.recvs)  # skips the workers already stopped (their receive is done)
        staleness = self.version - int(self.sent_version[k])
        self.apply(self.x, self.inbox[k][: self.d], k, staleness, lr)
        self.version += 1
        self.applied[k] += 1
        self.staleness.append(staleness)
        loss = float(self.inbox[k][self.d])
        self.ending = self.ending or self.version >= ctx.steps or ctx.out_of_time()
        self._answer(k)
        self.stopped = self.open == 0
        return loss

    def _answer(self, k: int) -> None:
        """Send worker ``k`` the model (and post its next receive) or the stop."""
        t, w = self.ctx.transport, self.workers[k]
        if self.replies[k] is not None:
            self.replies[k].wait()  # delivered: the worker pushed again after receiving it
        if self.ending:
            self.replies[k] = t.isend(self.outbox[k][:0], w, Channel.CONTROL)
            self.open -= 1
            return
        self.outbox[k][...] = self.x
        self.sent_version[k] = self.version
        self.replies[k] = t.isend(self.outbox[k], w, Channel.MODEL)
        self.recvs[k] = t.irecv(self.inbox[k], w, Channel.GRADIENT)

    def settle(self) -> None:
        if self.ctx.role == SERVER:
            for h in self.replies:
                if h is not None:
                    h.wait()

    # ------------------------------------------------------------------ reports

    def warm_up(self) -> None:
        if self.ctx.role == WORKER:  # the server computes no gradients
            super().warm_up()

    def summary_info(self) -> dict:
        """The server's facts (the runner asks rank 0, the server)."""
        s = np.asarray(self.staleness, dtype=np.float64)
        return {"updates_applied": int(self.version),
                "updates_per_worker": self.applied.tolist(),
                "staleness": {"mean": float(s.mean()) if s.size else 0.0,
                              "p50": float(np.percentile(s, 50)) if s.size else 0.0,
                              "p99": float(np.percentile(s, 99)) if s.size else 0.0,
                              "max": int(s.max()) if s.size else 0}}


@dataclass(frozen=True)
class ServerKeys(SGDConfig):
    """Keys of the parameter-server methods: rank 0 serves, every other rank works."""

    ASYNCHRONOUS = True
    HOST_ONLY = True  # the server's model and the messages live in host memory
    REPORTER = SERVER  # progress counts the updates the server applies

    def roles(self, world_size: int) -> tuple[str, ...]:
        return (SERVER,) + (WORKER,) * (world_size - 1)

    def check_world(self, world_size: int) -> None:
        if world_size < 2:
            raise ConfigError(f"{self.NAME} needs at least 2 ranks (a server and a worker), "
                              f"got {world_size}", key="algorithm.name")
