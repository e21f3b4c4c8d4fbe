"""DPSGD on real ranks: every step of every core reaches the server, none is lost, no hang.

A stand-in problem whose every core (a rank, or a thread of one) steps only its own block of
coordinates by exactly 1 (with
``lr: 1`` the shared copies and the server's model hold integers, exact in float32). Whatever
the interleaving -- cores writing one shared copy without locks, leaders pushing every B steps
while the others go on, a slow core, several nodes -- the final model must have moved each
block by exactly its core's steps: lock-free writes to disjoint coordinates lose nothing, every
node's change is applied once, and the leaders' last pushes and goodbyes end the run. Several
node sizes, B and cores as threads in this one job.

Usage: check_dpsgd.py CONFIG OUT_DIR
"""

import sys
from dataclasses import dataclass

import h5py
import numpy as np
from mpi4py import MPI

from mpiopt.comm.transport import Transport
from mpiopt.problems import PROBLEMS
from mpiopt.problems.base import Problem, ProblemConfig
from mpiopt.runner import run

BLOCK = 3
RANK = MPI.COMM_WORLD.Get_rank()
SIZE = MPI.COMM_WORLD.Get_size()


CORES = [1]  # cores per rank of the current case


class Disjoint(Problem):
    """Core c of rank r >= 1 steps its own BLOCK coordinates by +1 (gradient -1)."""

    def __init__(self, core=0):
        self.dim = BLOCK * (SIZE - 1) * CORES[0]
        self.core, self.made = core, 0

    def init(self, rng):
        return np.zeros(self.dim, np.float32)

    def replica(self):
        self.made += 1
        return Disjoint(self.made)

    def gradient(self, x, rng, out):
        out[:] = 0
        lo = ((RANK - 1) * CORES[0] + self.core) * BLOCK
        out[lo:lo + BLOCK] = -1
        return {"loss": 0.0}

    def evaluate(self, x):
        return {"loss": 0.0}


@dataclass(frozen=True)
class DisjointConfig(ProblemConfig):
    """Stand-in: each core its own coordinates."""

    def build(self, shard, batch_size, xp):
        return Disjoint()


PROBLEMS._modules["disjoint"] = "disjoint"  # registered here, not in a module of the package
PROBLEMS.register("disjoint")(DisjointConfig)

config, out = sys.argv[1], sys.argv[2]
t = Transport(timeout=60)
cases = [(1, 1, 1), (2, 3, 1), (3, 2, 1), (2, 2, 2)]  # (node_size, B, cores per rank)
for i, (node_size, b, cores) in enumerate(cases):
    if node_size > SIZE - 1:
        continue
    CORES[0] = cores
    slow = 1 + i % (SIZE - 1)
    sets = [f"algorithm.node_size={node_size}", f"algorithm.local_steps={b}",
            f"run.slowdown={{{slow}: 4}}", f"run.seed={i}"]
    if cores > 1:
        sets += ["algorithm.cores_mode=threads", f"algorithm.cores={cores}"]
    s = run(config, sets=sets, out=f"{out}/r{i}", quiet=True, transport=t)
    if RANK == 0:
        steps, info = s["steps_per_rank"], s["algorithm_info"]
        per_rank = info["core_steps_per_worker"]
        nodes = -(-(SIZE - 1) // node_size)
        assert info["nodes"] == nodes, (i, info)
        assert info["cores_per_node"] == [cores * min(node_size, SIZE - 1 - n * node_size)
                                          for n in range(nodes)], (i, info)
        assert info["core_steps"] == sum(per_rank), (i, info, steps)
        assert info["goodbyes"] == nodes, (i, info)
        assert info["updates_applied"] == sum(info["updates_per_worker"]), (i, info)
        with h5py.File(f"{out}/r{i}/model.h5") as f:
            model = f["x"][()].reshape(SIZE - 1, cores, BLOCK)
        # every block moved by its core's steps: the rank's thread by its rank's steps row
        assert np.array_equal(model[:, 0, :].T, np.tile(steps[1:], (BLOCK, 1))), (i, model)
        assert np.array_equal(model.sum(axis=(1, 2)), BLOCK * np.asarray(per_rank)), (i, model)
        assert (model == model[:, :, :1]).all(), (i, model)
t.barrier()
if RANK == 0:
    print(f"dpsgd checks passed on {SIZE} ranks", flush=True)
