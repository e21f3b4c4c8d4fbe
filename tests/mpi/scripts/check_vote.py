"""Every vote transport equals a numpy oracle of sign(sum of signs), ties to +1; any size.

Also checks: the bytes of each phase against the theoretical payload, pipelined segments,
inverting adversaries, and the count of close votes against the oracle's.
"""

import numpy as np

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


def oracle(signs):
    total = signs.sum(axis=0)
    voted = np.where(total >= 0, 1.0, -1.0).astype(np.float32)
    close = np.abs(total) == 1 if n % 2 else (total == 0) | (total == -2)
    return voted, int(close.sum())


def invert(packed, v, scratch):
    np.invert(packed, out=packed)


for d in (1, 7, 8 * n + 3, 100_003):
    vs = vectors(d, 11)
    signs = np.where(vs >= 0, 1, -1)
    honest, honest_close = oracle(signs)
    flipped = signs.copy()
    flipped[n - 1] *= -1  # the last rank inverts
    bad, bad_close = oracle(flipped)
    nbytes = -(-d // 8)
    for kind in VOTES:
        # One segment; then about five (3 bytes at least), the last one shorter: pipelined.
        for segment in (0, max(3, nbytes // 5)):
            for tamper, want, want_close in ((None, honest, honest_close),
                                             (invert if r == n - 1 else None, bad, bad_close)):
                t.reset_stats()
                vote = Vote(kind, t, d, np, segment, tamper)
                got = vote(vs[r].copy(), np.empty(d, np.float32))
                assert np.array_equal(got, want), (kind, segment, d,
                                                   np.flatnonzero(got != want)[:5])
                close = t.allreduce_scalar(float(vote.close_votes()), channel=Channel.EVAL)
                assert close == want_close, (kind, segment, d, close, want_close)
                up, down = t.stats[Channel.VOTE].sent, t.stats[Channel.VOTE_RESULT].sent
                segs = [min(segment or nbytes, nbytes - lo)
                        for lo in range(0, nbytes, segment or nbytes)]
                chunks = sum(-(-b // n) for b in segs)
                # sharded: (n-1) chunks out in the all-to-all, the voted chunk to n-1 ranks;
                # server: a worker's signs up, or the root's vote down (counted once).
                expect = {"sharded": ((n - 1) * chunks, (n - 1) * chunks),
                          "allgather": ((n - 1) * nbytes, 0),
                          "server": ((nbytes if r else 0) if n > 1 else 0,
                                     (nbytes if r == 0 else 0) if n > 1 else 0)}[kind]
                assert (up, down) == expect, (kind, segment, d, up, down, expect)
t.barrier()
if r == 0:
    print(f"vote checks passed on {n} ranks", flush=True)
