"""The compressor protocol, its errors and the checks every compressor shares.

A compressor is an optax-style bundle of functions built by a factory that closes over its
hyper-parameters::

    c = qsgd(levels=4, bucket=512, seed=rank)
    state = c.init(x)                          # NamedTuple of plain arrays
    payload, state = c.compress(x, state)      # payload.nbytes: bytes on the wire
    c.decompress(payload, out)                 # writes float32 into out and returns it

``compress(x, state, out=None)`` accepts a payload from ``c.empty_payload(d, xp)`` to reuse its
buffers, so a hot loop allocates nothing; the same call builds receive buffers for MPI.
``payload.buffers`` lists the arrays to send, in order. ``compress`` may update the arrays of
``state`` in place (error feedback does, to stay allocation-free) and returns the state to
use next: treat the one passed in as consumed.

Every ``compress`` first checks that its input is finite and raises :class:`NonFiniteError`
otherwise (a NaN must never become a sign bit); the algorithm applies the run's policy.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from mpiopt import kernels
from mpiopt.errors import ConfigError


class NonFiniteError(ValueError):
    """The vector to compress holds NaN or infinity (or would overflow the wire format)."""


class EmptyState(NamedTuple):
    """The state of a stateless compressor."""


class Compressor(NamedTuple):
    """A compressor: its name, hyper-parameters and functions (see the module docstring)."""

    name: str
    params: dict
    init: Callable[[Any], NamedTuple]
    compress: Callable[..., tuple[Any, NamedTuple]]
    decompress: Callable[..., Any]
    empty_payload: Callable[..., Any]


def payload_nbytes(payload) -> int:
    """Return the number of bytes of a payload's wire buffers."""
    return int(sum(b.nbytes for b in payload.buffers))


def init_stateless(x) -> EmptyState:
    """Return the (empty) state of a stateless compressor."""
    return EmptyState()


def check_finite(x, name: str) -> None:
    """Raise :class:`NonFiniteError` unless every element of ``x`` is finite."""
    if not kernels.all_finite(x):
        raise NonFiniteError(f"{name}: the vector to compress is not finite (NaN or inf)")


def flat(x):
    """Return ``x`` as a contiguous 1-D float32 vector or raise ``TypeError``."""
    if x.dtype != np.float32:
        raise TypeError(f"compressors take float32 vectors, got {x.dtype}")
    return kernels.array_module(x).ascontiguousarray(x).reshape(-1)


def output(out, x_like, d: int):
    """Return ``out`` (checked) or a new float32 vector of ``d`` elements beside ``x_like``."""
    xp = kernels.array_module(x_like)
    if out is None:
        return xp.empty(d, np.float32)
    if out.size != d or out.dtype != np.float32:
        raise ValueError(f"out must be a float32 vector of {d} elements, got {out.dtype} "
                         f"{tuple(out.shape)}")
    return out


def check_int(name: str, value, low: int, high: int | None = None) -> int:
    """Return ``value`` if it is an integer in ``[low, high]``, else raise ConfigError."""
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if not ok or value < low or (high is not None and value > high):
        rng = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ConfigError(f"must be an integer in {rng}, got {value!r}", key=name)
    return int(value)


def check_float(name: str, value, low: float, high: float, low_open=True) -> float:
    """Return ``value`` if it is a finite number in ``(low, high]`` (or ``[low, high]``)."""
    ok = isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, bool)
    v = float(value) if ok else float("nan")
    inside = (v > low if low_open else v >= low) and v <= high and np.isfinite(v)
    if not inside:
        rng = (f"{'(' if low_open else '['}{low}, {high}]" if np.isfinite(high)
               else f"{'>' if low_open else '>='} {low} and finite")
        raise ConfigError(f"must be a number in {rng}, got {value!r}", key=name)
    return v


def check_bool(name: str, value) -> bool:
    """Return ``value`` if it is a bool, else raise ConfigError."""
    if not isinstance(value, (bool, np.bool_)):
        raise ConfigError(f"must be true or false, got {value!r}", key=name)
    return bool(value)
