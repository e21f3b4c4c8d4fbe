"""signSGD and Signum with majority vote (1 bit per parameter both ways), and EF-signSGD.

Every worker updates its momentum ``v <- beta v + (1 - beta) g`` (``beta = 0``: signSGD),
packs ``sign(v)`` 8 per byte (``sign(0) = +1``), and the workers vote: the result is
``sign(sum of signs)`` with ties to ``+1``. Every worker then applies
``x <- x - lr (vote + wd x)`` (decoupled weight decay, after the vote).

How the vote travels (``algorithm.vote``):

- ``sharded``: the packed vector is cut into ``n`` chunks; an all-to-all sends chunk ``j`` of
  every worker to rank ``j``, which votes on it; an allgather returns the voted chunks. About
  ``2 d/8`` bytes sent and received per rank per step, whatever ``n`` is.
- ``allgather``: every rank receives every packed vector and votes locally (``(n-1) d/8``).
- ``server``: rank 0 gathers, votes and broadcasts, as in the publication.

Long vectors are voted in segments of ``algorithm.segment_bytes`` packed bytes with
nonblocking collectives: segment ``s + 1`` is packed while segment ``s`` travels, and segment
``s`` is voted and sent back while segment ``s + 1`` travels. Every buffer (momentum, packed,
stacked, voted) is allocated once; the step allocates nothing of model size.

Adversaries (experiments only, off by default): ``algorithm.adversaries`` workers send the
negation of their signs (``invert``) or the signs of Gaussian noise (``random``) instead of
their honest signs. The noise comes from the adversary's own stream, seeded by the run seed and
its rank, ``d`` standard normals per vote. The vote tolerates fewer than ``n/2`` of them.

``ef_signsgd`` is the compressed baseline: ``p = lr g + e``, ``delta = (|p|_1/d) sign(p)``,
``e = p - delta``; the packed signs and the scales are allgathered and every worker applies
the average of the scaled signs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mpiopt import backend, kernels
from mpiopt.algorithms import ALGORITHMS
from mpiopt.algorithms.base import AlgorithmConfig, NonFiniteError, SynchronousAlgorithm
from mpiopt.comm.transport import Channel
from mpiopt.config import check_ranks, param
from mpiopt.errors import ConfigError

VOTES = ("sharded", "allgather", "server")
ADVERSARIES = ("invert", "random")
SEGMENT_BYTES = 1 << 20  # the pipelined variant of ``bench comm --algorithm signum``
ADVERSARY_STREAM = 2  # the random adversary's stream: default_rng([seed, 2, rank])


class _Segment:
    """Buffers and pending handles of one segment of the packed vector (bytes ``lo:hi``)."""

    def __init__(self, kind: str, transport, lo: int, hi: int, d: int, xp):
        n = transport.size
        self.lo, self.nb = lo, hi - lo
        self.e0, self.e1 = 8 * lo, min(8 * hi, d)  # the parameters this segment carries
        self.chunk = -(-self.nb // n)  # ceil: the last chunks carry padding
        width = self.chunk * n if kind == "sharded" else self.nb
        self.send = xp.zeros(width, np.uint8)
        rows = n if kind != "server" or transport.rank == 0 else 1
        self.stack = xp.zeros((rows, self.chunk if kind == "sharded" else self.nb), np.uint8)
        self.mine = xp.zeros(self.chunk, np.uint8) if kind == "sharded" else None
        self.voted = xp.zeros(width, np.uint8)
        self.up = self.down = None


class Vote:
    """The majority vote of ``sign(v)`` over all ranks, written as +-1 into ``u``.

    Args:
        kind: ``sharded``, ``allgather`` or ``server``.
        transport: the world transport.
        d: the vector length.
        xp: the array module.
        segment_bytes: packed bytes per pipelined segment (0: a single segment).
        tamper: optional ``(send, v_part, scratch) -> None`` run on this rank's packed signs
            before they leave (adversaries).
    """

    def __init__(self, kind: str, transport, d: int, xp, segment_bytes: int = 0,
                 tamper=None):
        self.kind, self.t, self.d, self.xp, self.tamper = kind, transport, d, xp, tamper
        nbytes = kernels.nbytes_signs(d)
        seg = nbytes if segment_bytes <= 0 else segment_bytes
        self.segments = [_Segment(kind, transport, lo, min(lo + seg, nbytes), d, xp)
                         for lo in range(0, nbytes, seg)]

    def __call__(self, v, u):
        """Vote on the signs of every rank's ``v``; write the +-1 result into ``u``."""
        segs = self.segments
        for i, s in enumerate(segs):
            self._pack(s, v, u)
            s.up = self._start_up(s)
            if i:
                self._vote(segs[i - 1])
        self._vote(segs[-1])
        for s in segs:
            if s.down is not None:
                s.down.wait()
            kernels.unpack_signs(s.voted[: s.nb], s.e1 - s.e0, out=u[s.e0:s.e1])
        return u

    def warm_up(self, v, u) -> None:
        """Run the local kernels of a vote once (pack, vote, unpack); nothing is sent.

        Writes only buffers every call overwrites: the packed signs, the vote, ``u``.
        """
        for s in self.segments:
            kernels.pack_signs(v[s.e0:s.e1], out=s.send[: s.nb])
            kernels.majority_vote(s.stack, out=s.voted[: s.stack.shape[1]])
            kernels.unpack_signs(s.voted[: s.nb], s.e1 - s.e0, out=u[s.e0:s.e1])

    def _pack(self, s: _Segment, v, scratch) -> None:
        out = s.send[: s.nb]
        kernels.pack_signs(v[s.e0:s.e1], out=out)
        if self.tamper is not None:
            self.tamper(out, v[s.e0:s.e1], scratch[s.e0:s.e1])

    def _start_up(self, s: _Segment):
        """Send this rank's signs of ``s`` towards the voters; return the pending handle.

        A single segment has nothing to overlap: it takes the blocking collectives, the
        faster path (and returns None).
        """
        t, one = self.t, len(self.segments) == 1
        recv = s.stack if self.kind != "server" or t.rank == 0 else None
        if self.kind == "sharded":
            call = t.alltoall if one else t.ialltoall
            args = (s.send, recv, Channel.VOTE)
        elif self.kind == "allgather":
            call = t.allgather if one else t.iallgather
            args = (s.send, recv, Channel.VOTE)
        else:
            call = t.gather if one else t.igather
            args = (s.send, recv, 0, Channel.VOTE)
        handle = call(*args)
        return None if one else handle

    def _vote(self, s: _Segment) -> None:
        """Finish the up phase of ``s``, vote, and start (or do) its down phase."""
        t, one = self.t, len(self.segments) == 1
        if s.up is not None:
            s.up.wait()
        s.down = None
        if self.kind == "sharded":
            kernels.majority_vote(s.stack, out=s.mine)
            if one:
                t.allgather(s.mine, s.voted, Channel.VOTE_RESULT)
            else:
                s.down = t.iallgather(s.mine, s.voted, Channel.VOTE_RESULT)
        elif self.kind == "allgather":
            kernels.majority_vote(s.stack, out=s.voted)
        else:
            if t.rank == 0:
                kernels.majority_vote(s.stack, out=s.voted)
            if one:
                t.bcast(s.voted, 0, Channel.VOTE_RESULT)
            else:
                s.down = t.ibcast(s.voted, 0, Channel.VOTE_RESULT)

    def close_votes(self) -> int:
        """Count, among the coordinates this rank voted in the last call, the close ones.

        A coordinate is close when one worker changing its sign could change the vote: a sum
        of signs of +-1 for odd ``n``; 0 or -2 for even ``n`` (ties go to +1). In the
        ``allgather`` form rank 0 counts every coordinate and the others count none.
        """
        t, n = self.t, self.t.size
        if self.kind != "sharded" and t.rank != 0:
            return 0
        close = 0
        for s in self.segments:
            start = s.lo + (t.rank * s.chunk if self.kind == "sharded" else 0)
            width = min(s.stack.shape[1], s.lo + s.nb - start)
            # Only bytes and bits that carry parameters: padding would look like votes.
            nbits = min(8 * width, self.d - 8 * start)
            if nbits <= 0:
                continue
            stack = backend.to_host(s.stack)
            for c0 in range(0, nbits, 1 << 20):  # bounded scratch on big chunks
                c1 = min(c0 + (1 << 20), nbits)
                bits = np.unpackbits(stack[:, c0 // 8: -(-c1 // 8)], axis=1)[:, : c1 - c0]
                total = 2 * bits.sum(axis=0, dtype=np.int64) - n
                hit = np.abs(total) == 1 if n % 2 else (total == 0) | (total == -2)
                close += int(hit.sum())
        return close


def adversary_ranks(spec, n: int) -> tuple[int, ...]:
    """Return the adversarial ranks: the last ``k`` ranks for a count, or the listed ranks."""
    if isinstance(spec, int):
        return tuple(range(n - spec, n))
    return tuple(sorted(spec))


def adversary_stream(seed: int, rank: int) -> np.random.Generator:
    """Return the noise stream of a ``random`` adversary on ``rank``.

    Its own stream (the Context's are ``[seed, 0]`` and ``[seed, 1, rank]``), so the noise
    neither depends on nor shifts the rank's minibatch draws.
    """
    return np.random.default_rng([seed, ADVERSARY_STREAM, rank])


def make_tamper(kind: str, xp, rng: np.random.Generator | None = None):
    """Return an adversary's ``(packed, v, scratch) -> None`` rewrite of its packed signs.

    ``invert`` negates every sign. ``random`` packs the signs of the next standard normals of
    ``rng``, one per parameter, in order: a vote of ``d`` parameters takes the next ``d``
    draws, however it is segmented, and never looks at ``v``.
    """
    if kind == "invert":
        def tamper(packed, v, scratch):
            xp.invert(packed, out=packed)
    else:
        def tamper(packed, v, scratch):
            if xp is np:
                rng.standard_normal(out=scratch, dtype=np.float32)
            else:
                scratch[...] = xp.asarray(rng.standard_normal(scratch.size, np.float32))
            kernels.pack_signs(scratch, out=packed)
    return tamper


class _SignBase(SynchronousAlgorithm):
    """Buffers, the non-finite policy and the adversaries shared by the sign methods."""

    def setup(self) -> None:
        ctx = self.ctx
        self.x = ctx.problem.init(ctx.init_rng)
        self.g = ctx.xp.empty_like(self.x)
        self.v = ctx.xp.zeros_like(self.x)
        self.u = ctx.xp.empty_like(self.x)
        self.state = None
        ctx.strict_loss = self.cfg.nonfinite == "raise"
        self.adversaries = adversary_ranks(self.cfg.adversaries, ctx.size)

    def warm_up(self) -> None:
        super().warm_up()
        kernels.all_finite(self.g)

    def _finite(self, step: int, loss: float) -> bool:
        """Apply the non-finite policy; return False if every rank must skip this step."""
        ok = bool(np.isfinite(loss)) and kernels.all_finite(self.g)
        if self.cfg.nonfinite == "raise":
            if not ok:
                raise NonFiniteError(f"non-finite gradient on rank {self.ctx.rank} at step "
                                     f"{step} (algorithm.nonfinite: raise)")
            return True
        flag = np.array([0 if ok else 1], np.int32)
        self.ctx.transport.allreduce(flag, Channel.CONTROL, op="max")
        return flag[0] == 0

    def _tamper(self):
        """Return this rank's sign manipulation, or None for an honest worker."""
        ctx = self.ctx
        if ctx.rank not in self.adversaries:
            return None
        rng = adversary_stream(ctx.cfg.run.seed, ctx.rank)
        return make_tamper(self.cfg.adversary, ctx.xp, rng)

    def summary_info(self) -> dict:
        return {"adversaries": list(self.adversaries),
                "adversary": self.cfg.adversary if self.adversaries else None}


class Signum(_SignBase):
    """Signum / signSGD with a majority vote over all ranks."""

    def setup(self) -> None:
        super().setup()
        self.vote = Vote(self.cfg.vote, self.ctx.transport, int(self.x.size), self.ctx.xp,
                         self.cfg.segment_bytes, self._tamper())

    def warm_up(self) -> None:
        super().warm_up()
        self.vote.warm_up(self.v, self.u)

    def step(self, step: int, lr: float) -> float:
        loss = self.local_gradient(step)
        if not self._finite(step, loss):
            return loss  # skipped by every rank together; the row records the NaN
        beta = self.cfg.beta
        if beta:
            self.v *= beta
            self.g *= 1.0 - beta
            self.v += self.g
        else:
            self.v[...] = self.g
        self.vote(self.v, self.u)
        if self.cfg.weight_decay:
            self.ctx.xp.multiply(self.x, self.cfg.weight_decay, out=self.g)
            self.u += self.g
        self.u *= lr
        self.x -= self.u
        return loss

    def evaluate(self, step: int) -> dict:
        """Rank 0's model, plus the vote margin of the last step (collective)."""
        t = self.ctx.transport
        close = t.allreduce_scalar(float(self.vote.close_votes()), channel=Channel.EVAL)
        if self.ctx.rank != 0:
            return {}
        return {**self.ctx.problem.evaluate(self.x), "vote_margin": close / self.x.size}


class ScaledSignAverage:
    """EF-signSGD's exchange: ``delta = (|p|_1/d) sign(p)`` per rank, averaged over ranks.

    Each rank packs ``sign(p)`` with ``p = q + e`` and keeps ``e <- p - delta`` (the error
    feedback); the packed signs and the scales are allgathered ((n-1)(d/8 + 8) bytes sent per
    rank) and every rank forms the same average. All buffers are allocated once.
    """

    def __init__(self, transport, d: int, xp, tamper=None):
        self.t, self.d, self.tamper = transport, d, tamper
        n = transport.size
        nb = kernels.nbytes_signs(d)
        self.packed = xp.zeros(nb, np.uint8)
        self.stack = xp.zeros((n, nb), np.uint8)
        self.scale = np.zeros(1, np.float64)
        self.scales = np.zeros(n, np.float64)

    def warm_up(self, q) -> None:
        """Run the local kernels once on zeros (``q`` is scratch); ``e`` is left untouched."""
        q[...] = 0.0
        kernels.ef_sign_compress(q, q.copy(), self.packed)
        kernels.unpack_signs(self.stack[0], self.d, scale=0.0, out=q)

    def __call__(self, q, e, out):
        """Compress ``q + e`` (updating ``e``), exchange, and add the average into ``out``.

        ``q`` is used as scratch and is overwritten.
        """
        t, n = self.t, self.t.size
        self.scale[0] = kernels.ef_sign_compress(q, e, self.packed)
        if self.tamper is not None:
            self.tamper(self.packed, q, q)
        wait = [t.iallgather(self.scale, self.scales, Channel.VOTE),
                t.iallgather(self.packed, self.stack, Channel.VOTE)]
        for h in wait:
            h.wait()
        for w in range(n):
            kernels.unpack_signs(self.stack[w], self.d, scale=self.scales[w] / n, out=q)
            out += q
        return out


class EFSignSGD(_SignBase):
    """Error-feedback scaled signSGD, averaged over ranks by an allgather of packed signs."""

    def setup(self) -> None:
        super().setup()
        xp = self.ctx.xp
        self.e = xp.zeros_like(self.x)
        self.exchange = ScaledSignAverage(self.ctx.transport, int(self.x.size), xp,
                                          self._tamper())

    def warm_up(self) -> None:
        super().warm_up()
        self.exchange.warm_up(self.u)

    def step(self, step: int, lr: float) -> float:
        xp = self.ctx.xp
        loss = self.local_gradient(step)
        if not self._finite(step, loss):
            return loss
        if self.cfg.weight_decay:
            xp.multiply(self.x, self.cfg.weight_decay, out=self.u)
            self.g += self.u
        if self.cfg.momentum:
            self.v *= self.cfg.momentum
            self.v += self.g
        else:
            self.v[...] = self.g
        xp.multiply(self.v, lr, out=self.u)  # p = lr v + e, formed inside the kernel
        self.g[...] = 0.0
        self.exchange(self.u, self.e, self.g)
        self.x -= self.g
        return loss


@dataclass(frozen=True)
class SignKeys(AlgorithmConfig):
    """Keys shared by the sign methods: non-finite policy and adversaries."""

    nonfinite: str = param("raise", "On a NaN/Inf gradient: raise (abort with rank and "
                           "step) or skip (every rank skips the step).",
                           choices=("raise", "skip"))
    adversaries: int | tuple[int, ...] = param(
        0, "Adversarial workers (experiments only): a count k (the last k ranks) or a list "
        "of ranks.", low=0)
    adversary: str = param("invert", "What an adversary sends: invert (the negation of its "
                           "signs) or random (signs of Gaussian noise).", choices=ADVERSARIES)

    def check_world(self, world_size: int) -> None:
        spec = self.adversaries
        if isinstance(spec, int):
            if spec > world_size:
                raise ConfigError(f"{spec} adversaries but only {world_size} ranks",
                                  key="algorithm.adversaries")
            return
        check_ranks(spec, world_size, "algorithm.adversaries")
        if len(set(spec)) != len(spec):
            raise ConfigError(f"ranks listed twice in {list(spec)}", key="algorithm.adversaries")


@dataclass(frozen=True)
class VoteKeys(SignKeys):
    """Keys of the majority-vote methods: step size, decoupled weight decay, vote transport."""

    lr: float = param(1e-3, "Step size of the voted sign.", low=0, low_open=True)
    weight_decay: float = param(0.0, "Decoupled weight decay, applied after the vote.", low=0)
    vote: str = param("sharded", "How the vote travels: sharded (all-to-all + allgather), "
                      "allgather, server (rank 0 votes).", choices=VOTES)
    segment_bytes: int = param(0, "Packed bytes per pipelined vote segment (8 parameters a "
                               "byte; 0: one segment). Pays off where the network moves the "
                               "data; see docs/benchmarks.md.", low=0)

    def build(self, ctx) -> Signum:
        return Signum(self, ctx)


@ALGORITHMS.register("signum")
@dataclass(frozen=True)
class SignumConfig(VoteKeys):
    """Signum with majority vote: 1-bit momentum signs up, a 1-bit vote down."""

    beta: float = param(0.9, "Momentum of the signs' argument (0: signSGD).", low=0, high=1,
                        high_open=True)


@ALGORITHMS.register("signsgd")
@dataclass(frozen=True)
class SignSGDConfig(VoteKeys):
    """signSGD with majority vote: Signum without momentum (beta = 0)."""

    beta: float = param(0.0, "Momentum of the signs' argument (0: signSGD).", low=0, high=1,
                        high_open=True)


@ALGORITHMS.register("ef_signsgd")
@dataclass(frozen=True)
class EFSignSGDConfig(SignKeys):
    """Error-feedback scaled signSGD: 1 bit + a scale up, the average of scaled signs back."""

    lr: float = param(0.01, "Learning rate (inside the error-feedback accumulator).", low=0,
                      low_open=True)
    momentum: float = param(0.0, "Heavy-ball momentum of the gradient before compression.",
                            low=0, high=1, high_open=True)
    weight_decay: float = param(0.0, "L2 weight decay added to the gradient.", low=0)

    def build(self, ctx) -> EFSignSGD:
        return EFSignSGD(self, ctx)
