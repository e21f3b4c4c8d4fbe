"""DC-ASGD on real ranks: every update the server applies, replayed by a numpy oracle.

The server's rule is wrapped to record, for every applied gradient, the model before and
after (in place, or out of place into the worker's answer buffer as the engine does with one
server), the pushed gradient, the pushing worker and the staleness the engine gives it. After
the run the server replays the whole sequence with its own state (model, mean square,
momentum per worker) from the initial model: the backup of each gradient is taken from the
replay's own history of models, at the version the engine says the gradient was computed at
(applied updates minus staleness), not from the engine; every replayed model must equal the
server's bit for bit. Run once for DC-ASGD-c and once for DC-ASGD-a with momentum.

Usage: check_dcasgd.py CONFIG OUT_DIR
"""

import sys

import numpy as np
from oracles import dcasgd_step as oracle

from mpiopt.algorithms.dcasgd import DCASGD
from mpiopt.comm.transport import Transport
from mpiopt.runner import run

RECORDS = []
rule = DCASGD.apply


def recording(self, w, g, worker, staleness, lr, out=None):
    before = w.copy()
    rule(self, w, g, worker, staleness, lr, out)
    RECORDS.append((before, g.copy(), worker, staleness, lr, (w if out is None else out).copy()))


DCASGD.apply = recording


def replay(algorithm: dict) -> int:
    """Check every recorded update against the oracle; return how many were stale."""
    lam, adaptive, mu = algorithm["lam"], algorithm["adaptive"], algorithm["momentum"]
    if lam is None:
        lam = 2.0 if adaptive else 0.04  # the publication's values
    history = [RECORDS[0][0]]  # the model at every version, from the initial one
    ms = np.zeros_like(history[0]) if adaptive else None
    velocity = {}
    stale = 0
    for i, (before, g, k, staleness, lr, after) in enumerate(RECORDS):
        w = history[-1]
        assert np.array_equal(before.view(np.uint32), w.view(np.uint32)), i
        assert 0 <= staleness <= i, (i, staleness)
        backup = history[i - staleness]
        w, c, ms = oracle(w, g, backup, lr, lam, ms, algorithm["mean_square_decay"])
        if mu:
            velocity[k] = mu * velocity.get(k, 0) + c
            w = history[-1] - lr * velocity[k]
        assert np.array_equal(after.view(np.uint32), w.view(np.uint32)), (i, k, staleness)
        history.append(w)
        stale += bool(staleness) and not np.array_equal(history[i], backup)
    return stale


config, out = sys.argv[1], sys.argv[2]
t = Transport(timeout=60)
variants = [["algorithm.lam=2.0"],
            ["algorithm.adaptive=true", "algorithm.momentum=0.9", "algorithm.weight_decay=0.01"]]
counts = []  # stale (compensated) updates / updates, per variant
for i, sets in enumerate(variants):
    RECORDS.clear()
    s = run(config, sets=sets, out=f"{out}/r{i}", quiet=True, transport=t)
    if t.rank == 0:
        assert len(RECORDS) == s["algorithm_info"]["updates_applied"] > 0, (i, len(RECORDS))
        stale = replay(s["config"]["algorithm"])
        assert stale > 0, (i, "no update had a stale gradient: nothing was compensated")
        counts.append(f"{stale}/{len(RECORDS)}")
t.barrier()
if t.rank == 0:
    print(f"dcasgd checks passed on {t.size} ranks (stale/applied: {', '.join(counts)})",
          flush=True)
