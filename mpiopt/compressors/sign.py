"""Sign compression (signSGD): one bit per element, optionally with the scale ``|x|_1 / d``."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from mpiopt import kernels

from .base import Compressor, check_bool, check_finite, flat, init_stateless, output, payload_nbytes


class SignPayload(NamedTuple):
    """Packed sign bits (``numpy.packbits`` order) and, when scaled, a float32 scale."""

    packed: object
    scale: object  # float32 array of shape (1,), or None for plain signs (scale 1)
    d: int

    @property
    def buffers(self):
        return (self.packed,) if self.scale is None else (self.packed, self.scale)

    nbytes = property(payload_nbytes)


def sign(scaled: bool = False) -> Compressor:
    """Return the sign compressor: ``sign(x)`` (``sign(0) = +1``), or ``|x|_1/d * sign(x)``.

    The scaled form is the compressor of EF-signSGD; ``with_error_feedback`` runs it as one
    fused kernel. Majority vote works on the packed bits directly
    (:func:`mpiopt.kernels.majority_vote`).
    """
    scaled = check_bool("scaled", scaled)

    def empty_payload(d, xp=np):
        scale = xp.ones(1, np.float32) if scaled else None
        return SignPayload(xp.empty(kernels.nbytes_signs(d), np.uint8), scale, int(d))

    def compress(x, state, out=None):
        x = flat(x)
        check_finite(x, "sign")
        payload = out if out is not None else empty_payload(x.size, kernels.array_module(x))
        if scaled:
            payload.scale[0] = kernels.ef_sign_compress(x, None, payload.packed)
        else:
            kernels.pack_signs(x, payload.packed)
        return payload, state

    def decompress(payload, out=None):
        out = output(out, payload.packed, payload.d)
        scale = 1.0 if payload.scale is None else float(payload.scale[0])
        return kernels.unpack_signs(payload.packed, payload.d, scale, out)

    return Compressor("sign", {"scaled": scaled}, init_stateless, compress, decompress,
                      empty_payload)
