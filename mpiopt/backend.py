"""Array backends: numpy on the CPU, CuPy on a GPU; device choice and the CUDA-aware probe.

The GPU-MPI contract lives here and in the transport: synchronise the stream before any MPI
call; stage through host memory when MPI is not CUDA-aware, which is decided by a real probe
(a child process that hands a device buffer to MPI), never by a guess.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys

import numpy as np

from mpiopt.errors import ConfigError, MissingDependency


def cupy_or_none():
    """Return the cupy module if it imports and sees a device, else None."""
    try:
        import cupy
    except Exception:
        return None
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return None
    except Exception:
        return None
    return cupy


def gpu_count() -> int:
    """Return the number of CUDA devices visible (0 without CuPy)."""
    cp = cupy_or_none()
    return 0 if cp is None else int(cp.cuda.runtime.getDeviceCount())


def local_rank() -> int:
    """Return this process's rank among the processes of its node, from the launcher."""
    for var in ("MPI_LOCALRANKID", "PMI_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK",
                "SLURM_LOCALID", "MV2_COMM_WORLD_LOCAL_RANK"):
        if var in os.environ:
            return int(os.environ[var])
    return 0


def select(device: str):
    """Return the array module for ``run.device`` (cpu, gpu, auto), binding a GPU per rank."""
    if device == "cpu":
        return np
    cp = cupy_or_none()
    if cp is None:
        if device == "gpu":
            try:
                import cupy  # noqa: F401
            except ImportError:
                raise MissingDependency("run.device: gpu", "cupy", "gpu") from None
            raise ConfigError("gpu requested but no CUDA device is visible; valid: cpu, auto",
                              key="run.device")
        return np
    cp.cuda.Device(local_rank() % gpu_count()).use()
    return cp


def array_module(x):
    """Return numpy or cupy, following the type of ``x``."""
    if type(x).__module__.startswith("cupy"):
        import cupy

        return cupy
    return np


def to_host(x) -> np.ndarray:
    """Return ``x`` as a numpy array (a copy from the device for CuPy arrays)."""
    return x.get() if hasattr(x, "get") and not isinstance(x, np.ndarray) else np.asarray(x)


def synchronize(x) -> None:
    """Wait for the current CUDA stream so that ``x`` is complete before MPI reads it."""
    import cupy

    cupy.cuda.get_current_stream().synchronize()


def pinned_empty(shape, dtype) -> np.ndarray:
    """Return a numpy array in page-locked host memory (fast device transfers)."""
    import cupy

    count = int(np.prod(shape))
    mem = cupy.cuda.alloc_pinned_memory(count * np.dtype(dtype).itemsize)
    return np.frombuffer(mem, dtype=dtype, count=count).reshape(shape)


_PROBE = r"""
import cupy, numpy
from mpi4py import MPI
comm = MPI.COMM_SELF
a = cupy.arange(1024, dtype=cupy.float32)
b = cupy.zeros_like(a)
cupy.cuda.get_current_stream().synchronize()
comm.Sendrecv(a, 0, 7, b, 0, 7)
print("OK" if bool((a == b).all()) else "WRONG")
"""


@functools.lru_cache(maxsize=1)
def cuda_aware_mpi() -> bool | None:
    """Return whether MPI moves device buffers correctly; None when there is no GPU.

    The probe runs in a child process because a non-CUDA-aware MPI may crash on a device
    pointer rather than fail cleanly.
    """
    if cupy_or_none() is None:
        return None
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "MPI_LOCAL"))}
    try:
        out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True,
                             timeout=120, env=env)
    except subprocess.TimeoutExpired:
        return False
    return out.returncode == 0 and out.stdout.strip().endswith("OK")
