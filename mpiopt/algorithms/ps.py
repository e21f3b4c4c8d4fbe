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

import time
from dataclasses import dataclass

import numpy as np

from mpiopt.algorithms.base import SERVER, WORKER, AsynchronousAlgorithm, SGDConfig, ranks_of
from mpiopt.comm.transport import Channel, CommTimeout, wait_any
from mpiopt.config import param
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
        self.workers = ranks_of(ctx.roles)
        if ctx.role == SERVER:
            self._setup_server()
        else:
            self.push = np.zeros(self.d + 1, np.float32)  # the gradient, then the loss
            self.g = self.push[: self.d]  # computed in place: no copy into the message

    def _setup_server(self) -> None:
        t, d, n = self.ctx.transport, self.d, len(self.workers)
        self.inbox = [np.zeros(d + 1, np.float32) for _ in self.workers]
        # The model last sent to each worker: at first the initial model every rank holds.
        self.outbox = [self.x.copy() for _ in self.workers]
        self.replies = [None] * n
        self.sent_version = np.zeros(n, np.int64)
        self.applied = np.zeros(n, np.int64)
        self.dropped = np.zeros(n, np.int64)  # pushes older than algorithm.staleness_bound
        self.version = 0
        self.staleness: list[int] = []  # of every applied gradient, in order
        self.applied_from: list[int] = []  # the worker index of every applied gradient
        self.ending = False  # the budget is spent: every next push is answered with the stop
        self.open = n  # workers not yet told to stop
        self.recvs = [t.irecv(self.inbox[k], w, Channel.GRADIENT)
                      for k, w in enumerate(self.workers)]

    def budget(self):
        return None, None, None  # the server ends the run: see _server_step

    # ------------------------------------------------------------------ the rule

    def prepare(self, g, step: int) -> None:
        """Transform this worker's gradient ``g`` in place before it is pushed.

        Adds ``algorithm.weight_decay`` times the model; rules with worker-side momentum
        extend it.
        """
        if self.cfg.weight_decay:
            self.ctx.xp.multiply(self.x, self.cfg.weight_decay, out=self.state.scratch)
            g += self.state.scratch

    def apply(self, w, g, worker: int, staleness: int, lr: float) -> None:
        """Apply the gradient ``g`` of worker index ``worker`` to the server's model ``w``."""
        raise NotImplementedError

    def receive(self, k: int, lr: float) -> list[int]:
        """Take worker ``k``'s push (``inbox[k]``); return the workers to answer now, in order.

        By default the push is applied at once and its worker answered. A rule may hold a push
        back (its worker then waits for its answer; ``inbox[k]`` keeps the gradient) and
        answer it later from here, :meth:`on_idle` or :meth:`flush`; once :attr:`ending` is
        set it must apply every push at once.
        """
        self.update(k, lr)
        return [k]

    def patience(self) -> float | None:
        """Seconds the server may wait for a push before :meth:`on_idle` (None: no limit)."""
        return None

    def on_idle(self, lr: float) -> list[int]:
        """No push came within :meth:`patience`: return the workers to answer now."""
        return []

    def flush(self, lr: float) -> list[int]:
        """The budget is spent: apply what the rule holds back; return the workers to answer."""
        return []

    def update(self, k: int, lr: float) -> None:
        """Apply worker ``k``'s pushed gradient through the rule; count it and its staleness.

        A gradient staler than ``algorithm.staleness_bound`` (when set) is dropped instead:
        counted, not applied; its worker is answered with the current model all the same.
        """
        staleness = self.version - int(self.sent_version[k])
        bound = self.cfg.staleness_bound
        if bound and staleness > bound:
            self.dropped[k] += 1
            return
        self.apply(self.x, self.inbox[k][: self.d], k, staleness, lr)
        self.version += 1
        self.applied[k] += 1
        self.staleness.append(staleness)
        self.applied_from.append(k)

    # ------------------------------------------------------------------ steps

    def step(self, step: int, lr: float) -> float:
        if self.ctx.role == SERVER:
            return self._server_step(step, lr)
        return self._worker_step(step)

    def _worker_step(self, step: int) -> float:
        """Push a gradient at our model; receive the next model (or the stop) into it."""
        t, server = self.ctx.transport, 0
        loss = self.local_gradient(step)
        self.prepare(self.g, step)  # self.g is the message's first d floats
        self.push[self.d] = loss
        answer = t.irecv(self.x, server, None)  # the model, or the stop (empty, CONTROL)
        sent = t.isend(self.push, server, Channel.GRADIENT)
        answer.wait()
        sent.wait()
        self.stopped = answer.channel == Channel.CONTROL
        return loss

    def _server_step(self, step: int, lr: float) -> float:
        """Take the next push to arrive; answer the workers the rule releases."""
        ctx = self.ctx
        k = self._next_push(lr)
        answers = self.receive(k, lr)
        if not self.ending and (self.version >= ctx.steps or ctx.out_of_time()):
            self.ending = True
            answers += self.flush(lr)
        for j in answers:
            self._answer(j)
        self.stopped = self.open == 0
        return float(self.inbox[k][self.d])

    def _next_push(self, lr: float) -> int:
        """Wait for a push (under the run's deadline), letting the rule act when idle."""
        deadline = time.monotonic() + self.ctx.transport.timeout
        while True:
            patience = self.patience()
            left = deadline - time.monotonic()
            try:
                limit = left if patience is None else min(left, patience)  # 0: act at once
                k = wait_any(self.recvs, timeout=max(limit, 0.0))
            except CommTimeout:
                if patience is None or time.monotonic() >= deadline:
                    raise
                k = None
            if k is not None:
                return k
            released = self.on_idle(lr)  # all held back, or a bounded wait ran out
            if not released and all(h.done for h in self.recvs):
                raise RuntimeError(f"{self.cfg.NAME}: every worker waits for an answer the "
                                   f"rule holds back (step {self.ctx.transport.step})")
            for j in released:
                self._answer(j)

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

    def series(self) -> dict:
        """The server's record of every applied gradient, in order (workers have none)."""
        if self.ctx.role != SERVER:
            return {}
        return {"staleness": (np.asarray(self.staleness, np.int64),
                              "updates applied between the gradient's model and its own"),
                "worker": (np.asarray(self.applied_from, np.int64),
                           "index of the worker that pushed it (as in updates_per_worker)")}

    def summary_info(self) -> dict:
        """The server's facts (the runner asks rank 0, the server)."""
        s = np.asarray(self.staleness, dtype=np.float64)
        return {"updates_applied": int(self.version),
                "updates_per_worker": self.applied.tolist(),
                "dropped_stale_per_worker": self.dropped.tolist(),
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

    staleness_bound: int = param(0, "Drop (count, do not apply) a gradient computed at a model "
                                 "more than this many updates old; its worker gets the current "
                                 "model all the same (0: apply every gradient).", low=0)

    def roles(self, world_size: int) -> tuple[str, ...]:
        return (SERVER,) + (WORKER,) * (world_size - 1)

    def check_world(self, world_size: int) -> None:
        if world_size < 2:
            raise ConfigError(f"{self.NAME} needs at least 2 ranks (a server and a worker), "
                              f"got {world_size}", key="algorithm.name")
