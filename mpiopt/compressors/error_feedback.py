"""Error feedback as a wrapper: compress ``p = x + e``, keep ``e = p - decompress(...)``."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from mpiopt import kernels
from mpiopt.errors import ConfigError

from .base import Compressor, check_finite, flat


class EFState(NamedTuple):
    """The residual ``e`` (float32, like ``x``) and the inner compressor's state."""

    error: object
    inner: NamedTuple


def with_error_feedback(c: Compressor) -> Compressor:
    """Return ``c`` with error feedback (Karimireddy et al. 2019; EF-signSGD for scaled signs).

    ``compress(x)`` compresses ``p = x + e`` with ``c`` and keeps ``e = p - C(p)``, so the
    residual plus the decompressed value is exactly the compensated input ``p`` (up to float32
    rounding of the subtraction). The residual is updated in place. Scaled signs take the
    fused one-kernel path :func:`mpiopt.kernels.ef_sign_compress`; other compressors take the
    generic path, which allocates two temporary vectors per call.
    """
    if c.name == "lattice":
        raise ConfigError("error feedback does not apply to the lattice compressor, which "
                          "sends models, not updates", key="error_feedback")
    fused = c.name == "sign" and c.params.get("scaled", False)

    def init(x):
        x = flat(x)
        return EFState(kernels.array_module(x).zeros_like(x), c.init(x))

    def compress(x, state, out=None):
        x = flat(x)
        check_finite(x, f"ef_{c.name}")
        if fused:
            payload = out if out is not None else c.empty_payload(x.size,
                                                                  kernels.array_module(x))
            payload.scale[0] = kernels.ef_sign_compress(x, state.error, payload.packed)
            return payload, state
        xp = kernels.array_module(x)
        p = x + state.error
        payload, inner = c.compress(p, state.inner, out)  # raises before e is touched
        xp.subtract(p, c.decompress(payload, xp.empty_like(p)), out=state.error)
        return payload, EFState(state.error, inner)

    params = dict(c.params, error_feedback=True)
    return Compressor(f"ef_{c.name}", params, init, compress, c.decompress, c.empty_payload)


def residual_norm(state: EFState) -> float:
    """Return ``|e|_2`` of an error-feedback state (for logging)."""
    xp = kernels.array_module(state.error)
    return float(xp.linalg.norm(state.error.astype(np.float64)))
