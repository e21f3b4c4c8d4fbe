"""Twenty SwarmSGD runs of ranks of different speeds, one after the other in one job.

Each run has its own windows, its own slow rank and its own seed; every one must stop cleanly
with every rank having done all its steps and a finite final loss. The stop protocol is what
is repeated, so the runs share one launch.

Usage: check_stops.py CONFIG OUT_DIR
"""

import math
import sys

from mpiopt.comm.transport import Transport
from mpiopt.runner import run

config, out = sys.argv[1], sys.argv[2]
t = Transport(timeout=60)
for i in range(20):
    sets = [f"algorithm.mode={('pull', 'pairwise')[i % 2]}",
            f"run.slowdown={{{i % t.size}: 30}}", f"run.seed={i}"]
    summary = run(config, sets=sets, out=f"{out}/r{i}", quiet=True, transport=t)
    if t.rank == 0:
        assert summary["steps_per_rank"] == [40] * t.size, (i, summary["steps_per_rank"])
        assert math.isfinite(summary["final"]["loss"]), (i, summary["final"])
t.barrier()
if t.rank == 0:
    print(f"stop checks passed on {t.size} ranks (20 runs)", flush=True)
