"""GSGM: gradient scheduling with global momentum, for non-IID asynchronous training.

The rule of ALGORITHMS.md section 3 (our specification from the authors' abstracts; every
choice there is a [decision]), on the parameter-server engine:

- scheduling: a round lets each worker contribute once. A push from a worker on the white
  list is applied and answered; a push from one that already contributed this round waits in a
  FIFO queue (its worker waits for its answer) until the round ends: when every worker has
  contributed, or when ``algorithm.max_wait`` seconds have passed since the round began while
  a push waits, so that a slow worker cannot stall the others. The queue is then taken in
  arrival order at the start of the next round;
- partly averaged gradients: the update direction is the mean of the pushing worker's gradient
  and the last gradients of the ``algorithm.partial`` - 1 workers heard from most recently;
- global momentum on the server: ``m <- beta m + mean``, ``w <- w - lr m``.

Workers push their plain gradient (with ``algorithm.weight_decay`` added). With one worker and
``partial: 1`` it is sequential momentum SGD, step for step.
"""

from __future__ import annotations

import collections
import math
import time
from dataclasses import dataclass

from mpiopt.algorithms import ALGORITHMS
from mpiopt.algorithms.base import SERVER
from mpiopt.algorithms.ps import ParameterServer, ServerKeys
from mpiopt.config import param
from mpiopt.errors import ConfigError


class GSGM(ParameterServer):
    """White-listed rounds, a deferred queue, partly averaged gradients, global momentum."""

    def setup(self) -> None:
        super().setup()
        if self.ctx.role != SERVER:
            return
        xp, n = self.ctx.xp, len(self.workers)
        self.k = self.cfg.partial_for(n)
        self.momentum = xp.zeros_like(self.w)
        self.last = [None] * n  # G[j]: the last gradient of each worker (allocated on use)
        self.recent: collections.deque = collections.deque()  # workers with a G, latest last
        self.allowed = set(range(n))  # the white list of the current round
        self.queue: collections.deque = collections.deque()  # deferred pushes, in arrival order
        self.round, self.round_start = 0, time.monotonic()
        self.rounds_of_updates: list[int] = []  # the round of every applied gradient

    def apply(self, w, g, worker: int, staleness: int, lr: float, out=None) -> None:
        xp, scratch = self.ctx.xp, self.state.scratch
        if self.last[worker] is None:
            self.last[worker] = xp.empty_like(w)
        self.last[worker][...] = g
        if worker in self.recent:
            self.recent.remove(worker)
        self.recent.append(worker)
        others = [j for j in reversed(self.recent) if j != worker][: self.k - 1]
        if others:  # the partly averaged gradient
            scratch[...] = g
            for j in others:
                scratch += self.last[j]
            scratch *= 1.0 / (1 + len(others))
            direction = scratch
        else:
            direction = self.last[worker]
        self.momentum *= self.cfg.beta
        self.momentum += direction
        xp.multiply(self.momentum, lr, out=scratch)
        xp.subtract(w, scratch, out=w if out is None else out)
        self.rounds_of_updates.append(self.round)

    def receive(self, k: int, lr: float) -> list[int]:
        if k not in self.allowed:
            if not self.ending:
                self.queue.append(k)  # contributed this round already: its turn comes back
                return []
            self._open_round()  # the end applies every push, each in a round of its own
        return self._contribute(k, lr)

    def _contribute(self, k: int, lr: float) -> list[int]:
        """Apply ``k``'s push and answer it; a round that is complete starts the next."""
        self.update(k, lr)
        self.allowed.discard(k)
        return [k] + (self._next_round(lr) if not self.allowed else [])

    def _open_round(self) -> None:
        self.round += 1
        self.round_start = time.monotonic()
        self.allowed = set(range(len(self.workers)))

    def _next_round(self, lr: float) -> list[int]:
        """Open a new round to every worker and take the deferred pushes in arrival order."""
        self._open_round()
        answered = []
        while self.queue and self.queue[0] in self.allowed:
            answered += self._contribute(self.queue.popleft(), lr)
        return answered

    def patience(self) -> float | None:
        if not self.queue or self.cfg.max_wait is None:
            return None
        return max(self.round_start + self.cfg.max_wait - time.monotonic(), 0.0)

    def on_idle(self, lr: float) -> list[int]:
        return self._next_round(lr) if self.queue else []

    def flush(self, lr: float) -> list[int]:
        answered = []
        while self.queue:
            k = self.queue.popleft()
            if k not in self.allowed:
                self._open_round()
            answered += self._contribute(k, lr)
        return answered

    def server_facts(self) -> dict:
        per_round = collections.Counter(zip(self.rounds_of_updates, self.applied_from))
        return {**super().server_facts(), "rounds": self.round + 1,
                "most_contributions_per_worker_per_round": max(per_round.values(), default=0)}


@ALGORITHMS.register("gsgm")
@dataclass(frozen=True)
class GSGMConfig(ServerKeys):
    """GSGM: a parameter server with gradient scheduling and global momentum (non-IID data)."""

    beta: float = param(0.9, "Global momentum on the server: m <- beta m + direction.", low=0,
                        high=1, high_open=True)
    partial: int | None = param(None, "K: the direction averages the pushing worker's gradient "
                                "and the last of the K-1 workers heard from most recently "
                                "(default ceil(workers / 2)).", low=1)
    max_wait: float | None = param(1.0, "Seconds a round may last while a deferred push waits, "
                                   "before the next round starts anyway (null: until every "
                                   "worker has contributed).", low=0, low_open=True)

    def validate(self) -> None:
        super().validate()
        if self.momentum or self.nesterov:
            raise ConfigError("gsgm keeps its momentum on the server (algorithm.beta); valid: "
                              "0", key="algorithm.momentum")

    def partial_for(self, workers: int) -> int:
        """Return K for ``workers`` workers."""
        return self.partial if self.partial is not None else math.ceil(workers / 2)

    def check_world(self, world_size: int) -> None:
        super().check_world(world_size)
        workers = world_size - self.servers
        if self.partial is not None and self.partial > workers:
            raise ConfigError(f"{self.partial} is more than the {workers} workers (ranks "
                              f"{self.servers}..{world_size - 1}); valid: 1..{workers}",
                              key="algorithm.partial")

    def build(self, ctx) -> GSGM:
        return GSGM(self, ctx)
