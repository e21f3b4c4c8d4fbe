"""DPSGD: lock-free shared-memory updates inside a node, a parameter server across nodes.

ALGORITHMS.md section 4 (Mohamad, Alamri, Bouchachia). Two levels:

- Inside a node, the node's ranks (its *cores*) share one copy of the parameters in an MPI
  shared-memory window (``Win.Allocate_shared`` on the node's communicator) and update it
  without locks (Hogwild): each core draws a minibatch, computes the direction at the shared
  copy as it reads it (possibly while another core writes it) and subtracts ``lr`` times it in
  place. ``algorithm.node_size`` groups the workers into nodes of that many consecutive ranks
  (one machine emulating several nodes: shared-memory sub-communicators by colour); by default
  a node is the workers of one physical node.
- Across nodes, the lowest rank of each node (its *leader*) is the parameter server's client.
  Every ``algorithm.local_steps`` (B) of its own steps the leader pushes the node's change since
  its last pull, ``delta = v_p - base``, and the servers apply it on arrival, ``v <- v + delta``
  (no barrier; ``algorithm.staleness_bound`` drops a delta staler than the bound, as in the
  engine). The answer ``v`` goes into the shared copy without losing what the node's cores
  did while the push was in flight: ``v_p <- v_p + (v - base - delta)``, ``base <- v``. With one
  node of one core and ``B = 1`` this is sequential SGD (to float rounding).

The end: ``run.steps`` counts each core's own steps (or ``run.total_steps`` all cores'
together, or ``run.time_limit_s``), as in every asynchronous method. A leader whose own budget
is spent goes on pushing its node's change every B steps of the node while its other cores
still step; once every core of its node has stopped it pushes the last change and says goodbye
(an empty CONTROL message) to every server. A server ends when every leader has said goodbye,
so every step of every core reaches the servers. Evaluation is the servers' model, every
``run.eval_every`` pushes applied (rank 0).

What lock-freedom costs is counted, not guessed: every core marks its write of the shared copy
in a node counter (an atomic add before and after it); a write that overlapped another core's is
counted in ``overlapping_updates``. Such a write may have overwritten part of the other (a
lost update); a write that did not overlap lost nothing. The servers' staleness (pushes applied
between a leader's pull and its push) is the engine's.

[decision] ``cores_mode: ranks`` realises the cores as MPI ranks of a node; ``threads`` runs
``algorithm.cores`` threads in each rank instead, each core with its own problem object and
random stream, over the same shared copy (numba and numpy kernels release the interpreter's
lock, so the cores run in parallel where the problem's work is in them).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from mpiopt.algorithms import ALGORITHMS
from mpiopt.algorithms.base import SERVER, WORKER, ranks_of
from mpiopt.algorithms.ps import ParameterServer, ServerKeys
from mpiopt.comm.windows import ProgressThread, SharedWindow
from mpiopt.config import param
from mpiopt.errors import ConfigError

_STEPS, _DONE, _OVERLAP, _WRITERS = range(4)  # a core's counters (writers: the leader's only)
CORES_MODES = ("ranks", "threads")


def write(x, change, sign: float = -1.0) -> None:
    """Add ``sign * change`` to the shared ``x`` where ``change`` is not zero, without locks.

    Coordinates where ``change`` is zero are not written at all: an in-place update of the
    whole vector would store their old values again and could undo another core's concurrent
    update of them. Writers that touch disjoint coordinates therefore lose nothing.
    """
    nz = np.flatnonzero(change)
    if nz.size == change.size:
        if sign < 0:
            x -= change
        else:
            x += change
    elif nz.size:
        x[nz] += change[nz] if sign > 0 else -change[nz]


class DPSGD(ParameterServer):
    """The servers apply the nodes' changes; a node's cores update one copy without locks."""

    GOODBYE_ENDS = False  # the leaders end the run, each by its goodbye
    # A node pushes every B steps of its leader: the servers' waits are long, and a server that
    # spun through them would take a share of the cores of a node beside it (measured: 2 cores
    # of a node then played 1.1-1.5x as many CartPole steps per second as one, 1.6-1.8x without).
    IDLE_SPIN_S = 0.0005
    threads: list = []  # this rank's other cores (cores_mode: threads)

    def setup(self) -> None:
        ctx = self.ctx
        self._make_node()
        self.leaders = ctx.transport.allgather_obj(
            ctx.rank if ctx.role == WORKER and self.node.rank == 0 else None)
        self.leaders = [r for r in self.leaders if r is not None]
        super().setup()
        if ctx.role == WORKER:
            self._setup_core()

    def clients(self) -> list[int]:
        return self.leaders

    def answer_buffer(self) -> list:
        """A leader pulls the model into ``pulled``, then folds it into the node's copy."""
        if self.node.rank != 0:
            return super().answer_buffer()  # never started: only leaders exchange
        self.pulled = np.empty(self.d, np.float32)
        return [self.pulled[lo:hi] for lo, hi in self.bounds]

    def apply(self, w, g, worker: int, staleness: int, lr: float, out=None) -> None:
        np.add(w, g, out=w if out is None else out)  # a node's change: lr applied by its cores

    def spent(self) -> bool:
        return False  # the cores' budgets end the run: see the module doc

    def budget(self):
        if self.ctx.role == SERVER:
            return None, None, None
        return super(ParameterServer, self).budget()  # the run's keys, per core

    # ------------------------------------------------------------------ nodes

    def _make_node(self) -> None:
        """Group the workers into nodes (collective over the workers)."""
        ctx, cfg = self.ctx, self.cfg
        workers = ranks_of(ctx.roles)
        mine = self.workers_transport = ctx.transport.split(0 if ctx.role == WORKER else None)
        if mine is None:  # a server
            self.node = None
            return
        size = cfg.node_size
        if size is None:
            self.node = mine.split_shared()
            return
        self.node = mine.split(workers.index(ctx.rank) // size)
        shared = self.node.split_shared()
        apart = shared.size != self.node.size
        shared.free()
        if apart:
            raise ConfigError(f"{size} ranks of a node do not share memory here (only "
                              f"{shared.size} of rank {ctx.rank}'s do); valid: at most the "
                              "ranks of one physical node, or null for the physical node",
                              key="algorithm.node_size")

    def _setup_core(self) -> None:
        ctx, node, d = self.ctx, self.node, self.d
        self.leader = node.rank == 0
        self.node_index = self.leaders.index(node.bcast_obj(ctx.rank))
        self.shared = SharedWindow(node, d if self.leader else 0, np.float32, name="node model")
        self.marks = SharedWindow(node, 4, np.int64, name="node counters")
        self.v = self.shared.view(0)
        if self.leader:
            self.v[...] = self.x
        self.shared.fence()  # every core sees the initial model
        self.x = self.v  # the gradient is computed at the shared copy, and applied to it
        self.mark = self.marks.local
        self.pushes, self.overlap = 0, 0
        # clock: global spans the schedule over every core's steps of the run
        run, cfg = ctx.cfg.run, self.cfg
        cores = len(ranks_of(ctx.roles)) * (cfg.cores if cfg.cores_mode == "threads" else 1)
        total = run.total_steps if run.total_steps is not None else run.steps * cores
        self.schedule = cfg.make_schedule(total)
        if self.leader:
            self.base = self.x.copy()  # the model as last pulled
            self.node_steps_at_push = 0
            self.losses: list[float] = []
            self.gone = False  # said goodbye
        threads = self.cfg.cores - 1 if self.cfg.cores_mode == "threads" else 0
        if threads and not ProgressThread.supported():  # the cores' atomics call MPI
            raise ConfigError("threads need MPI thread level 'multiple' (mpi4py's default; "
                              "check mpi4py.rc.thread_level); valid: ranks",
                              key="algorithm.cores_mode")
        self.threads = [_Core(self, i) for i in range(1, threads + 1)]

    # ------------------------------------------------------------------ steps

    def step(self, step: int, lr: float) -> float:
        if self.ctx.role == SERVER:
            return self._server_step(step, lr)
        lr = self.rate(step)
        loss, overlapped = self._core_step(self.ctx.problem, self.ctx.rng, self.g, self.state,
                                           lr)
        self.overlap += overlapped
        for th in self.threads:
            th.check()
        self._store_counts(step + 1)  # after the steps' writes (see _exchange)
        if self.node.size > 1:
            self.marks.sync()  # a memory barrier: the write is visible before the count
        if self.leader:
            self.losses.append(loss)
            if (step + 1) % self.cfg.local_steps == 0:
                self._exchange()
        return loss

    def _store_counts(self, own: int) -> None:
        """Show the node this rank's steps (``own`` of its main thread, and its threads')
        and its overlapping writes."""
        self.mark[_OVERLAP] = self.overlap + sum(th.overlap for th in self.threads)
        self.mark[_STEPS] = own + sum(th.steps for th in self.threads)

    def rate(self, own: int) -> float:
        """The learning rate of a core's step: by its own step count ``own``, or (``clock:
        global``) by the run's, estimated as the node's steps so far times the nodes."""
        if self.cfg.clock == "core":
            return self.ctx.schedule(own)
        return self.schedule(self._node_steps(live=True) * len(self.leaders))

    def _core_step(self, problem, rng, g, state, lr: float) -> tuple[float, bool]:
        """One core's lock-free step on the shared copy; return its loss and whether its write
        overlapped another core's."""
        loss = problem.gradient(self.x, rng, g)["loss"]
        step = self.opt.step(self.x, g, state, lr)
        if self.node.size == 1 and not self.threads:
            self.x -= step
            return loss, False
        before = self.marks.fetch_and_add(1, 0, _WRITERS)
        write(self.x, step)
        after = self.marks.fetch_and_add(-1, 0, _WRITERS)
        return loss, bool(before > 0 or after > 1)

    def _exchange(self) -> None:
        """Push the node's change since the last pull; fold the answer into the shared copy."""
        self.push[0] = np.mean(self.losses) if self.losses else np.nan
        self.losses = []
        # Counted before the change is read: a core stores its step, then counts it, so every
        # step counted here is in the change (later ones may be too, and go again next time).
        self.node_steps_at_push = self._node_steps()
        np.subtract(self.v, self.base, out=self.g)  # delta, in the push's gradient part
        self.exchange.start_all()  # the engine's worker messages: answers into self.pulled
        self.exchange.wait_all()
        # v_p <- v_p + (v - base - delta): what the cores did meanwhile is kept.
        np.subtract(self.pulled, self.base, out=self.base)
        self.base -= self.g
        write(self.v, self.base, +1.0)  # only where the model moved: the cores write on
        self.base[...] = self.pulled
        self.pushes += 1

    def _node_steps(self, live: bool = False) -> int:
        """The steps the node's cores have stored; ``live``: this rank's threads' own counts
        too (the counters hold them only as of this rank's last step)."""
        self.marks.sync()
        steps = int(sum(self.marks.view(r)[_STEPS] for r in range(self.node.size)))
        if live and self.threads:
            steps += self.ctx.steps_done + sum(th.steps for th in self.threads) \
                - int(self.mark[_STEPS])
        return steps

    def _node_done(self) -> bool:
        self.marks.sync()
        return all(self.marks.view(r)[_DONE] for r in range(self.node.size))

    def warm_up(self) -> None:
        super().warm_up()
        for th in self.threads:  # after the main core's warm-up: the same kernels, loaded
            th.problem.warm_up(self.x, th.g)
            th.start()

    def settle(self) -> None:
        if self.ctx.role == SERVER:
            return super().settle()
        run = self.ctx.cfg.run
        if run.total_steps is not None or self.ctx.out_of_time():
            for th in self.threads:  # the budget this rank's loop obeyed ends theirs too
                th.halt.set()
        for th in self.threads:
            th.finish()
        self._store_counts(self.ctx.steps_done)
        self.mark[_DONE] = 1
        self.marks.sync()

    def serve(self) -> None:
        """A leader whose own steps are done: push for the node's other cores, then leave."""
        if self.ctx.role == SERVER or not self.leader or self.gone:
            return
        self._store_counts(self.ctx.steps_done)
        done = self._node_done()  # every core's last step is stored before it says so
        new = self._node_steps() - self.node_steps_at_push  # steps not surely pushed yet
        if new >= self.cfg.local_steps or (done and new):
            self._exchange()
        if done:
            self.say_goodbye(self.servers)
            self.gone = True

    def finish(self) -> None:
        ctx = self.ctx
        core = None
        if ctx.role == WORKER:
            core = {"rank": ctx.rank, "node": self.node_index,
                    "steps": int(self.mark[_STEPS]),
                    "overlapping_updates": int(self.mark[_OVERLAP]),
                    "pushes": self.pushes, "cores": 1 + len(self.threads)}
        self.cores = [c for c in ctx.transport.allgather_obj(core) if c is not None]
        super().finish()
        if ctx.role == WORKER:
            self.x = self.x.copy()  # the shared memory goes with the window
            self.marks.free()
            self.shared.free()
            self.node.free()
            self.workers_transport.free()

    def summary_info(self) -> dict:
        info = super().summary_info()
        steps = sum(c["steps"] for c in self.cores)
        overlap = sum(c["overlapping_updates"] for c in self.cores)
        nodes = len(self.leaders)
        info.update({
            "nodes": nodes,
            "cores_per_node": [sum(c["cores"] for c in self.cores if c["node"] == n)
                               for n in range(nodes)],
            "core_steps": steps,
            "core_steps_per_worker": [c["steps"] for c in self.cores],  # in rank order
            "overlapping_updates": overlap,
            "overlapping_fraction": overlap / steps if steps else 0.0,
        })
        return info


class _Core(threading.Thread):
    """One more core of a rank (``cores_mode: threads``): its own problem, stream and buffers.

    It steps on the node's shared copy like a rank does, ``run.steps`` times (or until the
    rank's loop ends by a time or total budget), while the rank's main thread steps too; the
    main thread folds its counts into the node's counters and raises its error, if any.
    """

    def __init__(self, alg: DPSGD, index: int):
        super().__init__(name=f"core-{index}", daemon=True)
        ctx = alg.ctx
        self.alg, self.index = alg, index
        self.problem = ctx.problem.replica()
        self.rng = np.random.default_rng([ctx.cfg.run.seed, 4, ctx.rank, index])
        self.g = np.empty_like(alg.x)
        self.state = alg.opt.init(alg.x)
        self.budget = ctx.steps if ctx.cfg.run.total_steps is None else None
        self.steps = self.overlap = 0
        self.halt = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        alg = self.alg
        try:
            while not self.halt.is_set() and (self.budget is None or self.steps < self.budget):
                _, overlapped = alg._core_step(self.problem, self.rng, self.g, self.state,
                                               alg.rate(self.steps))
                self.overlap += overlapped
                self.steps += 1  # after the write, as the rank's own count
        except BaseException as e:  # raised again in the rank's main thread
            self.error = e

    def check(self) -> None:
        """Raise this core's error in the calling (main) thread."""
        if self.error is not None:
            raise RuntimeError(f"core thread {self.index} of rank {self.alg.ctx.rank} failed: "
                               f"{self.error!r}") from self.error

    def finish(self) -> None:
        """Wait for this core to end its steps (each is short), then raise its error."""
        while self.is_alive():
            self.join(0.05)
        self.check()


@ALGORITHMS.register("dpsgd")
@dataclass(frozen=True)
class DPSGDConfig(ServerKeys):
    """DPSGD: lock-free cores per node, an asynchronous parameter server across nodes."""

    REPORTER = WORKER  # progress counts a core's steps (the first node's leader)

    local_steps: int = param(1, "B: a node leader pushes its node's change (and pulls the "
                             "model) every this many of its own steps.", low=1)
    node_size: int | None = param(None, "Workers per node, consecutive ranks after the servers "
                                  "(null: the workers of each physical node). Smaller than a "
                                  "physical node, one machine emulates several nodes.", low=1)
    cores_mode: str = param("ranks", "How a node's cores run: ranks (each rank of the node is "
                            "a core) or threads (each rank also runs algorithm.cores - 1 more "
                            "threads over the node's copy).", choices=CORES_MODES)
    cores: int = param(1, "Cores per rank with cores_mode: threads (the rank's own thread "
                       "included).", low=1)
    clock: str = param("global", "The step count of a core's learning rate: global (the "
                       "run's steps so far, estimated as the node's times the nodes; the "
                       "schedule spans every core's steps, as a serial run of as many would) "
                       "or core (its own steps).", choices=("global", "core"))

    def build(self, ctx) -> DPSGD:
        return DPSGD(self, ctx)
