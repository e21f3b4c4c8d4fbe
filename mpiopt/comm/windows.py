"""One-sided windows: RMA windows over ``Win.Allocate`` and node-local shared memory.

MPICH progresses passive-target RMA only while the target rank is inside MPI: a ``Get`` from a
rank that computes without calling MPI waits for it. Asynchronous algorithms therefore either
read node-local peers directly (:class:`SharedWindow`, or :meth:`Window.shared_view` of an
RMA window: plain loads from shared memory, no progress needed), or run a
:class:`ProgressThread` (a helper thread that enters MPI every millisecond), or run with MPICH's
asynchronous progress (``MPIR_CVAR_ASYNC_PROGRESS=1``), or call :meth:`Window.progress` from
their loops.
"""

from __future__ import annotations

import contextlib
import threading
import time

import numpy as np
from mpi4py import MPI

from mpiopt.comm.transport import Channel, CommTimeout, Transport

_LOCKS = {"exclusive": MPI.LOCK_EXCLUSIVE, "shared": MPI.LOCK_SHARED}
_OPS = {"sum": MPI.SUM, "replace": MPI.REPLACE, "max": MPI.MAX, "min": MPI.MIN}


def _sync(win) -> None:
    """Run ``Win.Sync`` inside the passive-target epoch it requires."""
    win.Lock_all(MPI.MODE_NOCHECK)
    win.Sync()
    win.Unlock_all()


class Window:
    """An RMA window of ``count`` elements of ``dtype`` on every rank of a transport.

    Args:
        transport: the transport whose communicator the window spans.
        count: elements exposed by each rank.
        dtype: element type (numpy dtype).
        channel: the channel that RMA bytes are counted on.
    """

    def __init__(self, transport: Transport, count: int, dtype=np.float32,
                 channel: Channel = Channel.MODEL):
        self.transport = transport
        self.dtype = np.dtype(dtype)
        self.count = int(count)
        self.channel = channel
        self.win = MPI.Win.Allocate(max(self.count, 1) * self.dtype.itemsize,
                                    self.dtype.itemsize, comm=transport.comm)
        self.local = np.frombuffer(self.win.tomemory(), dtype=self.dtype)[: self.count]
        self.local[:] = 0
        self._mpi_type = MPI._typedict[self.dtype.char]
        self._views: dict = {}
        transport.barrier()

    def shared_view(self, rank: int) -> np.ndarray | None:
        """Return ``rank``'s window memory as an array if this rank can load it directly.

        Ranks of one node share the memory of a ``Win.Allocate`` window in MPICH (MPI 4's
        ``Win.Shared_query``); reading it is then a plain copy that needs nothing from the
        target. Returns None for a peer on another node (use :meth:`get`).
        """
        if rank in self._views:
            return self._views[rank]
        view = None
        try:
            mem, _ = self.win.Shared_query(rank)
            arr = np.frombuffer(mem, dtype=self.dtype) if mem is not None else None
            if arr is not None and arr.size >= self.count:
                view = arr[: self.count]
        except (MPI.Exception, ValueError, TypeError):
            view = None
        self._views[rank] = view
        return view

    @contextlib.contextmanager
    def locked(self, rank: int, mode: str = "shared"):
        """Hold a passive-target lock on ``rank``'s window (``shared`` or ``exclusive``)."""
        t0 = time.perf_counter()
        self.win.Lock(rank, _LOCKS[mode])
        try:
            yield self
        finally:
            self.win.Unlock(rank)
            self.transport._charge(self.channel, 0, 0, time.perf_counter() - t0)

    # One-sided traffic is charged to the origin, the only rank that knows of it, in both
    # columns: what crosses the network at its request counts as sent and as received, so that
    # totals over ranks agree with two-sided traffic. Traffic to oneself is free.

    def charge(self, rank: int, nbytes: int, channel: Channel | None = None) -> None:
        """Count ``nbytes`` moved from or to ``rank`` (also by direct loads or stores)."""
        if rank != self.transport.rank:
            self.transport._charge(self.channel if channel is None else channel, nbytes,
                                   nbytes, 0.0)

    def get(self, out: np.ndarray, rank: int, offset: int = 0,
            channel: Channel | None = None) -> np.ndarray:
        """Read ``out.size`` elements of ``rank``'s window from ``offset`` (inside a lock).

        ``channel`` overrides the window's channel for this read's byte count (EVAL reads).
        """
        self.win.Get(out, rank, target=(offset, out.size, self._mpi_type))
        self.charge(rank, out.nbytes, channel)
        return out

    def put(self, buf: np.ndarray, rank: int, offset: int = 0) -> None:
        """Write ``buf`` into ``rank``'s window at ``offset`` (inside a lock)."""
        self.win.Put(buf, rank, target=(offset, buf.size, self._mpi_type))
        self.charge(rank, buf.nbytes)

    def accumulate(self, buf: np.ndarray, rank: int, offset: int = 0, op: str = "sum") -> None:
        """Combine ``buf`` into ``rank``'s window element-wise with ``op`` (atomic per element)."""
        self.win.Accumulate(buf, rank, target=(offset, buf.size, self._mpi_type), op=_OPS[op])
        self.charge(rank, buf.nbytes)

    def swap(self, buf: np.ndarray, out: np.ndarray, rank: int, offset: int = 0) -> np.ndarray:
        """Atomically (per element) replace ``rank``'s elements by ``buf``; old values to ``out``.

        Element-wise atomic with respect to concurrent :meth:`accumulate` calls, so that a rank
        can drain what others accumulate into it without losing an update.
        """
        self.win.Get_accumulate(buf, out, rank, target=(offset, buf.size, self._mpi_type),
                                op=MPI.REPLACE)
        self.charge(rank, buf.nbytes)
        return out

    def open_epoch(self) -> None:
        """Open a passive-target epoch on every rank for the life of the window.

        Uses ``MPI_MODE_NOCHECK``: no lock is taken, so an operation never waits for the
        target to make MPI progress (within a node, MPICH then reads and writes the target's
        memory directly); consistency is the caller's business (e.g. a version counter).
        Complete operations with :meth:`flush`.
        """
        self.win.Lock_all(MPI.MODE_NOCHECK)
        self._epoch = True

    def close_epoch(self) -> None:
        """Close the epoch of :meth:`open_epoch` (completes every outstanding operation)."""
        if getattr(self, "_epoch", False):
            self.win.Unlock_all()
            self._epoch = False

    def sync_local(self) -> None:
        """Order this rank's loads and stores to its own window memory (inside an epoch)."""
        self.win.Sync()

    def fetch_and_add(self, value, rank: int, offset: int = 0):
        """Atomically add ``value`` to one element of ``rank``'s window; return the old value."""
        origin = np.array([value], dtype=self.dtype)
        result = np.empty(1, dtype=self.dtype)
        self.win.Fetch_and_op(origin, result, rank, offset * 1, op=MPI.SUM)
        return result[0]

    def flush(self, rank: int) -> None:
        """Complete every RMA operation issued to ``rank`` in the current lock epoch."""
        self.win.Flush(rank)

    def sync(self) -> None:
        """Synchronise the public and private copies of the window memory (a memory barrier)."""
        _sync(self.win)

    def progress(self) -> None:
        """Enter MPI briefly so that pending passive-target operations on us progress."""
        MPI.Request.Testall([])
        self.transport.comm.Iprobe(source=MPI.ANY_SOURCE, tag=MPI.ANY_TAG)

    def free(self) -> None:
        """Release the window (collective over the transport's ranks)."""
        if self.win != MPI.WIN_NULL:
            self.close_epoch()
            self.local = None
            self._views = {}
            self.win.Free()


class SharedWindow:
    """Node-local shared memory: every rank of a node sees every segment as a numpy array.

    Built with ``Win.Allocate_shared`` on the transport's node communicator (ranks that share
    memory). Reads and writes are plain loads and stores: no MPI progress is involved, which is
    what lock-free (Hogwild) updates and reads of a busy peer need.

    Args:
        transport: a transport over the ranks of one node (see ``Transport.split_shared``).
        count: elements of the segment this rank contributes (0 for none).
        dtype: element type.
    """

    def __init__(self, transport: Transport, count: int, dtype=np.float32):
        self.transport = transport
        self.dtype = np.dtype(dtype)
        self.win = MPI.Win.Allocate_shared(int(count) * self.dtype.itemsize,
                                           self.dtype.itemsize, comm=transport.comm)
        self.counts = transport.comm.allgather(int(count))
        self._views = [self._segment(r) for r in range(transport.size)]
        self.local = self._views[transport.rank]
        transport.barrier()

    def _segment(self, rank: int) -> np.ndarray:
        mem, itemsize = self.win.Shared_query(rank)
        arr = np.frombuffer(mem, dtype=self.dtype)
        return arr[: self.counts[rank]]

    def view(self, rank: int) -> np.ndarray:
        """Return the numpy array over ``rank``'s segment (shared memory, no copy)."""
        return self._views[rank]

    def fence(self) -> None:
        """Make stores visible to the other ranks of the node and wait for them."""
        _sync(self.win)
        self.transport.barrier()

    def free(self) -> None:
        """Release the shared memory (collective over the node's ranks)."""
        if self.win != MPI.WIN_NULL:
            self._views = []
            self.local = None
            self.win.Free()


class ProgressThread:
    """A helper thread that enters MPI every ``interval`` seconds.

    Passive-target operations that other ranks direct at this rank's windows (a ``Get`` of
    its published model, an ``Accumulate`` into its inbox) need this rank's MPI progress
    unless the hardware or shared memory does the transfer. While the main thread computes,
    the helper's ``Iprobe`` on a private communicator drives MPICH's progress engine, so a
    remote reader waits about ``interval`` (plus up to one interpreter switch interval, 5 ms,
    while the main thread runs Python code) instead of a whole computation. Needs the
    ``multiple`` thread level (mpi4py's default).

    Args:
        comm: a communicator private to this use (probing never matches a message on it).
        interval: seconds between two entries into MPI.
    """

    def __init__(self, comm, interval: float = 1e-3):
        self.comm = comm
        self.interval = float(interval)
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mpiopt-progress", daemon=True)

    @staticmethod
    def supported() -> bool:
        """True if MPI was initialised with the ``multiple`` thread level."""
        return MPI.Query_thread() == MPI.THREAD_MULTIPLE

    def start(self) -> ProgressThread:
        if not self.supported():
            raise RuntimeError("a progress thread needs MPI thread level 'multiple' (mpi4py's "
                               "default; check mpi4py.rc.thread_level)")
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            while not self._stop.wait(self.interval):
                self.comm.Iprobe(source=MPI.ANY_SOURCE, tag=MPI.ANY_TAG)
        except BaseException as exc:  # reported by stop() on the main thread
            self.error = exc

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the thread; raise if it failed or does not end within ``timeout``."""
        self._stop.set()
        if self._thread.ident is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise CommTimeout(f"the MPI progress thread did not stop within {timeout:g} s")
        if self.error is not None:
            raise RuntimeError(f"the MPI progress thread failed: {self.error}") from self.error


class RawReader:
    """Bare mpi4py ``Get`` + ``Flush`` of ``count`` float32 from a peer (a benchmark reference).

    Every rank exposes a window of ``count`` floats in one long ``Lock_all`` epoch; ``read``
    is the shortest one-sided read MPI offers, with none of :class:`Window`'s accounting.
    Collective: every rank of ``transport`` creates and frees it together.
    """

    def __init__(self, transport: Transport, count: int):
        self.win = MPI.Win.Allocate(4 * count, 4, comm=transport.comm)
        self.win.Lock_all(MPI.MODE_NOCHECK)
        self.buf = np.empty(count, np.float32)

    def read(self, peer: int) -> None:
        """Read the peer's window into ``self.buf`` and wait until the data has arrived."""
        self.win.Get(self.buf, peer)
        self.win.Flush(peer)

    def free(self) -> None:
        """Close the epoch and free the window (collective)."""
        self.win.Unlock_all()
        self.win.Free()
