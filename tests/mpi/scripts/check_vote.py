"""Every vote transport equals a numpy oracle of sign(sum of signs), ties to +1; any size."""

import numpy as np

from mpiopt import kernels
from mpiopt.algorithms.signum import VOTES, Vote
from mpiopt.comm.transport import Channel, Transport

t = Transport(timeout=60)
r, n = t.rank, t.size


def vectors(d, seed):
    """Every rank's full-precision vector (each rank can rebuild them all for the oracle)."""
    rng = np.random.default_rng([seed, d])
    vs = rng.standard_normal((n, d)).astype(np.float32)
    vs[:, ::5] = 0.0  # sign(0) = +1
    vs[: n // 2, 1::7] = -1.0  # many ties when n is even
    vs[n // 2:, 1::7] = 1.0
    return vs


for d in (1, 7, 8 * n + 3, 100_003):
    vs = vectors(d, 11)
    oracle = np.where((np.where(vs >= 0, 1, -1)).sum(axis=0) >= 0, 1.0, -1.0)
    for kind in VOTES:
        packed = kernels.pack_signs(vs[r])
        t.reset_stats()
        voted = Vote(kind, t, packed.size, np).__call__(packed)
        got = kernels.unpack_signs(voted, d)
        assert np.array_equal(got, oracle), (kind, d, np.flatnonzero(got != oracle)[:5])
        sent = t.stats[Channel.VOTE].sent
        nbytes, chunk = packed.size, -(-packed.size // n)
        # sharded: (n-1) chunks out in the all-to-all, the voted chunk to n-1 ranks;
        # server: a worker's signs up, or the root's vote down (counted once).
        expect = {"sharded": 2 * (n - 1) * chunk, "allgather": (n - 1) * nbytes,
                  "server": nbytes if n > 1 else 0}[kind]
        assert sent == expect, (kind, d, sent, expect)
t.barrier()
if r == 0:
    print(f"vote checks passed on {n} ranks", flush=True)
