"""Numba CPU kernels: the same results as :mod:`.reference`, bit for bit, at memory speed.

This module holds the sign kernels (pack, unpack, vote, fused error feedback), the finiteness
check and the thread settings, and re-exports the QSGD and lattice kernels of
:mod:`._cpu_quant`; :mod:`._cpu_base` explains the layout shared by all of them.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

from ._common import CHUNK, LANES
from ._cpu_base import (
    _PAR,
    _SER,
    BLOCK,
    VOTE_BLOCK,
    _bits_to_bytes,
    _lanesum,
    _ntasks,
    _span,
    _tree,
)
from ._cpu_lda import digamma, lda_estep, lda_loglik
from ._cpu_quant import lattice_decode, lattice_encode, qsgd_dequantize, qsgd_quantize

__all__ = [
    "all_finite", "digamma", "ef_sign_compress", "get_num_threads", "lattice_decode",
    "lattice_encode", "lda_estep", "lda_loglik", "majority_vote", "pack_signs",
    "parallel_copy", "qsgd_dequantize", "qsgd_quantize", "set_num_threads", "unpack_signs",
]

# ----------------------------------------------------------------------------------- signs


@njit(**_SER)
def _pack_block(x, out, tmp):
    m = tmp[: x.size]
    for i in range(x.size):
        m[i] = np.float32(0) <= x[i]
    _bits_to_bytes(m, out)


@njit(**_PAR)
def _pack_signs(x, out, nth):
    d = x.size
    nblk = (d + BLOCK - 1) // BLOCK
    nt = _ntasks(nblk, nth)
    for t in prange(nt):
        tmp = np.empty(BLOCK, np.uint8)
        lo, hi = _span(nblk, t, nt)
        for b in range(lo, hi):
            s = b * BLOCK
            e = min(d, s + BLOCK)
            _pack_block(x[s:e], out[s // 8 : (e + 7) // 8], tmp)


def pack_signs(x, out):
    """Write the packed bits of ``x >= 0`` into ``out``."""
    _pack_signs(x, out, numba.get_num_threads())


@njit(**_SER)
def _unpack_block(packed, s, out):
    nfull = out.size // 8
    for j in range(nfull):
        b = packed[j]
        o = out[8 * j : 8 * j + 8]
        for k in range(8):
            o[k] = s if (b >> (7 - k)) & 1 else -s
    for i in range(nfull * 8, out.size):
        out[i] = s if (packed[i >> 3] >> (7 - (i & 7))) & 1 else -s


@njit(**_PAR)
def _unpack_signs(packed, d, s, out, nth):
    nblk = (d + BLOCK - 1) // BLOCK
    nt = _ntasks(nblk, nth)
    for t in prange(nt):
        lo, hi = _span(nblk, t, nt)
        for b in range(lo, hi):
            st = b * BLOCK
            e = min(d, st + BLOCK)
            _unpack_block(packed[st // 8 : (e + 7) // 8], s, out[st:e])


def unpack_signs(packed, d, scale, out):
    """Write ``+scale`` for set bits and ``-scale`` for clear bits of ``packed`` into ``out``."""
    _unpack_signs(packed, d, np.float32(scale), out, numba.get_num_threads())


@njit(**_SER)
def _bit_length(v):
    n = 0
    while v:
        n += 1
        v >>= 1
    return n


@njit(**_SER)
def _vote_block(stack, lo, hi, planes, c, out):
    """Count set bits per position in bit-sliced planes, then compare with the threshold.

    Plane ``k`` holds bit ``k`` of the count of every bit position of ``stack[:, lo:hi]``;
    adding a row is a ripple-carry add on whole bytes (8 positions per byte, 64 per lane).
    Plain loops over 1-D rows: numba vectorises these, not slice assignments on 2-D slices.
    """
    n = stack.shape[0]
    w = hi - lo
    m = planes.shape[0]
    for k in range(m):
        pk = planes[k]
        for i in range(w):
            pk[i] = 0
    for r in range(n):
        row = stack[r, lo:hi]
        for i in range(w):
            c[i] = row[i]
        for k in range(_bit_length(r + 1)):  # the count after r + 1 rows fits these planes
            pk = planes[k]
            for i in range(w):
                a = pk[i]
                pk[i] = a ^ c[i]
                c[i] = a & c[i]
    add = (1 << m) - (n + 1) // 2  # count >= ceil(n/2)  <=>  count + add carries out
    for i in range(w):
        c[i] = 0
    for k in range(m):
        pk = planes[k]
        if (add >> k) & 1:
            for i in range(w):
                c[i] = pk[i] | c[i]
        else:
            for i in range(w):
                c[i] = pk[i] & c[i]
    o = out[lo:hi]
    for i in range(w):
        o[i] = c[i]


@njit(**_PAR)
def _majority_vote(stack, out, nth):
    n, nbytes = stack.shape
    m = _bit_length(n)
    nblk = (nbytes + VOTE_BLOCK - 1) // VOTE_BLOCK
    nt = _ntasks(nblk, nth)
    for t in prange(nt):
        planes = np.empty((m, VOTE_BLOCK), np.uint8)
        carry = np.empty(VOTE_BLOCK, np.uint8)
        lo, hi = _span(nblk, t, nt)
        for b in range(lo, hi):
            s = b * VOTE_BLOCK
            e = min(nbytes, s + VOTE_BLOCK)
            _vote_block(stack, s, e, planes, carry, out)


def majority_vote(stack, out):
    """Write the packed vote ``sign(sum)`` (ties to +1) of the ``(n, nbytes)`` stack."""
    _majority_vote(stack, out, numba.get_num_threads())


# --------------------------------------------------------------------- error feedback, misc


@njit(**_SER)
def _ef_chunk(g, err, has_err, out, acc, m, pbuf):
    """Set ``p = g + e`` (stored in ``e``), pack ``p >= 0``; return the lane sum of ``|p|``."""
    n = g.size
    p = pbuf[:n]
    if has_err:
        for i in range(n):
            p[i] = g[i] + err[i]
            err[i] = p[i]
    else:
        for i in range(n):
            p[i] = g[i]
    acc[:] = 0.0
    nfull = n // LANES
    for r in range(nfull):
        pr = p[r * LANES : r * LANES + LANES]
        for j in range(LANES):
            acc[j] += np.float64(abs(pr[j]))
    for j in range(n - nfull * LANES):
        acc[j] += np.float64(abs(p[nfull * LANES + j]))
    mm = m[:n]
    for i in range(n):
        mm[i] = np.float32(0) <= p[i]
    _bits_to_bytes(mm, out)
    return _tree(acc)


@njit(**_SER)
def _residual(err, scale):
    for i in range(err.size):
        v = err[i]
        err[i] = v - scale if v >= 0 else v + scale


@njit(**_PAR)
def _ef_sign(g, err, has_err, out, nth):
    d = g.size
    nch = (d + CHUNK - 1) // CHUNK
    partials = np.zeros(nch)
    nt = _ntasks(nch, nth)
    for t in prange(nt):
        acc = np.empty(LANES)
        m = np.empty(CHUNK, np.uint8)
        pbuf = np.empty(CHUNK, np.float32)
        lo, hi = _span(nch, t, nt)
        for c in range(lo, hi):
            s = c * CHUNK
            e = min(d, s + CHUNK)
            ec = err[s:e] if has_err else err[:0]
            partials[c] = _ef_chunk(g[s:e], ec, has_err, out[s // 8 : (e + 7) // 8], acc, m,
                                    pbuf)
    scale = np.float32(_lanesum(partials, np.empty(LANES)) / d) if d else np.float32(0)
    if has_err:
        nblk = (d + BLOCK - 1) // BLOCK
        nt = _ntasks(nblk, nth)
        for t in prange(nt):
            lo, hi = _span(nblk, t, nt)
            for b in range(lo, hi):
                _residual(err[b * BLOCK : min(d, b * BLOCK + BLOCK)], scale)
    return scale


def ef_sign_compress(g, error, out_packed):
    """Pack ``sign(g + e)``, set ``e`` to the residual; return the scale ``|g + e|_1 / d``."""
    err = error if error is not None else np.empty(0, g.dtype)
    return float(_ef_sign(g, err, error is not None, out_packed, numba.get_num_threads()))


@njit(**_SER)
def _max_exponent(u, mask):
    m = mask ^ mask
    for i in range(u.size):
        m = max(m, u[i] & mask)
    return m


@njit(**_PAR)
def _finite_bits(u, mask, nth):
    d = u.size
    nblk = (d + BLOCK - 1) // BLOCK
    nt = _ntasks(nblk, nth)
    bad = np.zeros(max(nt, 1), np.bool_)
    for t in prange(nt):
        lo, hi = _span(nblk, t, nt)
        for b in range(lo, hi):
            if _max_exponent(u[b * BLOCK : min(d, b * BLOCK + BLOCK)], mask) == mask:
                bad[t] = True
                break
    return not bad.any()


def all_finite(x):
    """Return whether every element of ``x`` is finite (exponent bits not all ones)."""
    if x.dtype == np.float32:
        bits, mask = x.reshape(-1).view(np.uint32), np.uint32(0x7F800000)
    elif x.dtype == np.float64:
        bits, mask = x.reshape(-1).view(np.uint64), np.uint64(0x7FF0000000000000)
    else:
        return bool(np.isfinite(x).all())
    return bool(_finite_bits(bits, mask, numba.get_num_threads()))


@njit(**_SER)
def _copy_block(src, dst):
    for i in range(src.size):
        dst[i] = src[i]


@njit(**_PAR)
def _parallel_copy(src, dst, nth):
    d = src.size
    nblk = (d + BLOCK - 1) // BLOCK
    nt = _ntasks(nblk, nth)
    for t in prange(nt):
        lo, hi = _span(nblk, t, nt)
        for b in range(lo, hi):
            e = min(d, b * BLOCK + BLOCK)
            _copy_block(src[b * BLOCK : e], dst[b * BLOCK : e])


def parallel_copy(src, dst):
    """Copy ``src`` into ``dst`` with the numba threads (the benchmark's bandwidth probe)."""
    _parallel_copy(src, dst, numba.get_num_threads())


def set_num_threads(n: int) -> None:
    """Set the number of numba threads used by the parallel kernels."""
    numba.set_num_threads(n)


def get_num_threads() -> int:
    """Return the number of numba threads the parallel kernels use."""
    return numba.get_num_threads()
