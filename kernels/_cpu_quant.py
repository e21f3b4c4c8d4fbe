"""Numba kernels of QSGD and of the lattice scheme (see :mod:`._cpu_base` for the layout)."""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

from ._common import CHUNK, K_CLIP, LANES, M_CLIP, U24
from ._cpu_base import (
    _PAR,
    _SER,
    BLOCK,
    _lanesum,
    _lanesum_sq,
    _mix,
    _ntasks,
    _span,
    _wrapsum,
)

# ---------------------------------------------------------------------------------- QSGD


@njit(**_SER)
def _scale(norm, s):
    return s / np.float64(norm) if norm > 0 else 0.0


@njit(**_SER)
def _quant_seg(v, i0, sc, s_f, k0, k1, codes):
    """Write the codes of ``v`` (global index of ``v[0]`` is ``i0``) with factor ``sc``."""
    for i in range(v.size):
        r = np.float64(abs(v[i])) * sc
        if r > s_f:
            r = s_f
        low = np.floor(r)
        h = _mix(np.uint32(_mix(np.uint32(np.uint32(i0 + i) ^ k0)) + k1))
        u = np.float64(h >> np.uint32(8)) * U24
        lev = np.int8(low) + np.int8(u < r - low)
        codes[i] = -lev if v[i] < 0 else lev  # -0.0 has lev 0: same as testing the sign bit


@njit(**_SER)
def _nibbles(c, out):
    """Pack the int8 codes ``c`` two per byte (first in the high nibble)."""
    half = c.size // 2
    for i in range(half):
        out[i] = ((np.uint8(c[2 * i]) & np.uint8(15)) << 4) | (np.uint8(c[2 * i + 1]) & 15)
    if c.size % 2:
        out[half] = (np.uint8(c[c.size - 1]) & np.uint8(15)) << 4


@njit(**_SER)
def _quant_range(x, lo, hi, bucket, scs, s_f, k0, k1, codes):
    """Write the codes of ``x[lo:hi]`` into ``codes`` (length ``hi - lo``), bucket by bucket."""
    i = lo
    while i < hi:
        b = i // bucket
        e = min(hi, (b + 1) * bucket)
        _quant_seg(x[i:e], i, scs[b], s_f, k0, k1, codes[i - lo : e - lo])
        i = e


@njit(**_SER)
def _emit(x, lo, hi, bucket, scs, s_f, k0, k1, codes, tmp, nib):
    """Quantize ``x[lo:hi]`` into int8 ``codes`` or, when ``nib``, into uint8 nibbles."""
    if not nib:
        _quant_range(x, lo, hi, bucket, scs, s_f, k0, k1, codes[lo:hi])
    else:
        _quant_range(x, lo, hi, bucket, scs, s_f, k0, k1, tmp)
        _nibbles(tmp[: hi - lo], codes[lo // 2 : (hi + 1) // 2])


@njit(**_PAR)
def _qsgd_small(x, s_f, bucket, k0, k1, codes, norms, scs, nib, nth):
    """Quantize with buckets of at most CHUNK elements: norm and codes while in L1."""
    d = x.size
    per = max(1, BLOCK // bucket)
    per += per % 2 if bucket % 2 else 0  # a block start must be even for nibble output
    nblk = (norms.size + per - 1) // per
    nt = _ntasks(nblk, nth)
    for t in prange(nt):
        acc = np.empty(LANES)
        tmp = np.empty(per * bucket, np.int8)
        lo, hi = _span(nblk, t, nt)
        for blk in range(lo, hi):
            b0 = blk * per
            b1 = min(norms.size, b0 + per)
            for b in range(b0, b1):
                s = b * bucket
                norm = np.float32(np.sqrt(_lanesum_sq(x[s : min(d, s + bucket)], acc)))
                norms[b] = norm
                scs[b] = _scale(norm, s_f)
            _emit(x, b0 * bucket, min(d, b1 * bucket), bucket, scs, s_f, k0, k1, codes, tmp,
                  nib)


@njit(**_PAR)
def _qsgd_large(x, s_f, bucket, k0, k1, codes, norms, scs, nib, nth):
    """Quantize with buckets longer than CHUNK: chunk partials, norms, then codes."""
    d = x.size
    nb = norms.size
    cpb = (bucket + CHUNK - 1) // CHUNK
    partials = np.zeros((nb, cpb))
    nt = _ntasks(nb * cpb, nth)
    for t in prange(nt):
        acc = np.empty(LANES)
        lo, hi = _span(nb * cpb, t, nt)
        for idx in range(lo, hi):
            b, c = divmod(idx, cpb)
            s = b * bucket + c * CHUNK
            e = min(d, b * bucket + bucket, s + CHUNK)
            if s < e:
                partials[b, c] = _lanesum_sq(x[s:e], acc)
    acc = np.empty(LANES)
    for b in range(nb):  # zero partials past the end of the last bucket add nothing
        norms[b] = np.float32(np.sqrt(_lanesum(partials[b], acc)))
        scs[b] = _scale(norms[b], s_f)
    nblk = (d + BLOCK - 1) // BLOCK
    nt = _ntasks(nblk, nth)
    for t in prange(nt):
        tmp = np.empty(BLOCK, np.int8)
        lo, hi = _span(nblk, t, nt)
        for blk in range(lo, hi):
            _emit(x, blk * BLOCK, min(d, blk * BLOCK + BLOCK), bucket, scs, s_f, k0, k1,
                  codes, tmp, nib)


def qsgd_quantize(x, levels, bucket, k0, k1, codes, norms):
    """Write QSGD codes (int8, or uint8 nibbles) and float32 bucket norms of ``x``."""
    scs = np.empty(norms.size, np.float64)
    run = _qsgd_small if bucket <= CHUNK else _qsgd_large
    nib = codes.dtype == np.uint8
    run(x, np.float64(levels), bucket, np.uint32(k0), np.uint32(k1), codes, norms, scs, nib,
        numba.get_num_threads())


@njit(**_SER)
def _unnibble(p, out):
    for i in range(out.size // 2):
        b = p[i]
        hi = np.int8(b >> 4)
        lo = np.int8(b & 15)
        out[2 * i] = hi - 16 if hi >= 8 else hi
        out[2 * i + 1] = lo - 16 if lo >= 8 else lo
    if out.size % 2:
        hi = np.int8(p[out.size // 2] >> 4)
        out[out.size - 1] = hi - 16 if hi >= 8 else hi


@njit(**_SER)
def _deq_range(c, lo, hi, bucket, norms, s_f, out):
    """Write ``c * norm / levels`` for the elements ``lo:hi`` (codes ``c`` start at ``lo``)."""
    i = lo
    while i < hi:
        b = i // bucket
        j = min(hi, (b + 1) * bucket)
        step = np.float64(norms[b]) / s_f
        ci = c[i - lo : j - lo]
        o = out[i:j]
        for k in range(j - i):
            o[k] = np.float32(np.float64(ci[k]) * step)
        i = j


@njit(**_PAR)
def _dequantize(codes, norms, s_f, bucket, out, nib, nth):
    d = out.size
    nblk = (d + BLOCK - 1) // BLOCK
    nt = _ntasks(nblk, nth)
    for t in prange(nt):
        tmp = np.empty(BLOCK, np.int8)
        lo, hi = _span(nblk, t, nt)
        for blk in range(lo, hi):
            s = blk * BLOCK
            e = min(d, s + BLOCK)
            if nib:
                _unnibble(codes[s // 2 : (e + 1) // 2], tmp[: e - s])
                _deq_range(tmp, s, e, bucket, norms, s_f, out)
            else:
                _deq_range(codes[s:e], s, e, bucket, norms, s_f, out)


def qsgd_dequantize(codes, norms, levels, bucket, out):
    """Write ``code * norm / levels`` per element into ``out``."""
    _dequantize(codes, norms, np.float64(levels), bucket, out, codes.dtype == np.uint8,
                numba.get_num_threads())


# ------------------------------------------------------------------------------- lattice


@njit(**_SER)
def _weight(i):
    """Return the odd checksum weight of element ``i``."""
    return np.uint64(_mix(np.uint32(i))) | np.uint64(1)


@njit(**_SER)
def _encode_seg(x, i0, eps, qf, out):
    inv_q = 1.0 / qf
    acc = np.uint64(0)
    for i in range(x.size):
        k = np.rint(np.float64(x[i]) / eps)
        out[i] = np.int64(k - qf * np.floor(k * inv_q))
        kc = np.int64(min(max(k, -K_CLIP), K_CLIP))
        acc += np.uint64(kc) * _weight(i0 + i)
    return acc


@njit(**_PAR)
def _lattice_encode(x, eps, qf, out, nth):
    d = x.size
    nblk = (d + BLOCK - 1) // BLOCK
    nt = _ntasks(nblk, nth)
    sums = np.zeros(max(nt, 1), np.uint64)
    for t in prange(nt):
        lo, hi = _span(nblk, t, nt)
        for b in range(lo, hi):
            s = b * BLOCK
            e = min(d, s + BLOCK)
            sums[t] += _encode_seg(x[s:e], s, eps, qf, out[s:e])
    return _wrapsum(sums)


def lattice_encode(x, eps, q, out):
    """Write ``round(x / eps) mod q`` into ``out``; return the checksum of ``round(x / eps)``."""
    return int(_lattice_encode(x, float(eps), float(q), out, numba.get_num_threads()))


@njit(**_SER)
def _decode_seg(z, ref, i0, eps, q, thr, out):
    qeps = q * eps
    count = 0
    acc = np.uint64(0)
    for i in range(z.size):
        t = eps * np.float64(z[i])
        b = np.float64(ref[i])
        m = np.rint((b - t) / qeps)
        xh = t + qeps * m
        out[i] = np.float32(xh)
        count += abs(xh - b) >= thr
        k = np.int64(z[i]) + q * np.int64(min(max(m, -M_CLIP), M_CLIP))
        acc += np.uint64(k) * _weight(i0 + i)
    return count, acc


@njit(**_PAR)
def _lattice_decode(z, ref, eps, q, thr, out, nth):
    d = z.size
    nblk = (d + BLOCK - 1) // BLOCK
    nt = _ntasks(nblk, nth)
    counts = np.zeros(max(nt, 1), np.int64)
    sums = np.zeros(max(nt, 1), np.uint64)
    for t in prange(nt):
        lo, hi = _span(nblk, t, nt)
        for b in range(lo, hi):
            s = b * BLOCK
            e = min(d, s + BLOCK)
            c, a = _decode_seg(z[s:e], ref[s:e], s, eps, q, thr, out[s:e])
            counts[t] += c
            sums[t] += a
    return counts.sum(), _wrapsum(sums)


def lattice_decode(z, reference, eps, q, out):
    """Write the decoded vector into ``out``; return the guard-band count and the checksum."""
    thr = q * eps * 0.5 - eps
    count, cs = _lattice_decode(z, reference, float(eps), int(q), thr, out,
                                numba.get_num_threads())
    return int(count), int(cs)
