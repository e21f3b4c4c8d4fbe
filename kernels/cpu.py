"""Numba CPU kernels: the same results as :mod:`.reference`, bit for bit, at memory speed.

Layout of every parallel kernel: the work is cut into blocks, ``prange`` runs one task per
thread over a contiguous span of blocks, and a serial ``@njit`` function does one block on
array *slices*. Slices matter: a loop ``for i in range(n)`` over a slice lets LLVM prove the
index non-negative and vectorise, which an offset loop on the full array does not. Scratch
buffers are allocated once per thread, never per block.

Functions are compiled on first call (``cache=True`` keeps the machine code on disk); importing
this module compiles nothing. ``error_model="numpy"`` keeps float division free of checks.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

from ._common import CHUNK, LANES, MIX_A, MIX_B, U24

_SER = {"cache": True, "error_model": "numpy", "nogil": True}
_PAR = dict(_SER, parallel=True)
BLOCK = 1 << 14  # elements per block of the elementwise kernels (a multiple of CHUNK)
VOTE_BLOCK = 1 << 11  # bytes per column block of the vote (planes stay in L1)
GATHER = np.uint64(0x8040201008040201)  # moves byte k's low bit to bit 7 - k of the top byte


@njit(**_SER)
def _span(n, t, nt):
    """Return the half-open range of the ``n`` blocks that task ``t`` of ``nt`` owns."""
    per = (n + nt - 1) // nt
    lo = min(n, t * per)
    return lo, min(n, lo + per)


@njit(**_SER)
def _ntasks(nblocks, nt):
    return min(nt, nblocks)


# ----------------------------------------------------------------------------------- signs


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
def _pack_block(x, out, tmp):
    m = tmp[: x.size]
    for i in range(x.size):
        m[i] = 0 <= x[i]
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
def _vote_block(stack, planes, carry, out):
    """Count set bits per position in bit-sliced planes, then compare with the threshold."""
    n, w = stack.shape
    m = planes.shape[0]
    planes[:, :w] = 0
    c = carry[:w]
    for r in range(n):
        c[:] = stack[r]
        for k in range(_bit_length(r + 1)):  # ripple-carry add of one row into the counter
            pk = planes[k, :w]
            for i in range(w):
                a = pk[i]
                pk[i] = a ^ c[i]
                c[i] = a & c[i]
    add = (1 << m) - (n + 1) // 2  # count >= ceil(n/2)  <=>  count + add carries out
    c[:] = 0
    for k in range(m):
        pk = planes[k, :w]
        if (add >> k) & 1:
            for i in range(w):
                c[i] = pk[i] | c[i]
        else:
            for i in range(w):
                c[i] = pk[i] & c[i]
    out[:] = c


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
            _vote_block(stack[:, s:e], planes, carry, out[s:e])


def majority_vote(stack, out):
    """Write the packed vote ``sign(sum)`` (ties to +1) of the ``(n, nbytes)`` stack."""
    _majority_vote(stack, out, numba.get_num_threads())


# ------------------------------------------------------------------------- canonical sums


@njit(**_SER)
def _tree(acc):
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


# ---------------------------------------------------------------------------------- QSGD


@njit(**_SER)
def _mix(h):
    h = np.uint32(h ^ (h >> np.uint32(16)))
    h = np.uint32(h * np.uint32(MIX_A))
    h = np.uint32(h ^ (h >> np.uint32(15)))
    h = np.uint32(h * np.uint32(MIX_B))
    return np.uint32(h ^ (h >> np.uint32(16)))


@njit(**_SER)
def _scale(norm, s_f):
    if not norm > 0:
        return np.float32(0)
    sc = s_f / norm
    return sc if sc < np.inf else np.float32(0)


@njit(**_SER)
def _quant_seg(v, i0, sc, s_f, k0, k1, codes):
    """Write the codes of ``v`` (global index of ``v[0]`` is ``i0``) with factor ``sc``."""
    for i in range(v.size):
        r = abs(v[i]) * sc
        if r > s_f:
            r = s_f
        low = np.floor(r)
        h = _mix(np.uint32(_mix(np.uint32(np.uint32(i0 + i) ^ k0)) + k1))
        u = np.float32(h >> np.uint32(8)) * U24
        lev = np.int8(low) + np.int8(u < r - low)
        codes[i] = -lev if v[i] < 0 else lev


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
    scs = np.empty(norms.size, np.float32)
    run = _qsgd_small if bucket <= CHUNK else _qsgd_large
    nib = codes.dtype == np.uint8
    run(x, np.float32(levels), bucket, np.uint32(k0), np.uint32(k1), codes, norms, scs, nib,
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
            c = tmp[: e - s]
            if nib:
                _unnibble(codes[s // 2 : (e + 1) // 2], c)
            else:
                c[:] = codes[s:e]
            i = s
            while i < e:
                b = i // bucket
                j = min(e, (b + 1) * bucket)
                step = norms[b] / s_f
                ci = c[i - s : j - s]
                o = out[i:j]
                for k in range(j - i):
                    o[k] = np.float32(ci[k]) * step
                i = j


def qsgd_dequantize(codes, norms, levels, bucket, out):
    """Write ``code * norm / levels`` per element into ``out``."""
    _dequantize(codes, norms, np.float32(levels), bucket, out, codes.dtype == np.uint8,
                numba.get_num_threads())


# ------------------------------------------------------------------------------- lattice


@njit(**_SER)
def _encode_seg(x, eps, qf, out):
    inv_q = 1.0 / qf
    for i in range(x.size):
        k = np.rint(np.float64(x[i]) / eps)
        out[i] = np.int64(k - qf * np.floor(k * inv_q))


@njit(**_PAR)
def _lattice_encode(x, eps, qf, out, nth):
    d = x.size
    nblk = (d + BLOCK - 1) // BLOCK
    nt = _ntasks(nblk, nth)
    for t in prange(nt):
        lo, hi = _span(nblk, t, nt)
        for b in range(lo, hi):
            s = b * BLOCK
            e = min(d, s + BLOCK)
            _encode_seg(x[s:e], eps, qf, out[s:e])


def lattice_encode(x, eps, q, out):
    """Write ``round(x / eps) mod q`` into ``out``."""
    _lattice_encode(x, float(eps), float(q), out, numba.get_num_threads())


@njit(**_SER)
def _decode_seg(z, ref, eps, qeps, thr, out):
    count = 0
    for i in range(z.size):
        t = eps * np.float64(z[i])
        b = np.float64(ref[i])
        xh = t + qeps * np.rint((b - t) / qeps)
        out[i] = np.float32(xh)
        count += abs(xh - b) >= thr
    return count


@njit(**_PAR)
def _lattice_decode(z, ref, eps, qeps, thr, out, nth):
    d = z.size
    nblk = (d + BLOCK - 1) // BLOCK
    nt = _ntasks(nblk, nth)
    counts = np.zeros(max(nt, 1), np.int64)
    for t in prange(nt):
        lo, hi = _span(nblk, t, nt)
        for b in range(lo, hi):
            s = b * BLOCK
            e = min(d, s + BLOCK)
            counts[t] += _decode_seg(z[s:e], ref[s:e], eps, qeps, thr, out[s:e])
    return counts.sum()


def lattice_decode(z, reference, eps, q, out):
    """Write the decoded vector into ``out``; return how many coordinates hit the guard band."""
    qeps = q * eps
    return int(_lattice_decode(z, reference, float(eps), qeps, qeps * 0.5 - eps, out,
                               numba.get_num_threads()))


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
        p[:] = g
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
        mm[i] = 0 <= p[i]
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
