"""Pairwise SwarmSGD through the whole asynchronous loop with lr = 0: the stop loses nothing.

Every rank starts from its own model and steps with a zero learning rate, so models move only
by pairwise averaging, which preserves their sum. Rank 0 is slowed (run.slowdown), so the
others reach the stop first and wait, serving meanwhile. After the run (settle, the stop, the
last drain, the windows freed) the sum of the models must equal the sum at the start: a
correction still in flight at the stop, or drained before it landed, would break it.

The same for AD-PSGD (``ad_psgd``), which averages on the same machinery.

Usage: check_swarm_stop.py OUT_DIR [ALGORITHM [STEPS]]
"""

import os
import sys

import numpy as np

from mpiopt.algorithms.base import Context
from mpiopt.comm.transport import Transport
from mpiopt.faults import FaultInjector
from mpiopt.io.metrics import StepLog
from mpiopt.progress import Progress
from mpiopt.runner import build_problem
from mpiopt.schema import config_from_dict

out = sys.argv[1]
name = sys.argv[2] if len(sys.argv) > 2 else "swarm"
steps = int(sys.argv[3]) if len(sys.argv) > 3 else 150
t = Transport(timeout=60)
raw = {"problem": {"name": "mlp", "hidden": [16]},
       "data": {"name": "synthetic", "n_samples": 400, "n_features": 10, "n_classes": 3,
                "batch_size": 16},
       "algorithm": {"name": name, "mode": "pairwise", "topology": "complete",
                     "momentum": 0.9, "weight_decay": 1e-3},
       "run": {"steps": steps, "eval_every": 0, "slowdown": {0: 4}}}
cfg = config_from_dict(raw)
xp, shard, problem = build_problem(t, cfg)
start = problem.init(np.random.default_rng([7, t.rank]))  # every rank its own model
problem.init = lambda rng: start.copy()
os.makedirs(out, exist_ok=True)
ctx = Context(cfg, t, problem, xp, out, StepLog(f"{out}/rank{t.rank}.h5", 64),
              FaultInjector.from_env(t.rank), Progress(steps, 1.0, enabled=False))
ctx.schedule = lambda step: 0.0  # models move only by averaging
algo = cfg.algorithm.build(ctx)
before = t.allreduce(start.astype(np.float64))
spread = t.allreduce_scalar(float(((start - before / t.size) ** 2).sum()))
algo.run()
after = t.allreduce(algo.x.astype(np.float64))
moved = t.allreduce_scalar(float(((algo.x - after / t.size) ** 2).sum()))
assert np.allclose(after, before, rtol=0, atol=1e-4 * t.size), np.abs(after - before).max()
assert moved < 0.05 * spread, (spread, moved)  # they did average
assert sum(r["interactions"] for r in algo.totals) > 0
ctx.steplog.close()
t.barrier()
if t.rank == 0:
    print(f"{name} stop checks passed on {t.size} ranks", flush=True)
