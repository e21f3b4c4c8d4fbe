"""``mpiexec -n N mpiopt bench ps``: the parameter server's applied updates per second.

Rank 0 serves and the other ranks work, first through mpiopt's engine
(:class:`~mpiopt.algorithms.ps.ParameterServer` with the ``asgd`` rule, driven by its own
asynchronous loop with the run's per-step bookkeeping: step rows, heartbeat, counters), then
through a bare mpi4py server (:func:`~mpiopt.comm.raw_ps.raw_parameter_server`: any-source
``Recv``, axpy, ``Send`` back), in the same run. Workers compute no gradient: each pushes a
fixed buffer of d floats and its loss, so that what is timed is the communication and the
server's work. Buffers are touched before the clock starts (a long run has its pages).

Each round runs both with the same budget of updates, the order swapped every round. A rate is
the updates the server applied (the budget plus the pushes in flight at the end, which both
apply) over the seconds from the start barrier to the server's last answer (for the engine:
the time of its last step row). The figure of merit is the median over rounds of the paired
ratio (mpiopt / reference).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import h5py
import numpy as np

from mpiopt.algorithms.asgd import ASGD
from mpiopt.algorithms.base import SERVER, Context
from mpiopt.comm.raw_ps import raw_parameter_server
from mpiopt.comm.transport import Transport
from mpiopt.faults import FaultInjector
from mpiopt.io.metrics import StepLog, rank_log_path
from mpiopt.problems.base import Problem
from mpiopt.progress import Progress
from mpiopt.schema import config_from_dict

SIZES = (10_000, 1_000_000, 10_000_000)
LR = 1e-3
PUSH = 1e-3  # every gradient element: the model moves by 1e-6 an update, nothing overflows


class _Flat(Problem):
    """A problem of ``d`` parameters that computes nothing: the gradient buffer keeps ``PUSH``."""

    def __init__(self, d: int):
        self.dim = d

    def init(self, rng):
        return np.zeros(self.dim, np.float32)

    def gradient(self, x, rng, out) -> dict:
        return {"loss": 0.0}  # ``out`` holds the fixed push, written by the engine's warm-up

    def warm_up(self, x, out, calls: int = 16) -> None:
        out.fill(PUSH)

    def evaluate(self, x) -> dict:
        return {}


class _Pushing(ASGD):
    """ASGD as it runs, except that its warm-up also touches every buffer (pages mapped)."""

    def warm_up(self) -> None:
        super().warm_up()  # workers: the fixed push into the gradient buffer
        if self.ctx.role == SERVER:
            mine = (*self.inbox, *self.outbox, self.state.scratch)
        else:
            mine = (self.push,)
        for buf in (self.x, *mine):
            buf.fill(0.0)


def _config(updates: int):
    """Return an asgd configuration whose server applies ``updates``; no evaluations."""
    return config_from_dict({
        "problem": {"name": "softmax"},  # unused: the context gets the flat problem
        "data": {"name": "synthetic"},
        "algorithm": {"name": "asgd", "lr": LR},
        "run": {"steps": updates, "eval_every": 0, "quiet": True}})


def engine(t: Transport, d: int, updates: int, tmp: str) -> tuple[int, float]:
    """Run the engine once; return the server's updates applied and its seconds (every rank)."""
    cfg = _config(updates)
    steplog = StepLog(rank_log_path(tmp, t.rank), cfg.run.metrics_chunk)
    ctx = Context(cfg, t, _Flat(d), np, tmp, steplog, FaultInjector([], t.rank),
                  Progress(updates, enabled=False))
    algo = _Pushing(cfg.algorithm, ctx)
    algo.run()
    steplog.close()
    if t.rank != 0:
        return t.bcast_obj(None)
    with h5py.File(steplog.path, "r") as f:
        seconds = float(f["time"][-1])  # the end of the server's last step
    return t.bcast_obj((int(algo.version), seconds))


def reference(t: Transport, d: int, updates: int) -> tuple[int, float]:
    """Run the bare server once; return its updates applied and seconds (every rank)."""
    push = np.full(d + 1, PUSH, np.float32)
    push[d] = 0.0  # the loss
    return t.bcast_obj(raw_parameter_server(t, push, updates, LR))


def budget(d: int) -> int:
    """Return the updates of one timed run: about 0.3 GB through the server each way."""
    return int(min(500, max(40, 3e8 // (4 * d))))


def measure(t: Transport, d: int, rounds: int, updates: int | None, tmp: str) -> dict:
    """Time ``rounds`` paired runs of the engine and the reference for ``d`` parameters."""
    updates = updates or budget(d)
    engine(t, d, min(updates, 20), tmp), reference(t, d, min(updates, 20))  # warm-up
    rates = np.zeros((rounds, 2))  # updates/s of (reference, engine)
    for i in range(rounds):
        for j in ((0, 1) if i % 2 == 0 else (1, 0)):
            applied, seconds = (reference(t, d, updates) if j == 0 else
                                engine(t, d, updates, tmp))
            rates[i, j] = applied / seconds
    ratios = rates[:, 1] / rates[:, 0]
    return {"d": d, "ranks": t.size, "workers": t.size - 1, "updates": updates,
            "rounds": rounds, "reference_updates_per_s": float(np.median(rates[:, 0])),
            "mpiopt_updates_per_s": float(np.median(rates[:, 1])),
            "ratio": float(np.median(ratios)),
            "ratio_range": [float(ratios.min()), float(ratios.max())]}


def _fmt(d: int) -> str:
    for unit, scale in (("M", 1_000_000), ("K", 1000)):
        if d >= scale and d % scale == 0:
            return f"{d // scale}{unit}"
    return str(d)


def run(max_elems: int = 10_000_000, repeats: int | None = None, json_path: str | None = None,
        updates: int | None = None, out=print) -> list[dict]:
    """Run the comparison for every d up to ``max_elems``; rank 0 prints a line per d."""
    from mpiopt.errors import ConfigError
    from mpiopt.runner import share_cores

    t = Transport()
    if t.size < 2:
        t.free()
        raise ConfigError("bench ps needs at least 2 ranks (a server and a worker)")
    share_cores(t)
    tmp = t.bcast_obj(tempfile.mkdtemp(prefix="mpiopt-bench-") if t.rank == 0 else None)
    os.makedirs(os.path.dirname(rank_log_path(tmp, t.rank)), exist_ok=True)
    if t.rank == 0:
        workers = f"{t.size - 1} worker" + ("s" if t.size > 2 else "")
        out(f"parameter server on {t.size} ranks (1 server, {workers}), asgd, fixed pushes: "
            "applied updates/s of mpiopt and of a bare mpi4py server (medians; ratio: median "
            "of paired rounds, order alternated)")
        out(f"{'d':>6} {'updates':>8} {'reference':>12} {'mpiopt':>12} {'ratio':>6}  range")
    rows = []
    for d in [s for s in SIZES if s <= max_elems] or [max_elems]:
        row = measure(t, d, repeats or 7, updates, tmp)
        rows.append(row)
        if t.rank == 0:
            lo, hi = row["ratio_range"]
            out(f"{_fmt(d):>6} {row['updates']:8d} {row['reference_updates_per_s']:10.1f}/s "
                f"{row['mpiopt_updates_per_s']:10.1f}/s {row['ratio']:6.2f}  {lo:.2f}-{hi:.2f}",
                flush=True)
    t.barrier()
    if t.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        if json_path:
            with open(json_path, "w") as fh:
                json.dump({"ranks": t.size, "ps": rows}, fh, indent=2)
    t.free()
    return rows
