"""Array backends: numpy on the CPU, CuPy on a GPU; device choice, staging, CUDA-aware probe.

The GPU-MPI contract lives here and in the transport: synchronise the stream before any MPI
call; stage through host memory when MPI is not CUDA-aware. Whether it is, is decided once per
job, before training (:func:`decide_cuda_aware`, from ``run.cuda_aware``): by default a real
probe, in a child process with a clean environment, hands device buffers to MPI on one rank of
every node, and the ranks agree on the answer. Nothing here imports ``mpi4py``; the probe's
child does, in its own process.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass

import numpy as np

from mpiopt.errors import ConfigError, MissingDependency

PROBE_TIMEOUT_S = 120.0  # importing CuPy, creating a context, starting MPI: seconds, not minutes


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


_LOCAL_RANK_VARS = ("MPI_LOCALRANKID", "PMI_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK",
                    "SLURM_LOCALID", "MV2_COMM_WORLD_LOCAL_RANK", "PALS_LOCAL_RANKID",
                    "FLUX_TASK_LOCAL_ID", "JSM_NAMESPACE_LOCAL_RANK")


def local_rank(env=None) -> int:
    """Return this process's rank among the processes of its node, from the launcher."""
    env = os.environ if env is None else env
    for var in _LOCAL_RANK_VARS:
        if var in env:
            return int(env[var])
    return 0


# Variables a process manager sets when it tells MPI the size of the job (PMI-1/2, PMIx, Open MPI).
_SIZE_VARS = ("PMI_SIZE", "PMIX_RANK", "OMPI_COMM_WORLD_SIZE")


def singleton_tasks(world_size: int, env=None) -> int:
    """Return the task count of an srun step whose tasks each started MPI alone, else 0.

    ``srun`` without ``--mpi=pmi2`` (and no ``MpiDefault``) gives MPI no process manager to
    wire up with: every task becomes a singleton of size 1 that believes it is rank 0.
    """
    env = os.environ if env is None else env
    tasks = int(env.get("SLURM_STEP_NUM_TASKS") or 0)
    if world_size == 1 and tasks > 1 and not any(v in env for v in _SIZE_VARS):
        return tasks
    return 0


def device_index(count: int, env=None) -> int:
    """Return the visible device this rank uses: its local rank modulo ``count``.

    ``count`` is the number of *visible* devices, so a launcher that binds one GPU per rank
    through ``CUDA_VISIBLE_DEVICES`` gives every rank device 0, its own GPU.
    """
    return local_rank(env) % count if count > 0 else 0


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
    cp.cuda.Device(device_index(gpu_count())).use()
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


def synchronize(x, stream=None) -> None:
    """Wait until the work producing device array ``x`` is done, so MPI reads finished data.

    CuPy arrays do not record the stream that wrote them, so the contract is: ``x`` was produced
    on the current stream *of its own device* (``x.device``, not the current device), which is
    where every mpiopt kernel and problem launches; that stream is waited for. A caller that
    produces ``x`` on another stream passes it as ``stream`` (or synchronises it first).
    Waiting for the whole device instead would also be correct, but it would serialise the
    exchange behind unrelated streams (computation meant to overlap it), so it is not done.

    Args:
        x: a CuPy array about to be handed to MPI.
        stream: the ``cupy.cuda.Stream`` that produced ``x``, if not the current one.
    """
    if stream is not None:
        stream.synchronize()
        return
    import cupy

    with x.device:
        cupy.cuda.get_current_stream().synchronize()


def pinned_empty(shape, dtype) -> np.ndarray:
    """Return a numpy array in page-locked host memory (fast device transfers).

    The memory comes from CuPy's pinned memory pool and goes back to it when the array is
    collected; ``cupy.get_default_pinned_memory_pool().free_all_blocks()`` returns it to the
    system.
    """
    import cupy

    count = int(np.prod(shape))
    mem = cupy.cuda.alloc_pinned_memory(count * np.dtype(dtype).itemsize)
    return np.frombuffer(mem, dtype=dtype, count=count).reshape(shape)


# --------------------------------------------------------------------------- host staging


class StagingPool:
    """Host arrays that stand in for device buffers while MPI is not CUDA-aware.

    A host array is leased for one MPI operation and released when that operation has
    completed, so two operations in flight never share one (two sends of equal-sized buffers
    to two neighbours must not). Free arrays are kept for reuse by ``(shape, dtype)``, never by
    the device buffer's address: freed device memory is reused for arrays of another shape.
    At most ``keep`` free arrays are kept, the least recently released dropped first, because
    pinned host memory is scarce and a long run sees many sizes; leases in use are not
    counted, as they cannot be dropped.

    Args:
        allocate: ``allocate(shape, dtype) -> numpy array`` (page-locked in production).
        keep: the most free arrays kept for reuse.
    """

    def __init__(self, allocate=pinned_empty, keep: int = 8):
        self._allocate = allocate
        self.keep = int(keep)
        self._free: collections.OrderedDict[tuple, list] = collections.OrderedDict()
        self.leased = 0  # leases not yet released

    @staticmethod
    def _key(shape, dtype) -> tuple:
        return tuple(int(s) for s in shape), np.dtype(dtype).str

    def acquire(self, shape, dtype) -> np.ndarray:
        """Lease a host array of ``shape`` and ``dtype``: a released one, else a new one."""
        bucket = self._free.get(self._key(shape, dtype))
        host = bucket.pop() if bucket else self._allocate(shape, dtype)
        if bucket is not None and not bucket:
            del self._free[self._key(shape, dtype)]
        self.leased += 1
        return host

    def release(self, host: np.ndarray) -> None:
        """Return a leased array for reuse, dropping the least recently used beyond ``keep``."""
        self.leased -= 1
        key = self._key(host.shape, host.dtype)
        self._free.setdefault(key, []).append(host)
        self._free.move_to_end(key)
        while len(self) > self.keep:
            oldest = next(iter(self._free))
            self._free[oldest].pop(0)
            if not self._free[oldest]:
                del self._free[oldest]

    def clear(self) -> None:
        """Drop every free array (leases in use stay valid until released)."""
        self._free.clear()

    def __len__(self) -> int:
        return sum(len(b) for b in self._free.values())

    @property
    def nbytes(self) -> int:
        """Return the bytes held by the free arrays."""
        return sum(h.nbytes for b in self._free.values() for h in b)


# --------------------------------------------------------------------------- the probe

# Variables a launcher or resource manager sets for the processes of a job. A child that
# inherits them believes it is one of those processes and tries to join the job: it waits for
# a PMI/PMIx server that will never answer it (a hang) or claims a rank already taken.
_LAUNCHER_PREFIXES = (
    "PMI_", "PMI2_", "PMIX", "HYDRA_", "HYDI_", "MPI_LOCALRANKID", "MPI_LOCALNRANKS",
    "OMPI_", "PRTE_", "PRRTE_", "ORTE_", "SLURM_", "SRUN_", "PALS_", "ALPS_APP_", "FLUX_",
    "JSM_NAMESPACE_", "MV2_COMM_WORLD_", "MPISPAWN_", "MPIRUN_", "I_MPI_HYDRA_",
)
# Open MPI settings of the data path, which decide CUDA support, are kept (the probe must test
# the job's configuration); every other OMPI_ variable, the launcher's included, is dropped.
_OMPI_KEPT = tuple(f"OMPI_MCA_{f}" for f in (
    "pml", "btl", "mtl", "coll", "osc", "opal_cuda", "mpi_", "accelerator", "smsc",
    "common_ucx", "op_"))


def launcher_variable(name: str) -> bool:
    """Return True if the launcher owns environment variable ``name`` (the probe drops it)."""
    if name.startswith(_OMPI_KEPT):
        return False
    return name.startswith(_LAUNCHER_PREFIXES)


def scrub_env(env) -> dict:
    """Return a copy of ``env`` without the launcher's variables (MPI settings stay)."""
    return {k: v for k, v in env.items() if not launcher_variable(k)}


@dataclass(frozen=True)
class Probe:
    """What the CUDA-aware probe found: ``aware``, and in ``detail`` what or why."""

    aware: bool
    detail: str


_PROBE = r"""
import json, sys
import cupy
cupy.cuda.Device(int(sys.argv[1])).use()
from mpi4py import MPI

def check(comm):
    for n in (256, 1 << 20):  # small and large messages take different paths (eager, rendezvous)
        a = cupy.arange(n, dtype=cupy.float32)
        b = cupy.full(n, -1.0, dtype=cupy.float32)
        c = cupy.zeros(n, dtype=cupy.float32)
        cupy.cuda.get_current_stream().synchronize()
        MPI.Request.Waitall([comm.Irecv(b, 0, 7), comm.Isend(a, 0, 7)])
        if not bool((a == b).all()):
            return f"Isend/Irecv of {n} float32 between device buffers delivered wrong data"
        comm.Allreduce(a, c, op=MPI.SUM)
        if not bool((a == c).all()):
            return f"Allreduce of {n} float32 on device buffers gave wrong data"
    return None

why = check(MPI.COMM_SELF)
print("mpiopt-probe:", json.dumps({"ok": why is None,
                                   "why": why or "device buffers moved and reduced correctly"}))
"""


def run_child(args: list[str], timeout: float, env=None) -> tuple[int | None, str, str]:
    """Run ``args`` with the launcher's variables scrubbed; kill its process group at timeout.

    Returns ``(returncode, stdout, stderr)``, the return code None after a timeout. The child
    leads its own session so that a grandchild holding the pipes dies with it (waiting for
    the pipes to close would otherwise hang past the timeout), and reads no stdin (the
    launcher forwards its stdin to rank 0).
    """
    env = scrub_env(os.environ if env is None else env)
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        return None, out, err
    return proc.returncode, out, err


def read_probe(returncode: int | None, stdout: str, stderr: str, timeout: float) -> Probe:
    """Turn what the probe's child did into a :class:`Probe` with a one-line reason."""
    if returncode is None:
        return Probe(False, f"the probe did not finish within {timeout:g} s")
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return Probe(False, f"the probe crashed ({name}), as an MPI that takes a device "
                            "pointer for host memory does")
    answer = _answer(stdout)
    if returncode == 0 and isinstance(answer, dict) and "ok" in answer:
        return Probe(bool(answer["ok"]), str(answer.get("why", "")))
    last = (stderr.strip().splitlines() or ["no output"])[-1]
    return Probe(False, f"the probe failed (exit status {returncode}): {last}")


def _answer(stdout: str):
    """Return the probe's JSON answer, found by its prefix (MPI may print lines of its own)."""
    for line in reversed(stdout.splitlines()):
        if line.startswith("mpiopt-probe: "):
            try:
                return json.loads(line.split(" ", 1)[1])
            except ValueError:
                return None
    return None


def probe_cuda_aware(device: int, timeout: float = PROBE_TIMEOUT_S, env=None) -> Probe:
    """Hand device buffers on GPU ``device`` to MPI in a child process; report what happened.

    The child (a fresh singleton MPI process; ``env`` or this one's, scrubbed of the
    launcher's variables) sends between two device buffers with ``Isend``/``Irecv`` on
    ``COMM_SELF`` and reduces one with ``Allreduce``, at an eager and a rendezvous size, and
    checks the data. It is a child because an MPI that is not CUDA-aware may crash on a device
    pointer rather than fail cleanly. A self-send proves that the library moves device
    memory; the paths between processes are assumed to match (``run.cuda_aware: false``
    overrides if they do not).
    """
    code, out, err = run_child([sys.executable, "-c", _PROBE, str(device)], timeout, env)
    return read_probe(code, out, err, timeout)


def agree_cuda_aware(probes: list) -> Probe:
    """Return the job's answer from every rank's probe (None: that rank did not probe).

    CUDA-aware only if at least one rank probed and every probe said yes: one node that
    cannot take device buffers would crash or corrupt every exchange with it, so then all
    ranks stage.
    """
    ran = [(rank, p) for rank, p in enumerate(probes) if p is not None]
    if not ran:
        return Probe(False, "no rank probed")
    for rank, p in ran:
        if not p.aware:
            return Probe(False, f"rank {rank}: {p.detail}")
    return Probe(True, f"probed on {len(ran)} node(s)")


def decide_cuda_aware(transport, setting, device: str) -> tuple[bool | None, str | None]:
    """Decide, on every rank together, whether MPI takes device buffers (``run.cuda_aware``).

    Call it before any rank touches its GPU (a device in exclusive-process mode takes one
    context only, and the probe's child needs it). With ``auto`` the first rank of every node
    probes its own GPU and the ranks agree (:func:`agree_cuda_aware`); ``True``/``False`` are
    taken as given. Collective over ``transport`` when ``setting`` is ``auto`` and ``device``
    is not ``cpu``.

    Returns:
        The value for ``Transport.cuda_aware`` (None when arrays live in host memory) and a
        line for rank 0 to print (a ``warning:`` when the setting is pointless), or None.
    """
    on_gpu = device != "cpu" and cupy_or_none() is not None
    if setting in (True, False):
        return _as_given(setting, on_gpu, device)
    if device == "cpu":
        return None, None
    node = transport.split_shared()
    leader = node.rank == 0
    node.free()
    mine = probe_cuda_aware(device_index(gpu_count())) if leader and on_gpu else None
    result = agree_cuda_aware(_allgather_patiently(transport, mine))
    if not on_gpu:
        return None, None
    return result.aware, _aware_line(result.aware, result.detail)


def _aware_line(aware: bool, why: str) -> str:
    staged = "" if aware else "; device buffers are staged through host memory"
    return f"CUDA-aware MPI: {'yes' if aware else 'no'} ({why}){staged}"


def _as_given(setting: bool, on_gpu: bool, device: str) -> tuple[bool | None, str | None]:
    """Take ``run.cuda_aware: true|false`` as given; warn when true cannot matter."""
    if on_gpu:
        return setting, _aware_line(setting, f"run.cuda_aware: {str(setting).lower()}, "
                                             "not probed")
    if setting:
        where = "run.device is cpu" if device == "cpu" else "no CUDA device is visible"
        return None, (f"warning: run.cuda_aware: true has no effect: {where}, arrays live in "
                      "host memory")
    return None, None


def _allgather_patiently(transport, obj) -> list:
    """Gather ``obj`` from every rank, waiting at least as long as a probe may take."""
    saved = transport.timeout
    transport.timeout = max(saved, PROBE_TIMEOUT_S + 60.0)
    try:
        return transport.allgather_obj(obj)
    finally:
        transport.timeout = saved
