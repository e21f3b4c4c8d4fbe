"""SwarmSGD's averaging with lr = 0, at any rank count, over several topologies and modes.

Every rank starts from its own random model and, for a fixed number of rounds and with random
pauses (so that interleavings differ from run to run), publishes, averages with a random
neighbour and drains its inbox, exactly as the training loop does without the SGD step.
Checks: ``pairwise`` preserves the sum of all models (to float rounding); every mode drives
the models to consensus; a lattice-decoded copy is within eps/2 of the partner's published
model, and a reference beyond the distance bound falls back to the float32 copy (counted).

Usage: check_swarm.py CASE... with CASE = MODE,QUANTIZE,TOPOLOGY[,OPTION...]; the options are
``get`` (reads by MPI Get only), ``locks`` (MPI locks, pull mode only) and ``slots=K`` (K
publish slots). The cases run one after the other in this one job, each with its own windows.
"""

import sys
import time

import numpy as np

from mpiopt.algorithms.swarm import Gossip, SwarmConfig
from mpiopt.comm.topology import build_topology
from mpiopt.comm.transport import Transport

t = Transport(timeout=60)
r, n = t.rank, t.size
d = 1001
for case in sys.argv[1:]:
    mode, quantize, spec, *options = case.split(",")
    slots = [int(o.split("=")[1]) for o in options if o.startswith("slots=")]
    rng = np.random.default_rng([3, r])
    x = rng.standard_normal(d).astype(np.float32)
    start_sum = t.allreduce(x.astype(np.float64).copy())
    mean = start_sum / n
    start_dist = t.allreduce_scalar(float(((x - mean) ** 2).sum())) / n
    cfg = SwarmConfig(topology=spec, mode=mode, quantize=quantize,
                      lattice_eps=1e-3 if quantize.startswith("lattice") else None)
    gossip = Gossip(t, d, build_topology(spec, n, 0), mode, cfg.compressor(n),
                    direct_reads="get" not in options, slots=slots[0] if slots else 2,
                    locks="locks" in options)
    gossip.start(x)
    for step in range(60 if n > 1 else 3):
        gossip.drain(x)
        gossip.interact(x, rng)
        gossip.publish(x, step)
        time.sleep(float(rng.uniform(0, 2e-3)))
    gossip.settle()  # as the runtime does before its stop: our corrections reach their inboxes
    t.barrier()  # nobody publishes any more: a read sees one fixed copy
    if quantize.startswith("lattice") and gossip.neighbors:
        j = gossip.neighbors[0]
        exact = gossip.read_fp32(j, np.empty(d, np.float32))
        before = gossip.fallbacks
        decoded = gossip.read(j, x).copy()  # decoded against our own model
        eps = cfg.lattice_eps
        assert gossip.fallbacks == before, (case, "unexpected fallback")
        err = float(np.abs(decoded.astype(np.float64) - exact).max())
        assert err <= eps / 2 * (1 + 1e-6) + 1e-6, (case, err, eps / 2)
        # A reference beyond the distance bound q*eps/2 must fall back to the float32 copy.
        q = 1 << 16 if quantize == "lattice16" else 1 << 8
        far = x + np.float32(q * eps)
        got = gossip.read(j, far)
        assert gossip.fallbacks == before + 1, (case, "no fallback beyond the bound")
        assert np.array_equal(got, exact)
        gossip.fallbacks = before
    t.barrier()
    totals = gossip.stop(x)
    end_sum = t.allreduce(x.astype(np.float64).copy())
    end_mean = end_sum / n
    end_dist = t.allreduce_scalar(float(((x - end_mean) ** 2).sum())) / n
    if mode == "pairwise":
        # float32 models: each averaging rounds by about 2**-24 relative.
        assert np.allclose(end_sum, start_sum, rtol=0, atol=1e-4 * n), (
            spec, np.abs(end_sum - start_sum).max())
    if n > 1:
        assert end_dist < 0.05 * start_dist, (case, start_dist, end_dist)
    assert sum(tot["interactions"] for tot in totals) == (60 * n if n > 1 else 0)
t.barrier()
if r == 0:
    print(f"swarm checks passed on {n} ranks ({len(sys.argv) - 1} cases)", flush=True)
