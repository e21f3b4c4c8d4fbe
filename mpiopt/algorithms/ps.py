"""The asynchronous parameter server: ranks ``0..S-1`` serve, the other ranks are workers.

Each of the ``S`` servers (``algorithm.servers``) owns one contiguous range of the parameters:
server ``s`` holds ``x[lo_s:hi_s]`` with ``lo_s = s d // S``. A worker computes a gradient at
the model it last received, pushes each server its range of it (server 0's message also
carries the minibatch loss) and waits for every server's answer; a server takes pushes in
whatever order they arrive, applies each through the method's update rule
(:meth:`ParameterServer.apply`) to its range and answers the pushing worker with that range of
the new model. There is no barrier while training, and the servers never talk to each other:
each runs the rule on its own range, with its own versions, rounds and queues. Each worker has
one push in flight at most; a server keeps a receive posted for every worker and takes the
first to complete, under the run's deadline. Every message of training goes between the same
buffers, so both sides set their operations up once as persistent requests
(:class:`~mpiopt.comm.transport.RequestSet`) and restart them for every message. With one
server the rule writes the new model out of place, straight into the buffer the pushing
worker's answer goes out from, and that buffer becomes the server's model: an answer is copied
only when its worker gets a model another push produced (a rule that held pushes back, a
dropped stale gradient).

Versions. The server counts the updates it has applied; it remembers the version it last sent
to each worker, so the staleness of every gradient it applies (updates applied since the model
the gradient was computed at) is known exactly, without the workers sending it.

The end. ``run.steps`` (or ``run.time_limit_s`` on the server's clock) counts the updates a
server applies. Once spent, the server answers each worker's next push, which is already on its
way or will be, with the stop (an empty message on the CONTROL channel) instead of a model, and
applies that push too: every pushed gradient is applied exactly once, and with one server it
applies ``run.steps`` plus at most one more per other worker. With several servers, a worker
told to stop by one of them says goodbye (an empty CONTROL message) to each server that
answered its last push with a model; a server that receives a goodbye ends too. Every server
thus hears from every worker one last time, by a push answered with the stop or by a goodbye,
and every server applies the same pushes. Every rank then leaves its loop with nothing in
flight and meets the others at the shared stop of the asynchronous runtime.

Evaluation and the saved model. Rank 0 holds the whole model only for evaluating and saving it:
with several servers, each keeps its range in an RMA window and rank 0 reads the others' ranges
one-sidedly (a mid-run evaluation reads each range as it is at that moment, while the servers
go on; the final one, after every rank has stopped, reads the final model).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from mpiopt.algorithms.base import SERVER, WORKER, AsynchronousAlgorithm, SGDConfig, ranks_of
from mpiopt.comm.transport import SPIN_S, Channel, CommTimeout, wait_all
from mpiopt.comm.windows import Window
from mpiopt.config import param
from mpiopt.errors import ConfigError

_CONTROL = Channel.CONTROL  # a module global: looked up at every message


class ParameterServer(AsynchronousAlgorithm):
    """The engine of every parameter-server method, on one rank (server or worker).

    A method overrides :meth:`apply` (the server's update rule) and, if its workers transform
    their gradient before pushing it (local momentum), :meth:`prepare`.
    """

    def setup(self) -> None:
        super().setup()
        ctx = self.ctx
        self.d = d = int(self.x.size)
        self.workers = self.clients()
        self.servers = ranks_of(ctx.roles, SERVER)
        n_servers = len(self.servers)
        self.bounds = [(s * d // n_servers, (s + 1) * d // n_servers) for s in range(n_servers)]
        # Several servers keep their ranges in a window, read by rank 0 to evaluate and save.
        mine = self.bounds[ctx.rank] if ctx.role == SERVER else (0, 0)
        self.models = (Window(ctx.transport, mine[1] - mine[0], np.float32, Channel.EVAL,
                              name="server models") if n_servers > 1 else None)
        if ctx.role == SERVER:
            self._setup_server()
        else:
            self.push = np.zeros(d + 1, np.float32)  # the loss, then the gradient
            self.g = self.push[1:]  # computed in place: no copy into the messages
            # Server s gets push[1 + lo_s : 1 + hi_s]; server 0's message starts at the loss.
            self.parts = [self.push[(1 + lo if s else 0): 1 + hi]
                          for s, (lo, hi) in enumerate(self.bounds)]
            self.answers = self.answer_buffer()
            self.bye = np.zeros(0, np.float32)
            # The same messages every step: from each server its range of the model or the
            # stop (an empty CONTROL message), then to each server its part of the push.
            self.exchange = ctx.transport.requests()
            for s, part in zip(self.servers, self.answers):
                self.exchange.recv(part, s, None)
            for s, part in zip(self.servers, self.parts):
                self.exchange.send(part, s, Channel.GRADIENT)

    def answer_buffer(self) -> list:
        """Return where a worker receives each server's range of the model (its own model)."""
        return [self.x[lo:hi] for lo, hi in self.bounds]

    def _setup_server(self) -> None:
        ctx = self.ctx
        t, n = ctx.transport, len(self.workers)
        self.lo, self.hi = self.bounds[ctx.rank]
        size = self.hi - self.lo
        if self.models is None:
            self.w = self.x  # the one server's model is the whole vector
        else:
            self.w = self.models.local
            self.w[...] = self.x[self.lo:self.hi]
        self.state = self.opt.init(self.w)  # the rule's scratch, sized to this range
        self.offset = 1 if ctx.rank == 0 else 0  # only server 0's messages carry the loss
        self.inbox = [np.zeros(size + self.offset, np.float32) for _ in self.workers]
        self.grads = [box[self.offset:] for box in self.inbox]  # the gradient of each push
        # The model last sent to each worker: at first the initial model every rank holds.
        self.outbox = [self.w.copy() for _ in self.workers]
        self.sent_version = [0] * n
        self.applied = [0] * n
        self.dropped = [0] * n  # pushes older than algorithm.staleness_bound
        self.version = 0
        self.staleness: list[int] = []  # of every applied gradient, in order
        self.applied_from: list[int] = []  # the worker index of every applied gradient
        self.ending = False  # the budget is spent: every next push is answered with the stop
        self.open = n  # workers not yet told to stop (nor said goodbye)
        self.goodbyes = 0
        # Persistent operations, one per worker each way, restarted for every message: a push
        # (GRADIENT) or a goodbye (CONTROL), any channel from that worker; the model back.
        self.pushes, self.replies = t.requests(), t.requests()
        for k, w in enumerate(self.workers):
            self.pushes.recv(self.inbox[k], w, None)
            self.replies.send(self.outbox[k], w, Channel.MODEL)
        self.stops = []  # the handles of the stops sent
        self.pushes.start_all()
        # The workers check the losses they compute; a server's row holds NaN where it has no
        # loss: on servers other than 0, and in the step that only took the last goodbye.
        ctx.strict_loss = False

    def budget(self):
        return None, None, None  # the server ends the run: see _server_step

    def clients(self) -> list[int]:
        """Return the ranks that push to the servers (every worker here)."""
        return ranks_of(self.ctx.roles)

    def spent(self) -> bool:
        """Return True once this server's budget is spent: ``run.steps`` updates applied, or
        ``run.time_limit_s`` on its clock. A method whose clients end the run returns False."""
        return self.version >= self.ctx.steps or self.ctx.out_of_time()

    # ------------------------------------------------------------------ the rule

    def prepare(self, g, step: int) -> None:
        """Transform this worker's gradient ``g`` in place before it is pushed.

        Adds ``algorithm.weight_decay`` times the model; rules with worker-side momentum
        extend it.
        """
        if self.cfg.weight_decay:
            self.ctx.xp.multiply(self.x, self.cfg.weight_decay, out=self.state.scratch)
            g += self.state.scratch

    def apply(self, w, g, worker: int, staleness: int, lr: float, out=None) -> None:
        """Apply the gradient ``g`` of worker index ``worker`` to the server's model ``w``.

        The new model goes into ``w`` in place, or with ``out`` given into ``out`` (``w`` left
        as it is). ``out`` is then ``outbox[worker]``, the model last sent to that worker, the
        buffer its answer goes out from: a rule that reads it (DC-ASGD's backup) does so
        before it writes ``out``.
        """
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
        staleness = self.version - self.sent_version[k]
        bound = self.cfg.staleness_bound
        if bound and staleness > bound:
            self.dropped[k] += 1
            return
        if self.models is None:  # one server: the new model straight into k's answer
            if self.replies.active[k]:
                self.replies.wait(k)  # delivered: k pushed again after receiving it
            out = self.outbox[k]
            self.apply(self.w, self.grads[k], k, staleness, lr, out)
            self.x = self.w = out
        else:  # the model stays in the window that rank 0 reads
            self.apply(self.w, self.grads[k], k, staleness, lr)
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
        loss = self.local_gradient(step)
        self.prepare(self.g, step)  # self.g is the message's gradient part
        self.push[0] = loss
        exchange = self.exchange
        exchange.start_all()  # the answers' receives first, then the pushes
        exchange.wait_all()
        if _CONTROL in exchange.channel:  # the end: a server that answered with a model...
            self._leave()
        return loss

    def _leave(self) -> None:
        """A server answered with the stop: say goodbye to those that answered with a model."""
        told = self.exchange.channel
        self.say_goodbye([s for k, s in enumerate(self.servers) if told[k] is not _CONTROL])
        self.stopped = True

    def say_goodbye(self, servers) -> None:
        """Tell ``servers`` that this worker pushes no more (an empty CONTROL message each)."""
        t = self.ctx.transport
        wait_all([t.isend(self.bye, s, Channel.CONTROL) for s in servers])

    def _server_step(self, step: int, lr: float) -> float:
        """Take the next push to arrive; answer the workers the rule releases."""
        k = self._next_push(lr)
        if k is None:  # the last worker said goodbye: nothing left to apply
            self.stopped = True
            return float("nan")
        answers = self.receive(k, lr)
        if not self.ending and self.spent():
            answers += self._end(lr)
        for j in answers:
            self._answer(j)
        self.stopped = self.open == 0
        return float(self.inbox[k][0]) if self.offset else float("nan")

    def _end(self, lr: float) -> list[int]:
        """The budget is spent (or a worker has left): apply what the rule holds back."""
        self.ending = True
        return self.flush(lr)

    GOODBYE_ENDS = True  # a goodbye means another server has ended the run
    IDLE_SPIN_S = SPIN_S  # a server waiting for pushes polls without sleeping this long first

    def _goodbye(self, k: int, lr: float) -> None:
        """Worker ``k`` has left (another server stopped it): this server ends too.

        Where clients end the run (:attr:`GOODBYE_ENDS` False) a goodbye closes that client only.
        """
        self.open -= 1
        self.goodbyes += 1
        if self.GOODBYE_ENDS and not self.ending:
            for j in self._end(lr):
                self._answer(j)

    def _next_push(self, lr: float) -> int | None:
        """Wait for a push (under the run's deadline), letting the rule act when idle.

        Goodbyes are taken here; None once the last open worker has said goodbye.
        """
        pushes = self.pushes
        if self.open and self.patience() is None:  # the common case: one plain wait
            k = pushes.wait_any(self.ctx.transport.timeout, self.IDLE_SPIN_S)
            if k is not None and pushes.channel[k] is not _CONTROL:
                return k
            if k is not None:
                self._goodbye(k, lr)
        return self._wait_for_push(lr)

    def _wait_for_push(self, lr: float) -> int | None:
        """:meth:`_next_push` where the rule may act meanwhile, or workers have left."""
        deadline = time.monotonic() + self.ctx.transport.timeout
        while True:
            if self.open == 0:
                return None
            patience = self.patience()
            left = deadline - time.monotonic()
            try:
                limit = left if patience is None else min(left, patience)  # 0: act at once
                k = self.pushes.wait_any(max(limit, 0.0), self.IDLE_SPIN_S)
            except CommTimeout:
                if patience is None or time.monotonic() >= deadline:
                    raise
                k = None
            if k is not None and self.pushes.channel[k] is _CONTROL:
                self._goodbye(k, lr)
                continue
            if k is not None:
                return k
            released = self.on_idle(lr)  # all held back, or a bounded wait ran out
            if not released and not any(self.pushes.active):
                raise RuntimeError(f"{self.cfg.NAME}: every worker waits for an answer the "
                                   f"rule holds back (step {self.ctx.transport.step})")
            for j in released:
                self._answer(j)

    def _answer(self, k: int) -> None:
        """Send worker ``k`` the model (and post its next receive) or the stop."""
        replies = self.replies
        if replies.active[k]:
            replies.wait(k)  # delivered: the worker pushed again after receiving it
        if self.ending:
            stop = self.ctx.transport.isend(self.outbox[k][:0], self.workers[k], _CONTROL)
            self.stops.append(stop)
            self.open -= 1
            return
        if self.outbox[k] is not self.w:  # not the buffer the rule wrote this model into
            self.outbox[k][...] = self.w
        self.sent_version[k] = self.version
        replies.start(k)
        self.pushes.start(k)

    def settle(self) -> None:
        if self.ctx.role == SERVER:
            self.replies.wait_all()
            wait_all(self.stops)

    def finish(self) -> None:
        """Gather the servers' facts and the final model on rank 0; free the window."""
        ctx = self.ctx
        for requests in ((self.pushes, self.replies) if ctx.role == SERVER else (self.exchange,)):
            requests.free()
        facts = ctx.transport.allgather_obj(self.server_facts() if ctx.role == SERVER else None)
        self.facts = [f for f in facts if f is not None]
        if self.models is None:
            return
        if ctx.rank == 0:
            self._assemble()
        if ctx.role == SERVER:
            self.w = self.w.copy()  # the window's memory goes with it
        self.models.free()

    def _assemble(self) -> None:
        """Put the whole model into rank 0's ``x``: its own range and the others' (read)."""
        for s, (lo, hi) in enumerate(self.bounds):
            if s == 0:
                self.x[lo:hi] = self.w
            else:
                self.models.get(self.x[lo:hi], self.servers[s])

    def evaluate_running(self, step: int) -> dict:
        if self.models is not None:
            self._assemble()  # each range as its server holds it now
        return self.ctx.problem.evaluate(self.x)

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

    def server_facts(self) -> dict:
        """Return this server's facts for ``summary.json`` (rules add their own)."""
        s = np.asarray(self.staleness, dtype=np.float64)
        return {"updates_applied": int(self.version),
                "updates_per_worker": list(self.applied),
                "dropped_stale_per_worker": list(self.dropped),
                "goodbyes": self.goodbyes,
                "staleness": {"mean": float(s.mean()) if s.size else 0.0,
                              "p50": float(np.percentile(s, 50)) if s.size else 0.0,
                              "p99": float(np.percentile(s, 99)) if s.size else 0.0,
                              "max": int(s.max()) if s.size else 0}}

    def summary_info(self) -> dict:
        """Server 0's facts; with several servers also ``per_server``, every server's."""
        info = dict(self.facts[0])
        if len(self.facts) > 1:
            info["servers"] = len(self.facts)
            info["parameters_per_server"] = [hi - lo for lo, hi in self.bounds]
            info["per_server"] = self.facts
        return info


@dataclass(frozen=True)
class ServerKeys(SGDConfig):
    """Keys of the parameter-server methods: ranks 0..servers-1 serve, the others work."""

    ASYNCHRONOUS = True
    HOST_ONLY = True  # the server's model and the messages live in host memory
    REPORTER = SERVER  # progress counts the updates the server applies

    staleness_bound: int = param(0, "Drop (count, do not apply) a gradient computed at a model "
                                 "more than this many updates old; its worker gets the current "
                                 "model all the same (0: apply every gradient).", low=0)

    servers: int = param(1, "Ranks 0..servers-1 are servers, each owning a contiguous range of "
                         "about 1/servers of the parameters; the other ranks are workers.",
                         low=1)

    def roles(self, world_size: int) -> tuple[str, ...]:
        return (SERVER,) * self.servers + (WORKER,) * (world_size - self.servers)

    def check_world(self, world_size: int) -> None:
        if world_size < 2:
            raise ConfigError(f"{self.NAME} needs at least 2 ranks (a server and a worker), "
                              f"got {world_size}", key="algorithm.name")
        if self.servers >= world_size:
            raise ConfigError(f"{self.servers} servers leave no worker among {world_size} "
                              f"ranks; valid: 1..{world_size - 1}", key="algorithm.servers")
