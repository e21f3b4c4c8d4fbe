"""``mpiexec -n N mpiopt bench train``: the allreduce baseline against a minimal loop.

Both train the quickstart model (an MLP with one hidden layer of 64 on digits) on the same
shards with the same batch size, in the same run. The minimal loop is written by hand here in
numpy and mpi4py (forward, backward, the minibatch loss, one ``Allreduce`` per step, momentum
SGD); mpiopt runs its full engine (``mpiopt run``) with metrics recording on. Each is timed
from a barrier to the end of its last step on the slowest rank (for mpiopt: the time column of
the last step row, which leaves out the final evaluation). Rounds alternate which goes first;
the figure of merit is the median over rounds of the paired ratio of steps per second
(mpiopt / minimal), so that drift in machine load, large on a shared machine, hits both alike.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time

import h5py
import numpy as np

from mpiopt import runner
from mpiopt.comm.transport import Transport, raw_allreduce
from mpiopt.jobs import JOBS_DIR
from mpiopt.schema import load_config

CONFIG = str(JOBS_DIR / "configs" / "quickstart.yaml")


def minimal_loop(transport: Transport, x_train, y_train, steps: int, batch: int, hidden: int,
                 n_classes: int, lr: float = 0.05, momentum: float = 0.9,
                 warmup: int = 20) -> float:
    """Train a one-hidden-layer MLP with one Allreduce per step; return the seconds taken.

    Each step also computes the minibatch loss, which a run records in its step log.

    The first ``warmup`` steps are not timed, as mpiopt's setup is not: right after other
    work (an mpiopt run) the first steps pay for faulting memory back in.
    """
    rng = np.random.default_rng(transport.rank)
    d_in = x_train.shape[1]
    sizes = [d_in * hidden, hidden, hidden * n_classes, n_classes]
    flat = np.zeros(sum(sizes), np.float32)
    grad, mom = np.zeros_like(flat), np.zeros_like(flat)
    w1, b1, w2, b2 = np.split(flat, np.cumsum(sizes)[:-1])
    g1, gb1, g2, gb2 = np.split(grad, np.cumsum(sizes)[:-1])
    w1[:] = rng.standard_normal(w1.size) * np.sqrt(2 / d_in)
    w2[:] = rng.standard_normal(w2.size) * np.sqrt(1 / hidden)
    w1, w2, g1, g2 = (a.reshape(r, c) for a, (r, c) in zip(
        (w1, w2, g1, g2), ((d_in, hidden), (hidden, n_classes)) * 2))
    rows, losses = np.arange(batch), []  # the minibatch loss, as a run records it
    t0 = 0.0
    for i in range(warmup + steps):
        if i == warmup:
            transport.barrier()
            t0 = time.perf_counter()
        idx = rng.integers(0, len(y_train), batch)
        xb, yb = x_train[idx], y_train[idx]
        h = np.maximum(xb @ w1 + b1, 0)
        z = h @ w2 + b2
        z -= z.max(axis=1, keepdims=True)
        p = np.exp(z)
        total = p.sum(axis=1, keepdims=True)
        losses.append(float(np.log(total).sum() - z[rows, yb].sum()) / batch)
        p /= total
        p[rows, yb] -= 1
        p /= batch
        g2[:] = h.T @ p
        gb2[:] = p.sum(axis=0)
        dh = (p @ w2.T) * (h > 0)
        g1[:] = xb.T @ dh
        gb1[:] = dh.sum(axis=0)
        raw_allreduce(transport, grad)
        grad /= transport.size
        mom *= momentum
        mom += grad
        flat -= lr * mom
    transport.barrier()
    return time.perf_counter() - t0


def mpiopt_loop(transport: Transport, steps: int, out_dir: str) -> float:
    """Run the quickstart config (no evaluations) through mpiopt; return its training time.

    The time is the end of the last step on the slowest rank, from the step log.
    """
    runner.run(CONFIG, sets=["run.eval_every=0", "run.quiet=true"], steps=steps,
               out=out_dir, overwrite=True, transport=transport)
    last = 0.0
    if transport.rank == 0:
        with h5py.File(os.path.join(out_dir, "metrics.h5"), "r") as f:
            last = max(float(g["time"][-1]) for g in f["ranks"].values())
    return transport.bcast_obj(last)


def run(steps: int = 300, repeats: int | None = None, json_path: str | None = None,
        out=print) -> dict:
    """Time both loops ``repeats`` rounds, alternating; print the paired ratio on rank 0."""
    transport = Transport()
    runner.share_cores(transport)  # both loops under the BLAS threads a run uses
    cfg = load_config(CONFIG)
    shard = cfg.data.load(transport.rank, transport.size, cfg.run.seed, with_test=False)
    tmp = tempfile.mkdtemp(prefix="mpiopt-bench-") if transport.rank == 0 else None
    tmp = transport.bcast_obj(tmp)

    def minimal():
        took = minimal_loop(transport, shard.x_train, shard.y_train, steps,
                            cfg.data.batch_size, cfg.problem.hidden[0], shard.n_classes)
        return transport.allreduce_scalar(took, op="max")

    def ours(i):
        return mpiopt_loop(transport, steps, os.path.join(tmp, f"run{i % 2}"))

    minimal(), ours(0)  # warm-up: first-touch allocations, file system, MPI connections
    rounds = repeats or 10
    times = np.zeros((rounds, 2))
    for i in range(rounds):
        if i % 2:
            times[i] = minimal(), ours(i)
        else:
            times[i, 1] = ours(i)
            times[i, 0] = minimal()
    ratios = times[:, 0] / times[:, 1]
    result = {"ranks": transport.size, "steps": steps, "rounds": rounds,
              "minimal_steps_per_s": steps / float(np.median(times[:, 0])),
              "mpiopt_steps_per_s": steps / float(np.median(times[:, 1])),
              "ratio": float(np.median(ratios)),
              "ratio_range": [float(ratios.min()), float(ratios.max())]}
    if transport.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        out(f"quickstart model on {transport.size} ranks, {steps} steps, {rounds} rounds "
            "(medians; ratio: median of the paired ratios, order alternated)")
        out(f"  minimal numpy+mpi4py loop:     {result['minimal_steps_per_s']:8.1f} steps/s")
        out(f"  mpiopt allreduce (metrics on): {result['mpiopt_steps_per_s']:8.1f} steps/s")
        out(f"  ratio: {result['ratio']:.2f} (range {ratios.min():.2f}-{ratios.max():.2f}; "
            "target >= 0.90)")
        if json_path:
            with open(json_path, "w") as fh:
                json.dump(result, fh, indent=2)
    return result
