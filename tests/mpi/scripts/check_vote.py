"""Every vote transport equals a numpy oracle of sign(sum of signs), ties to +1; any size.

Also checks: the bytes of each phase against the theoretical payload, pipelined segments,
inverting and random adversaries, and the count of close votes against the oracle's. A random
adversary's signs are rebuilt on every rank from its stream (run seed, rank): the signs of the
next d standard normals per vote.
"""

import numpy as np

from mpiopt.algorithms.signum import VOTES, Vote, adversary_stream, make_tamper
from mpiopt.comm.transport import Channel, Transport

t = Transport(timeout=60)
r, n = t.rank, t.size
SEED = 7
RANDOM = tuple(range(n - max(1, n // 2), n))  # the random adversaries: the last half


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


def random_signs(d, calls):
    """The signs every rank would send in ``calls`` votes with RANDOM as random adversaries."""
    signs = np.broadcast_to(np.where(vectors(d, 11) >= 0, 1, -1), (calls, n, d)).copy()
    for a in RANDOM:
        noise = adversary_stream(SEED, a).standard_normal((calls, d), dtype=np.float32)
        signs[:, a] = np.where(noise >= 0, 1, -1)
    return signs


def expected_bytes(kind, segment, nbytes):
    """Return the (vote, vote result) bytes this rank sends in one vote."""
    segs = [min(segment or nbytes, nbytes - lo) for lo in range(0, nbytes, segment or nbytes)]
    chunks = sum(-(-b // n) for b in segs)
    # sharded: (n-1) chunks out in the all-to-all, the voted chunk to n-1 ranks;
    # server: a worker's signs up, or the root's vote down (counted once).
    return {"sharded": ((n - 1) * chunks, (n - 1) * chunks),
            "allgather": ((n - 1) * nbytes, 0),
            "server": ((nbytes if r else 0) if n > 1 else 0,
                       (nbytes if r == 0 else 0) if n > 1 else 0)}[kind]


def check_votes(kind, segment, d, tamper, signs):
    """Vote ``len(signs)`` times with one Vote; each must equal the oracle of its signs."""
    vs = vectors(d, 11)
    t.reset_stats()
    vote = Vote(kind, t, d, np, segment, tamper)
    for call, call_signs in enumerate(signs):
        want, want_close = oracle(call_signs)
        got = vote(vs[r].copy(), np.empty(d, np.float32))
        where = (kind, segment, d, call)
        assert np.array_equal(got, want), (*where, np.flatnonzero(got != want)[:5])
        close = t.allreduce_scalar(float(vote.close_votes()), channel=Channel.EVAL)
        assert close == want_close, (*where, close, want_close)
    up, down = t.stats[Channel.VOTE].sent, t.stats[Channel.VOTE_RESULT].sent
    expect = expected_bytes(kind, segment, -(-d // 8))
    assert (up, down) == (len(signs) * expect[0], len(signs) * expect[1]), (
        kind, segment, d, up, down, expect)


for d in (1, 7, 8 * n + 3, 100_003):
    signs = np.where(vectors(d, 11) >= 0, 1, -1)
    flipped = signs.copy()
    flipped[n - 1] *= -1  # the last rank inverts
    noisy = random_signs(d, 2)  # two votes: the stream moves on
    if d > 8:
        assert not np.array_equal(noisy[0], noisy[1]), d
    for kind in VOTES:
        # One segment; then about five (3 bytes at least), the last one shorter: pipelined.
        for segment in (0, max(3, -(-d // 8) // 5)):
            check_votes(kind, segment, d, None, [signs])
            check_votes(kind, segment, d, make_tamper("invert", np) if r == n - 1 else None,
                        [flipped])
            rng = adversary_stream(SEED, r)  # two votes: the noise of each, by segments
            check_votes(kind, segment, d, make_tamper("random", np, rng) if r in RANDOM
                        else None, noisy)
t.barrier()
if r == 0:
    print(f"vote checks passed on {n} ranks", flush=True)
