"""DC-ASGD: asynchronous SGD with delay compensation (Zheng et al., ICML 2017).

A worker's gradient ``g`` was computed at the model the server last sent it, ``b`` (the
publication's backup ``w_bak``, the engine's ``outbox``); by the time it arrives the model is
``w``. The server corrects the gradient with a first-order Taylor term whose Hessian is
approximated by the outer product of the gradient, kept diagonal, and applies it at once::

    c = g + lam * g * g * (w - b)          (element-wise)
    w <- w - lr * c

DC-ASGD-c is this rule with a constant ``algorithm.lam``. DC-ASGD-a (``algorithm.adaptive:
true``) scales it by a moving average of ``g * g`` over the gradients the server applies,
``ms <- decay * ms + (1 - decay) * g * g`` (``algorithm.mean_square_decay``), updated before
it is used, and ``lam_t = lam / sqrt(ms + 1e-7)``. The defaults are the publication's
CIFAR-10 settings: ``lam = 0.04`` for DC-ASGD-c, ``lam0 = 2`` for DC-ASGD-a, decay ``0.95``.

Choices of ours, where the publication is silent or its notation leaves room:

- [decision] ``1e-7`` under the square root, as in the authors' Multiverso updater, so that a
  coordinate whose gradients have all been zero gets no compensation instead of ``0/0``.
- [decision] One mean square on the server, over the stream of applied gradients, as the
  publication writes it (``MeanSquare(t)``); the authors' code keeps one per worker.
- [decision] The publication's server runs plain SGD. ``algorithm.weight_decay`` is added to
  the gradient on the worker, at the model it pulled, before it is pushed (as ``asgd`` does),
  so the compensation acts on the gradient of the regularised loss. ``algorithm.momentum``
  keeps, for every worker, a heavy-ball buffer of that worker's *compensated* gradients,
  ``m_k <- mu m_k + c; w <- w - lr m_k``; it lives on the server because only there is ``c``
  known. That is ``asgd``'s worker-local momentum with ``c`` in place of ``g``, so with
  ``lam = 0``, or one worker (whose gradient is never stale, ``w = b``), ``dcasgd`` equals
  ``asgd`` bit for bit, and the three methods compared in the issue share one learning rate
  and the same keys.
"""

from __future__ import annotations

from dataclasses import dataclass

from mpiopt.algorithms import ALGORITHMS
from mpiopt.algorithms.base import SERVER
from mpiopt.algorithms.ps import ParameterServer, ServerKeys
from mpiopt.config import param
from mpiopt.errors import ConfigError

EPS = 1e-7  # under the square root of the mean square (the authors' code)
LAM = {False: 0.04, True: 2.0}  # the publication's lam (constant) and lam0 (adaptive)


class DCASGD(ParameterServer):
    """Apply every pushed gradient on arrival, compensated for the updates it missed."""

    def setup(self) -> None:
        super().setup()
        if self.ctx.role != SERVER:
            return
        xp = self.ctx.xp
        self.lam = self.cfg.lam_value()
        self.diff = xp.empty_like(self.w)
        self.mean_square = xp.zeros_like(self.w) if self.cfg.adaptive else None
        self.velocity = [None] * len(self.workers)  # momentum of each worker (on first use)

    def compensate(self, w, g, backup, out) -> None:
        """Write the compensated gradient ``g + lam_t * g * g * (w - backup)`` into ``out``.

        The operations are those of the formula read left to right, in float32, so that a
        plain numpy evaluation of it gives the same bits. DC-ASGD-a first moves the mean square.
        """
        xp, cfg = self.ctx.xp, self.cfg
        xp.subtract(w, backup, out=self.diff)
        if cfg.adaptive:
            ms, decay = self.mean_square, cfg.mean_square_decay
            ms *= decay
            xp.multiply(g, 1.0 - decay, out=out)
            out *= g
            ms += out
            xp.add(ms, EPS, out=out)
            xp.sqrt(out, out=out)
            xp.divide(self.lam, out, out=out)  # lam_t, per coordinate
            out *= g
        else:
            xp.multiply(g, self.lam, out=out)
        out *= g
        out *= self.diff
        out += g

    def apply(self, w, g, worker: int, staleness: int, lr: float, out=None) -> None:
        xp, scratch = self.ctx.xp, self.state.scratch
        self.compensate(w, g, self.outbox[worker], scratch)  # the backup is read here only
        if self.cfg.momentum:
            if self.velocity[worker] is None:
                self.velocity[worker] = xp.zeros_like(w)
            m = self.velocity[worker]
            m *= self.cfg.momentum
            m += scratch
            scratch[...] = m
        scratch *= lr
        xp.subtract(w, scratch, out=w if out is None else out)


@ALGORITHMS.register("dcasgd")
@dataclass(frozen=True)
class DCASGDConfig(ServerKeys):
    """DC-ASGD: the parameter server compensates each gradient for its delay."""

    lam: float | None = param(None, "Strength of the delay compensation: lam (constant "
                              "variant) or lam0 (adaptive). Default: the publication's, 0.04, "
                              "or 2 with adaptive.", low=0)
    adaptive: bool = param(False, "DC-ASGD-a: lam_t = lam / sqrt(mean square of the "
                           "applied gradients + 1e-7), per coordinate.")
    mean_square_decay: float = param(0.95, "Adaptive: ms <- decay ms + (1 - decay) g*g.",
                                     low=0, high=1, high_open=True)

    def validate(self) -> None:
        super().validate()
        if self.nesterov:
            raise ConfigError("dcasgd keeps heavy-ball momentum per worker; valid: false",
                              key="algorithm.nesterov")

    def lam_value(self) -> float:
        """Return lam, or the publication's value for the variant when it is not set."""
        return LAM[self.adaptive] if self.lam is None else self.lam

    def build(self, ctx) -> DCASGD:
        return DCASGD(self, ctx)
