"""Compressors: optax-style ``init`` / ``compress`` / ``decompress`` over flat float32 vectors.

See :mod:`.base` for the protocol. Build one by name with :func:`make_compressor` or with a
factory: :func:`identity`, :func:`fp16`, :func:`sign`, :func:`qsgd`, :func:`lattice`,
:func:`topk`, and the wrapper :func:`with_error_feedback`.
"""

from .base import Compressor, EmptyState, NonFiniteError
from .error_feedback import EFState, with_error_feedback
from .lattice import LatticeBoundError, LatticePayload, lattice
from .qsgd import QSGDPayload, QSGDState, qsgd
from .registry import COMPRESSORS, compressor_names, make_compressor
from .sign import SignPayload, sign
from .simple import DensePayload, TopKPayload, fp16, identity, topk

__all__ = [
    "COMPRESSORS",
    "Compressor",
    "DensePayload",
    "EFState",
    "EmptyState",
    "LatticeBoundError",
    "LatticePayload",
    "NonFiniteError",
    "QSGDPayload",
    "QSGDState",
    "SignPayload",
    "TopKPayload",
    "compressor_names",
    "fp16",
    "identity",
    "lattice",
    "make_compressor",
    "qsgd",
    "sign",
    "topk",
    "with_error_feedback",
]
