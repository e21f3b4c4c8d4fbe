"""The parameter server under heterogeneous workers: runs end cleanly, pushes applied once.

Several runs in this one job, each with another slow worker (run.slowdown) and seed. In every
run every server (algorithm.servers of them) must apply every push exactly once (its count per
worker equals the worker's steps), apply run.steps updates plus at most one more per other
worker, and every rank must leave with nothing in flight.

Usage: check_ps.py CONFIG OUT_DIR RUNS
"""

import math
import sys

from mpiopt.comm.transport import Transport
from mpiopt.runner import run
from mpiopt.schema import load_config

config, out, runs = sys.argv[1], sys.argv[2], int(sys.argv[3])
t = Transport(timeout=60)
servers = load_config(config).algorithm.servers
n_workers = t.size - servers
for i in range(runs):
    slow = servers + i % n_workers
    sets = [f"run.slowdown={{{slow}: 4}}", f"run.seed={i}"]
    s = run(config, sets=sets, out=f"{out}/r{i}", quiet=True, transport=t)
    if t.rank == 0:
        steps, info = s["steps_per_rank"], s["algorithm_info"]
        budget = s["config"]["run"]["steps"]
        work = steps[servers:]
        per_server = info.get("per_server", [info])
        assert len(per_server) == servers, (i, info)
        for k, f in enumerate(per_server):
            assert f["updates_per_worker"] == work, (i, k, f, steps)
            # a server's rows: its pushes, and one more where only a goodbye came
            assert f["updates_applied"] == sum(work), (i, k, f, steps)
            assert steps[k] in (sum(work), sum(work) + 1), (i, k, f, steps)
            assert budget <= f["updates_applied"] <= budget + n_workers - 1, (i, f, budget)
            if s["algorithm"] == "gsgm":  # scheduling: one contribution per worker per round
                assert f["most_contributions_per_worker_per_round"] == 1, (i, k, f)
        assert math.isfinite(s["final"]["loss"]), (i, s["final"])
t.barrier()
if t.rank == 0:
    print(f"ps checks passed on {t.size} ranks ({runs} runs)", flush=True)
