"""D-PSGD with lr = 0 mixes by the topology's matrix: after t steps ``X_t = W^t X_0``; any size.

Every rank starts from its own random model (identical starts would hide the mixing) and takes
steps of the real D-PSGD runtime (minibatch gradient, exchange with the neighbours, mixing,
local optimizer with momentum and weight decay) at lr = 0, so each step is the mixing alone.
Checks, per topology and after every step t: rank i's model is row i of ``W^t X_0``, with W
the topology's ``mixing_matrix()``, to float32 rounding; ``W^t X_0`` is far from ``X_0`` (the
check sees the mixing); and each rank sent one fp32 model per neighbour per step.

Usage: check_d_psgd.py TOPOLOGY...   (a name, or a JSON list of [i, j] edges)
"""

import json
import sys

import numpy as np

from mpiopt.algorithms.base import Context
from mpiopt.comm.transport import Channel, Transport
from mpiopt.faults import FaultInjector
from mpiopt.progress import Progress
from mpiopt.runner import build_problem
from mpiopt.schema import config_from_dict

STEPS = 6
t = Transport(timeout=60)
r, n = t.rank, t.size


def build(spec):
    """Return this rank's set-up D-PSGD runtime over ``spec`` and the topology."""
    cfg = config_from_dict({
        "problem": {"name": "softmax"},
        "data": {"name": "synthetic", "n_samples": 300, "n_test": 50, "n_features": 10,
                 "n_classes": 3, "batch_size": 16},
        "algorithm": {"name": "d_psgd", "topology": spec, "momentum": 0.9,
                      "weight_decay": 0.01},
        "run": {"steps": STEPS, "seed": 3, "quiet": True},
    })
    xp, _, problem = build_problem(t, cfg)
    ctx = Context(cfg, t, problem, xp, "", None, FaultInjector((), r),
                  Progress(STEPS, enabled=False))
    algo = cfg.algorithm.build(ctx)
    algo.setup()
    return algo, cfg.algorithm.topology_for(n)


for arg in sys.argv[1:]:
    spec = json.loads(arg) if arg.startswith("[") else arg
    algo, top = build(spec)
    d = algo.x.size
    x0 = np.stack([np.random.default_rng([5, i]).standard_normal(d) for i in range(n)])
    x0 = x0.astype(np.float32)
    algo.x[...] = x0[r]
    w = top.mixing_matrix()
    # Each step rounds a product and a sum per term (deg + 1 terms, weights rounded to
    # float32 too); W is doubly stochastic and non-negative, so errors add up, never grow.
    per_step = 3 * (max(top.degrees()) + 1) * 2.0**-24 * float(np.abs(x0).max())
    want = x0.astype(np.float64)
    t.reset_stats()
    for step in range(STEPS):
        algo.step(step, 0.0)
        want = w @ want
        err = float(np.abs(algo.x - want[r]).max())
        assert err <= (step + 1) * per_step, (spec, step, err, (step + 1) * per_step)
    moved = float(np.abs(want - x0).max())
    assert moved > 1e3 * STEPS * per_step, (spec, moved)
    sent = t.stats[Channel.GOSSIP].sent
    assert sent == STEPS * top.degree(r) * 4 * d, (spec, sent)
    t.barrier()
if r == 0:
    print(f"d_psgd checks passed on {n} ranks", flush=True)
