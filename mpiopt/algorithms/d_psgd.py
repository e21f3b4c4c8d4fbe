"""D-PSGD (Lian et al., 2017), a baseline: every step, average with the neighbours by the
gossip matrix, then step locally.

``x_i <- sum_j W_ij x_j - lr * g_i(x_i)`` with ``W`` the Metropolis-Hastings matrix of the
topology. The exchange of the current models is started before the gradient is computed, so
communication overlaps computation; receive buffers are allocated once.
"""

from __future__ import annotations

from dataclasses import dataclass

from mpiopt.algorithms import ALGORITHMS
from mpiopt.algorithms.base import GraphKeys, SynchronousAlgorithm
from mpiopt.comm.transport import Channel, wait_all


class DecentralizedSGD(SynchronousAlgorithm):
    """Synchronous decentralized SGD over a fixed graph."""

    def setup(self) -> None:
        super().setup()
        ctx = self.ctx
        top = self.cfg.topology_for(ctx.size)
        w = top.mixing_matrix()
        self.neighbors = top.neighbors(ctx.rank)
        self.weights = [float(w[ctx.rank, j]) for j in self.neighbors]
        self.self_weight = float(w[ctx.rank, ctx.rank])
        self.inbox = [ctx.xp.empty_like(self.x) for _ in self.neighbors]
        self.mixed = ctx.xp.empty_like(self.x)

    def step(self, step: int, lr: float) -> float:
        t = self.ctx.transport
        handles = [t.irecv(buf, j, Channel.GOSSIP) for j, buf in zip(self.neighbors, self.inbox)]
        handles += [t.isend(self.x, j, Channel.GOSSIP) for j in self.neighbors]
        loss = self.local_gradient(step)  # overlaps the exchange; x is only read
        wait_all(handles)
        mixed = self.mixed
        self.ctx.xp.multiply(self.x, self.self_weight, out=mixed)
        for weight, buf in zip(self.weights, self.inbox):
            buf *= weight
            mixed += buf
        self.x[...] = mixed
        self.opt.apply(self.x, self.g, self.state, lr)
        return loss

    def evaluate(self, step: int) -> dict:
        return self.evaluate_average()


@ALGORITHMS.register("d_psgd")
@dataclass(frozen=True)
class DecentralizedSGDConfig(GraphKeys):
    """D-PSGD (Lian et al.), a baseline: each step, average with all neighbours, then step.

    Not the asynchronous DPSGD of Mohamad et al. (``dpsgd``).
    """

    def build(self, ctx) -> DecentralizedSGD:
        return DecentralizedSGD(self, ctx)
