"""Local update rules and learning-rate schedules.

An optimizer is a pair in the optax style: ``init(x) -> state`` and
``apply(x, g, state, lr) -> state``, with state a NamedTuple of plain arrays allocated once.
``apply`` updates ``x`` in place and may use ``g`` as scratch, so the hot loop allocates
nothing of model size.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

from mpiopt.backend import array_module

SCHEDULES = ("constant", "step", "cosine", "inverse_power")


def make_schedule(kind: str, lr: float, total_steps: int, warmup_steps: int = 0,
                  decay_every: int = 0, gamma: float = 0.1,
                  min_lr: float = 0.0, tau0: float = 1.0,
                  kappa: float = 0.7) -> Callable[[int], float]:
    """Return ``step -> learning rate``: a base schedule after a linear warm-up.

    Args:
        kind: ``constant``, ``step`` (multiply by ``gamma`` every ``decay_every`` steps),
            ``cosine`` (from ``lr`` down to ``min_lr`` at ``total_steps``) or
            ``inverse_power`` (``lr * (tau0 + step) ** -kappa``, the step size of stochastic
            variational inference: with ``kappa`` in (0.5, 1] the steps satisfy the
            Robbins-Monro conditions; ``step`` counts from 0).
        lr: the base learning rate.
        total_steps: the length of the run (for ``cosine``).
        warmup_steps: steps of linear warm-up from ``lr / warmup_steps`` to ``lr``.
        decay_every: the period of ``step`` decay.
        gamma: the factor of ``step`` decay.
        min_lr: the floor of ``cosine``.
        tau0: the delay of ``inverse_power`` (> 0; at least 1 keeps every step at most ``lr``).
        kappa: the forgetting rate of ``inverse_power``.
    """
    if kind not in SCHEDULES:
        raise ValueError(f"unknown schedule {kind!r}; valid: {', '.join(SCHEDULES)}")
    if kind == "inverse_power" and not (tau0 > 0 and 0.5 < kappa <= 1):
        raise ValueError(f"inverse_power needs tau0 > 0 and kappa in (0.5, 1], got "
                         f"tau0={tau0}, kappa={kappa}")
    if kind == "constant" and warmup_steps <= 0:
        return lambda step: lr  # asked every step: the plain case in one call

    def base(step: int) -> float:
        if kind == "step" and decay_every > 0:
            return lr * gamma ** (step // decay_every)
        if kind == "cosine":
            t = min(max(step - warmup_steps, 0) / max(total_steps - warmup_steps, 1), 1.0)
            return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * t))
        if kind == "inverse_power":
            return lr * (tau0 + step) ** -kappa
        return lr

    def schedule(step: int) -> float:
        if step < warmup_steps:
            return lr * (step + 1) / warmup_steps
        return base(step)

    return schedule


class SGDState(NamedTuple):
    """Momentum buffer (None without momentum) and one scratch vector."""

    momentum: Any
    scratch: Any


@dataclass(frozen=True)
class SGD:
    """SGD with optional heavy-ball or Nesterov momentum and L2 weight decay.

    ``d = g + wd x``; ``m = mu m + d``; the step is ``m`` (heavy ball) or ``d + mu m``
    (Nesterov); ``x = x - lr * step``.
    """

    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0

    def init(self, x) -> SGDState:
        """Allocate the optimizer's buffers for parameters like ``x``."""
        xp = array_module(x)
        buf = xp.zeros_like(x) if self.momentum else None
        return SGDState(buf, xp.empty_like(x))

    def apply(self, x, g, state: SGDState, lr: float) -> SGDState:
        """Update ``x`` in place with gradient ``g`` (``g`` is overwritten)."""
        x -= self.step(x, g, state, lr)
        return state

    def step(self, x, g, state: SGDState, lr: float):
        """Return ``lr`` times the step at ``x`` (in ``state.scratch``), moving the momentum.

        ``x - step`` is what :meth:`apply` writes; ``g`` is overwritten.
        """
        xp = array_module(x)
        scratch = state.scratch
        if self.weight_decay:
            xp.multiply(x, self.weight_decay, out=scratch)
            g += scratch
        direction = g
        if self.momentum:
            m = state.momentum
            m *= self.momentum
            m += g
            direction = m
            if self.nesterov:
                xp.multiply(m, self.momentum, out=scratch)
                g += scratch
                direction = g
        xp.multiply(direction, lr, out=scratch)
        return scratch
