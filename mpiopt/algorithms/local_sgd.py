"""Local SGD: ``H`` local steps on every rank, then an average of all models."""

from __future__ import annotations

from dataclasses import dataclass

from mpiopt.algorithms import ALGORITHMS
from mpiopt.algorithms.base import SGDConfig, SynchronousAlgorithm
from mpiopt.comm.transport import Channel
from mpiopt.config import param


class LocalSGD(SynchronousAlgorithm):
    """Local optimizer steps; every ``local_steps`` steps the models are averaged."""

    def step(self, step: int, lr: float) -> float:
        loss = self.local_gradient(step)
        self.opt.apply(self.x, self.g, self.state, lr)
        if (step + 1) % self.cfg.local_steps == 0:
            self.average()
        return loss

    def average(self) -> None:
        """Replace every model by the mean model (an fp32 allreduce)."""
        self.ctx.transport.allreduce(self.x, Channel.MODEL)
        self.x *= 1.0 / self.ctx.size
        if self.cfg.average_momentum and self.state.momentum is not None:
            self.ctx.transport.allreduce(self.state.momentum, Channel.MODEL)
            self.state.momentum[...] *= 1.0 / self.ctx.size

    def finish(self) -> None:
        # The final model is the average, also when the budget ends between averages.
        if self.ctx.steps_done % self.cfg.local_steps:
            self.average()

    def evaluate(self, step: int) -> dict:
        return self.evaluate_average()


@ALGORITHMS.register("local_sgd")
@dataclass(frozen=True)
class LocalSGDConfig(SGDConfig):
    """Local SGD: H local steps on each rank, then an fp32 average of all models."""

    local_steps: int = param(4, "Local steps H between two averages.", low=1)
    average_momentum: bool = param(False, "Also average the momentum buffers.")

    def build(self, ctx) -> LocalSGD:
        return LocalSGD(self, ctx)
