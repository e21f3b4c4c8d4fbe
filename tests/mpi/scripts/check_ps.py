"""The parameter server under heterogeneous workers: runs end cleanly, pushes applied once.

Several runs in this one job, each with another slow worker (run.slowdown) and seed. In every
run the server must apply every push exactly once (its count per worker equals the worker's
steps), apply run.steps updates plus at most one more per other worker, and every rank must
leave with nothing in flight.

Usage: check_ps.py CONFIG OUT_DIR RUNS
"""

import math
import sys

from mpiopt.comm.transport import Transport
from mpiopt.runner import run

config, out, runs = sys.argv[1], sys.argv[2], int(sys.argv[3])
t = Transport(timeout=60)
n_workers = t.size - 1
for i in range(runs):
    slow = 1 + i % n_workers
    sets = [f"run.slowdown={{{slow}: 4}}", f"run.seed={i}"]
    s = run(config, sets=sets, out=f"{out}/r{i}", quiet=True, transport=t)
    if t.rank == 0:
        steps, info = s["steps_per_rank"], s["algorithm_info"]
        budget = s["config"]["run"]["steps"]
        assert info["updates_per_worker"] == steps[1:], (i, info, steps)
        assert info["updates_applied"] == steps[0] == sum(steps[1:]), (i, info, steps)
        assert budget <= steps[0] <= budget + n_workers - 1, (i, steps, budget)
        assert math.isfinite(s["final"]["loss"]), (i, s["final"])
        if s["algorithm"] == "gsgm":  # scheduling: one contribution per worker per round
            assert info["most_contributions_per_worker_per_round"] == 1, (i, info)
t.barrier()
if t.rank == 0:
    print(f"ps checks passed on {t.size} ranks ({runs} runs)", flush=True)
