"""Per-element hot paths of the compressed algorithms, on numpy, numba and CuPy arrays.

Every kernel has one signature and three implementations: :mod:`.reference` (numpy, the
oracle), :mod:`.cpu` (numba, compiled on first call, cached on disk, parallel) and :mod:`.gpu`
(CuPy raw kernels, compiled on first call, memoised per device). They agree bit for bit.
Dispatch follows the input: a CuPy array runs on its device; a numpy array runs the numba
kernel, or the numpy reference when it is shorter than :data:`SMALL` (:data:`SMALL_SIGNS` for
unpacking and voting, :data:`SMALL_STREAMING` for pack and the finiteness check). Below those
sizes numba gains at most tens of microseconds a call, while loading it (import, threading
layer, cached machine code) costs about 0.75 s per process: a run on a small model never
imports numba. Algorithms that will run numba kernels load them before their clock starts
(:func:`preload`).
``backend="numpy" | "numba" | "cupy"`` forces one. Every kernel takes ``out=`` so that a hot
loop allocates nothing.

LDA's variational E-step (:func:`lda_estep`), the words' log-likelihood under given topics
(:func:`lda_loglik`) and :func:`digamma` run on the host only (numpy and numba), and agree to
rounding rather than bit for bit (see :mod:`.reference`); they dispatch to numba at any size,
as their per-document loops are slow in numpy whatever the size.

Importing this package imports neither numba nor CuPy and compiles nothing.

Conventions: vectors are 1-D float32; ``sign(0) = +1`` (bit set for ``x >= 0``, ``-0.0``
included); bits are packed in ``numpy.packbits`` order (element 0 is the most significant bit
of byte 0) and the tail of the last byte is zero; a tied vote is +1. Non-finite values are not
checked here (NaN packs as -1): callers check with :func:`all_finite` first.
"""

from __future__ import annotations

import importlib
import os
import sys

import numpy as np

from mpiopt.errors import ConfigError, MissingDependency

from . import reference
from ._common import (
    BACKENDS,
    check_eps,
    check_qsgd,
    derive_seed,
    hash_keys,
    lattice_dtype,
    nbytes_nibbles,
    nbytes_signs,
)

__all__ = [
    "BACKENDS",
    "SMALL",
    "SMALL_SIGNS",
    "SMALL_STREAMING",
    "all_finite",
    "array_module",
    "derive_seed",
    "digamma",
    "ef_sign_compress",
    "get_num_threads",
    "is_cupy",
    "lattice_decode",
    "lattice_encode",
    "lda_estep",
    "lda_loglik",
    "majority_vote",
    "nbytes_nibbles",
    "nbytes_signs",
    "pack_signs",
    "qsgd_dequantize",
    "qsgd_quantize",
    "set_num_threads",
    "thread_limit",
    "unpack_signs",
]

# Below these sizes the numpy reference runs instead of numba (figures: docs/benchmarks.md,
# "Kernel dispatch"). The quantizers gain 40-270 us a call from numba already at 5K elements;
# unpacking and voting gain under 15 us there (numpy has near-fused routines for them) and
# pack and the finiteness check nothing until far larger.
SMALL = 1 << 10  # qsgd, lattice, ef_sign_compress: elements
SMALL_SIGNS = 1 << 14  # unpack_signs: elements; majority_vote: voters x elements / 8
SMALL_STREAMING = 1 << 17  # pack_signs (numpy.packbits) and all_finite (numpy.isfinite)

_cpu_module = None  # the numba kernels (kernels/cpu.py), imported by the first kernel call
_threads: int | None = None  # the thread count asked for, applied when numba is loaded


def is_cupy(x) -> bool:
    """Return whether ``x`` is a CuPy array (without importing CuPy)."""
    return type(x).__module__.split(".")[0] == "cupy"


def array_module(x):
    """Return ``cupy`` for a CuPy array, else ``numpy``."""
    return importlib.import_module("cupy") if is_cupy(x) else np


def _gpu():
    try:
        importlib.import_module("cupy")
    except ImportError as exc:
        raise MissingDependency("the CuPy kernels", "cupy", "gpu") from exc
    return importlib.import_module(".gpu", __name__)


def _impl(x, size: int, backend: str | None, small: int = SMALL):
    """Return the backend module that runs a kernel on ``x`` of ``size`` elements."""
    gpu = is_cupy(x)
    if backend is None:
        backend = "cupy" if gpu else ("numba" if size >= small else "numpy")
    elif backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if gpu != (backend == "cupy"):
        raise TypeError(f"backend {backend!r} cannot run on a {type(x).__module__} array")
    if backend == "numpy":
        return reference
    return _gpu() if gpu else _cpu()


def _vector(x, xp, name: str, dtype=np.float32):
    """Return ``x`` as a contiguous 1-D array of ``dtype`` or raise ``TypeError``."""
    if x.dtype != dtype:
        raise TypeError(f"{name} must be {np.dtype(dtype).name}, got {x.dtype}")
    return xp.ascontiguousarray(x).reshape(-1)


def _output(out, xp, shape, dtype, name: str = "out"):
    """Return ``out`` checked for shape, dtype and contiguity, or a new array."""
    if out is None:
        return xp.empty(shape, dtype)
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype or not out.flags.c_contiguous:
        raise ValueError(f"{name} must be a contiguous {np.dtype(dtype).name} array of shape "
                         f"{tuple(shape)}, got {out.dtype} {tuple(out.shape)}")
    if is_cupy(out) != (xp is not np):
        raise TypeError(f"{name} must live where the input lives")
    return out


def pack_signs(x, out=None, *, backend=None):
    """Pack the signs of the float32 vector ``x`` into ``ceil(d/8)`` bytes (bit = ``x >= 0``)."""
    xp = array_module(x)
    x = _vector(x, xp, "x")
    out = _output(out, xp, (nbytes_signs(x.size),), np.uint8)
    _impl(x, x.size, backend, SMALL_STREAMING).pack_signs(x, out)
    return out


def unpack_signs(packed, d: int, scale: float = 1.0, out=None, *, backend=None):
    """Unpack ``d`` sign bits into float32 ``+scale`` (bit set) and ``-scale`` (clear)."""
    xp = array_module(packed)
    packed = _vector(packed, xp, "packed", np.uint8)
    if packed.size != nbytes_signs(d):
        raise ValueError(f"{d} signs need {nbytes_signs(d)} bytes, got {packed.size}")
    out = _output(out, xp, (int(d),), np.float32)
    _impl(packed, int(d), backend, SMALL_SIGNS).unpack_signs(packed, int(d), float(scale), out)
    return out


def majority_vote(packed, out=None, *, backend=None):
    """Return the packed vote ``sign(sum of signs)`` (ties to +1) of an ``(n, nbytes)`` stack."""
    xp = array_module(packed)
    if packed.ndim != 2 or packed.dtype != np.uint8 or packed.shape[0] < 1:
        raise ValueError(f"packed must be a uint8 (n >= 1, nbytes) stack, got {packed.dtype} "
                         f"{tuple(packed.shape)}")
    packed = xp.ascontiguousarray(packed)
    out = _output(out, xp, (packed.shape[1],), np.uint8)
    _impl(packed, packed.size, backend, SMALL_SIGNS).majority_vote(packed, out)
    return out


def qsgd_quantize(x, levels: int, bucket: int, seed_or_state, *, packed: bool = False,
                  out=None, norms_out=None, backend=None):
    """Quantize ``x`` stochastically to ``levels`` per bucket; return ``(codes, norms)``.

    Bucket ``b`` (elements ``b*bucket`` up to the next bucket) has the float32 norm
    ``|x_b|_2``; element ``i`` gets the code ``sign(x_i) * l`` with ``l`` the stochastic
    rounding of ``|x_i| * levels / norm`` (up with probability the fractional part), so that
    ``code * norm / levels`` is unbiased. Codes are int8, or with ``packed`` (``levels <= 7``)
    two 4-bit two's-complement codes per byte, first in the high nibble. The rounding draws
    come from a counter hash of ``(seed, i)``: same seed, same codes, whatever the backend or
    the thread count. ``seed_or_state`` is an int in ``[0, 2**64)`` (see :func:`derive_seed`)
    or a numpy ``Generator`` (advanced by one draw).
    """
    xp = array_module(x)
    x = _vector(x, xp, "x")
    check_qsgd(levels, bucket, x.size)
    if packed and levels > 7:
        raise ValueError(f"4-bit packed codes need levels <= 7, got {levels}")
    k0, k1 = hash_keys(seed_or_state)
    shape, dtype = ((nbytes_nibbles(x.size),), np.uint8) if packed else ((x.size,), np.int8)
    codes = _output(out, xp, shape, dtype)
    bucket = min(int(bucket), max(x.size, 1))  # same buckets, same sums; indices stay small
    norms = _output(norms_out, xp, (-(-x.size // bucket),), np.float32, "norms_out")
    _impl(x, x.size, backend).qsgd_quantize(x, int(levels), bucket, k0, k1, codes, norms)
    return codes, norms


def qsgd_dequantize(codes, norms, levels: int, bucket: int, d: int | None = None, *,
                    out=None, backend=None):
    """Return the float32 vector ``code * norm / levels`` of int8 or 4-bit packed codes.

    uint8 ``codes`` are read as 4-bit packed, int8 as plain; the length ``d`` is needed for
    packed codes unless ``out`` gives it.
    """
    xp = array_module(codes)
    nib = codes.dtype == np.uint8
    if d is None:
        if nib and out is None:
            raise ValueError("d (the vector length) is needed to unpack 4-bit codes")
        d = out.size if out is not None else codes.size
    d = int(d)
    codes = _vector(codes, xp, "codes", np.uint8 if nib else np.int8)
    if codes.size != (nbytes_nibbles(d) if nib else d):
        raise ValueError(f"codes of size {codes.size} do not hold {d} elements")
    check_qsgd(levels, bucket, d)
    bucket = min(int(bucket), max(d, 1))
    norms = _vector(norms, xp, "norms")
    if norms.size != -(-d // bucket):
        raise ValueError(f"{d} elements in buckets of {bucket} need {-(-d // bucket)} norms, "
                         f"got {norms.size}")
    out = _output(out, xp, (d,), np.float32)
    _impl(codes, d, backend).qsgd_dequantize(codes, norms, int(levels), bucket, out)
    return out


def lattice_encode(x, eps: float, q: int, out=None, *, backend=None):
    """Encode ``z = round(x / eps) mod q``; return ``(z, checksum)``.

    Rounding is half to even, in float64; ``z`` is uint8 for ``q <= 256``, else uint16
    (``q`` a power of two up to ``2**16``). ``checksum`` (an int in ``[0, 2**64)``) is the
    weighted sum of the lattice points ``round(x / eps)`` that :func:`lattice_decode` recomputes
    on the receiving side (see :mod:`._common`): send it along with ``z``.
    """
    xp = array_module(x)
    x = _vector(x, xp, "x")
    out = _output(out, xp, (x.size,), lattice_dtype(q))
    checksum = _impl(x, x.size, backend).lattice_encode(x, check_eps(eps), int(q), out)
    return out, checksum


def lattice_decode(z, reference, eps: float, q: int, out=None, *, backend=None):
    """Decode lattice codes against ``reference``; return ``(x_hat, suspects, checksum)``.

    ``x_hat = eps*z + q*eps*round((reference - eps*z) / (q*eps))`` (in float64, rounded to
    float32) is within ``eps/2`` of the encoded ``x`` (plus the float32 rounding of ``x_hat``)
    when ``|x - reference| < q*eps/2`` in every coordinate. Two checks report a violation:

    * ``suspects`` counts the coordinates in the guard band
      ``|x_hat - reference| >= q*eps/2 - eps``, where a coordinate that just crossed the bound
      lands (and where a legitimate one is about to cross it);
    * ``checksum`` is recomputed from the decoded lattice points; it differs from the
      sender's whenever any coordinate was decoded in the wrong window (always for a single
      one; several wrong coordinates escape only if their errors cancel exactly).
    """
    xp = array_module(z)
    z = _vector(z, xp, "z", lattice_dtype(q))
    ref = _vector(reference, xp, "reference")
    if ref.size != z.size:
        raise ValueError(f"reference has {ref.size} elements, codes have {z.size}")
    out = _output(out, xp, (z.size,), np.float32)
    suspects, checksum = _impl(z, z.size, backend).lattice_decode(z, ref, check_eps(eps),
                                                                   int(q), out)
    return out, suspects, checksum


def ef_sign_compress(g, error, out_packed, *, backend=None) -> float:
    """Fuse error-feedback sign compression; return the scale ``|p|_1 / d`` (float32 value).

    With ``p = g + error``: pack ``sign(p)`` into ``out_packed`` and set
    ``error = p - scale * sign(p)`` in place. With ``error=None`` it packs ``sign(g)`` and
    returns ``|g|_1 / d`` (scaled signSGD without feedback). ``|p|_1`` is the canonical float64
    sum of :mod:`._common`, so the scale is the same on every backend.
    """
    xp = array_module(g)
    g = _vector(g, xp, "g")
    if error is not None:
        if error.size != g.size or error.dtype != np.float32 or not error.flags.c_contiguous:
            raise ValueError("error must be a contiguous float32 vector as long as g")
        if is_cupy(error) != is_cupy(g):
            raise TypeError("error must live where g lives")
        error = error.reshape(-1)
    out_packed = _output(out_packed, xp, (nbytes_signs(g.size),), np.uint8, "out_packed")
    return _impl(g, g.size, backend).ef_sign_compress(g, error, out_packed)


def all_finite(x, *, backend=None) -> bool:
    """Return whether every element of ``x`` is finite (no NaN, no infinity)."""
    if x.dtype.kind not in "fc":
        return True
    return _impl(x, x.size, backend, SMALL_STREAMING).all_finite(x)


def _host_backend(arrays, backend):
    """Return the module of a host-only kernel: numba by default, numpy if asked."""
    if any(is_cupy(a) for a in arrays) or backend == "cupy":
        raise TypeError("the LDA kernels run on host memory (numpy arrays) only")
    return _impl(np.empty(0), 1, backend, small=0)


def _csr(indptr, ids, counts, rows: int):
    """Return the CSR arrays as int64, int64, float64, checking ids against ``rows``."""
    indptr = np.ascontiguousarray(indptr, dtype=np.int64)
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    counts = np.ascontiguousarray(counts, dtype=np.float64)
    if indptr.ndim != 1 or indptr.size < 1 or indptr[0] != 0 or indptr[-1] != ids.size \
            or ids.size != counts.size or np.any(np.diff(indptr) < 0):
        raise ValueError("indptr, ids, counts must be a CSR matrix: indptr non-decreasing "
                         "from 0 to len(ids) == len(counts)")
    if ids.size and (ids.min() < 0 or ids.max() >= rows):
        raise ValueError(f"word ids must be in [0, {rows}), got [{ids.min()}, {ids.max()}]")
    return indptr, ids, counts


def _matrix(a, name: str, shape=None):
    """Check that ``a`` is a C-contiguous float64 matrix (of ``shape``); return it."""
    if a.dtype != np.float64 or a.ndim != 2 or not a.flags.c_contiguous or (
            shape is not None and tuple(a.shape) != tuple(shape)):
        want = f" of shape {tuple(shape)}" if shape is not None else ""
        raise ValueError(f"{name} must be a C-contiguous float64 matrix{want}, got "
                         f"{a.dtype} {tuple(a.shape)}")
    return a


def lda_estep(indptr, ids, counts, exp_elog_beta, alpha: float, gamma, max_iter: int,
              tol: float, sstats=None, *, backend=None) -> int:
    """Fit the variational Dirichlet ``gamma`` of every document, with the topics fixed.

    Hoffman et al.'s E-step for LDA, per document ``d`` (row ``d`` of the CSR matrix
    ``indptr``, ``ids``, ``counts``): with ``t = exp(E[log theta_d])`` under
    Dirichlet(``gamma[d]``) and ``b_n = exp_elog_beta[ids[n]]``, repeat
    ``gamma[d] <- alpha + t * sum_n counts[n] b_n / (t . b_n)`` until the mean absolute
    change is below ``tol``, at most ``max_iter`` times.

    Args:
        indptr, ids, counts: the documents; ``ids`` index rows of ``exp_elog_beta``.
        exp_elog_beta: ``exp(E[log beta])``, float64 ``(words, topics)``, word-major; any
            fixed topics (e.g. normalised topic-word probabilities) work the same way.
        alpha: the symmetric Dirichlet prior of the documents' topic mixtures.
        gamma: float64 ``(documents, topics)``: the starting values, overwritten.
        max_iter, tol: the stopping rule of each document.
        sstats: None, or a float64 ``(words, topics)`` array set to
            ``sum_d sum_n counts[n] t_d / (t_d . b_n)`` in the rows of the words (multiply by
            ``exp_elog_beta`` for the expected topic-word counts).

    Returns:
        The number of updates of ``gamma`` made, over all documents.
    """
    impl = _host_backend((gamma, exp_elog_beta), backend)
    eb = _matrix(exp_elog_beta, "exp_elog_beta")
    indptr, ids, counts = _csr(indptr, ids, counts, eb.shape[0])
    _matrix(gamma, "gamma", (indptr.size - 1, eb.shape[1]))
    if sstats is not None:
        _matrix(sstats, "sstats", eb.shape)
    if not alpha > 0 or max_iter < 1 or tol < 0:
        raise ValueError(f"need alpha > 0, max_iter >= 1, tol >= 0; got {alpha}, {max_iter}, "
                         f"{tol}")
    return impl.lda_estep(indptr, ids, counts, eb, float(alpha), gamma, int(max_iter),
                          float(tol), sstats)


def lda_loglik(indptr, ids, counts, theta, beta, *, backend=None) -> float:
    """Return ``sum_d sum_n counts[n] log(theta[d] . beta[ids[n]])``.

    ``theta`` is float64 ``(documents, topics)`` (topic mixtures), ``beta`` float64
    ``(words, topics)`` (topic-word probabilities, word-major).
    """
    impl = _host_backend((theta, beta), backend)
    beta = _matrix(beta, "beta")
    indptr, ids, counts = _csr(indptr, ids, counts, beta.shape[0])
    _matrix(theta, "theta", (indptr.size - 1, beta.shape[1]))
    return impl.lda_loglik(indptr, ids, counts, theta, beta)


def digamma(x, *, backend=None):
    """Return the digamma function of the float64 array ``x`` (``x > 0``), to about 1e-12."""
    return _host_backend((x,), backend).digamma(x)


def thread_limit() -> int:
    """Return the most threads the numba kernels may use, without importing numba.

    This is numba's ``NUMBA_NUM_THREADS``: the environment variable if set, else the cores
    this process may run on.
    """
    numba = sys.modules.get("numba")
    if numba is not None:
        return int(numba.config.NUMBA_NUM_THREADS)
    if os.environ.get("NUMBA_NUM_THREADS", "").strip():
        return int(os.environ["NUMBA_NUM_THREADS"])
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def set_num_threads(n: int) -> None:
    """Set the number of threads of the numba kernels (1 up to :func:`thread_limit`).

    Before the first kernel runs this only records ``n``: numba (about a second to import) is
    loaded with the first kernel that needs it, and takes the count then.
    """
    global _threads
    limit = thread_limit()
    if not isinstance(n, int) or not 1 <= n <= limit:
        raise ConfigError(f"must be an integer in [1, {limit}], got {n!r}", key="threads")
    _threads = n
    if _cpu_module is not None:
        _cpu_module.set_num_threads(n)


def get_num_threads() -> int:
    """Return the number of threads of the numba kernels."""
    return _cpu().get_num_threads()


def _cpu():
    """Return the numba kernels, importing numba on first use with the thread count set."""
    global _cpu_module
    if _cpu_module is None:
        module = importlib.import_module(".cpu", __name__)
        if _threads is not None:
            module.set_num_threads(_threads)
        _cpu_module = module
    return _cpu_module
