"""Compressors by name, for configuration files: ``make_compressor("qsgd", levels=4)``."""

from __future__ import annotations

import inspect

from mpiopt.errors import ConfigError

from .base import Compressor, check_bool
from .error_feedback import with_error_feedback
from .lattice import lattice
from .qsgd import qsgd
from .sign import sign
from .simple import fp16, identity, topk

COMPRESSORS = {
    "identity": identity,
    "fp16": fp16,
    "sign": sign,
    "qsgd": qsgd,
    "lattice": lattice,
    "topk": topk,
}


def compressor_names() -> list[str]:
    """Return the registered compressor names, sorted."""
    return sorted(COMPRESSORS)


def make_compressor(name: str, **params) -> Compressor:
    """Build the compressor ``name`` with ``params``; ``error_feedback=True`` wraps it.

    Raises:
        ConfigError: for an unknown name (the message lists the valid ones), an unknown
            parameter (listing the valid ones) or a value out of range (naming its range).
    """
    factory = COMPRESSORS.get(name) if isinstance(name, str) else None
    if factory is None:
        raise ConfigError(f"unknown compressor {name!r}; valid: {', '.join(compressor_names())}",
                          key="name")
    ef = check_bool("error_feedback", params.pop("error_feedback", False))
    valid = list(inspect.signature(factory).parameters)
    for key in params:
        if key not in valid:
            names = ", ".join(valid + ["error_feedback"])
            raise ConfigError(f"unknown parameter of compressor {name!r}; valid: {names}",
                              key=key)
    try:
        c = factory(**params)
    except TypeError as exc:  # a required parameter is missing
        raise ConfigError(f"compressor {name!r}: {exc}", key="name") from exc
    return with_error_feedback(c) if ef else c
