"""signSGD and Signum with majority vote: 1 bit per parameter in both directions.

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

All buffers (momentum, packed, stacked, voted, unpacked) are allocated once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mpiopt import kernels
from mpiopt.algorithms.base import AlgorithmConfig, NonFiniteError, SynchronousAlgorithm
from mpiopt.comm.transport import Channel
from mpiopt.config import ALGORITHMS, param

VOTES = ("sharded", "allgather", "server")


class Vote:
    """One vote transport: packed signs of this rank in, packed vote out (same on all ranks)."""

    def __init__(self, kind: str, transport, nbytes: int, xp):
        self.kind, self.t, self.nbytes = kind, transport, nbytes
        n = transport.size
        self.chunk = -(-nbytes // n)  # ceil: the last chunks carry padding
        width = self.chunk * n if kind == "sharded" else nbytes
        self.send = xp.zeros(width, np.uint8)
        rows = n if kind != "server" or transport.rank == 0 else 0
        cols = self.chunk if kind == "sharded" else nbytes
        self.stack = xp.zeros((max(rows, 1), cols), np.uint8)
        self.mine = xp.zeros(self.chunk, np.uint8)
        self.voted = xp.zeros(width, np.uint8)

    def __call__(self, packed):
        """Return the packed majority vote of every rank's ``packed`` signs."""
        self.send[: self.nbytes] = packed
        getattr(self, "_" + self.kind)()
        return self.voted[: self.nbytes]

    def _sharded(self):
        self.t.alltoall(self.send, self.stack, Channel.VOTE)
        kernels.majority_vote(self.stack, out=self.mine)
        self.t.allgather(self.mine, self.voted, Channel.VOTE)

    def _allgather(self):
        self.t.allgather(self.send, self.stack, Channel.VOTE)
        kernels.majority_vote(self.stack, out=self.voted)

    def _server(self):
        self.t.gather(self.send, self.stack if self.t.rank == 0 else None, 0, Channel.VOTE)
        if self.t.rank == 0:
            kernels.majority_vote(self.stack, out=self.voted)
        self.t.bcast(self.voted, 0, Channel.VOTE)


class Signum(SynchronousAlgorithm):
    """Signum / signSGD with a majority vote over all ranks."""

    def setup(self) -> None:
        ctx = self.ctx
        self.x = ctx.problem.init(ctx.init_rng)
        self.g = ctx.xp.empty_like(self.x)
        self.v = ctx.xp.zeros_like(self.x)
        self.u = ctx.xp.empty_like(self.x)
        d = int(self.x.size)
        self.packed = ctx.xp.zeros(kernels.nbytes_signs(d), np.uint8)
        self.vote = Vote(self.cfg.vote, ctx.transport, self.packed.size, ctx.xp)
        self.state = None
        ctx.strict_loss = self.cfg.nonfinite == "raise"

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
        kernels.pack_signs(self.v, out=self.packed)
        voted = self.vote(self.packed)
        kernels.unpack_signs(voted, self.x.size, out=self.u)
        if self.cfg.weight_decay:
            self.ctx.xp.multiply(self.x, self.cfg.weight_decay, out=self.g)
            self.u += self.g
        self.u *= lr
        self.x -= self.u
        return loss


@ALGORITHMS.register("signum")
@dataclass(frozen=True)
class SignumConfig(AlgorithmConfig):
    """Signum with majority vote: 1-bit momentum signs up, a 1-bit vote down."""

    lr: float = param(1e-3, "Step size of the voted sign.", low=0, low_open=True)
    beta: float = param(0.9, "Momentum of the signs' argument (0: signSGD).", low=0, high=1,
                        high_open=True)
    weight_decay: float = param(0.0, "Decoupled weight decay, applied after the vote.", low=0)
    vote: str = param("sharded", "How the vote travels: sharded (all-to-all + allgather), "
                      "allgather, server (rank 0 votes).", choices=VOTES)
    nonfinite: str = param("raise", "On a NaN/Inf gradient: raise (abort with rank and "
                           "step) or skip (every rank skips the step).",
                           choices=("raise", "skip"))

    def build(self, ctx) -> Signum:
        return Signum(self, ctx)


@ALGORITHMS.register("signsgd")
@dataclass(frozen=True)
class SignSGDConfig(SignumConfig):
    """signSGD with majority vote: Signum without momentum (beta = 0)."""

    beta: float = param(0.0, "Momentum of the signs' argument (0: signSGD).", low=0, high=1,
                        high_open=True)
