"""Multi-Level Local SGD's special cases against the baselines, in one job.

With every worker stepping in every slot (``rates: 1``) the same code is
- distributed SGD (``tau = q = 1`` and a complete hub graph): the ``allreduce`` baseline, also
  with uneven sub-networks (hub masses other than uniform: one hub round must still give every
  hub the weighted global average);
- local SGD (one sub-network, ``tau = H``): the ``local_sgd`` baseline;
and both trajectories end at the same model to float tolerance. Then a run with random rates
on a ring of hubs checks the counts of steps taken.

Usage: check_mll.py CONFIG OUT_DIR
"""

import sys

import h5py
import numpy as np

from mpiopt.comm.transport import Transport
from mpiopt.runner import run

config, out = sys.argv[1], sys.argv[2]
t = Transport(timeout=60)
n = t.size


def model(name):
    with h5py.File(f"{out}/{name}/model.h5") as f:
        return f["x"][()]


def case(name, *sets):
    return run(config, sets=list(sets), out=f"{out}/{name}", quiet=True, transport=t)


uneven = [[0, 1], list(range(2, n))] if n > 2 else [[0], [1]]
case("allreduce", "algorithm.name=allreduce")
case("dsgd", "algorithm.name=mll_sgd", "algorithm.tau=1", "algorithm.q=1",
     f"algorithm.groups={uneven}", "algorithm.hub_topology=complete")
case("local", "algorithm.name=local_sgd", "algorithm.local_steps=4")
case("mll_local", "algorithm.name=mll_sgd", "algorithm.tau=4", "algorithm.q=1",
     "algorithm.groups=1")
s = case("rates", "algorithm.name=mll_sgd", "algorithm.tau=2", "algorithm.q=2",
         f"algorithm.groups={min(3, n)}", "algorithm.hub_topology=ring",
         "algorithm.rates=uniform:0.2,0.9")
if t.rank == 0:
    for a, b in (("dsgd", "allreduce"), ("mll_local", "local")):
        np.testing.assert_allclose(model(a), model(b), rtol=1e-4, atol=1e-5, err_msg=a)
        assert not np.array_equal(model(a), model("rates"))
    info = s["algorithm_info"]
    steps = s["config"]["run"]["steps"]
    assert len(info["groups"]) == min(3, n) and info["hubs"] == [g[0] for g in info["groups"]]
    taken, rates = np.asarray(info["steps_taken_per_rank"]), np.asarray(info["rates"])
    assert ((0 < taken) & (taken < steps)).all(), (taken, steps)
    # each slot a Bernoulli(p): within 5 standard deviations of p * slots
    sd = np.sqrt(steps * rates * (1 - rates))
    assert (np.abs(taken - rates * steps) <= 5 * sd + 1).all(), (taken, rates)
    h = np.asarray(info["mixing_matrix"])
    np.testing.assert_allclose(h.sum(axis=0), 1.0)
t.barrier()
if t.rank == 0:
    print(f"mll checks passed on {n} ranks", flush=True)
