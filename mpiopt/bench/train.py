"""``mpiexec -n N mpiopt bench train``: the allreduce baseline against a minimal loop.

Both train the quickstart model (an MLP with one hidden layer of 64 on digits) on the same
shards with the same batch size, in the same run, alternating repetitions. The minimal loop is
written by hand here in numpy and mpi4py (forward, backward, one ``Allreduce`` per step,
momentum SGD); mpiopt runs its full engine with metrics recording on. The figure of merit is
mpiopt's steps per second over the minimal loop's.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time

import numpy as np

from mpiopt import runner
from mpiopt.comm.transport import Transport, raw_allreduce
from mpiopt.jobs import JOBS_DIR
from mpiopt.schema import load_config

CONFIG = str(JOBS_DIR / "configs" / "quickstart.yaml")


def minimal_loop(transport: Transport, x_train, y_train, steps: int, batch: int, hidden: int,
                 n_classes: int, lr: float = 0.05, momentum: float = 0.9) -> float:
    """Train a one-hidden-layer MLP with one Allreduce per step; return the seconds taken."""
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
    transport.barrier()
    t0 = time.perf_counter()
    for _ in range(steps):
        idx = rng.integers(0, len(y_train), batch)
        xb, yb = x_train[idx], y_train[idx]
        h = np.maximum(xb @ w1 + b1, 0)
        z = h @ w2 + b2
        p = np.exp(z - z.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        p[np.arange(batch), yb] -= 1
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
    """Run the quickstart config (no evaluations) through mpiopt; return its wall time."""
    summary = runner.run(CONFIG, sets=["run.eval_every=0", "run.quiet=true"], steps=steps,
                         out=out_dir, overwrite=True, transport=transport)
    wall = summary["wall_time_s"] if transport.rank == 0 else 0.0
    return transport.allreduce_scalar(wall, op="max")


def run(steps: int = 300, repeats: int | None = None, json_path: str | None = None,
        out=print) -> dict:
    """Time both loops ``repeats`` times, alternating; print the best of each on rank 0."""
    transport = Transport()
    cfg = load_config(CONFIG)
    shard = cfg.data.load(transport.rank, transport.size, cfg.run.seed, with_test=False)
    tmp = tempfile.mkdtemp(prefix="mpiopt-bench-") if transport.rank == 0 else None
    tmp = transport.bcast_obj(tmp)
    ours, minimal = [], []
    for i in range(repeats or 3):
        minimal.append(minimal_loop(transport, shard.x_train, shard.y_train, steps,
                                    cfg.data.batch_size, cfg.problem.hidden[0],
                                    shard.n_classes))
        ours.append(mpiopt_loop(transport, steps, os.path.join(tmp, f"run{i}")))
    result = {"ranks": transport.size, "steps": steps,
              "minimal_steps_per_s": steps / min(minimal),
              "mpiopt_steps_per_s": steps / min(ours)}
    result["ratio"] = result["mpiopt_steps_per_s"] / result["minimal_steps_per_s"]
    if transport.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        out(f"quickstart model on {transport.size} ranks, {steps} steps, best of "
            f"{len(ours)}")
        out(f"  minimal numpy+mpi4py loop: {result['minimal_steps_per_s']:8.1f} steps/s")
        out(f"  mpiopt allreduce (metrics on): {result['mpiopt_steps_per_s']:8.1f} steps/s")
        out(f"  ratio: {result['ratio']:.2f} (target >= 0.50)")
        if json_path:
            with open(json_path, "w") as fh:
                json.dump(result, fh, indent=2)
    return result
