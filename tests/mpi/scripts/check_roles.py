"""Roles: the training set is shared by the workers only; progress comes from the first worker.

Rank 0 is given the role of a server (as a parameter server's would be): the workers, ranks
1..n-1, must hold disjoint shards that together cover the training set; rank 0 builds its
problem on the first worker's shard (for the shapes) and holds the test set.
"""

import dataclasses

import numpy as np

from mpiopt.algorithms.allreduce import AllreduceConfig
from mpiopt.algorithms.base import SERVER, WORKER, reporter_rank
from mpiopt.comm.transport import Transport
from mpiopt.runner import build_problem, workers_of
from mpiopt.schema import config_from_dict


@dataclasses.dataclass(frozen=True)
class ServerFirst(AllreduceConfig):
    def roles(self, world_size):
        return (SERVER,) + (WORKER,) * (world_size - 1)


t = Transport(timeout=60)
raw = {"problem": {"name": "softmax"}, "data": {"name": "synthetic", "n_samples": 300},
       "algorithm": {"name": "allreduce"}}
cfg = config_from_dict(raw)
cfg = dataclasses.replace(cfg, algorithm=ServerFirst())
assert workers_of(cfg, t.size) == list(range(1, t.size))
assert reporter_rank(cfg.algorithm.roles(t.size)) == 1
_, shard, problem = build_problem(t, cfg)
every = t.allgather_obj(shard.indices.tolist())
workers = [np.array(every[r]) for r in range(1, t.size)]
assert sum(len(w) for w in workers) == 300
assert np.array_equal(np.sort(np.concatenate(workers)), np.arange(300))
assert np.array_equal(np.array(every[0]), workers[0])  # the server: the first worker's shard
assert (shard.x_test is not None) == (t.rank == 0)
t.barrier()
if t.rank == 0:
    print(f"role checks passed on {t.size} ranks", flush=True)
