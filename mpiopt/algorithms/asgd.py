"""ASGD: asynchronous SGD on the parameter server, each gradient applied on arrival.

A worker keeps its own momentum (``algorithm.momentum``) and weight decay and pushes
``m <- mu m + (g + wd w)``; the server applies ``w <- w - lr m`` at once, whatever the staleness.
With one worker it is sequential momentum SGD, step for step.
"""

from __future__ import annotations

from dataclasses import dataclass

from mpiopt.algorithms import ALGORITHMS
from mpiopt.algorithms.ps import ParameterServer, ServerKeys


class ASGD(ParameterServer):
    """Apply every pushed gradient on arrival; momentum and weight decay on the workers."""

    def prepare(self, g, step: int) -> None:
        super().prepare(g, step)  # weight decay
        cfg, state = self.cfg, self.state
        if cfg.momentum:
            m = state.momentum
            m *= cfg.momentum
            m += g
            g[...] = m

    def apply(self, w, g, worker: int, staleness: int, lr: float, out=None) -> None:
        scratch = self.state.scratch
        self.ctx.xp.multiply(g, lr, out=scratch)
        self.ctx.xp.subtract(w, scratch, out=w if out is None else out)


@ALGORITHMS.register("asgd")
@dataclass(frozen=True)
class ASGDConfig(ServerKeys):
    """ASGD: the parameter server applies each worker's gradient on arrival."""

    def validate(self) -> None:
        super().validate()
        if self.nesterov:
            from mpiopt.errors import ConfigError

            raise ConfigError("asgd keeps heavy-ball momentum on the workers; valid: false",
                              key="algorithm.nesterov")

    def build(self, ctx) -> ASGD:
        return ASGD(self, ctx)
