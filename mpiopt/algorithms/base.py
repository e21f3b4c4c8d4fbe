"""Shared pieces of every algorithm: config bases, the run context and the step loop.

An algorithm is a frozen config class registered by name whose ``build(ctx)`` returns an
:class:`Algorithm`. The algorithm owns its loop and its roles; the :class:`Context` gives it the
shared services: transport, problem, random streams, schedule, stopping rule, evaluation
cadence, recorder, progress and fault injection.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from mpiopt.comm.termination import Termination
from mpiopt.comm.topology import build_topology
from mpiopt.comm.transport import Channel
from mpiopt.config import Section, param
from mpiopt.io.metrics import EvalLog, StepLog
from mpiopt.optim import SCHEDULES, SGD, make_schedule

WORKER, SERVER, HUB = "worker", "server", "hub"
CALIBRATION = 10  # steps whose compute, at full speed, sets run.slowdown's delay


@dataclass(frozen=True)
class AlgorithmConfig(Section):
    """Keys common to every algorithm: the learning rate and its schedule."""

    HOST_ONLY: ClassVar[bool] = False  # True: runs on host memory (run.device auto means cpu)
    ASYNCHRONOUS: ClassVar[bool] = False  # True: ranks step at their own pace (total budgets)
    REPORTER: ClassVar[str] = "worker"  # the role whose first rank prints progress lines

    lr: float = param(0.1, "Base learning rate.", low=0, low_open=True)
    schedule: str = param("constant", "Learning-rate schedule after warm-up.",
                          choices=SCHEDULES)
    warmup_steps: int = param(0, "Steps of linear warm-up from lr/warmup_steps to lr.", low=0)
    decay_every: int = param(0, "schedule: step multiplies lr by gamma every this many "
                             "steps (0: never).", low=0)
    gamma: float = param(0.1, "Decay factor of the step schedule.", low=0, high=1,
                         low_open=True)
    tau0: float = param(1.0, "schedule: inverse_power, lr * (tau0 + t)^-kappa at step t "
                        "(from 0): the delay that damps the first steps (>= 1 keeps every "
                        "step at most lr; scikit-learn's learning_offset L is tau0 = L + 1).",
                        low=0, low_open=True)
    kappa: float = param(0.7, "schedule: inverse_power, the forgetting rate; in (0.5, 1] "
                         "the steps sum to infinity and their squares do not, as stochastic "
                         "variational inference needs.", low=0.5, high=1, low_open=True)

    def build(self, ctx: Context) -> Algorithm:
        """Return the runtime object of this algorithm for one rank."""
        raise NotImplementedError

    def roles(self, world_size: int) -> tuple[str, ...]:
        """Return the role of every rank: all workers unless the algorithm has servers or hubs."""
        return (WORKER,) * world_size

    def make_schedule(self, total_steps: int):
        """Return ``step -> lr`` for this configuration."""
        return make_schedule(self.schedule, self.lr, total_steps, self.warmup_steps,
                             self.decay_every, self.gamma, tau0=self.tau0, kappa=self.kappa)


@dataclass(frozen=True)
class SGDConfig(AlgorithmConfig):
    """Keys of the local optimizer: momentum, Nesterov, weight decay."""

    momentum: float = param(0.0, "Heavy-ball momentum of the local optimizer.", low=0,
                            high=1, high_open=True)
    nesterov: bool = param(False, "Use Nesterov momentum (needs momentum > 0).")
    weight_decay: float = param(0.0, "L2 weight decay added to the gradient.", low=0)

    def validate(self) -> None:
        if self.nesterov and not self.momentum:
            from mpiopt.errors import ConfigError

            raise ConfigError("needs algorithm.momentum > 0", key="algorithm.nesterov")

    def optimizer(self) -> SGD:
        """Return the local optimizer these keys describe."""
        return SGD(self.momentum, self.nesterov, self.weight_decay)


@dataclass(frozen=True)
class GraphKeys(SGDConfig):
    """Keys of the algorithms that gossip over a graph of ranks."""

    topology: Any = param("ring", "Graph over ranks: complete, ring, torus, hypercube, "
                          "random_regular:k, or a list of [i, j] edges.")
    graph_seed: int = param(0, "Seed of random graphs (random_regular), fixed across runs.",
                            low=0)

    def topology_for(self, world_size: int):
        """Return the connected topology over ``world_size`` ranks."""
        return build_topology(self.topology, world_size, self.graph_seed)

    def check_world(self, world_size: int) -> None:
        self.topology_for(world_size)


def ranks_of(roles, role: str = "worker") -> list[int]:
    """Return the ranks that have ``role``, in order (the workers by default)."""
    return [r for r, mine in enumerate(roles) if mine == role]


def reporter_rank(roles, role: str = "worker") -> int:
    """Return the rank that reports progress: the first of ``role`` (rank 0 if none has it)."""
    return next((r for r, mine in enumerate(roles) if mine == role), 0)


class NonFiniteError(FloatingPointError):
    """A loss or gradient became NaN or infinite."""


class Context:
    """Services shared by the algorithms of one run, on one rank.

    Attributes:
        cfg: the validated configuration.
        transport: the world transport.
        problem: this rank's problem (the test set only on rank 0).
        xp: the array module.
        rng: this rank's random stream (minibatches, local choices).
        init_rng: a stream identical on every rank (initial parameters).
        schedule: ``step -> lr``.
        steps: the step budget per rank.
        roles: every rank's role (``worker``, ``server``, ``hub``...), from the algorithm.
        role: this rank's role.
        reporter: the rank that prints progress lines (the first worker; not rank 0 when
            rank 0 serves).
        slowdown: this rank's factor from ``run.slowdown`` (1: full speed).
    """

    def __init__(self, cfg, transport, problem, xp, run_dir: str, steplog: StepLog,
                 faults, progress):
        self.cfg = cfg
        self.transport = transport
        self.rank, self.size = transport.rank, transport.size
        self.problem = problem
        self.xp = xp
        seed = cfg.run.seed
        self.roles = cfg.algorithm.roles(self.size)
        self.role = self.roles[self.rank]
        workers = ranks_of(self.roles)
        # A worker's stream follows its place among the workers, not its rank: a run with a
        # server in front draws the same minibatches as one without.
        self.rng = np.random.default_rng(
            [seed, 1, workers.index(self.rank)] if self.rank in workers else [seed, 3, self.rank])
        self.init_rng = np.random.default_rng([seed, 0])
        self.steps = cfg.run.steps
        self.time_limit = cfg.run.time_limit_s
        self.eval_every = cfg.run.eval_every
        self.schedule = cfg.algorithm.make_schedule(cfg.run.expected_steps(self.size))
        self.run_dir = run_dir
        self.steplog = steplog
        self.evals = EvalLog()
        self.faults = faults
        self.progress = progress
        self.start = time.perf_counter()
        self.steps_done = 0
        self.eval_s = 0.0  # seconds in evaluations (see evaluated)
        self.final: dict = {}
        self.strict_loss = True  # a non-finite loss ends the run (policies may relax this)
        self.reporter = reporter_rank(self.roles, cfg.algorithm.REPORTER)
        self.slowdown = float(cfg.run.slowdown.get(self.rank, 1.0))
        self._debt = 0.0  # seconds run.slowdown still owes (negative: slept too long)
        self._calibration: list[float] = []  # compute of the first steps, at full speed
        self._reference: float | None = None  # this rank's compute per step, from them
        self._stalled = 0.0  # seconds of this step spent in an injected stall
        # The transport's running totals, and their values when the step began: begin_step
        # and end_step read a few attributes, which is most of what a step's row costs.
        self._totals = transport.totals
        self._t0, self._sent0, self._recv0, self._comm0 = self.start, 0, 0, 0.0

    # ------------------------------------------------------------------ steps

    def elapsed(self) -> float:
        """Return seconds since the run started."""
        return time.perf_counter() - self.start

    def restart_clock(self, barrier: bool = True) -> None:
        """Start the run's clock now: setup (allocation, kernel loading) is not run time.

        With ``barrier`` every rank starts it together, once all are set up: a rank that
        finished its setup first would otherwise count the others' setup as its first step.
        """
        if barrier:
            self.transport.barrier()
        self.start = time.perf_counter()

    def out_of_time(self) -> bool:
        """Return True when the run's wall-time budget is spent."""
        limit = self.time_limit
        return limit is not None and self.elapsed() >= limit

    def begin_step(self, step: int) -> None:
        """Mark the start of ``step``: fire due faults, stamp timers and counters."""
        totals = self._totals
        self.transport.step = step
        self._sent0, self._recv0, self._comm0 = totals.sent, totals.recv, totals.seconds
        self._t0 = time.perf_counter()
        if self.faults.faults:
            self.faults.at_step(step)  # a stall counts as this step's compute time
            self._stalled = time.perf_counter() - self._t0  # ... but run.slowdown does not scale it

    def end_step(self, step: int, loss: float | None, lr: float) -> None:
        """Record the row of ``step`` and report progress; fail on a non-finite loss.

        ``loss`` None: the step computed no loss (an idle slot); its row holds NaN.
        """
        if loss is None:
            loss = math.nan
        elif self.strict_loss and not math.isfinite(loss):
            raise NonFiniteError(f"non-finite loss {loss} on rank {self.rank} at step {step} "
                                 "(the model diverged or a gradient was NaN)")
        now = time.perf_counter()
        totals = self._totals
        comm = totals.seconds - self._comm0
        if self.slowdown != 1.0:
            self._slow_down(max(now - self._t0 - comm - self._stalled, 0.0))
            now = time.perf_counter()
        compute = now - self._t0 - comm
        sent = totals.sent
        self.steplog.append(step, now - self.start, loss, lr, sent - self._sent0,
                            totals.recv - self._recv0, compute if compute > 0.0 else 0.0, comm)
        self.steps_done = step + 1
        if now >= self.progress.due:  # infinite when progress lines are off
            self.progress.update(step, loss, sent, now)

    def _slow_down(self, compute: float) -> None:
        """Sleep so that this rank computes ``slowdown`` times as long as it would.

        The delay owed per step is ``(slowdown - 1) r``, with ``r`` this rank's own compute per
        step: the median of its first :data:`CALIBRATION` steps, taken at full speed (their
        delay is owed after them). Measuring every step instead would feed back: a rank that
        has just slept computes several times slower (cold caches, a busy core) and would then
        sleep longer still. A sleep overshoots what it is asked for; the excess is kept as a
        debt against later steps, so that over a run the delays add up to what is owed.
        """
        if self._reference is None:
            self._calibration.append(compute)
            if len(self._calibration) < CALIBRATION:
                return
            self._reference = float(np.median(self._calibration))
            self._debt += (self.slowdown - 1.0) * self._reference * (CALIBRATION - 1)
        self._debt += (self.slowdown - 1.0) * self._reference
        if self._debt > 0.0:
            t0 = time.perf_counter()
            time.sleep(self._debt)
            self._debt -= time.perf_counter() - t0

    def eval_due(self, step: int) -> bool:
        """Return True if an evaluation is due after ``step`` (never after the last)."""
        every = self.eval_every
        return every > 0 and (step + 1) % every == 0 and step + 1 < self.steps

    def evaluated(self, evaluate, step: int) -> dict:
        """Return ``evaluate(step)``, counting its seconds as evaluation, not training."""
        t0 = time.perf_counter()
        try:
            return evaluate(step)
        finally:
            self.eval_s += time.perf_counter() - t0

    def record_eval(self, step: int, metrics: dict) -> None:
        """Store an evaluation row (rank 0) and show it in the progress line.

        ``time`` is the run's clock; ``train_time`` leaves out the seconds this rank spent in
        the evaluations so far (:meth:`evaluated`).
        """
        now = self.elapsed()
        row = {"step": step + 1, "time": now, "train_time": now - self.eval_s,
               "bytes_sent": float(self.transport.bytes_sent()), **metrics}
        self.evals.append(row)
        self.progress.note_eval(metrics)


class Algorithm:
    """Runtime of one algorithm on one rank: owns the loop, reports metrics via the context."""

    def __init__(self, cfg, ctx: Context):
        self.cfg = cfg
        self.ctx = ctx

    def run(self) -> None:
        """Train until the step or time budget is spent, then evaluate the final model(s)."""
        raise NotImplementedError

    def evaluate(self, step: int) -> dict:
        """Evaluate the algorithm's model(s); return rank 0's metrics ({} on other ranks)."""
        raise NotImplementedError

    def summary_info(self) -> dict:
        """Return facts about this run's algorithm for ``summary.json`` (rank 0's copy)."""
        return {}

    def series(self) -> dict[str, tuple[Any, str]]:
        """Return this rank's own series for ``metrics.h5``: ``name -> (1-D array, doc)``.

        Asked of every rank at the end of the run; each non-empty answer is written to
        ``series/<rank>/<name>``, every series with its own length (one row per event of the
        method: an applied gradient, a gossip exchange...) and ``doc`` as its description.
        """
        return {}


class ModelAlgorithm(Algorithm):
    """An algorithm whose every rank holds a model ``x``, a gradient ``g`` and an optimizer.

    The base of the synchronous and the asynchronous loops: allocation, the local gradient,
    the warm-up, evaluation of rank 0's model or of the average model, the saved model.
    """

    def setup(self) -> None:
        """Allocate buffers and initial parameters (identical on every rank)."""
        ctx = self.ctx
        self.x = ctx.problem.init(ctx.init_rng)
        self.g = ctx.xp.empty_like(self.x)
        self.opt = self.cfg.optimizer()
        self.state = self.opt.init(self.x)

    def step(self, step: int, lr: float) -> float:
        """Do one step; return the local minibatch loss."""
        raise NotImplementedError

    def local_gradient(self, step: int) -> float:
        """Compute this rank's minibatch gradient into ``self.g``; return the loss."""
        ctx = self.ctx
        loss = ctx.problem.gradient(self.x, ctx.rng, self.g)["loss"]
        if ctx.faults.faults:
            ctx.faults.corrupt(step, self.g)
        return loss

    def warm_up(self) -> None:
        """Run this rank's local work on scratch data before the clock starts.

        The problem computes a few gradients into ``g`` (its minibatch stream unmoved).
        Subclasses add their kernels: dispatch decides by size whether numba runs, and where
        it does this loads numba and the cached machine code (or compiles it, on a fresh
        install) now rather than in the first steps. Nothing is communicated.
        """
        self.ctx.problem.warm_up(self.x, self.g)

    def evaluate(self, step: int) -> dict:
        """Evaluate rank 0's model on the test set (rank 0 holds it)."""
        return self.ctx.problem.evaluate(self.x) if self.ctx.rank == 0 else {}

    def evaluate_average(self) -> dict:
        """Evaluate the average of all ranks' models; add the consensus distance.

        The consensus distance is the mean over ranks of ``|x_i - mean(x)|^2``. Uses the
        optimizer's scratch and the gradient buffer, both free between steps.
        """
        ctx = self.ctx
        avg = self.state.scratch
        avg[...] = self.x
        ctx.transport.allreduce(avg, Channel.EVAL)
        avg *= 1.0 / ctx.size
        diff = self.g
        ctx.xp.subtract(self.x, avg, out=diff)
        dist = ctx.transport.allreduce_scalar(float((diff * diff).sum()), channel=Channel.EVAL)
        if ctx.rank != 0:
            return {}
        return {**ctx.problem.evaluate(avg), "consensus_distance": dist / ctx.size}

    def model(self):
        """Return the parameters to save as the run's final model."""
        return self.x


class SynchronousAlgorithm(ModelAlgorithm):
    """An algorithm whose ranks all take the same steps: one ``step`` per iteration."""

    def run(self) -> None:
        ctx = self.ctx
        self.setup()
        self.warm_up()
        limited = ctx.time_limit is not None
        ctx.restart_clock()
        for step in range(ctx.steps):
            # Every rank must stop at the same step: rank 0's clock decides.
            if limited and self._agree_out_of_time():
                break
            ctx.begin_step(step)
            lr = ctx.schedule(step)
            loss = self.step(step, lr)
            ctx.end_step(step, loss, lr)
            if ctx.eval_every and ctx.eval_due(step):
                ctx.record_eval(step, ctx.evaluated(self.evaluate, step))
        self.finish()
        ctx.final = ctx.evaluated(self.evaluate, ctx.steps_done - 1)
        if ctx.rank == 0:
            ctx.record_eval(ctx.steps_done - 1, ctx.final)

    def finish(self) -> None:
        """Hook run after the last step, before the final evaluation."""

    def _agree_out_of_time(self) -> bool:
        flag = np.array([1.0 if self.ctx.out_of_time() else 0.0])
        self.ctx.transport.bcast(flag, root=0, channel=Channel.CONTROL)
        return bool(flag[0])


class AsynchronousAlgorithm(ModelAlgorithm):
    """An algorithm whose ranks step at their own pace and meet only at the end.

    The loop every asynchronous method shares: each rank takes ``step`` after ``step`` until
    its budget is spent (``run.steps``, or ``run.total_steps`` over all ranks instead, or
    ``run.time_limit_s``), showing its progress by a heartbeat; then it waits for the others
    with :class:`~mpiopt.comm.termination.Termination`, doing what it owes them meanwhile
    (:meth:`serve`), which waits for slow ranks however long they take and fails only on one
    that shows no progress for ``run.comm_timeout_s``. After every rank has stopped,
    :meth:`finish` releases what the method holds, and the final evaluation is collective.
    Mid-run evaluations are rank 0's alone (:meth:`evaluate_running`): nobody else waits.
    A method is its ``setup``, ``step``, ``settle``, ``serve`` and ``finish``.
    """

    stopped = False  # set by a step when the method itself ends this rank's loop

    def budget(self) -> tuple[int | None, float | None, int | None]:
        """Return this rank's budget: its steps, the run's time limit, the total steps.

        The run's keys by default (``run.steps``, ``run.time_limit_s``, ``run.total_steps``);
        a method whose ranks learn the end from a peer (a parameter server's workers) returns
        Nones and sets :attr:`stopped` instead.
        """
        run = self.ctx.cfg.run
        own = self.ctx.steps if run.total_steps is None else None  # a total budget replaces it
        return own, run.time_limit_s, run.total_steps

    def step(self, step: int, lr: float) -> float:
        """Do one local step, with its own communication; return the minibatch loss."""
        raise NotImplementedError

    def settle(self) -> None:
        """Complete this rank's operations towards the others before it waits at the stop.

        One-sided writes into peers' windows (corrections, updates) complete at their targets
        only when flushed; a rank that has stopped must leave nothing in flight.
        """

    def serve(self) -> None:
        """Do, while waiting at the stop, what the others may still need from this rank."""

    def finish(self) -> None:
        """Release the method's communication state once every rank has stopped."""

    def evaluate_running(self, step: int) -> dict:
        """Evaluate mid-run on rank 0 alone, without the others (default: its own model)."""
        return self.ctx.problem.evaluate(self.x)

    def run(self) -> None:
        ctx = self.ctx
        self.setup()
        self.warm_up()
        stop = Termination(ctx.transport, *self.budget(), ctx.elapsed)
        evaluating = ctx.rank == 0 and ctx.eval_every > 0
        ctx.restart_clock()
        step = 0
        while not self.stopped and (stop.unbounded or stop.go(step)):
            ctx.begin_step(step)
            lr = ctx.schedule(step)
            loss = self.step(step, lr)
            ctx.end_step(step, loss, lr)
            stop.beat(step + 1)
            if evaluating and ctx.eval_due(step):
                ctx.record_eval(step, ctx.evaluated(self.evaluate_running, step))
            step += 1
        self.settle()
        stop.wait(self.serve)
        stop.free()
        self.finish()
        ctx.final = ctx.evaluated(self.evaluate, ctx.steps_done - 1)
        if ctx.rank == 0:
            ctx.record_eval(ctx.steps_done - 1, ctx.final)
