"""The transport: the one owner of the communicator, the tags and the byte counts.

Every message of mpiopt goes through a :class:`Transport`. It wraps a duplicated
communicator, names each kind of traffic with a :class:`Channel` (also its MPI tag), counts the
bytes each channel sends and receives and the seconds spent inside MPI, and makes GPU buffers
safe: before any MPI call the current stream of the buffer's device is synchronised (see
:func:`mpiopt.backend.synchronize` for that contract) and, unless MPI is known to be
CUDA-aware, device buffers are staged through leased host arrays
(:class:`mpiopt.backend.StagingPool`).

Blocking collectives run at full speed; a watchdog thread enforces their deadline and ends the
job with a message naming the operation, the peer, the channel and the step. Nonblocking
operations return a :class:`Handle` whose ``wait`` (and ``cancel``) polls with backoff until
its deadline and then raises :class:`CommTimeout`; :func:`wait_any` and :func:`test_some` do
the same over many handles, and a :class:`RequestSet` over persistent operations that are
started again for every message (a parameter server's receives from its workers).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import dataclass

import numpy as np
from mpi4py import MPI

from mpiopt import backend
from mpiopt.comm.handles import (  # noqa: F401  (re-exported: the transport's API)
    SPIN_S,
    Channel,
    CommTimeout,
    Handle,
    RequestSet,
    _backoff,
    _copy_back,
    _Receive,
    test_some,
    wait_all,
    wait_any,
)

DEFAULT_TIMEOUT_S = 300.0


@dataclass(slots=True)
class ChannelStats:
    """Counters of one channel: bytes by direction and seconds inside MPI."""

    sent: int = 0
    recv: int = 0
    seconds: float = 0.0


class Totals:
    """Running totals over every channel: bytes (EVAL's left out) and seconds inside MPI.

    Kept beside the per-channel counters so that the step loop reads three attributes at
    the start and the end of every step instead of summing channels or calling methods.
    """

    __slots__ = ("sent", "recv", "seconds")

    def __init__(self):
        self.clear()

    def clear(self) -> None:
        """Zero the totals."""
        self.sent = self.recv = 0
        self.seconds = 0.0


def _nbytes(buf) -> int:
    return int(buf.nbytes) if buf is not None else 0


def _is_device(buf) -> bool:
    return type(buf).__module__.startswith("cupy")


class _Watchdog:
    """End the job when a blocking MPI call outlives its deadline.

    How depends on the thread level MPI was initialised at (``multiple``: whether this
    thread may call MPI while the main thread is blocked inside it). At ``multiple`` it calls
    ``MPI_Abort``, which every launcher honours. Below, a second thread calling MPI is
    erroneous, and the main thread cannot be made to act (it sits inside the blocked call, and
    Python runs signal handlers only between bytecodes), so the watchdog ends this process
    alone with ``os._exit(3)`` and leaves the rest to the launcher: Hydra (the mpich wheel's
    ``mpiexec``) kills every other rank when one exits abnormally; measured here at 2, 3 and 5
    ranks under ``serialized``, the whole job was gone within 30 ms of the exit, whether the
    other ranks were sleeping or blocked in MPI. Under Slurm the same takes ``srun
    --kill-on-bad-exit=1`` (or ``KillOnBadExit``); without it a rank that is not itself stuck
    in a watched call keeps running. Run at ``multiple`` (mpi4py's default) to abort anywhere.
    """

    def __init__(self, rank: int, thread_level: int = MPI.THREAD_MULTIPLE):
        self.rank = rank
        self.can_abort = thread_level >= MPI.THREAD_MULTIPLE
        self.current: tuple | None = None
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the watching thread (once, at the first watched call).

        A call is watched by setting :attr:`current` to ``(deadline, what, peer, channel,
        step, limit)`` (``deadline`` in ``perf_counter`` time) and back to None after it;
        :meth:`Transport._call` does that inline, as a method call would cost more than the
        rest of the arming.
        """
        self.thread = threading.Thread(target=self._watch, daemon=True, name="mpiopt-watchdog")
        self.thread.start()

    def _watch(self) -> None:
        while True:
            time.sleep(0.25)
            current = self.current
            if current is not None and time.perf_counter() > current[0]:
                self._fire(*current[1:])

    def _fire(self, what: str, peer, channel, step: int, limit: float) -> None:
        how = ("aborting the job" if self.can_abort else
               "exiting (thread level below multiple: the launcher ends the other ranks)")
        sys.stderr.write(f"mpiopt: rank {self.rank}: {what} timed out after {limit:g} s "
                         f"(peer {peer}, tag {channel.name}, step {step}); {how}\n")
        sys.stdout.flush()
        sys.stderr.flush()
        time.sleep(0.5)  # let the launcher forward the line before the job is torn down
        if self.can_abort:
            MPI.COMM_WORLD.Abort(3)
        os._exit(3)


class Transport:
    """Duplicated communicator with channels, byte accounting, deadlines and GPU staging.

    Args:
        comm: the communicator to duplicate (default ``COMM_WORLD``).
        timeout: deadline in seconds of any single wait.
        cuda_aware: whether MPI takes device buffers directly, as decided for the whole job
            (:func:`mpiopt.backend.decide_cuda_aware`; the runner does it from
            ``run.cuda_aware``). ``None`` (undecided) stages device buffers through host
            memory, which is always correct: the transport never probes by itself, because a
            probe inside the first collective would run on some ranks only, lazily, while
            their peers wait.
    """

    def __init__(self, comm=None, timeout: float = DEFAULT_TIMEOUT_S,
                 cuda_aware: bool | None = None, _dup: bool = True):
        base = MPI.COMM_WORLD if comm is None else comm
        self.comm = base.Dup() if _dup else base
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        self.timeout = float(timeout)
        self.cuda_aware = cuda_aware
        self.step = -1
        self._parent: Transport | None = None  # a split's parent, charged with its traffic
        self.totals = Totals()
        self.reset_stats()
        self._watchdog = _Watchdog(MPI.COMM_WORLD.Get_rank(), MPI.Query_thread())
        self.staging = backend.StagingPool()

    # ----------------------------------------------------------------- accounting

    def _charge(self, channel: Channel, sent: int, recv: int, seconds: float) -> None:
        s = self._slots[channel]
        s.sent += sent
        s.recv += recv
        s.seconds += seconds
        # Running totals: the step loop reads them twice a step, summing channels would cost
        # tens of microseconds.
        totals = self.totals
        totals.seconds += seconds
        if channel is not _EVAL:
            totals.sent += sent
            totals.recv += recv
        if self._parent is not None:  # a sub-communicator's traffic is the run's traffic too
            self._parent._charge(channel, sent, recv, seconds)

    def _charge_sent(self, channel: Channel, nbytes: int) -> None:
        """:meth:`_charge` of a send just started (per message: the shorter path)."""
        self._slots[channel].sent += nbytes
        if channel is not _EVAL:
            self.totals.sent += nbytes
        if self._parent is not None:
            self._parent._charge_sent(channel, nbytes)

    def _charge_received(self, channel: Channel, nbytes: int, seconds: float) -> None:
        """:meth:`_charge` of a receive just completed after ``seconds`` of waiting."""
        s, totals = self._slots[channel], self.totals
        s.recv += nbytes
        s.seconds += seconds
        totals.seconds += seconds
        if channel is not _EVAL:
            totals.recv += nbytes
        if self._parent is not None:
            self._parent._charge_received(channel, nbytes, seconds)

    def charge_time(self, channel: Channel, seconds: float) -> None:
        """Count ``seconds`` of communication that no call of the transport timed.

        For exchanges done by loads and stores (a peer's window in shared memory): the step
        log then counts them as communication, not computation.
        """
        self._charge(channel, 0, 0, seconds)

    def bytes_sent(self) -> int:
        """Return the bytes the algorithm sent so far (every channel but EVAL)."""
        return self.totals.sent

    def bytes_recv(self) -> int:
        """Return the bytes the algorithm received so far (every channel but EVAL)."""
        return self.totals.recv

    def comm_seconds(self) -> float:
        """Return the seconds spent inside MPI calls so far."""
        return self.totals.seconds

    def reset_stats(self) -> None:
        """Zero every channel's counters."""
        # A list indexed by tag on the hot path (hashing an enum member runs Python code);
        # ``stats`` maps each Channel to the same objects for readers.
        self._slots = [ChannelStats() for _ in range(max(Channel) + 1)]
        self.stats = {c: self._slots[c] for c in Channel}
        self.totals.clear()  # in place: readers may hold the object

    # ----------------------------------------------------------------- GPU safety

    def _host(self, buf, fill: bool = True):
        """Return an MPI-safe stand-in for ``buf``: itself, or a leased host array.

        A device buffer's stream is synchronised first. Unless MPI is CUDA-aware, a host array
        is leased from :attr:`staging`, filled with ``buf``'s data if ``fill`` (a buffer that
        is only received into needs no copy); :meth:`_back` (or the handle of a nonblocking
        operation) returns it once MPI is done with it.
        """
        if buf is None or not _is_device(buf):
            return buf
        backend.synchronize(buf)
        if self.cuda_aware:
            return buf
        host = self.staging.acquire(buf.shape, buf.dtype)
        if fill:
            buf.get(out=host)
        return host

    def _back(self, buf, host, copy: bool = True) -> None:
        """Copy a staged host result back into ``buf`` (if ``copy``) and release the lease."""
        if host is buf or host is None:
            return
        if copy:
            _copy_back(buf, host)
        self.staging.release(host)

    def release_staging(self) -> None:
        """Drop the free host staging arrays (leases in flight stay valid)."""
        self.staging.clear()

    def _call(self, what: str, peer, channel: Channel, sent: int, recv: int, fn, *args,
              **kwargs):
        """Run one blocking MPI call under the watchdog's deadline and charge its channel."""
        dog, limit = self._watchdog, self.timeout
        t0 = time.perf_counter()
        dog.current = (t0 + limit, what, peer, channel, self.step, limit)
        if dog.thread is None:
            dog.start()
        try:
            return fn(*args, **kwargs)
        finally:
            dog.current = None
            self._charge(channel, sent, recv, time.perf_counter() - t0)

    # ----------------------------------------------------------------- collectives

    def allreduce(self, buf, channel: Channel = Channel.GRADIENT, op: str = "sum"):
        """Reduce ``buf`` over all ranks in place and return it.

        Bytes are counted as a bandwidth-optimal ring (reduce-scatter plus allgather) moves
        them: ``2 (n-1)/n`` times the buffer, each way.
        """
        n = self.size
        moved = int(2 * (n - 1) * buf.nbytes / n)
        host = buf if type(buf) is np.ndarray else self._host(buf)  # the common case first
        self._call("allreduce", "all", channel, moved, moved, self.comm.Allreduce, MPI.IN_PLACE,
                   host, _OPS[op])
        if host is not buf:
            self._back(buf, host)
        return buf

    def bcast(self, buf, root: int = 0, channel: Channel = Channel.MODEL):
        """Broadcast ``buf`` from ``root`` in place; the root counts the buffer once sent."""
        nb = _nbytes(buf)
        is_root = self.rank == root
        sent, recv = (nb, 0) if is_root else (0, nb)
        host = self._host(buf, fill=is_root)
        self._call("bcast", f"root {root}", channel, sent if self.size > 1 else 0, recv,
                   self.comm.Bcast, host, root=root)
        self._back(buf, host, copy=not is_root)
        return buf

    def allgather(self, sendbuf, recvbuf, channel: Channel = Channel.MODEL):
        """Gather every rank's ``sendbuf`` into ``recvbuf`` (rank-major) on all ranks."""
        nb = _nbytes(sendbuf) * (self.size - 1)
        s, r = self._host(sendbuf), self._host(recvbuf, fill=False)
        self._call("allgather", "all", channel, nb, nb, self.comm.Allgather, s, r)
        self._back(sendbuf, s, copy=False)
        self._back(recvbuf, r)
        return recvbuf

    def alltoall(self, sendbuf, recvbuf, channel: Channel = Channel.VOTE):
        """Send block ``j`` of ``sendbuf`` to rank ``j``; receive rank ``i``'s into block i."""
        nb = _nbytes(sendbuf) * (self.size - 1) // max(self.size, 1)
        s, r = self._host(sendbuf), self._host(recvbuf, fill=False)
        self._call("alltoall", "all", channel, nb, nb, self.comm.Alltoall, s, r)
        self._back(sendbuf, s, copy=False)
        self._back(recvbuf, r)
        return recvbuf

    def gather(self, sendbuf, recvbuf, root: int = 0, channel: Channel = Channel.GRADIENT):
        """Gather ``sendbuf`` of every rank into ``recvbuf`` at ``root``."""
        nb = _nbytes(sendbuf)
        root_recv = nb * (self.size - 1) if self.rank == root else 0
        sent = 0 if self.rank == root else nb
        s = self._host(sendbuf)
        r = self._host(recvbuf, fill=False) if self.rank == root else None
        self._call("gather", f"root {root}", channel, sent, root_recv, self.comm.Gather, s, r,
                   root=root)
        self._back(sendbuf, s, copy=False)
        if self.rank == root:
            self._back(recvbuf, r)
        return recvbuf

    def barrier(self, channel: Channel = Channel.CONTROL) -> None:
        """Wait for every rank (under the deadline)."""
        self._call("barrier", "all", channel, 0, 0, self.comm.Barrier)

    def allreduce_scalar(self, value: float, op: str = "sum",
                         channel: Channel = Channel.CONTROL) -> float:
        """Reduce one float over all ranks."""
        buf = np.array([value], dtype=np.float64)
        self.allreduce(buf, channel=channel, op=op)
        return float(buf[0])

    def allgather_obj(self, obj, channel: Channel = Channel.CONTROL) -> list:
        """Gather a small picklable object from every rank (control traffic)."""
        return self._call("allgather_obj", "all", channel, 0, 0, self.comm.allgather, obj)

    def bcast_obj(self, obj, root: int = 0, channel: Channel = Channel.CONTROL):
        """Broadcast a small picklable object from ``root`` (control traffic)."""
        return self._call("bcast_obj", f"root {root}", channel, 0, 0, self.comm.bcast, obj,
                          root=root)

    # ----------------------------------------------------------------- nonblocking

    def _start(self, what: str, peer, channel: Channel, sent: int, recv: int, post,
               recvbuf=None, host=None, sendbuf=None, send_host=None) -> Handle:
        """Post a nonblocking collective, charge its bytes and return its handle.

        ``host`` and ``send_host`` are the staged stand-ins of ``recvbuf`` and ``sendbuf``:
        the handle copies the first back on completion and releases both.
        """
        t0 = time.perf_counter()
        req = post()
        self._charge(channel, sent, recv, time.perf_counter() - t0)
        return Handle(self, req, what, peer, channel,
                      finish=None if recvbuf is None else lambda: _copy_back(recvbuf, host),
                      release=self._releaser((sendbuf, send_host), (recvbuf, host)))

    def _releaser(self, *pairs):
        """Return a callback releasing the leases of ``(buffer, stand-in)`` pairs, or None."""
        leases = [h for b, h in pairs if h is not b and h is not None]
        if not leases:
            return None
        if len(leases) == 2 and leases[0] is leases[1]:  # one in-place buffer (ibcast)
            leases.pop()

        def release():
            for h in leases:
                self.staging.release(h)
        return release

    def ibarrier(self, channel: Channel = Channel.CONTROL) -> Handle:
        """Start a barrier; waiting on its handle idles politely (polls with backoff)."""
        return self._start("barrier", "all", channel, 0, 0, self.comm.Ibarrier)

    def iallgather(self, sendbuf, recvbuf, channel: Channel = Channel.MODEL) -> Handle:
        """Start :meth:`allgather`; ``recvbuf`` is valid once the handle completes."""
        nb = _nbytes(sendbuf) * (self.size - 1)
        s, r = self._host(sendbuf), self._host(recvbuf, fill=False)
        return self._start("allgather", "all", channel, nb, nb,
                           lambda: self.comm.Iallgather(s, r), recvbuf, r, sendbuf, s)

    def ialltoall(self, sendbuf, recvbuf, channel: Channel = Channel.VOTE) -> Handle:
        """Start :meth:`alltoall`; ``recvbuf`` is valid once the handle completes."""
        nb = _nbytes(sendbuf) * (self.size - 1) // max(self.size, 1)
        s, r = self._host(sendbuf), self._host(recvbuf, fill=False)
        return self._start("alltoall", "all", channel, nb, nb,
                           lambda: self.comm.Ialltoall(s, r), recvbuf, r, sendbuf, s)

    def igather(self, sendbuf, recvbuf, root: int = 0,
                channel: Channel = Channel.GRADIENT) -> Handle:
        """Start :meth:`gather`; the root's ``recvbuf`` is valid once the handle completes."""
        nb = _nbytes(sendbuf)
        is_root = self.rank == root
        s = self._host(sendbuf)
        r = self._host(recvbuf, fill=False) if is_root else None
        return self._start("gather", f"root {root}", channel, 0 if is_root else nb,
                           nb * (self.size - 1) if is_root else 0,
                           lambda: self.comm.Igather(s, r, root=root),
                           recvbuf if is_root else None, r, sendbuf, s)

    def iallreduce(self, buf, channel: Channel = Channel.GRADIENT, op: str = "sum") -> Handle:
        """Start :meth:`allreduce` (in place, counted the same); ``buf`` is valid on completion."""
        n = self.size
        moved = int(2 * (n - 1) * _nbytes(buf) / n)
        host = self._host(buf)
        return self._start("allreduce", "all", channel, moved, moved,
                           lambda: self.comm.Iallreduce(MPI.IN_PLACE, host, op=_OPS[op]),
                           buf, host, buf, host)

    def ibcast(self, buf, root: int = 0, channel: Channel = Channel.MODEL) -> Handle:
        """Start :meth:`bcast`; ``buf`` is valid everywhere once the handle completes."""
        nb = _nbytes(buf)
        is_root = self.rank == root
        sent, recv = (nb if self.size > 1 else 0, 0) if is_root else (0, nb)
        host = self._host(buf, fill=is_root)
        return self._start("bcast", f"root {root}", channel, sent, recv,
                           lambda: self.comm.Ibcast(host, root=root),
                           None if is_root else buf, host, buf, host)

    # ----------------------------------------------------------------- point to point

    def isend(self, buf, dest: int, channel: Channel) -> Handle:
        """Start sending ``buf`` to ``dest`` on ``channel``; return its handle."""
        host = self._host(buf)
        req = self.comm.Isend(host, dest=dest, tag=int(channel))
        h = Handle(self, req, "send", dest, channel, release=self._releaser((buf, host)))
        h._sent = _nbytes(buf)
        self._charge(channel, h._sent, 0, 0.0)
        return h

    def irecv(self, buf, source: int | None, channel: Channel | None) -> Handle:
        """Start receiving into ``buf``; return its handle.

        ``source`` None receives from any rank and ``channel`` None on any channel; once the
        handle is done, ``source``, ``channel`` and ``nbytes`` tell what arrived (a message
        may be shorter than ``buf``). Bytes are counted on completion.
        """
        host = self._host(buf, fill=False)
        req = self.comm.Irecv(host, source=MPI.ANY_SOURCE if source is None else source,
                              tag=MPI.ANY_TAG if channel is None else int(channel))
        return _Receive(self, req, buf, host, source, channel)

    def requests(self) -> RequestSet:
        """Return an empty set of persistent operations on this transport (host buffers)."""
        return RequestSet(self)

    def sendrecv(self, sendbuf, dest: int, recvbuf, source: int, channel: Channel) -> None:
        """Exchange buffers with two peers (possibly the same) under the deadline."""
        handles = [self.irecv(recvbuf, source, channel), self.isend(sendbuf, dest, channel)]
        wait_all(handles)

    # ----------------------------------------------------------------- structure

    def split(self, color: int | None, key: int | None = None) -> Transport | None:
        """Return a transport over the ranks of the same ``color``, ordered by ``key``.

        Collective over this transport. A rank passing ``color=None`` joins no group (a
        parameter server left out of its workers' communicator) and gets None. The new
        transport's bytes and seconds are also counted on this one.
        """
        mpi_color = MPI.UNDEFINED if color is None else int(color)
        sub = self._call("split", "all", Channel.CONTROL, 0, 0, self.comm.Split, mpi_color,
                         self.rank if key is None else key)
        if sub == MPI.COMM_NULL:
            return None
        return self._child(sub)

    def _child(self, comm) -> Transport:
        """A transport over ``comm`` whose counts also go to this one's."""
        child = Transport(comm, self.timeout, self.cuda_aware, _dup=False)
        child._parent = self
        return child

    def split_shared(self) -> Transport:
        """Return a transport over the ranks that share this node's memory."""
        sub = self.comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        return self._child(sub)

    def free(self) -> None:
        """Release the duplicated communicator and the free host staging arrays."""
        self.release_staging()
        if self.comm != MPI.COMM_NULL and self.comm != MPI.COMM_WORLD:
            self.comm.Free()


_EVAL = Channel.EVAL  # a module global: an enum member is slower to look up on its class

_OPS = {"sum": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN, "prod": MPI.PROD,
        "lor": MPI.LOR, "land": MPI.LAND, "bor": MPI.BOR}


def raw_allreduce(transport: Transport, buf) -> None:
    """Sum ``buf`` in place with a bare mpi4py ``Allreduce`` (the benchmarks' reference)."""
    transport.comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)


def self_transport(timeout: float = DEFAULT_TIMEOUT_S) -> Transport:
    """Return a transport over this process alone (``COMM_SELF``)."""
    return Transport(MPI.COMM_SELF, timeout)


def world_rank() -> int:
    """Return the rank of this process in COMM_WORLD."""
    return MPI.COMM_WORLD.Get_rank()


def world_size() -> int:
    """Return the number of processes in COMM_WORLD."""
    return MPI.COMM_WORLD.Get_size()


def abort(code: int = 1) -> None:
    """Abort every rank of the job (used when one rank fails)."""
    sys.stdout.flush()
    sys.stderr.flush()
    MPI.COMM_WORLD.Abort(code)


def async_progress_enabled() -> bool:
    """True if MPICH runs its own progress thread (``MPIR_CVAR_ASYNC_PROGRESS=1``)."""
    return os.environ.get("MPIR_CVAR_ASYNC_PROGRESS", "0") == "1"


def mpi_info() -> dict:
    """Return facts about the MPI library: name, version, thread level, world size."""
    levels = {MPI.THREAD_SINGLE: "single", MPI.THREAD_FUNNELED: "funneled",
              MPI.THREAD_SERIALIZED: "serialized", MPI.THREAD_MULTIPLE: "multiple"}
    return {
        "library": MPI.Get_library_version().strip().splitlines()[0],
        "standard": "{}.{}".format(*MPI.Get_version()),
        "thread_level": levels.get(MPI.Query_thread(), str(MPI.Query_thread())),
        "world_size": MPI.COMM_WORLD.Get_size(),
        "processor": MPI.Get_processor_name(),
        "async_progress": async_progress_enabled(),
    }
