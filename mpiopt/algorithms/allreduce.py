"""Synchronous data-parallel SGD: ``x <- x - lr * mean_i g_i`` with an fp32 allreduce."""

from __future__ import annotations

from dataclasses import dataclass

from mpiopt.algorithms import ALGORITHMS
from mpiopt.algorithms.base import SGDConfig, SynchronousAlgorithm
from mpiopt.comm.transport import Channel


class AllreduceSGD(SynchronousAlgorithm):
    """Every step: local gradient, allreduce, mean, local optimizer update."""

    def step(self, step: int, lr: float) -> float:
        loss = self.local_gradient(step)
        self.ctx.transport.allreduce(self.g, Channel.GRADIENT)
        self.g *= 1.0 / self.ctx.size
        self.opt.apply(self.x, self.g, self.state, lr)
        return loss


@ALGORITHMS.register("allreduce")
@dataclass(frozen=True)
class AllreduceConfig(SGDConfig):
    """Synchronous data-parallel SGD: the gradients are averaged by an allreduce every step."""

    def build(self, ctx) -> AllreduceSGD:
        return AllreduceSGD(self, ctx)
