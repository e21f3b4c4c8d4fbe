"""CuPy kernels: the CUDA source of :mod:`._gpu_source`, compiled lazily, one module per device.

Imported only when a CuPy array reaches a kernel (so CuPy is already there). Nothing is
compiled before the first launch on a device; the compiled module is memoised by device id.
Launches go to the device that holds the input and the current stream of that device.
"""

from __future__ import annotations

import cupy
import numpy as np

from ._common import CHUNK
from ._gpu_source import OPTIONS, SOURCE

THREADS = 256
MAX_BLOCKS = 1 << 16  # kernels loop grid-stride past this
_MODULES: dict[int, cupy.RawModule] = {}


def _kernel(name: str):
    """Return the kernel ``name`` of the module compiled for the current device."""
    dev = cupy.cuda.Device().id
    mod = _MODULES.get(dev)
    if mod is None:
        mod = _MODULES[dev] = cupy.RawModule(code=SOURCE, options=OPTIONS)
    return mod.get_function(name)


def _launch(name: str, n_threads: int, args: tuple, like) -> None:
    """Launch ``name`` with enough blocks for ``n_threads`` threads on ``like``'s device."""
    if n_threads <= 0:
        return
    blocks = min(MAX_BLOCKS, -(-n_threads // THREADS))
    with like.device:
        _kernel(name)((blocks,), (THREADS,), args)


def _i64(v) -> np.int64:
    return np.int64(v)


def parallel_copy(src, dst):
    """Copy ``src`` into ``dst`` with a kernel (the benchmark's device bandwidth probe)."""
    _launch("copy_f32", src.size, (src, dst, _i64(src.size)), src)


def pack_signs(x, out):
    """Write the packed bits of ``x >= 0`` into ``out``."""
    words = -(-x.size // 32)
    _launch("pack_signs", 32 * -(-words // 4), (x, out, _i64(x.size)), x)  # 4 words a warp


def unpack_signs(packed, d, scale, out):
    """Write ``+scale`` for set bits and ``-scale`` for clear bits of ``packed`` into ``out``."""
    s = np.float32(scale)
    _launch("unpack_signs", d, (packed, out, _i64(d), s, -s), out)


def majority_vote(stack, out):
    """Write the packed vote ``sign(sum)`` (ties to +1) of the ``(n, nbytes)`` stack."""
    n, nbytes = stack.shape
    _launch("majority_vote", nbytes, (stack, out, np.int32(n), _i64(nbytes)), stack)


def _bucket_norms(x, bucket, norms):
    """Write the canonical float32 norms of the buckets of ``x`` (buckets over CHUNK)."""
    d, nb = x.size, norms.size
    cpb = -(-bucket // CHUNK)
    with x.device:
        part = cupy.empty(nb * cpb, np.float64)
    _launch("qsgd_partials", 32 * nb * cpb,
            (x, part, _i64(d), _i64(bucket), _i64(cpb), _i64(nb * cpb)), x)
    _launch("qsgd_norms", 32 * nb, (part, norms, _i64(nb), _i64(cpb)), x)


def qsgd_quantize(x, levels, bucket, k0, k1, codes, norms):
    """Write QSGD codes (int8, or uint8 nibbles) and float32 bucket norms of ``x``."""
    d, nb, s_f = x.size, norms.size, np.float64(levels)
    keys = (np.uint32(k0), np.uint32(k1))
    nib = codes.dtype == np.uint8
    if bucket <= CHUNK:
        _launch("qsgd_fused", 32 * nb, (x, codes, norms, _i64(d), _i64(bucket), _i64(nb), s_f,
                                        *keys, np.int32(not nib)), x)
        if not nib:
            return
    else:
        _bucket_norms(x, bucket, norms)
    if nib:
        _launch("qsgd_codes4", codes.size, (x, norms, codes, _i64(d), np.uint32(bucket), s_f,
                                            *keys), x)
    else:
        _launch("qsgd_codes", d, (x, norms, codes, _i64(d), np.uint32(bucket), s_f, *keys), x)


def qsgd_dequantize(codes, norms, levels, bucket, out):
    """Write ``code * norm / levels`` per element into ``out``."""
    d = out.size
    name = "qsgd_dequant4" if codes.dtype == np.uint8 else "qsgd_dequant"
    _launch(name, d, (codes, norms, out, _i64(d), np.uint32(bucket), np.float64(levels)), out)


def _suffix(dtype) -> str:
    return "u8" if dtype == np.uint8 else "u16"


def lattice_encode(x, eps, q, out):
    """Write ``round(x / eps) mod q`` into ``out``; return the checksum of ``round(x / eps)``."""
    with x.device:
        cs = cupy.zeros(1, np.uint64)
    _launch(f"lattice_encode_{_suffix(out.dtype)}", x.size,
            (x, out, _i64(x.size), np.float64(eps), np.float64(q), cs), x)
    return int(cs.get()[0])


def lattice_decode(z, reference, eps, q, out):
    """Write the decoded vector into ``out``; return the guard-band count and the checksum."""
    with z.device:
        acc = cupy.zeros(2, np.uint64)  # [guard-band count, checksum]
    _launch(f"lattice_decode_{_suffix(z.dtype)}", z.size,
            (z, reference, out, _i64(z.size), np.float64(eps), _i64(q),
             np.float64(q * eps * 0.5 - eps), acc[0:1], acc[1:2]), z)
    count, cs = acc.get()
    return int(count), int(cs)


def ef_sign_compress(g, error, out_packed):
    """Pack ``sign(g + e)``, set ``e`` to the residual; return the scale ``|g + e|_1 / d``."""
    d = g.size
    if d == 0:
        return 0.0
    nch = -(-d // CHUNK)
    with g.device:
        part, total = cupy.empty(nch, np.float64), cupy.empty(1, np.float64)
    err = error if error is not None else g  # never written when has_err is 0
    _launch("ef_chunks", 32 * nch, (g, err, np.int32(error is not None), out_packed, part,
                                    _i64(d), _i64(nch)), g)
    _launch("lanesum_rows", 32, (part, total, _i64(1), _i64(nch)), g)
    scale = np.float32(float(total.get()[0]) / d)
    if error is not None:
        _launch("ef_residual", d, (error, _i64(d), scale), g)
    return float(scale)


def all_finite(x):
    """Return whether every element of ``x`` is finite."""
    with x.device:
        return bool(cupy.isfinite(x).all())
