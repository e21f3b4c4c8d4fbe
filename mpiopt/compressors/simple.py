"""Compressors without kernels of their own: identity, fp16 and top-k sparsification."""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from mpiopt import kernels

from .base import (
    Compressor,
    NonFiniteError,
    check_finite,
    check_float,
    flat,
    init_stateless,
    output,
    payload_nbytes,
)


class DensePayload(NamedTuple):
    """A dense vector on the wire (float32 for identity, float16 for fp16)."""

    values: object
    d: int

    @property
    def buffers(self):
        return (self.values,)

    nbytes = property(payload_nbytes)


class TopKPayload(NamedTuple):
    """The ``k`` largest-magnitude entries: sorted indices (int32 below 2**31) and values."""

    indices: object
    values: object
    d: int

    @property
    def buffers(self):
        return (self.indices, self.values)

    nbytes = property(payload_nbytes)


def _dense_decompress(payload, out=None):
    out = output(out, payload.values, payload.d)
    out[...] = payload.values
    return out


def identity() -> Compressor:
    """Return the identity compressor (float32 on the wire; the baseline)."""

    def empty_payload(d, xp=np):
        return DensePayload(xp.empty(d, np.float32), int(d))

    def compress(x, state, out=None):
        x = flat(x)
        check_finite(x, "identity")
        if out is None:
            return DensePayload(x.copy(), x.size), state
        out.values[...] = x
        return out, state

    return Compressor("identity", {}, init_stateless, compress, _dense_decompress, empty_payload)


def fp16() -> Compressor:
    """Return the half-precision compressor (float16 on the wire; overflow raises)."""

    def empty_payload(d, xp=np):
        return DensePayload(xp.empty(d, np.float16), int(d))

    def compress(x, state, out=None):
        x = flat(x)
        check_finite(x, "fp16")
        xp = kernels.array_module(x)
        payload = out if out is not None else empty_payload(x.size, xp)
        with np.errstate(over="ignore"):  # overflow is detected just below
            payload.values[...] = x
        if not kernels.all_finite(payload.values):
            raise NonFiniteError("fp16: a value overflows float16 (|x| > 65504)")
        return payload, state

    return Compressor("fp16", {}, init_stateless, compress, _dense_decompress, empty_payload)


def topk(ratio: float) -> Compressor:
    """Return top-k sparsification keeping ``ceil(ratio * d)`` largest-magnitude entries."""
    ratio = check_float("ratio", ratio, 0.0, 1.0)

    def count(d):
        return min(d, max(1, math.ceil(ratio * d))) if d else 0

    def empty_payload(d, xp=np):
        k = count(int(d))
        itype = np.int32 if d < 2**31 else np.int64
        return TopKPayload(xp.empty(k, itype), xp.empty(k, np.float32), int(d))

    def compress(x, state, out=None):
        x = flat(x)
        check_finite(x, "topk")
        xp = kernels.array_module(x)
        k = count(x.size)
        idx = xp.argpartition(xp.abs(x), x.size - k)[x.size - k :] if k < x.size else None
        idx = xp.sort(idx) if idx is not None else xp.arange(x.size)
        payload = out if out is not None else empty_payload(x.size, xp)
        payload.indices[...] = idx
        payload.values[...] = x[idx]
        return payload, state

    def decompress(payload, out=None):
        out = output(out, payload.values, payload.d)
        out[...] = 0
        out[payload.indices] = payload.values
        return out

    return Compressor("topk", {"ratio": ratio}, init_stateless, compress, decompress,
                      empty_payload)
