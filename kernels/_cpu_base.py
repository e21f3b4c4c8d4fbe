"""Building blocks of the numba kernels: work split, canonical sums, hash, bit gathering.

Layout of every parallel kernel: the work is cut into blocks, ``prange`` runs one task per
thread over a contiguous span of blocks, and a serial ``@njit`` function does one block on
array *slices*. Slices matter: a loop ``for i in range(n)`` over a slice lets LLVM prove the
index non-negative and vectorise, which an offset loop on the full array does not; plain loops
over 1-D arrays also vectorise where slice assignments on 2-D slices do not. Scratch buffers
are allocated once per thread, never per block. The thread count is passed in (``nth``):
calling ``numba.get_num_threads`` inside a kernel would make it uncacheable.

Functions are compiled on first call (``cache=True`` keeps the machine code on disk); importing
these modules compiles nothing. ``error_model="numpy"`` keeps float division free of checks.
Numba's disk cache checks only the file of the cached function, not the modules it calls:
after editing this module, delete ``kernels/__pycache__/*.nb[ic]`` so that callers recompile.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from ._common import LANES, MIX_A, MIX_B

_SER = {"cache": True, "error_model": "numpy", "nogil": True}
_PAR = dict(_SER, parallel=True)
BLOCK = 1 << 14  # elements per block of the elementwise kernels (a multiple of CHUNK)
VOTE_BLOCK = 512  # bytes per column block of the vote (planes stay in L1)
GATHER = np.uint64(0x8040201008040201)  # moves byte k's low bit to bit 7 - k of the top byte


@njit(**_SER)
def _span(n, t, nt):
    """Return the half-open range of the ``n`` blocks that task ``t`` of ``nt`` owns."""
    per = (n + nt - 1) // nt
    lo = min(n, t * per)
    return lo, min(n, lo + per)


@njit(**_SER)
def _ntasks(nblocks, nt):
    """Return how many tasks to run: one per thread, at most one per block."""
    return min(nt, nblocks)


@njit(**_SER)
def _bits_to_bytes(m, out):
    """Pack the 0/1 bytes ``m`` into ``out`` (numpy.packbits order, tail zero-padded)."""
    n = m.size
    nfull = n // 8
    w = m[: nfull * 8].view(np.uint64)
    for i in range(nfull):
        out[i] = (w[i] * GATHER) >> np.uint64(56)
    if n > nfull * 8:
        b = 0
        for k in range(n - nfull * 8):
            b |= m[nfull * 8 + k] << (7 - k)
        out[nfull] = b


@njit(**_SER)
def _tree(acc):
    """Combine the 32 lane sums by ``acc[j] += acc[j + off]``, off = 16 .. 1; return acc[0]."""
    off = LANES // 2
    while off:
        for j in range(off):
            acc[j] += acc[j + off]
        off //= 2
    return acc[0]


@njit(**_SER)
def _lanesum_sq(v, acc):
    """Return the 32-lane canonical sum of ``v**2`` (float64) of one chunk."""
    acc[:] = 0.0
    nfull = v.size // LANES
    for r in range(nfull):
        vr = v[r * LANES : r * LANES + LANES]
        for j in range(LANES):
            y = np.float64(vr[j])
            acc[j] += y * y
    for j in range(v.size - nfull * LANES):
        y = np.float64(v[nfull * LANES + j])
        acc[j] += y * y
    return _tree(acc)


@njit(**_SER)
def _lanesum(v, acc):
    """Return the 32-lane canonical sum of the float64 values ``v``."""
    acc[:] = 0.0
    nfull = v.size // LANES
    for r in range(nfull):
        vr = v[r * LANES : r * LANES + LANES]
        for j in range(LANES):
            acc[j] += vr[j]
    for j in range(v.size - nfull * LANES):
        acc[j] += v[nfull * LANES + j]
    return _tree(acc)


@njit(**_SER)
def _mix(h):
    """Return ``lowbias32(h)`` (uint32, wrapping)."""
    h = np.uint32(h ^ (h >> np.uint32(16)))
    h = np.uint32(h * np.uint32(MIX_A))
    h = np.uint32(h ^ (h >> np.uint32(15)))
    h = np.uint32(h * np.uint32(MIX_B))
    return np.uint32(h ^ (h >> np.uint32(16)))


@njit(**_SER)
def _wrapsum(v):
    """Return the sum of the uint64 values ``v`` modulo 2**64."""
    acc = np.uint64(0)
    for i in range(v.size):
        acc += v[i]
    return acc
