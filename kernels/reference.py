"""Numpy reference kernels: the oracle every other backend must match bit for bit.

Each function takes validated inputs and preallocated outputs (the public functions in
:mod:`mpiopt.kernels` check and allocate) and writes its result into them. Clarity wins over
speed here, but every float operation is written in the exact order the fast backends use
(see :mod:`mpiopt.kernels._common`).
"""

from __future__ import annotations

import numpy as np

from ._common import CHUNK, K_CLIP, LANES, M_CLIP, MIX_A, MIX_B, U24, vote_threshold


def lanesum(v: np.ndarray) -> np.ndarray:
    """Return the 32-lane canonical sum of each row of the float64 array ``v`` (R, L)."""
    rows, length = v.shape
    pad = (-length) % LANES
    if pad:
        v = np.concatenate([v, np.zeros((rows, pad))], axis=1)
    v = v.reshape(rows, -1, LANES)
    acc = np.zeros((rows, LANES))
    for m in range(v.shape[1]):  # lane j adds its elements strictly in order
        acc += v[:, m, :]
    off = LANES // 2
    while off:
        acc[:, :off] += acc[:, off : 2 * off]
        off //= 2
    return acc[:, 0].copy()


def csum_rows(v: np.ndarray) -> np.ndarray:
    """Return the canonical sum of each row of the float64 array ``v``: chunks, then lanes."""
    rows, length = v.shape
    if length <= CHUNK:  # one chunk: the outer lane sum of a single value is that value
        return lanesum(v)
    nch = -(-length // CHUNK)
    v = np.concatenate([v, np.zeros((rows, nch * CHUNK - length))], axis=1)
    partial = lanesum(v.reshape(rows * nch, CHUNK)).reshape(rows, nch)
    return lanesum(partial)


def csum_segments(v: np.ndarray, seg: int) -> np.ndarray:
    """Return the canonical sums of consecutive segments of ``seg`` elements of ``v``."""
    full = v.size // seg
    parts = [csum_rows(v[: full * seg].reshape(full, seg))] if full else []
    if v.size > full * seg:
        parts.append(csum_rows(v[full * seg :].reshape(1, -1)))
    return np.concatenate(parts) if parts else np.zeros(0)


def mix32(h: np.ndarray) -> np.ndarray:
    """Return ``lowbias32(h)`` of a uint32 array (wrapping arithmetic)."""
    h = h ^ (h >> 16)
    h = h * np.uint32(MIX_A)
    h = h ^ (h >> 15)
    h = h * np.uint32(MIX_B)
    return h ^ (h >> 16)


def uniform(index: np.ndarray, k0: int, k1: int) -> np.ndarray:
    """Return the float32 uniforms in [0, 1) of the uint32 ``index`` for keys ``(k0, k1)``."""
    h = mix32(mix32(index ^ np.uint32(k0)) + np.uint32(k1))
    return (h >> 8).astype(np.float32) * U24


def pack_signs(x, out):
    """Write the packed bits of ``x >= 0`` into ``out``."""
    out[:] = np.packbits(x >= 0)


def unpack_signs(packed, d, scale, out):
    """Write ``+scale`` for set bits and ``-scale`` for clear bits of ``packed`` into ``out``."""
    s = np.float32(scale)
    out[:] = np.where(np.unpackbits(packed, count=d).astype(bool), s, -s)


def majority_vote(stack, out):
    """Write the packed vote ``sign(sum)`` (ties to +1) of the ``(n, nbytes)`` stack."""
    counts = np.unpackbits(stack, axis=1).sum(axis=0, dtype=np.int64)
    out[:] = np.packbits(counts >= vote_threshold(stack.shape[0]))


def qsgd_scales(norms, levels):
    """Return the per-bucket float64 factor ``levels / norm`` (0 for a zero norm)."""
    return np.divide(float(levels), norms.astype(np.float64), out=np.zeros(norms.size),
                     where=norms > 0)


def nibble_pack(codes, out):
    """Write signed 4-bit ``codes`` two per byte (first element in the high nibble)."""
    c = (codes.astype(np.uint8) & np.uint8(0xF))
    if c.size % 2:
        c = np.append(c, np.uint8(0))
    out[:] = (c[0::2] << 4) | c[1::2]


def nibble_unpack(packed, d):
    """Return the signed int8 codes of ``d`` 4-bit values packed two per byte."""
    c = np.empty(2 * packed.size, np.int16)
    c[0::2] = packed >> 4
    c[1::2] = packed & 0xF
    c = c[:d]
    return np.where(c >= 8, c - 16, c).astype(np.int8)


def qsgd_quantize(x, levels, bucket, k0, k1, codes, norms):
    """Write QSGD codes (int8, or uint8 nibbles) and float32 bucket norms of ``x``."""
    d = x.size
    norms[:] = np.sqrt(csum_segments(x.astype(np.float64) ** 2, bucket)).astype(np.float32)
    sc = np.repeat(qsgd_scales(norms, levels), bucket)[:d]
    r = np.minimum(np.abs(x).astype(np.float64) * sc, float(levels))
    low = np.floor(r)
    u = uniform(np.arange(d, dtype=np.uint32), k0, k1).astype(np.float64)
    lev = low.astype(np.int8) + (u < (r - low)).astype(np.int8)
    c = np.where(np.signbit(x), -lev, lev).astype(np.int8)
    if codes.dtype == np.uint8:
        nibble_pack(c, codes)
    else:
        codes[:] = c


def qsgd_dequantize(codes, norms, levels, bucket, out):
    """Write ``code * norm / levels`` per element into ``out``."""
    d = out.size
    c = nibble_unpack(codes, d) if codes.dtype == np.uint8 else codes
    step = np.repeat(norms.astype(np.float64) / levels, bucket)[:d]
    out[:] = (c.astype(np.float64) * step).astype(np.float32)


def checksum(k: np.ndarray) -> int:
    """Return ``sum(k_i * w_i) mod 2**64`` of int64 lattice points, ``w_i = lowbias32(i) | 1``."""
    w = mix32(np.arange(k.size, dtype=np.uint32)).astype(np.uint64) | np.uint64(1)
    return int(np.sum(k.astype(np.uint64) * w, dtype=np.uint64))


def lattice_encode(x, eps, q, out):
    """Write ``round(x / eps) mod q`` into ``out``; return the checksum of ``round(x / eps)``."""
    k = np.rint(x.astype(np.float64) / eps)
    out[:] = (k - q * np.floor(k * (1.0 / q))).astype(out.dtype)
    return checksum(np.clip(k, -K_CLIP, K_CLIP).astype(np.int64))


def lattice_decode(z, reference, eps, q, out):
    """Write the decoded vector into ``out``; return the guard-band count and the checksum."""
    qeps = q * eps
    t = eps * z.astype(np.float64)
    b = reference.astype(np.float64)
    m = np.rint((b - t) / qeps)
    xh = t + qeps * m
    out[:] = xh.astype(np.float32)
    suspects = int(np.count_nonzero(np.abs(xh - b) >= qeps * 0.5 - eps))
    k = z.astype(np.int64) + q * np.clip(m, -M_CLIP, M_CLIP).astype(np.int64)
    return suspects, checksum(k)


def ef_sign_compress(g, error, out_packed):
    """Pack ``sign(g + e)``, set ``e`` to the residual; return the scale ``|g + e|_1 / d``."""
    p = g + error if error is not None else g
    total = csum_segments(np.abs(p).astype(np.float64), max(p.size, 1))
    scale = np.float32(total[0] / p.size) if p.size else np.float32(0)
    out_packed[:] = np.packbits(p >= 0)
    if error is not None:
        error[:] = p - np.where(p >= 0, scale, -scale)
    return float(scale)


def all_finite(x):
    """Return whether every element of ``x`` is finite."""
    return bool(np.isfinite(x).all())


# ------------------------------------------------------------------------ LDA (variational)
# The LDA kernels are the exception to bit-for-bit agreement: their sums are dot products over
# topics and documents, which numpy (BLAS) and numba add in different orders, and exp/log
# differ by an ulp between libraries. The backends agree to rounding (relative 1e-9 in the
# tests), on the same iterations when the convergence test is not at the edge of ``tol``.

ESTEP_FLOOR = 1e-100  # added to every phi normaliser, as in Hoffman et al.'s code


def digamma(x: np.ndarray) -> np.ndarray:
    """Return the digamma function of the float64 array ``x`` (``x > 0``), to about 1e-12.

    The recurrence ``psi(x) = psi(x + 1) - 1/x`` lifts ``x`` to at least 6, where the
    asymptotic series to ``x**-10`` is accurate to double precision.
    """
    x = np.array(x, dtype=np.float64)
    out = np.zeros_like(x)
    low = x < 6.0
    while low.any():
        out[low] -= 1.0 / x[low]
        x[low] += 1.0
        low = x < 6.0
    f = 1.0 / (x * x)
    tail = f * (-1.0 / 12 + f * (1.0 / 120 + f * (-1.0 / 252 + f * (1.0 / 240 + f * (-1.0 / 132)))))
    return out + np.log(x) - 0.5 / x + tail


def _exp_elog_theta(g: np.ndarray) -> np.ndarray:
    """Return ``exp(E[log theta])`` under Dirichlet(``g``)."""
    return np.exp(digamma(g) - digamma(np.array(g.sum())))


def lda_estep(indptr, ids, counts, exp_elog_beta, alpha, gamma, max_iter, tol, sstats):
    """Fit every document's variational Dirichlet ``gamma`` with the topics fixed.

    Hoffman et al.'s E-step, one document at a time: with ``t = exp(E[log theta])`` of the
    current ``gamma_d`` and ``b_n`` the row of ``exp_elog_beta`` of the document's word
    ``n``, repeat ``gamma_d <- alpha + t * sum_n c_n b_n / (t . b_n)`` until the mean absolute
    change of ``gamma_d`` is below ``tol`` or ``max_iter`` updates were made. Then
    ``sstats[w] += c_n t / (t . b_n)`` for each word (the caller multiplies by
    ``exp_elog_beta`` to get the expected topic-word counts). Returns the number of updates.
    An empty document gets ``gamma_d = alpha``.
    """
    if sstats is not None:
        sstats[...] = 0.0
    total = 0
    for d in range(len(indptr) - 1):
        lo, hi = indptr[d], indptr[d + 1]
        if lo == hi:
            gamma[d] = alpha
            continue
        eb, c = exp_elog_beta[ids[lo:hi]], counts[lo:hi]
        g = gamma[d].copy()
        t = _exp_elog_theta(g)
        for _ in range(max_iter):
            new = alpha + t * ((c / (eb @ t + ESTEP_FLOOR)) @ eb)
            change = np.abs(new - g).mean()
            g = new
            t = _exp_elog_theta(g)
            total += 1
            if change < tol:
                break
        gamma[d] = g
        if sstats is not None:
            np.add.at(sstats, ids[lo:hi], np.outer(c / (eb @ t + ESTEP_FLOOR), t))
    return total


def lda_loglik(indptr, ids, counts, theta, beta):
    """Return ``sum_d sum_n c_n log(theta_d . beta_n)``: the words' log-likelihood (float)."""
    docs = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
    p = np.einsum("nk,nk->n", theta[docs], beta[ids])
    return float(counts @ np.log(p))
