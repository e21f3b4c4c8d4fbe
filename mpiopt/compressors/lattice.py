"""The SwarmSGD lattice scheme: ``z = round(x/eps) mod q``, decoded against a reference."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from mpiopt import kernels
from mpiopt.errors import ConfigError

from .base import (
    Compressor,
    check_finite,
    check_float,
    check_int,
    flat,
    init_stateless,
    output,
    payload_nbytes,
)


class LatticeBoundError(ValueError):
    """The distance bound is (or is about to be) violated: the decoded vector is unusable.

    ``count`` is the number of coordinates in the guard band, ``checksum_ok`` whether the
    lattice checksum matched. The algorithm falls back to a full-precision exchange (and
    counts how often that happens).
    """

    def __init__(self, count: int, checksum_ok: bool, d: int, bound: float):
        self.count = count
        self.checksum_ok = checksum_ok
        what = "checksum mismatch, " if not checksum_ok else ""
        super().__init__(f"lattice decode: {what}{count} of {d} coordinates within eps of the "
                         f"distance bound q*eps/2 = {bound:g}")


class LatticePayload(NamedTuple):
    """Lattice codes (uint16 for ``q = 2**16``, uint8 for ``q <= 2**8``) and their checksum."""

    z: object
    checksum: object  # uint64 host (numpy) array of shape (1,), even for CuPy codes
    d: int

    @property
    def buffers(self):
        return (self.z, self.checksum)

    nbytes = property(payload_nbytes)


def lattice(eps: float, q: int = 1 << 16) -> Compressor:
    """Return the lattice compressor with step ``eps`` and modulus ``q`` (a power of two).

    ``decompress(payload, out, reference=b)`` decodes against the receiver's own vector ``b``.
    It is exact to ``eps/2`` when ``|x - b| < q*eps/2`` in every coordinate, and raises
    :class:`LatticeBoundError` otherwise. A violated bound makes a decoded coordinate jump by
    a multiple of ``q*eps``; two checks catch it: the guard band
    ``|x_hat - b| >= q*eps/2 - eps`` (the requested test: it sees a coordinate that has just
    crossed the bound, and also flags one about to cross) and an 8-byte checksum of the
    lattice points sent with the codes (it sees any jump, whatever its size; see
    :func:`mpiopt.kernels.lattice_decode`). The guard band alone misses a coordinate that
    jumps past the band at once, which is why the checksum is there.
    """
    eps = check_float("eps", eps, 0.0, float("inf"))
    q = check_int("q", q, 2, 1 << 16)
    if q & (q - 1):
        raise ConfigError(f"must be a power of two in [2, 65536], got {q}", key="q")
    dtype = np.uint8 if q <= 256 else np.uint16

    def empty_payload(d, xp=np):
        return LatticePayload(xp.empty(int(d), dtype), np.zeros(1, np.uint64), int(d))

    def compress(x, state, out=None):
        x = flat(x)
        check_finite(x, "lattice")
        payload = out if out is not None else empty_payload(x.size, kernels.array_module(x))
        _, payload.checksum[0] = kernels.lattice_encode(x, eps, q, payload.z)
        return payload, state

    def decompress(payload, out=None, reference=None):
        if reference is None:
            raise TypeError("lattice decompress needs the receiver's reference vector")
        out = output(out, payload.z, payload.d)
        out, count, checksum = kernels.lattice_decode(payload.z, reference, eps, q, out)
        ok = checksum == int(payload.checksum[0])
        if count or not ok:
            raise LatticeBoundError(count, ok, payload.d, q * eps / 2)
        return out

    return Compressor("lattice", {"eps": eps, "q": q}, init_stateless, compress, decompress,
                      empty_payload)
