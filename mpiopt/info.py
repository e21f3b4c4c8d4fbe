"""``mpiopt info``: versions, the MPI library, GPUs and whether MPI is CUDA-aware."""

from __future__ import annotations

import platform
from importlib import metadata


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _cupy_version() -> str:
    for name in ("cupy", "cupy-cuda12x", "cupy-cuda11x", "cupy-cuda13x"):
        version = _version(name)
        if version != "not installed":
            return version
    return "not installed"


def collect() -> dict:
    """Gather the facts ``mpiopt info`` prints (starts MPI, probes CUDA-aware MPI on a GPU)."""
    from mpiopt import __version__, backend
    from mpiopt.comm.transport import mpi_info

    gpus = backend.gpu_count()
    # The same probe as ``run.cuda_aware: auto``, on this process's own GPU.
    probe = backend.probe_cuda_aware(backend.device_index(gpus)) if gpus else None
    facts = {
        "mpiopt": __version__,
        "python": platform.python_version(),
        "numpy": _version("numpy"),
        "numba": _version("numba"),
        "h5py": _version("h5py"),
        "mpi4py": _version("mpi4py"),
        "cupy": _cupy_version(),
        **{f"mpi_{k}": v for k, v in mpi_info().items()},
        "gpus": gpus,
        "cuda_aware_mpi": ("unknown: no GPU" if probe is None
                           else f"yes (probed: {probe.detail})" if probe.aware
                           else f"no (probed: {probe.detail}; host staging)"),
    }
    return facts


def render(facts: dict) -> str:
    """Format the facts as aligned ``key: value`` lines."""
    width = max(len(k) for k in facts)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in facts.items())
