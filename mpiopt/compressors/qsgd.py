"""QSGD (Alistarh et al. 2017): unbiased stochastic quantization to ``levels`` per bucket."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from mpiopt import kernels
from mpiopt.errors import ConfigError

from .base import Compressor, check_bool, check_finite, check_int, flat, output, payload_nbytes


class QSGDState(NamedTuple):
    """The number of vectors compressed so far (the counter of the rounding stream)."""

    step: np.ndarray  # int64, shape ()


class QSGDPayload(NamedTuple):
    """Codes (int8, or uint8 with two 4-bit codes per byte) and one float32 norm per bucket."""

    codes: object
    norms: object
    d: int

    @property
    def buffers(self):
        return (self.codes, self.norms)

    nbytes = property(payload_nbytes)


def _check_packed(packed, levels: int) -> bool:
    """Return whether codes are 4-bit packed (default: when ``levels <= 7``)."""
    if packed is None:
        return levels <= 7
    if check_bool("packed", packed) and levels > 7:
        raise ConfigError(f"4-bit packed codes need levels <= 7, got {levels}", key="packed")
    return bool(packed)


def qsgd(levels: int = 4, bucket: int = 512, seed: int = 0, packed: bool | None = None
         ) -> Compressor:
    """Return QSGD with ``levels`` levels per sign and one norm per ``bucket`` elements.

    ``E[decompress(compress(x))] = x`` and the variance is at most
    ``min(b/s^2, sqrt(b)/s) * |x|^2`` (``b`` the bucket, ``s`` the levels). The rounding of
    call ``t`` uses the stream ``derive_seed(seed, t)``: give every rank its own ``seed``.
    ``packed`` (default: ``levels <= 7``) sends 4-bit codes, else one int8 per element.
    """
    levels = check_int("levels", levels, 1, 127)
    bucket = check_int("bucket", bucket, 1)
    seed = check_int("seed", seed, 0, (1 << 64) - 1)
    packed = _check_packed(packed, levels)

    def init(x):
        return QSGDState(np.zeros((), np.int64))

    def empty_payload(d, xp=np):
        d = int(d)
        codes = (xp.empty(kernels.nbytes_nibbles(d), np.uint8) if packed
                 else xp.empty(d, np.int8))
        return QSGDPayload(codes, xp.empty(-(-d // bucket), np.float32), d)

    def compress(x, state, out=None):
        x = flat(x)
        check_finite(x, "qsgd")
        payload = out if out is not None else empty_payload(x.size, kernels.array_module(x))
        kernels.qsgd_quantize(x, levels, bucket, kernels.derive_seed(seed, int(state.step)),
                              packed=packed, out=payload.codes, norms_out=payload.norms)
        return payload, QSGDState(state.step + 1)

    def decompress(payload, out=None):
        out = output(out, payload.codes, payload.d)
        return kernels.qsgd_dequantize(payload.codes, payload.norms, levels, bucket, payload.d,
                                       out=out)

    params = {"levels": levels, "bucket": bucket, "seed": seed, "packed": packed}
    return Compressor("qsgd", params, init, compress, decompress, empty_payload)
