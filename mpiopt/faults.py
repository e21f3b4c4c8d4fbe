"""Fault injection for tests and drills, driven by the ``MPIOPT_FAULT`` variable.

``MPIOPT_FAULT=KIND:rank=R:step=S[:seconds=T]`` with KIND one of

- ``raise``: rank R raises an exception at step S (the job must abort with the error shown);
- ``kill``: rank R kills itself with SIGKILL at step S (the launcher must end the job);
- ``nan``: rank R's gradient at step S becomes NaN (the run's non-finite policy applies);
- ``stall``: rank R sleeps T seconds at step S without calling MPI (a slow or stuck peer).

Several faults may be given, separated by commas. Off unless the variable is set.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass

from mpiopt.errors import ConfigError

KINDS = ("raise", "kill", "nan", "stall")
ENV = "MPIOPT_FAULT"


class InjectedFault(RuntimeError):
    """The exception raised by a ``raise`` fault."""


@dataclass(frozen=True)
class Fault:
    """One injected fault: what happens, on which rank, at which step."""

    kind: str
    rank: int
    step: int
    seconds: float = 1.0


def _parse_one(text: str) -> Fault:
    kind, *fields = text.strip().split(":")
    if kind not in KINDS:
        raise ConfigError(f"unknown fault {kind!r}; valid: {', '.join(KINDS)}", key=ENV)
    values = {}
    for item in fields:
        name, sep, value = item.partition("=")
        if not sep or name not in ("rank", "step", "seconds"):
            raise ConfigError(f"expected rank=R, step=S or seconds=T, got {item!r}", key=ENV)
        try:
            values[name] = float(value) if name == "seconds" else int(value)
        except ValueError:
            raise ConfigError(f"{name} must be a number, got {value!r}", key=ENV) from None
    if "rank" not in values or "step" not in values:
        raise ConfigError(f"{text!r} needs rank=R and step=S", key=ENV)
    return Fault(kind, values["rank"], values["step"], values.get("seconds", 1.0))


def parse(text: str | None) -> tuple[Fault, ...]:
    """Parse the value of ``MPIOPT_FAULT`` (empty or None: no faults)."""
    if not text:
        return ()
    return tuple(_parse_one(part) for part in text.split(",") if part.strip())


class FaultInjector:
    """Fires the faults of one rank at their steps."""

    def __init__(self, faults, rank: int):
        self.faults = [f for f in faults if f.rank == rank]
        self.rank = rank

    @classmethod
    def from_env(cls, rank: int) -> FaultInjector:
        """Build the injector of ``rank`` from the environment."""
        return cls(parse(os.environ.get(ENV)), rank)

    def at_step(self, step: int) -> None:
        """Fire the ``raise``, ``kill`` and ``stall`` faults due at ``step``."""
        for f in self.faults:
            if f.step != step:
                continue
            if f.kind == "raise":
                raise InjectedFault(f"injected fault on rank {self.rank} at step {step}")
            if f.kind == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if f.kind == "stall":
                time.sleep(f.seconds)

    def corrupt(self, step: int, grad) -> None:
        """Turn ``grad`` into NaN if a ``nan`` fault is due at ``step``."""
        if self.faults and any(f.kind == "nan" and f.step == step for f in self.faults):
            grad[...] = float("nan")
